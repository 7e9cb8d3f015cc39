"""The result of a sweep: the typed records that ``ranking.json`` is written from."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .._version import __version__
from ..blocks import block_order, format_block_spec
from ..families import FAMILIES, Family
from ..provenance import CRITERION, FORMULA
from ..recipes import recipes_for
from ..settings import AnalyzeSettings, settings_to_json
from ..verdict import NOISE_MSE, Criterion, CurvePoint
from .plan import RenderStats

#: The family of an analysis read back without its LoRA (``analyze --from``): the first.
_DEFAULT_FAMILY = FAMILIES[0]


@dataclass(frozen=True)
class AnalysisSettings:
    """What the analysis ran with: the renders', the LoRA's and the pictures' settings.

    ``ranking.json`` writes them as one flat object (:meth:`to_json`), the render
    settings first, as it always has.
    """

    render: AnalyzeSettings
    lora: str
    lora_sha256: str
    model: str
    heatmap_scale: str
    cmap: str
    #: per mode: the top of the heatmaps' global scale (0.0 on a per-image scale)
    heatmap_vmax: Mapping[str, float]

    def to_json(self) -> dict[str, Any]:
        return {
            **settings_to_json(self.render),
            "lora": self.lora,
            "lora_sha256": self.lora_sha256,
            "model": self.model,
            "heatmap_scale": self.heatmap_scale,
            "cmap": self.cmap,
            "heatmap_vmax": dict(self.heatmap_vmax),
        }


@dataclass
class BlockRow:
    """One block's influence in one mode, averaged over prompts x seeds."""

    block: str
    mode: str
    mse: float
    mse_std: float
    ssim: float
    ssim_std: float
    rank: int
    params: int
    bytes: int
    norm: float
    norm_rank: int


@dataclass
class Suggestion:
    """The suggested keep set and the ``slim`` command that writes it."""

    mode: str
    coverage_target: float
    coverage: float
    blocks: list[str]
    spec: str
    bytes: int
    bytes_before: int
    command: str | None
    #: "coverage" (estimated from per-block influence) or "kept_share" (the verdict, from the curve)
    criterion: str = "coverage"
    #: with "kept_share": the worst kept share per distance of the suggested set
    kept: dict[str, float] | None = None


@dataclass
class Analysis:
    """The result of a sweep: what ``ranking.json`` holds."""

    settings: AnalysisSettings
    rows: list[BlockRow]
    spearman: dict[str, float | None]
    suggestion: Suggestion
    references: list[dict[str, Any]]
    images: list[dict[str, Any]]
    renders: RenderStats = field(default_factory=RenderStats)
    out_dir: Path = Path()
    #: per prompt x seed: what the full LoRA does to the image (see lora_prune.verdict)
    effects: list[dict[str, Any]] = field(default_factory=list)
    #: the pruning curve, when one was rendered (analyze --curve, slim --auto)
    curve: list[CurvePoint] | None = None
    curve_criterion: Criterion | None = None
    #: the LoRA's ranks on its input layers, for the recipes (lora_prune.recipes.input_ranks)
    input_ranks: tuple[int, ...] | None = None
    #: the LoRA's model family, whose recipes retrain the suggestion
    family: Family = _DEFAULT_FAMILY

    @property
    def zero_blocks(self) -> list[str]:
        """Blocks whose delta is exactly zero (weight norm 0): ranked last, never kept."""
        return sorted({r.block for r in self.rows if r.norm == 0}, key=block_order)

    @property
    def notes(self) -> list[str]:
        """What a reader of the ranking should know that is not a warning."""
        zero = self.zero_blocks
        if not zero:
            return []
        return [
            f"{len(zero)} block{'s carry' if len(zero) != 1 else ' carries'} no weight (norm 0): "
            f"ranked last and never kept: {format_block_spec(zero)}"
        ]

    @property
    def warnings(self) -> list[str]:
        """Images on which the LoRA shows (next to) no effect: nothing can be verified there."""
        prompts = self.settings.render.prompts
        return [
            f"the LoRA has no measurable effect on prompt {e['prompt']} ({prompts[e['prompt']]!r}) "
            f"seed {e['seed']}: MSE(base, full) {e['mse']:.3g} <= noise floor {NOISE_MSE:g}; use "
            "prompts where the LoRA shows, such as its trigger words"
            for e in self.effects
            if not e["measurable"]
        ]

    def rows_for(self, mode: str) -> list[BlockRow]:
        return sorted((r for r in self.rows if r.mode == mode), key=lambda r: r.rank)

    def to_json(self) -> dict[str, Any]:
        return {
            "tool": {"name": "lora-prune", "version": __version__},
            "settings": self.settings.to_json(),
            "rows": [asdict(r) for r in self.rows],
            "spearman": self.spearman,
            "suggestion": asdict(self.suggestion),
            # the trainer settings that retrain only the suggested blocks (lora_prune.recipes)
            "recipes": [
                asdict(r)
                for r in recipes_for(
                    self.family, self.suggestion.blocks, input_ranks=self.input_ranks
                )
            ]
            if self.suggestion.command is not None
            else [],
            "references": self.references,
            "images": self.images,
            "contact_sheet": "contact_sheet.png",
            "influence": "influence.png",
            "effects": self.effects,
            "noise_floor_mse": NOISE_MSE,
            "warnings": self.warnings,
            "notes": self.notes,
            "pruning_curve": None
            if self.curve is None
            else {
                "image": "pruning_curve.png",
                "order": self.curve[-1].blocks if self.curve else [],
                "criterion": CRITERION,
                "formula": FORMULA,
                "min_kept": self.curve_criterion.min_kept if self.curve_criterion else None,
                "points": [asdict(p) for p in self.curve],
            },
        }
