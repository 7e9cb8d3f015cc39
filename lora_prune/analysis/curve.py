"""The pruning curve of a sweep: attach it to an analysis, store it beside the renders, read it back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..blocks import format_block_spec
from ..boundedjson import loads_bounded
from ..errors import UsageError
from ..fileio import read_limited, write_json
from ..lora import LoraFile
from ..provenance import CRITERION
from ..verdict import Criterion, CurvePoint
from .model import Analysis, Suggestion
from .outputs import write_results

CURVE_FILE = "pruning_curve.json"
#: One point per k (a few hundred bytes each); 16 MiB is far beyond any LoRA's block count.
CURVE_MAX_BYTES = 16 * 1024 * 1024
_CURVE_SETTINGS = ("prompts", "seeds", "width", "height", "steps", "guidance", "strength")


def set_curve(
    analysis: Analysis,
    curve: Sequence[CurvePoint],
    criterion: Criterion,
    *,
    lora: LoraFile | None = None,
) -> None:
    """Attach a pruning curve; the suggestion becomes the fewest blocks passing the verdict.

    The curve is stored beside the renders (``pruning_curve.json``) so that
    ``analyze --from`` keeps it.
    """
    attach_curve(analysis, curve, criterion, lora=lora)
    render = analysis.settings.to_json()
    doc = {
        "lora_sha256": analysis.settings.lora_sha256,
        "settings": {k: render[k] for k in (*_CURVE_SETTINGS, "images") if k in render},
        "min_kept": criterion.min_kept,
        "min_ssim": criterion.min_ssim,
        "points": [asdict(p) for p in curve],
    }
    write_json(analysis.out_dir / CURVE_FILE, doc)
    write_results(analysis)


def attach_curve(
    analysis: Analysis,
    curve: Sequence[CurvePoint],
    criterion: Criterion,
    *,
    lora: LoraFile | None = None,
) -> None:
    """Set ``analysis``'s curve; the suggestion becomes the fewest blocks that pass."""
    analysis.curve = list(curve)
    analysis.curve_criterion = criterion
    passing = [p for p in curve if p.passed and p.k > 0]
    if passing:
        best = passing[0]
        s = analysis.suggestion
        spec = format_block_spec(best.blocks)
        name = Path(analysis.settings.lora).name
        analysis.suggestion = Suggestion(
            mode=s.mode,
            coverage_target=s.coverage_target,
            coverage=s.coverage,
            blocks=list(best.blocks),
            spec=spec,
            bytes=best.bytes,
            bytes_before=lora.header.file_size if lora is not None else s.bytes_before,
            command=f"lora-prune slim {name} --keep {spec}",
            criterion=CRITERION,
            kept=dict(best.worst),
        )


def read_curve(
    out_dir: Path, manifest: Mapping[str, Any]
) -> tuple[list[CurvePoint], Criterion] | None:
    """A stored curve of the same LoRA and render settings, else None (never trusted blindly)."""
    path = out_dir / CURVE_FILE
    if not path.exists():
        return None
    try:
        doc = loads_bounded(read_limited(path, CURVE_MAX_BYTES), max_bytes=CURVE_MAX_BYTES)
        settings = manifest["settings"]
        stored = doc["settings"]
        # "images" is absent for text to image: compared both ways, an edit never reuses that.
        if doc["lora_sha256"] != manifest["lora"]["sha256"] or any(
            stored.get(k) != settings.get(k) for k in {*stored, "images"}
        ):
            return None
        points = [CurvePoint(**p) for p in doc["points"]]
        criterion = Criterion(
            min_kept=float(doc["min_kept"]),
            min_ssim=None if doc["min_ssim"] is None else float(doc["min_ssim"]),
        )
    except (OSError, ValueError, KeyError, TypeError, RecursionError, UsageError):
        return None
    return points, criterion
