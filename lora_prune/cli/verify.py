"""``lora-prune verify``: prove a slim LoRA renders like its full LoRA (exit 1 when not)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..errors import EXIT_FAILED
from ..render import require_render
from ..settings import ModelSpec, RenderRequest
from ..verdict import Criterion
from ._app import EXIT_CODES_HELP
from ._model_options import render_options
from ._options import (
    VERDICT_HELP,
    beside,
    file_argument,
    need_spec,
    perceptual_opt,
    verdict_options,
)
from ._printers import print_verification


@click.command(epilog=VERDICT_HELP + "\n\n" + EXIT_CODES_HELP)
@click.argument("full", type=click.Path(path_type=Path), callback=file_argument)
@click.argument(
    "slim_file", metavar="SLIM", type=click.Path(path_type=Path), callback=file_argument
)
@render_options()
@verdict_options()
@perceptual_opt
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder for verify.png and verify.json [default: <slim stem>.verify].",
)
def verify(
    full: Path,
    slim_file: Path,
    spec: ModelSpec | None,
    request: RenderRequest,
    criterion: Criterion,
    perceptual: str | None,
    out_dir: Path | None,
) -> None:
    """Prove a slim LoRA renders like its full LoRA; exit 1 when an image keeps too little.

    Each image must keep --min-kept of the LoRA's effect (see Verdict below).

    Example: lora-prune verify my_lora.safetensors my_lora.slim.safetensors --model tiny
    --prompt "a cat" --seeds 0,1
    """
    spec = need_spec(spec)
    out = out_dir or beside(slim_file, ".verify")
    require_render()
    from ..render.workflows import verify_files

    result = verify_files(
        full,
        slim_file,
        spec,
        request.settings(spec.model),
        out,
        criterion=criterion,
        perceptual=perceptual,
    )
    print_verification(result)
    click.echo(f"wrote    {out / 'verify.png'}, {out / 'verify.json'}")
    if not result.measurable:
        raise result.no_effect_error()
    if not result.passed:
        sys.exit(EXIT_FAILED)
