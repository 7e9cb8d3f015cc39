"""Where a slim file came from, and the proof that it is part of its full file.

The one home of provenance: the metadata keys ``slim`` and ``resize`` write
(their own ``lora_prune.*`` keys and the trainers' file hashes they refresh), the
verification record in ``lora_prune.verification`` and the byte-level subset
proof. ``slim``, ``verify``/``slim --auto`` (which write) and ``check`` (which
judges) all use these, so they cannot drift apart. The record names the
criterion (the share of the LoRA's effect kept, see :mod:`lora_prune.verdict`),
its thresholds and the per-image shares.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .boundedjson import JsonLimitError, loads_bounded
from .errors import NotASubsetError
from .lora import LoraFile
from .safetensors_io import SafetensorsHeader, SafetensorsReader, TensorInfo

#: Every key lora-prune adds to a slim file's metadata starts with this.
PROVENANCE_PREFIX = "lora_prune."
VERIFICATION_KEY = PROVENANCE_PREFIX + "verification"
#: SHA-256 of the whole full file the slim was cut from
SOURCE_SHA_KEY = PROVENANCE_PREFIX + "source_sha256"
#: file name (no folder) of that full file
SOURCE_NAME_KEY = PROVENANCE_PREFIX + "source_name"
KEPT_BLOCKS_KEY = PROVENANCE_PREFIX + "kept_blocks"
DROPPED_BLOCKS_KEY = PROVENANCE_PREFIX + "dropped_blocks"
VERSION_KEY = PROVENANCE_PREFIX + "version"
#: ``resize``: JSON of its settings, the file it was resized from and each
#: changed module's ``[rank before, rank after]``. Not :data:`SOURCE_SHA_KEY`:
#: that marks a slim, whose tensors ``check`` proves part of the full file.
RESIZED_RANKS_KEY = PROVENANCE_PREFIX + "resized_ranks"

# File hashes trainers write; slim recomputes those present for its output.
#: kohya: SHA-256 of the data section
MODEL_HASH_KEY = "sshs_model_hash"
#: kohya's legacy hash: 8 hex digits of 64 KiB at 1 MiB into the file
LEGACY_HASH_KEY = "sshs_legacy_hash"
#: SAI model spec: "0x" + SHA-256 of the data section
MODELSPEC_HASH_KEY = "modelspec.hash_sha256"

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


def resized_source(metadata: Mapping[str, str]) -> str | None:
    """The SHA-256 of the file a ``resize`` output was made from; None for any other file.

    Such a file holds other tensors than its source by design: it is proved by
    rendering it (``verify``), not by the byte-level subset proof of a slim.
    """
    raw = metadata.get(RESIZED_RANKS_KEY)
    if raw is None:
        return None
    try:
        doc = loads_bounded(raw, max_bytes=_MAX_RECORD_BYTES)
    except JsonLimitError:
        return None
    source = doc.get("source_sha256") if isinstance(doc, dict) else None
    return source if isinstance(source, str) and _HEX64.fullmatch(source) else None


def _number(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            return None
        return number if math.isfinite(number) else None
    return None


# ---------------------------------------------------------------------------
# The subset proof

#: ``missing``: not in the full file; ``mismatch``: another dtype or shape there;
#: ``values``: other bytes there.
SubsetFault = Literal["missing", "mismatch", "values"]


@dataclass(frozen=True)
class SubsetDifference:
    """One tensor of a slim file that the full file does not hold byte for byte."""

    name: str
    fault: SubsetFault
    slim: TensorInfo
    full: TensorInfo | None


def _digest(reader: SafetensorsReader, name: str) -> bytes:
    # A digest per side keeps one tensor's bytes in memory at a time.
    return hashlib.sha256(reader.read_bytes(name)).digest()


def subset_differences(
    slim_path: Path,
    slim_header: SafetensorsHeader,
    full_path: Path,
    full_header: SafetensorsHeader,
    limit: int | None = None,
) -> list[SubsetDifference]:
    """The slim file's tensors that are not in the full file byte for byte (at most ``limit``).

    Names, dtypes and shapes are compared from the headers first, so a wrong
    pairing is found without reading data; then the bytes of the remaining
    tensors, in the slim file's order so reads stay sequential.
    """
    out: list[SubsetDifference] = []
    same: list[TensorInfo] = []
    for name, info in slim_header.tensors.items():
        other = full_header.tensors.get(name)
        if other is None:
            out.append(SubsetDifference(name, "missing", info, None))
        elif (other.dtype, other.shape) != (info.dtype, info.shape):
            out.append(SubsetDifference(name, "mismatch", info, other))
        else:
            same.append(info)
        if limit is not None and len(out) >= limit:
            return out
    if not same:
        return out
    with (
        SafetensorsReader(full_path, full_header) as full,
        SafetensorsReader(slim_path, slim_header) as slim,
    ):
        for info in sorted(same, key=lambda t: t.begin):
            if _digest(full, info.name) != _digest(slim, info.name):
                out.append(
                    SubsetDifference(info.name, "values", info, full_header.tensors[info.name])
                )
                if limit is not None and len(out) >= limit:
                    break
    return out


def check_subset(full: LoraFile, slim: LoraFile) -> list[str]:
    """The slim file's blocks, after proving they are whole, identical blocks of ``full``.

    Raises :class:`NotASubsetError` naming the first key that differs, is
    missing from ``full``, or is missing from a block the slim file keeps.
    """
    found = subset_differences(slim.path, slim.header, full.path, full.header, limit=1)
    if found:
        diff = found[0]
        where = f"{slim.path}: {diff.name}"
        if diff.full is None:
            raise NotASubsetError(
                "the slim file has a key the full file lacks",
                where,
                "give the full LoRA this file was slimmed from",
            )
        if diff.fault == "mismatch":
            info, other = diff.slim, diff.full
            raise NotASubsetError(
                f"key differs in dtype/shape ({info.dtype}{list(info.shape)} vs "
                f"{other.dtype}{list(other.shape)})",
                where,
                "give the full LoRA this file was slimmed from",
            )
        raise NotASubsetError(
            "tensor values differ from the full file",
            where,
            "the slim file was not cut from this full file",
        )
    blocks = slim.blocks
    for key, block in full.key_blocks.items():
        if block in blocks and key not in slim.header.tensors:
            raise NotASubsetError(
                f"the slim file keeps block {block} but lacks its key",
                f"{slim.path}: {key}",
                "verify supports slims of whole blocks (as lora-prune slim writes)",
            )
    return blocks
