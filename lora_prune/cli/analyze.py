"""``lora-prune analyze``: rank a LoRA's blocks by rendering one variant per block."""

from __future__ import annotations

from pathlib import Path

import click

from ..analysis import analyze_from
from ..errors import UsageError
from ..render import require_render
from ..settings import (
    DEFAULT_COVERAGE,
    MODES,
    ModelSpec,
    PictureOptions,
    RenderRequest,
    check_coverage,
)
from ..verdict import Criterion
from ._app import EXIT_CODES_HELP
from ._model_options import render_options
from ._options import (
    batch_size_opt,
    beside,
    checked,
    file_argument,
    perceptual_opt,
    picture_options,
    recipes_opt,
    verdict_options,
)
from ._printers import ProgressBar, print_analysis, print_renders

BOTH = "both"


@click.command("analyze", epilog=EXIT_CODES_HELP)
@click.argument("lora", type=click.Path(path_type=Path), required=False, callback=file_argument)
@render_options(required=False)
@click.option(
    "--mode",
    type=click.Choice((*MODES, BOTH)),
    default=MODES[0],
    show_default=True,
    help="solo: only that block on (vs no LoRA); loo: all but that block (vs full LoRA).",
)
@batch_size_opt
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Output folder [default: <lora stem>.analysis beside the LoRA].",
)
@click.option(
    "--from",
    "from_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Recompute the analysis from an earlier run's renders; no model needed.",
)
@click.option(
    "--coverage",
    type=float,
    default=DEFAULT_COVERAGE,
    show_default=True,
    callback=checked(check_coverage),
    help="Share of the total influence the suggested keep set must cover (without --curve).",
)
@click.option(
    "--curve",
    is_flag=True,
    help="Also render the pruning curve (top-k blocks for every k) and suggest the "
    "fewest blocks that keep --min-kept of the effect on every image.",
)
@verdict_options("With --curve: ")
@perceptual_opt
@recipes_opt
@picture_options
def analyze(
    lora: Path | None,
    spec: ModelSpec | None,
    request: RenderRequest,
    mode: str,
    batch_size: int,
    out_dir: Path | None,
    from_dir: Path | None,
    coverage: float,
    curve: bool,
    criterion: Criterion,
    perceptual: str | None,
    recipes: bool,
    options: PictureOptions,
) -> None:
    """Rank a LoRA's blocks by rendering one variant per block (MSE and SSIM).

    Writes DIR/ranking.csv, ranking.json, contact_sheet.png (and
    contact_sheet_loo.png with --mode both), influence.png, pruning_curve.png
    (with --curve), report.html, manifest.json, images/ and heatmaps/. Rerunning renders only
    what is missing or damaged (each cached image is checked against its record).

    \b
    Example: lora-prune analyze my_lora.safetensors --model black-forest-labs/FLUX.1-dev
             --prompt "portrait of sks woman" --seeds 0,1 --mode both --out my_lora.analysis
    Example: lora-prune analyze --from my_lora.analysis --heatmap-scale per-image

    \b
    Several GPUs: accelerate launch --num_processes 8 -m lora_prune.cli analyze ...
    (one process per GPU, each renders a share; see docs/performance.md).
    """
    if from_dir is not None:
        _refuse_what_from_cannot_honour()
        print_analysis(analyze_from(from_dir, coverage=coverage, options=options), recipes=recipes)
        return
    if lora is None or spec is None or not request.prompts:
        raise UsageError(
            "analyze needs LORA, --model and --prompt",
            "command line",
            "or use --from DIR to recompute an earlier run",
        )
    # Only torch is needed to plan: a rerun with every render cached imports no diffusers.
    require_render(("torch",))
    from ..render.runs import run_analyze

    with ProgressBar("rendering") as bar:
        run = run_analyze(
            lora,
            spec,
            request.settings(spec.model, MODES if mode == BOTH else (mode,)),
            out_dir or beside(lora, ".analysis"),
            batch_size=batch_size,
            coverage=coverage,
            options=options,
            curve=criterion if curve else None,
            perceptual=perceptual,
            progress=bar,
        )
    print_renders(run.renders, run.seconds, run.shard)
    if run.analysis is not None:  # None in a helper process: the main one reports
        print_analysis(run.analysis, recipes=recipes)


#: What ``--from`` recomputes with: the earlier run's renders, scored and drawn anew.
_WITH_FROM = {
    "from_dir",
    "coverage",
    "recipes",
    "heatmap_scale",
    "cmap",
    "opacity",
    "sheet_order",
    "sheet_max_pixels",
}


def _refuse_what_from_cannot_honour() -> None:
    """A LORA, a model or render options beside ``--from`` would be silently ignored."""
    ctx = click.get_current_context()
    given = [
        param.opts[0] if param.opts[0].startswith("-") else param.human_readable_name
        for param in ctx.command.params
        if param.name not in _WITH_FROM
        and ctx.get_parameter_source(param.name or "") == click.core.ParameterSource.COMMANDLINE
    ]
    if given:
        raise UsageError(
            f"--from recomputes an earlier run with its own LoRA, model and renders; "
            f"{', '.join(given)} cannot apply",
            "--from",
            "drop them, or run analyze without --from to render anew",
        )
