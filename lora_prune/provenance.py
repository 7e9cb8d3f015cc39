"""The verification record a slim file carries in ``lora_prune.verification``.

One type writes and parses it, so ``verify``/``slim --auto`` (which write it) and
``check`` (which judges it) cannot drift apart. The record names the criterion
(the share of the LoRA's effect kept, see :mod:`lora_prune.verdict`), its
thresholds and the per-image shares.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

from .boundedjson import JsonLimitError, loads_bounded

VERIFICATION_KEY = "lora_prune.verification"
CRITERION = "kept_share"
FORMULA = "kept = 1 - d(slim, full) / d(base, full), per image and distance"

#: A record is a few hundred bytes per image; anything far larger is not ours.
_MAX_RECORD_BYTES = 1 << 20
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class VerificationRecord:
    passed: bool
    full_sha256: str
    criterion: str | None = CRITERION
    min_kept: float | None = None
    min_ssim: float | None = None
    worst_ssim: float | None = None
    #: smallest kept share over images, per distance
    worst_kept: dict[str, float] = field(default_factory=dict)
    distances: list[str] = field(default_factory=list)
    #: per image: {"prompt", "seed", "kept": {distance: share}}
    images: list[dict[str, Any]] = field(default_factory=list)
    model: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_metadata(self) -> str:
        """Compact JSON for the safetensors ``__metadata__``."""
        doc: dict[str, Any] = {
            "criterion": self.criterion,
            "formula": FORMULA,
            "distances": self.distances,
            "min_kept": self.min_kept,
            "min_ssim": self.min_ssim,
            "passed": self.passed,
            "full_sha256": self.full_sha256,
            "worst_ssim": None if self.worst_ssim is None else round(self.worst_ssim, 6),
            "worst_kept": {k: round(v, 6) for k, v in self.worst_kept.items()},
            "images": self.images,
            "model": self.model,
            **self.settings,
        }
        return json.dumps(doc, sort_keys=True)

    @property
    def kept_share(self) -> float | None:
        """The smallest kept share over images and distances."""
        return min(self.worst_kept.values()) if self.worst_kept else None

    @classmethod
    def parse(cls, raw: str) -> VerificationRecord | str:
        """The record, or why it cannot be used (a short phrase)."""
        try:
            doc = loads_bounded(raw, max_bytes=_MAX_RECORD_BYTES)
        except JsonLimitError as exc:
            return exc.reason
        if not isinstance(doc, dict):
            return "is not a JSON object"
        passed = doc.get("passed")
        full = doc.get("full_sha256")
        if not isinstance(passed, bool):
            return "has no true/false 'passed'"
        if not isinstance(full, str) or not _HEX64.fullmatch(full):
            return "has no 'full_sha256' hex digest"
        criterion = doc.get("criterion")
        worst_kept_raw = doc.get("worst_kept")
        worst_kept: dict[str, float] = {}
        if isinstance(worst_kept_raw, dict):
            for k, v in worst_kept_raw.items():
                value = _number(v)
                if isinstance(k, str) and value is not None:
                    worst_kept[k] = value
        images = doc.get("images")
        return cls(
            passed=passed,
            full_sha256=full,
            criterion=criterion if isinstance(criterion, str) else None,
            min_kept=_number(doc.get("min_kept")),
            min_ssim=_number(doc.get("min_ssim")),
            worst_ssim=_number(doc.get("worst_ssim")),
            worst_kept=worst_kept,
            images=[i for i in images if isinstance(i, dict)] if isinstance(images, list) else [],
        )


def _number(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            return None
        return number if math.isfinite(number) else None
    return None
