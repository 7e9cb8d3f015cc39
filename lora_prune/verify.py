"""Proving a slim LoRA: it must render like the full one.

:func:`check_subset` proves at the byte level that a slim file holds whole
blocks of the full file and nothing else. Because of that, rendering the full
LoRA with only the slim file's blocks switched on *is* rendering the slim file,
so :func:`verify_slim` and :func:`auto_keep` render per-image block masks on one
engine attached to the full LoRA (torch-free here: the renderer is passed in).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__
from .analysis import AnalyzeSettings, Renderer, settings_to_json, write_json
from .blocks import block_order, format_block_spec, sort_blocks
from .errors import UnsupportedLoraError, UsageError
from .lora import LoraFile
from .metrics import diff_map, mse, ssim
from .pictures import contact_sheet, heatmap_overlay, label_tile, save_png, side_by_side
from .safetensors_io import SafetensorsReader

VERIFICATION_KEY = "lora_prune.verification"


class NotASubsetError(UnsupportedLoraError):
    """The slim file is not made of whole blocks of the full file."""


def _digest(reader: SafetensorsReader, name: str) -> str:
    return hashlib.sha256(reader.read_bytes(name)).hexdigest()


def check_subset(full: LoraFile, slim: LoraFile) -> list[str]:
    """The slim file's blocks, after proving they are whole, identical blocks of ``full``.

    Raises :class:`NotASubsetError` naming the first key that differs, is
    missing from ``full``, or is missing from a block the slim file keeps.
    """
    full_tensors = full.header.tensors
    slim_tensors = slim.header.tensors
    for name, info in slim_tensors.items():
        other = full_tensors.get(name)
        if other is None:
            raise NotASubsetError(
                "the slim file has a key the full file lacks", f"{slim.path}: {name}",
                "give the full LoRA this file was slimmed from",
            )
        if (other.dtype, other.shape) != (info.dtype, info.shape):
            raise NotASubsetError(
                f"key differs in dtype/shape ({info.dtype}{list(info.shape)} vs "
                f"{other.dtype}{list(other.shape)})", f"{slim.path}: {name}",
                "give the full LoRA this file was slimmed from",
            )
    blocks = slim.blocks
    with SafetensorsReader(full.path, full.header) as fr, SafetensorsReader(slim.path, slim.header) as sr:
        for name in sorted(slim_tensors, key=lambda n: slim_tensors[n].begin):
            if _digest(fr, name) != _digest(sr, name):
                raise NotASubsetError(
                    "tensor values differ from the full file", f"{slim.path}: {name}",
                    "the slim file was not cut from this full file",
                )
    for key, block in full.key_blocks.items():
        if block in blocks and key not in slim_tensors:
            raise NotASubsetError(
                f"the slim file keeps block {block} but lacks its key", f"{slim.path}: {key}",
                "verify supports slims of whole blocks (as lora-prune slim writes)",
            )
    return blocks


@dataclass
class VerifyImage:
    prompt: int
    seed: int
    ssim: float
    mse: float
    #: MSE(base, full): how much the LoRA changes this image
    effect: float
    #: 1 - MSE(slim, full) / MSE(base, full); None when the LoRA changes nothing
    kept_share: float | None
    passed: bool


@dataclass
class VerifyResult:
    full: str
    slim: str | None
    full_sha256: str
    kept_blocks: list[str]
    min_ssim: float
    settings: dict[str, Any]
    model: str
    images: list[VerifyImage] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(i.passed for i in self.images)

    @property
    def worst_ssim(self) -> float:
        return min(i.ssim for i in self.images)

    @property
    def mean_ssim(self) -> float:
        return float(np.mean([i.ssim for i in self.images]))

    @property
    def kept_share(self) -> float | None:
        effect = sum(i.effect for i in self.images)
        return 1.0 - sum(i.mse for i in self.images) / effect if effect > 0 else None

    def to_json(self) -> dict[str, Any]:
        return {
            "tool": {"name": "lora-prune", "version": __version__},
            "full": self.full,
            "slim": self.slim,
            "full_sha256": self.full_sha256,
            "kept_blocks": format_block_spec(self.kept_blocks),
            "model": self.model,
            "settings": self.settings,
            "min_ssim": self.min_ssim,
            "passed": self.passed,
            "worst_ssim": self.worst_ssim,
            "mean_ssim": self.mean_ssim,
            "kept_share": self.kept_share,
            "images": [asdict(i) for i in self.images],
        }

    def metadata_value(self) -> str:
        """The compact JSON stored in a slim file's ``lora_prune.verification``."""
        return json.dumps({
            "full_sha256": self.full_sha256,
            "model": self.model,
            "prompts": list(self.settings["prompts"]),
            "seeds": list(self.settings["seeds"]),
            "size": [self.settings["width"], self.settings["height"]],
            "steps": self.settings["steps"],
            "min_ssim": self.min_ssim,
            "worst_ssim": round(self.worst_ssim, 6),
            "kept_share": None if self.kept_share is None else round(self.kept_share, 6),
            "passed": self.passed,
        }, sort_keys=True)


def _score(
    base: np.ndarray, full: np.ndarray, slim: np.ndarray, prompt: int, seed: int, min_ssim: float
) -> VerifyImage:
    s = ssim(slim, full)
    m = mse(slim, full)
    effect = mse(base, full)
    return VerifyImage(prompt, seed, s, m, effect, 1.0 - m / effect if effect > 0 else None, s >= min_ssim)


def _check_threshold(min_ssim: float) -> None:
    if not 0.0 <= min_ssim <= 1.0:
        raise UsageError(f"--min-ssim {min_ssim} is not in 0..1", "--min-ssim", "use e.g. 0.95")


def verify_slim(
    full: LoraFile,
    full_sha256: str,
    keep: Sequence[str],
    settings: AnalyzeSettings,
    renderer: Renderer,
    *,
    min_ssim: float = 0.95,
    slim_path: Path | None = None,
    out_dir: Path | None = None,
    scale: int = 1,
) -> VerifyResult:
    """Render base, full and the kept blocks for every prompt x seed and score them.

    With ``out_dir``, writes ``verify.png`` (rows of base | full | slim |
    heatmap of slim vs full) and ``verify.json``.
    """
    _check_threshold(min_ssim)
    kept = frozenset(keep)
    all_blocks = frozenset(full.blocks)
    result = VerifyResult(
        full=str(full.path), slim=str(slim_path) if slim_path else None, full_sha256=full_sha256,
        kept_blocks=sort_blocks(kept), min_ssim=min_ssim,
        settings=settings_to_json(settings),
        model=renderer.model_id,
    )
    rows = []
    for p, prompt in enumerate(settings.prompts):
        for seed in settings.seeds:
            base, full_img, slim_img = renderer([frozenset(), all_blocks, kept], prompt, seed, settings)
            score = _score(base, full_img, slim_img, p, seed, min_ssim)
            result.images.append(score)
            if out_dir is not None:
                d = diff_map(slim_img, full_img)
                verdict = "pass" if score.passed else "FAIL"
                rows.append(side_by_side([
                    label_tile(base, "no LoRA", bottom=f"prompt {p}, seed {seed}", scale=scale),
                    label_tile(full_img, "full", scale=scale),
                    label_tile(slim_img, "slim", top_right=f"SSIM {score.ssim:.4f}",
                               bottom=f"MSE {score.mse:.2f}", scale=scale),
                    label_tile(heatmap_overlay(slim_img, d, max(float(d.max()), 1.0), 0.75),
                               f"slim vs full: {verdict}", bottom=f"max diff {float(d.max()):.1f}",
                               scale=scale),
                ]))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_png(contact_sheet(rows, columns=1), out_dir / "verify.png")
        write_json(out_dir / "verify.json", result.to_json())
    return result


@dataclass
class AutoResult:
    blocks: list[str]
    order: list[str]
    tried: list[tuple[int, float]]  # (number of top blocks kept, worst SSIM)
    verification: VerifyResult


def auto_keep(
    full: LoraFile,
    full_sha256: str,
    order: Sequence[str],
    settings: AnalyzeSettings,
    renderer: Renderer,
    *,
    min_ssim: float = 0.95,
    batch_size: int = 8,
    progress: Callable[[int, int], None] | None = None,
) -> AutoResult:
    """The smallest keep set, in ranking order, that passes ``min_ssim`` on every image.

    Candidate sets are the top-k blocks of ``order`` for k = 1..n, rendered as
    per-image block masks in batches; the scan stops at the first passing k.
    """
    _check_threshold(min_ssim)
    order = [b for b in order if b in full.blocks]
    if not order:
        raise UsageError("the ranking names none of the LoRA's blocks", full.path,
                         "run analyze on this LoRA first")
    all_blocks = frozenset(full.blocks)
    refs: dict[tuple[int, int], tuple[np.ndarray, np.ndarray]] = {}
    for p, prompt in enumerate(settings.prompts):
        for seed in settings.seeds:
            base, full_img = renderer([frozenset(), all_blocks], prompt, seed, settings)
            refs[(p, seed)] = (base, full_img)
    tried: list[tuple[int, float]] = []
    # The scores of the chosen set are those of the very renders that chose it.
    scores: dict[int, list[VerifyImage]] = {}
    chosen = len(order)
    total = len(order)
    for start in range(1, len(order) + 1, batch_size):
        ks = list(range(start, min(start + batch_size, len(order) + 1)))
        for k in ks:
            scores[k] = []
        for p, prompt in enumerate(settings.prompts):
            for seed in settings.seeds:
                base, full_img = refs[(p, seed)]
                imgs = renderer([frozenset(order[:k]) for k in ks], prompt, seed, settings)
                for k, img in zip(ks, imgs, strict=True):
                    scores[k].append(_score(base, full_img, img, p, seed, min_ssim))
        worst = {k: min(i.ssim for i in scores[k]) for k in ks}
        tried.extend((k, worst[k]) for k in ks)
        if progress:
            progress(ks[-1], total)
        passing = [k for k in ks if worst[k] >= min_ssim]
        if passing:
            chosen = passing[0]
            break
    blocks = sorted(order[:chosen], key=block_order)
    result = VerifyResult(
        full=str(full.path), slim=None, full_sha256=full_sha256, kept_blocks=blocks,
        min_ssim=min_ssim,
        settings=settings_to_json(settings),
        model=renderer.model_id,
        images=scores[chosen],
    )
    return AutoResult(blocks, list(order), tried, result)
