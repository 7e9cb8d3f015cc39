"""``lora-prune check``: the CI gate for LoRA files (integrity, format, values, policy)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ..check import FORMATS, load_policy, run_check
from ..check import render as render_check
from ..errors import UsageError
from ..render import require_render
from ..settings import ModelSpec, RenderRequest, input_images
from ..verdict import Criterion
from ._app import CHECK_EXIT_HELP
from ._model_options import size_opt, steps_opt
from ._options import file_argument, images_opt, seeds_opt, verdict_options


@click.command(epilog=CHECK_EXIT_HELP)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--policy",
    type=click.Path(path_type=Path),
    callback=file_argument,
    help="TOML policy: max size, allowed/required blocks, metadata, verified slims.",
)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default=FORMATS[0], show_default=True)
@click.option(
    "--model",
    metavar="M",
    help="Re-render slim files against their full files instead of trusting the "
    "recorded verification (needs --prompt).",
)
@click.option("--prompt", "prompts", multiple=True, help="With --model: prompt (repeatable).")
@images_opt("With --model: ")
@seeds_opt
@size_opt
@steps_opt
@verdict_options("With --model: ")
def check(
    paths: tuple[Path, ...],
    policy: Path | None,
    fmt: str,
    model: str | None,
    prompts: tuple[str, ...],
    images: tuple[Path, ...],
    seeds: tuple[int, ...],
    size: int | None,
    steps: int | None,
    criterion: Criterion,
) -> None:
    """Check LoRA files for CI: integrity, FLUX format, finite values, ranks/alphas, policy.

    Every .safetensors under PATHS is read (never unpickled); pickle files are
    reported as unsafe. Works without torch.

    Example: lora-prune check loras/ --policy lora-policy.toml --format github
    """
    reverify = None
    if model is not None:
        if not prompts:
            raise UsageError("--model needs --prompt", "check", "add --prompt")
        request = RenderRequest(
            prompts=prompts, seeds=seeds, size=size, steps=steps, images=input_images(images)
        )
        settings = request.settings(model)
        require_render()
        from ..render.workflows import make_reverify

        reverify = make_reverify(ModelSpec(model), settings, criterion)
    result = run_check(list(paths), load_policy(policy) if policy else None, reverify=reverify)
    click.echo(render_check(result, fmt), nl=False)
    sys.exit(result.exit_code)
