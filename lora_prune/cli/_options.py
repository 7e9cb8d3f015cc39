"""The options more than one command shares, and how their values become settings.

Each option is declared here once; its default and its checks come from the
settings type it fills (:mod:`lora_prune.settings`, :mod:`lora_prune.verdict`),
which :func:`gather` builds when the command starts, before a file is read or a
model loaded. A command module only adds the options that are its own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import click

from ..blocks import BlockSpec
from ..errors import UsageError
from ..fileio import not_a_folder
from ..settings import (
    COLORMAP_NAMES,
    COMPUTE_DTYPES,
    DEFAULT_BATCH_SIZE,
    HEATMAP_SCALES,
    MIN_SHEET_PIXELS,
    SHEET_ORDERS,
    ModelSpec,
    PictureOptions,
    check_batch_size,
    parse_seeds,
)
from ..verdict import DEFAULT_MIN_KEPT, Criterion

F = TypeVar("F", bound=Callable[..., Any])
Callback = Callable[[click.Context, click.Parameter, Any], Any]


def checked(check: Callable[[Any], Any]) -> Callback:
    """A click callback that runs a check of :mod:`lora_prune.settings` on a given value."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        return None if value is None else check(value)

    return callback


def file_argument(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    # A folder where a file is needed is the same exit-3 error for every command
    # (what read_lora says), checked before any other work.
    if value is not None:
        not_a_folder(value)
    return value


def gather(
    options: Sequence[Callable[[Any], Any]], build: Callable[[dict[str, Any]], None]
) -> Callable[[F], F]:
    """Add ``options``; ``build`` replaces their raw values with the typed object the command gets.

    The object is built, and so checked, when the command starts: before it reads
    a file or loads a model.
    """

    def decorate(f: F) -> F:
        @functools.wraps(f)
        def command(**kw: Any) -> Any:
            build(kw)
            return f(**kw)

        for option in reversed(options):
            command = option(command)
        return cast(F, command)

    return decorate


def block_spec(value: str | None, option: str) -> BlockSpec | None:
    """A block spec option (None when not given), read against the LoRA's family later."""
    return BlockSpec(value, option) if value is not None else None


def need_spec(spec: ModelSpec | None) -> ModelSpec:
    if spec is None:  # click enforces --model where it is required
        raise UsageError("no model given", "--model", "add --model")
    return spec


def beside(path: Path, suffix: str) -> Path:
    """``<stem><suffix>`` beside ``path`` (the default output folders)."""
    return path.with_name(path.name.removesuffix(".safetensors") + suffix)


lora_arg = click.argument("lora", type=click.Path(path_type=Path), callback=file_argument)
allow_unknown_opt = click.option(
    "--allow-unknown",
    is_flag=True,
    help="Report keys that match no FLUX.1 format as block 'other'.",
)
seeds_opt = click.option(
    "--seeds",
    "--seed",
    "seeds",
    default="0",
    show_default=True,
    callback=checked(parse_seeds),
    help="Comma-separated seeds (--seed S for one).",
)


def images_opt(when: str = "") -> Callable[[F], F]:
    """``--image FILE`` (repeatable): the images an edit model edits; ``when`` prefixes the help."""
    return click.option(
        "--image",
        "images",
        multiple=True,
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        help=f"{when}An image to edit (FLUX.1 Kontext): one for every prompt, or one per "
        "--prompt in order; renders are edits of it.",
    )


batch_size_opt = click.option(
    "--batch-size",
    type=int,
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    callback=checked(check_batch_size),
    help="Images per pipeline call.",
)
dtype_opt = click.option(
    "--dtype",
    type=click.Choice(COMPUTE_DTYPES),
    help="Compute dtype [default: bf16 on GPUs, fp32 on cpu].",
)
recipes_opt = click.option(
    "--recipes",
    is_flag=True,
    help="Print the kohya, ai-toolkit and OneTrainer settings that retrain only the kept blocks.",
)
perceptual_opt = click.option(
    "--perceptual",
    metavar="MODEL",
    help="Add a perceptual distance to the verdict: 1 - cosine of the pooled embeddings of a "
    "transformers image encoder (DINOv2 or CLIP vision; local folder or hub id).",
)


def lora_output_options(suffix: str) -> Callable[[F], F]:
    """``-o/--output`` and ``--force`` of the commands that write a LoRA file."""

    def decorate(f: F) -> F:
        f = click.option(
            "--force", is_flag=True, help="Replace an existing output (never the input)."
        )(f)
        return click.option(
            "-o",
            "--output",
            type=click.Path(path_type=Path),
            help=f"Output file [default: <stem>{suffix}.safetensors beside the input].",
        )(f)

    return decorate


# --- the verdict -------------------------------------------------------------------
VERDICT_HELP = """\b
Verdict: for every image (prompt x seed) and distance d (MSE on 8-bit RGB,
1 - SSIM), the LoRA's effect is E = d(base, full), the slim's residual
R = d(slim, full), and the share of the effect kept is 1 - R / E. A slim
passes when every image keeps at least --min-kept for every distance (and
reaches --min-ssim, when given). An image where MSE(base, full) <= 1 (one
8-bit level RMS: render noise) proves nothing: exit 7, use prompts where
the LoRA shows, such as its trigger words."""


def _build_criterion(kw: dict[str, Any]) -> None:
    kw["criterion"] = Criterion(min_kept=kw.pop("min_kept"), min_ssim=kw.pop("min_ssim"))


def verdict_options(when: str = "") -> Callable[[F], F]:
    """--min-kept and --min-ssim, passed as ``criterion`` (:mod:`lora_prune.verdict`)."""
    return gather(
        [
            click.option(
                "--min-kept",
                type=float,
                default=DEFAULT_MIN_KEPT,
                show_default=True,
                help=f"{when}Share of the LoRA's effect (1 - d(slim, full) / "
                "d(base, full)) every image must keep, for MSE and 1-SSIM.",
            ),
            click.option(
                "--min-ssim",
                type=float,
                default=None,
                help=f"{when}Also require SSIM(slim, full) >= this on every image [default: off].",
            ),
        ],
        _build_criterion,
    )


# --- pictures ----------------------------------------------------------------------
def _build_pictures(kw: dict[str, Any]) -> None:
    names = ("heatmap_scale", "cmap", "opacity", "sheet_order", "sheet_max_pixels")
    kw["options"] = PictureOptions(**{k: kw.pop(k) for k in names})


picture_options = gather(
    [
        click.option(
            "--heatmap-scale",
            type=click.Choice(HEATMAP_SCALES),
            default=PictureOptions.heatmap_scale,
            show_default=True,
            help="One scale for all heatmaps (comparable), or each its own.",
        ),
        click.option(
            "--cmap",
            type=click.Choice(COLORMAP_NAMES),
            default=PictureOptions.cmap,
            show_default=True,
            help="Heatmap colour map, from no change to the most: jet blue to red, turbo dark "
            "through green to red, inferno black to yellow, gray black to white.",
        ),
        click.option(
            "--opacity",
            type=float,
            default=PictureOptions.opacity,
            show_default=True,
            help="Heatmap weight of the strongest change in the contact sheets, from 0 to 1 "
            "(unchanged pixels show the render in grey).",
        ),
        click.option(
            "--sheet-order",
            type=click.Choice(SHEET_ORDERS),
            default=PictureOptions.sheet_order,
            show_default=True,
        ),
        click.option(
            "--sheet-max-pixels",
            type=int,
            default=PictureOptions.sheet_max_pixels,
            show_default=True,
            help=f"Shrink the contact sheet to at most this many pixels "
            f"(at least {MIN_SHEET_PIXELS:,}).",
        ),
    ],
    _build_pictures,
)
