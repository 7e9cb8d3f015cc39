"""``lora-prune slim``: keep chosen blocks byte for byte, or (``--auto``) the fewest that pass."""

from __future__ import annotations

from pathlib import Path

import click

from ..errors import BudgetError, UsageError
from ..lora import read_lora
from ..render import require_render
from ..settings import ModelSpec, RenderRequest, check_max_size
from ..slim import slim_lora
from ..verdict import Criterion
from ._app import EXIT_CODES_HELP
from ._model_options import render_options
from ._options import (
    VERDICT_HELP,
    allow_unknown_opt,
    batch_size_opt,
    beside,
    block_spec,
    checked,
    lora_arg,
    lora_output_options,
    perceptual_opt,
    recipes_opt,
    verdict_options,
)
from ._printers import (
    ProgressBar,
    print_curve,
    print_slim,
    print_tried,
    print_verification,
)


@click.command(epilog=VERDICT_HELP + "\n\n" + EXIT_CODES_HELP)
@lora_arg
@click.option("--keep", metavar="SPEC", help="Blocks to keep, e.g. double.0-5,single.10-20,input.")
@click.option("--drop", metavar="SPEC", help="Blocks to drop (all others are kept).")
@click.option(
    "--auto",
    is_flag=True,
    help="Find the smallest keep set that renders like the full LoRA (needs --model, --prompt).",
)
@lora_output_options(".slim")
@allow_unknown_opt
@render_options(required=False, when="With --auto: ")
@verdict_options("With --auto: ")
@perceptual_opt
@recipes_opt
@batch_size_opt
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="With --auto: analysis folder (renders are reused) [default: <stem>.analysis].",
)
@click.option(
    "--max-size",
    metavar="SIZE",
    callback=checked(check_max_size),
    help="With --auto: the file must fit SIZE (e.g. 20MB, 1.5GiB); when the passing keep set "
    "does not, lower ranks are tried (most blocks that fit per uniform rank, and per-module "
    "ranks allocated by energy per byte; best passing kept).",
)
def slim(
    lora: Path,
    keep: str | None,
    drop: str | None,
    auto: bool,
    output: Path | None,
    force: bool,
    allow_unknown: bool,
    spec: ModelSpec | None,
    request: RenderRequest,
    criterion: Criterion,
    perceptual: str | None,
    recipes: bool,
    batch_size: int,
    work_dir: Path | None,
    max_size: int | None,
) -> None:
    """Write a LoRA that keeps only the chosen blocks, byte-identical for what it keeps.

    \b
    SPEC: block ids with ranges and groups, e.g. double.0-5,double.7,single.10-20,input;
    the groups double, single, te (clip+t5), all; a block-weight vector of 57, 58, 61
    or 19 comma-separated weights (0 = drop); or kohya's
    train_double_block_indices=0,1,8-12 (train_single_block_indices=...).

    \b
    Example: lora-prune slim my_lora.safetensors --keep double.7,double.12,single.7-20
    Example: lora-prune slim my_lora.safetensors --auto --model tiny --prompt "a cat" --seeds 0,1

    With --auto: the fewest top-ranked blocks whose slim keeps --min-kept of the
    LoRA's effect on every image (see Verdict below); writes the pruning curve
    into --work-dir.
    """
    if not auto:
        if max_size is not None:
            raise UsageError("--max-size needs --auto", "--max-size", "add --auto")
        lora_file = read_lora(lora, allow_unknown=allow_unknown)
        keep_set, drop_set = block_spec(keep, "--keep"), block_spec(drop, "--drop")
        result = slim_lora(
            lora_file,
            keep_set,
            drop=drop_set,
            output=output,
            force=force,
            allow_unknown=allow_unknown,
        )
        implied = keep_set.implied(lora_file.family.blocks) if keep_set else frozenset()
        print_slim(result, lora_file, recipes=recipes, implied=implied)
        return
    if keep or drop:
        raise UsageError("--auto chooses the blocks itself", "--keep/--drop", "drop them or --auto")
    if spec is None or not request.prompts:
        raise UsageError("--auto needs --model and --prompt", "command line", "add them")
    lora_file = read_lora(lora, allow_unknown=allow_unknown)
    require_render()
    from ..render.workflows import auto_slim

    with ProgressBar("ranking blocks") as bar:
        try:
            done = auto_slim(
                lora_file,
                spec,
                request.settings(spec.model, ("loo",)),
                work_dir or beside(lora, ".analysis"),
                criterion=criterion,
                perceptual=perceptual,
                output=output,
                force=force,
                batch_size=batch_size,
                progress=bar,
                max_size=max_size,
            )
        except BudgetError as exc:
            bar.close()
            print_tried(exc.tried)
            raise
    print_curve(done.analysis)
    print_tried(done.tried)
    print_verification(done.verification or done.auto.verification)
    print_slim(done.slim, lora_file, recipes=recipes)
