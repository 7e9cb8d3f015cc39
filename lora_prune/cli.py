"""The ``lora-prune`` command line: parses arguments, calls the library, prints.

Nothing here computes: every command is options -> settings
(:mod:`lora_prune.settings`, built and checked before anything is read) ->
library call -> printer. Errors from :mod:`lora_prune.errors`, and click's own
usage errors, become one ``error: ...`` line on stderr and the exit code
documented there. Its length is the options, help texts and printers of seven
commands; no function here is long.
"""

from __future__ import annotations

import contextlib
import functools
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TypeVar, cast

import click

from . import __version__
from .analysis import (
    Analysis,
    Renderer,
    RenderStats,
    Shard,
    analyze,
    compute_analysis,
    read_manifest,
    render_sweep,
)
from .blocks import format_block_spec, parse_block_spec
from .budget import BudgetCandidate
from .check import FORMATS as CHECK_FORMATS
from .check import load_policy, run_check
from .check import render as render_check
from .errors import (
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    BudgetError,
    LoraPruneError,
    OutputExistsError,
    UsageError,
)
from .fileio import not_a_folder, refuse_overwrite
from .lora import LoraFile, read_lora
from .pictures import save_png
from .recipes import input_ranks, recipes_for
from .safetensors_io import file_sha256
from .settings import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_COVERAGE,
    DEFAULT_GUIDANCE,
    DEFAULT_STRENGTH,
    HEATMAP_SCALES,
    MEMORY_PLANS,
    MIN_SHEET_PIXELS,
    SHEET_ORDERS,
    TINY_MODEL_ID,
    ModelSpec,
    PictureOptions,
    RenderRequest,
    RenderSettings,
    check_batch_size,
    check_coverage,
    check_max_size,
    parse_seeds,
)
from .slim import SlimResult, slim_lora
from .stats import SORT_KEYS, LoraReport, block_stats_and_sha256, human_bytes, inspect_lora
from .verdict import BASE_DISTANCES, DEFAULT_MIN_KEPT, Criterion, Distance
from .verify import VerifyResult, verify_slim, verify_target

if TYPE_CHECKING:
    from .render.session import Session

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES_HELP = """\b
Exit codes: 0 ok, 1 verification/policy failed, 2 usage, 3 unreadable or
unsafe file, 4 unsupported LoRA, 5 missing optional dependency, 6 output
could not be written, 7 no measurable effect of the LoRA on an image, 130
interrupted."""


CHECK_EXIT_HELP = """\b
Exit codes: 0 all files pass, 1 a policy or content check failed (also a LoRA
for another base model), 2 usage, 3 a file is unreadable or unsafe (wins over 1)."""


def _counter_text(counts: dict[Any, int], fmt: Callable[[Any], str] = str) -> str:
    if not counts:
        return "none"
    return ", ".join(f"{fmt(k)} x{v}" for k, v in counts.items())


def _alpha_text(alpha: float) -> str:
    return f"{alpha:g}"


def print_report(report: LoraReport) -> None:
    echo = click.echo
    echo(f"file          {report.path} ({human_bytes(report.file_bytes)})")
    grammars = ", ".join(f"{g} ({n} keys)" for g, n in report.grammars.items())
    echo(f"format        {report.format}" + (f"  [{grammars}]" if len(report.grammars) > 1 else ""))
    echo(
        f"tensors       {sum(b.tensors for b in report.blocks)}, {report.total_params:,} parameters"
    )
    echo(f"dtypes        {_counter_text(report.dtypes)}")
    echo(f"adapters      {_counter_text(report.adapters)}")
    echo(f"ranks         {_counter_text(report.ranks)}")
    echo(
        f"alphas        {_counter_text(report.alphas, _alpha_text) if report.alphas else 'none (scale 1)'}"
    )
    echo(f"text encoders {', '.join(report.text_encoders) or 'none'}")
    echo(f"metadata      {report.metadata_keys} keys")
    for key, value in report.metadata.items():
        shown = value if len(value) <= 70 else value[:67] + "..."
        echo(f"  {key} = {shown}")
    echo("")
    header = f"{'block':<10} {'modules':>7} {'tensors':>7} {'params':>12} {'bytes':>10} {'size%':>6} {'norm':>10} {'norm%':>6}"
    echo(header)
    echo("-" * len(header))
    for b in report.blocks:
        echo(
            f"{b.block:<10} {b.modules:>7} {b.tensors:>7} {b.params:>12,} {human_bytes(b.bytes):>10} "
            f"{100 * b.share_bytes:>5.1f}% {b.norm:>10.4g} {100 * b.share_norm:>5.1f}%"
        )
    echo("-" * len(header))
    echo(
        f"{'total':<10} {sum(b.modules for b in report.blocks):>7} "
        f"{sum(b.tensors for b in report.blocks):>7} {report.total_params:>12,} "
        f"{human_bytes(report.total_bytes):>10} {100.0:>5.1f}% {report.total_norm:>10.4g}"
    )


class LoraPruneGroup(click.Group):
    """A group whose commands report every error, click's own included, as one line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LoraPruneError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted, run the command again to continue", err=True)
            sys.exit(EXIT_INTERRUPTED)

    def main(self, *args: Any, **kwargs: Any) -> Any:
        """click's main, but its usage errors (unknown option, missing or bad value) are one line.

        click would print the usage and an ``Error:`` line; here they end as
        ``error: <what>, see 'lora-prune <command> --help'`` with exit 2, as
        every other usage error does.
        """
        if not kwargs.get("standalone_mode", True):
            return super().main(*args, **kwargs)
        kwargs["standalone_mode"] = False
        try:
            rv = super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            exc.show()  # a bare `lora-prune`: the help, as click shows it
            sys.exit(exc.exit_code)
        except click.ClickException as exc:
            click.echo(f"error: {_click_error_line(exc)}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("error: interrupted, run the command again to continue", err=True)
            sys.exit(EXIT_INTERRUPTED)
        sys.exit(rv if isinstance(rv, int) else 0)


def _click_error_line(exc: click.ClickException) -> str:
    names: list[str] = []
    ctx: click.Context | None = getattr(exc, "ctx", None)
    while ctx is not None and ctx.parent is not None:
        names.insert(0, ctx.info_name or "")
        ctx = ctx.parent
    what = " ".join(exc.format_message().split()).rstrip(".")
    return str(UsageError(what, None, f"see '{' '.join(['lora-prune', *names])} --help'"))


@click.group(cls=LoraPruneGroup, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="lora-prune")
def cli() -> None:
    """Find which blocks of a FLUX.1 LoRA matter and ship smaller LoRAs."""


# --- options -> settings ----------------------------------------------------------
Callback = Callable[[click.Context, click.Parameter, Any], Any]


def _checked(check: Callable[[Any], Any]) -> Callback:
    """A click callback that runs a check of :mod:`lora_prune.settings` on a given value."""

    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        return None if value is None else check(value)

    return callback


def _file_argument(ctx: click.Context, param: click.Parameter, value: Path | None) -> Path | None:
    # A folder where a file is needed is the same exit-3 error for every command
    # (what read_lora says), checked before any other work.
    if value is not None:
        not_a_folder(value)
    return value


def _gather(
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


lora_arg = click.argument("lora", type=click.Path(path_type=Path), callback=_file_argument)
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
    callback=_checked(parse_seeds),
    help="Comma-separated seeds (--seed S for one).",
)
batch_size_opt = click.option(
    "--batch-size",
    type=int,
    default=DEFAULT_BATCH_SIZE,
    show_default=True,
    callback=_checked(check_batch_size),
    help="Images per pipeline call.",
)


def _build_render(kw: dict[str, Any]) -> None:
    model = kw.pop("model")
    where = (kw.pop("transformer_file"), kw.pop("device"), kw.pop("dtype"), kw.pop("offload"))
    compile_blocks = kw.pop("compile")
    files = {k: kw.pop(k) for k in ("comfy", "clip_file", "t5_file", "vae_file", "memory")}
    if model is None and files["comfy"] is not None:
        model = str(files["comfy"])  # tokenizers come from the ComfyUI install
    kw["spec"] = (
        None if model is None else ModelSpec(model, *where, compile=compile_blocks, **files)
    )
    kw["request"] = RenderRequest(
        prompts=tuple(kw.pop("prompts")),
        seeds=kw.pop("seeds"),
        **{k: kw.pop(k) for k in ("size", "width", "height", "steps", "guidance", "strength")},
    )


def _model_callback(required: bool) -> Callback:
    """--model is required unless --comfy names every component."""

    def callback(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
        # Options given on the command line are processed first, so a given
        # --comfy is in ctx.params by now.
        if value is None and required and ctx.params.get("comfy") is None:
            raise click.MissingParameter(ctx=ctx, param=param)
        return value

    return callback


def _file_option(name: str, dest: str, what: str) -> Callable[[F], F]:
    return click.option(
        name, dest, type=click.Path(path_type=Path), callback=_file_argument, help=what
    )


def model_file_options() -> list[Callable[[F], F]]:
    """--comfy and the single-file options, shared by the render commands and doctor."""
    return [
        click.option(
            "--comfy",
            type=click.Path(path_type=Path),
            help="A ComfyUI folder (or its models/): every component is found there by its "
            "contents (extra_model_paths.yaml honoured).",
        ),
        _file_option(
            "--transformer",
            "transformer_file",
            "Single-file FLUX.1 transformer (.safetensors, ComfyUI/BFL naming) "
            "to use with the rest of --model, or instead of the one --comfy finds.",
        ),
        _file_option(
            "--clip", "clip_file", "Single-file CLIP-L text encoder (clip_l.safetensors)."
        ),
        _file_option("--t5", "t5_file", "Single-file T5-XXL encoder (t5xxl_fp16.safetensors)."),
        _file_option("--vae", "vae_file", "Single-file FLUX.1 VAE (ae.safetensors)."),
    ]


def render_options(*, required: bool = True, when: str = "") -> Callable[[F], F]:
    """Model and render options, passed as ``spec`` (None without --model) and ``request``."""
    return _gather(
        [
            click.option(
                "--model",
                "model",
                metavar="M",
                callback=_model_callback(required),
                help=f"{when}'tiny' (built-in test model), a local diffusers FLUX.1 "
                "folder, or a hub id (with --comfy: only where tokenizers may come from).",
            ),
            *model_file_options(),
            click.option("--device", help="cuda, mps or cpu [default: best available]."),
            click.option(
                "--dtype",
                type=click.Choice(["fp32", "bf16", "fp16"]),
                help="[default: bf16 on GPUs, fp32 on cpu].",
            ),
            click.option(
                "--memory",
                type=click.Choice(MEMORY_PLANS),
                default="auto",
                show_default=True,
                help="How the pipeline lives on the card (see 'lora-prune doctor').",
            ),
            click.option("--offload", is_flag=True, help="Same as --memory offload."),
            click.option(
                "--compile",
                is_flag=True,
                help="torch.compile the transformer blocks (slow first batch, faster after).",
            ),
            click.option(
                "--prompt",
                "prompts",
                multiple=True,
                required=required,
                help=f"{when}Prompt (repeatable).",
            ),
            seeds_opt,
            click.option("--size", type=int, help="Square size [default: 768; 64 for tiny]."),
            click.option("--width", type=int, help="Width (overrides --size)."),
            click.option("--height", type=int, help="Height (overrides --size)."),
            click.option("--steps", type=int, help="Denoising steps [default: 20; 4 for tiny]."),
            click.option("--guidance", type=float, default=DEFAULT_GUIDANCE, show_default=True),
            click.option(
                "--strength",
                type=float,
                default=DEFAULT_STRENGTH,
                show_default=True,
                help="LoRA strength; multiplies the weight delta once.",
            ),
        ],
        _build_render,
    )


def _need_spec(spec: ModelSpec | None) -> ModelSpec:
    if spec is None:  # click enforces --model where it is required
        raise UsageError("no model given", "--model", "add --model")
    return spec


VERDICT_HELP = """\b
Verdict: for every image (prompt x seed) and distance d (MSE on 8-bit RGB,
1 - SSIM), the LoRA's effect is E = d(base, full), the slim's residual
R = d(slim, full), and the share of the effect kept is 1 - R / E. A slim
passes when every image keeps at least --min-kept for every distance (and
reaches --min-ssim, when given). An image where MSE(base, full) <= 1 (one
8-bit level RMS: render noise) proves nothing: exit 7, use prompts where
the LoRA shows, such as its trigger words."""


perceptual_opt = click.option(
    "--perceptual",
    metavar="MODEL",
    help="Add a perceptual distance to the verdict: 1 - cosine of the pooled embeddings of a "
    "transformers image encoder (DINOv2 or CLIP vision; local folder or hub id).",
)


def _build_criterion(kw: dict[str, Any]) -> None:
    kw["criterion"] = Criterion(min_kept=kw.pop("min_kept"), min_ssim=kw.pop("min_ssim"))


def verdict_options(when: str = "") -> Callable[[F], F]:
    """--min-kept and --min-ssim, passed as ``criterion`` (:mod:`lora_prune.verdict`)."""
    return _gather(
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


def _build_pictures(kw: dict[str, Any]) -> None:
    names = ("heatmap_scale", "cmap", "opacity", "sheet_order", "sheet_max_pixels")
    kw["options"] = PictureOptions(**{k: kw.pop(k) for k in names})


picture_options = _gather(
    [
        click.option(
            "--heatmap-scale",
            type=click.Choice(HEATMAP_SCALES),
            default="global",
            show_default=True,
            help="One scale for all heatmaps (comparable), or each its own.",
        ),
        click.option(
            "--cmap",
            type=click.Choice(["jet", "turbo", "inferno", "gray"]),
            default="jet",
            show_default=True,
            help="Heatmap colour map (blue = no change, red = most).",
        ),
        click.option(
            "--opacity",
            type=click.FloatRange(0, 1),
            default=0.6,
            show_default=True,
            help="Heatmap opacity in the contact sheet.",
        ),
        click.option(
            "--sheet-order", type=click.Choice(SHEET_ORDERS), default="block", show_default=True
        ),
        click.option(
            "--sheet-max-pixels",
            type=int,
            default=40_000_000,
            show_default=True,
            help=f"Shrink the contact sheet to at most this many pixels "
            f"(at least {MIN_SHEET_PIXELS:,}).",
        ),
    ],
    _build_pictures,
)


# --- the render seam: lazily imported (torch), typed for mypy ---------------------
def _require_render() -> None:
    from .render import require_render

    require_render()


@contextlib.contextmanager
def _session(spec: ModelSpec, lora: LoraFile) -> Iterator[Session]:
    _require_render()
    from .render.session import open_session

    with open_session(spec, lora) as session:
        yield session


@contextlib.contextmanager
def _lazy_renderer(spec: ModelSpec, lora: LoraFile) -> Iterator[Renderer]:
    """A renderer whose session opens only when something must render (a cached rerun loads nothing)."""
    from .render import require_render

    require_render(("torch",))
    from .render.lazy import lazy_renderer

    with lazy_renderer(spec, lambda: _session(spec, lora)) as renderer:
        yield renderer


def _distances(perceptual: str | None, device: str | None) -> dict[str, Distance]:
    """The verdict's distances: MSE and 1-SSIM, plus the perceptual one when asked for."""
    if perceptual is None:
        return dict(BASE_DISTANCES)
    _require_render()
    from .render.perceptual import PerceptualDistance

    return {**BASE_DISTANCES, "perceptual": PerceptualDistance(perceptual, device or "cpu")}


def _beside(path: Path, suffix: str) -> Path:
    """``<stem><suffix>`` beside ``path`` (the default output folders)."""
    return path.with_name(path.name.removesuffix(".safetensors") + suffix)


# --- commands ----------------------------------------------------------------------
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


@cli.command(epilog=EXIT_CODES_HELP)
@lora_arg
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--sort",
    type=click.Choice(SORT_KEYS),
    default="block",
    show_default=True,
    help="Order of the block rows.",
)
@allow_unknown_opt
def inspect(lora: Path, as_json: bool, sort: str, allow_unknown: bool) -> None:
    """Show a LoRA's format, dtypes, ranks, alphas and per-block size and weight norm.

    Example: lora-prune inspect my_flux_lora.safetensors --sort norm
    """
    report = inspect_lora(read_lora(lora, allow_unknown=allow_unknown), sort=sort)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        print_report(report)


def _spec(value: str | None, option: str) -> frozenset[str] | None:
    if value is None:
        return None
    try:
        return parse_block_spec(value)
    except UsageError as exc:
        raise UsageError(exc.what, option, exc.fix) from exc


@cli.command(epilog=EXIT_CODES_HELP)
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
@batch_size_opt
@click.option(
    "--work-dir",
    type=click.Path(path_type=Path, file_okay=False),
    help="With --auto: analysis folder (renders are reused) [default: <stem>.analysis].",
)
@click.option(
    "--max-size",
    metavar="SIZE",
    callback=_checked(check_max_size),
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
    if auto:
        if keep or drop:
            raise UsageError(
                "--auto chooses the blocks itself", "--keep/--drop", "drop them or --auto"
            )
        if spec is None or not request.prompts:
            raise UsageError("--auto needs --model and --prompt", "command line", "add them")
        result, lora_file = _auto_slim(
            lora,
            spec,
            request.settings(spec.model, ("loo",)),
            work_dir or _beside(lora, ".analysis"),
            criterion=criterion,
            distances=_distances(perceptual, spec.device),
            output=output,
            force=force,
            allow_unknown=allow_unknown,
            batch_size=batch_size,
            max_size=max_size,
        )
    else:
        if max_size is not None:
            raise UsageError("--max-size needs --auto", "--max-size", "add --auto")
        keep_set, drop_set = _spec(keep, "--keep"), _spec(drop, "--drop")
        lora_file = read_lora(lora, allow_unknown=allow_unknown)
        result = slim_lora(
            lora_file,
            keep_set,
            drop=drop_set,
            output=output,
            force=force,
            allow_unknown=allow_unknown,
        )
    _print_slim(result, lora_file)


def _auto_slim(
    lora: Path,
    spec: ModelSpec,
    settings: RenderSettings,
    work_dir: Path,
    *,
    criterion: Criterion,
    distances: dict[str, Distance],
    output: Path | None,
    force: bool,
    allow_unknown: bool,
    batch_size: int,
    max_size: int | None,
) -> tuple[SlimResult, LoraFile]:
    refuse_overwrite([lora, spec.transformer_file], [output], [work_dir])
    lora_file = read_lora(lora, allow_unknown=allow_unknown)
    _require_render()
    from .render.workflows import auto_slim

    bar = _Bar("ranking blocks")
    try:
        auto_result = auto_slim(
            lora_file,
            spec,
            settings,
            work_dir,
            criterion=criterion,
            distances=distances,
            output=output,
            force=force,
            batch_size=batch_size,
            progress=bar,
            max_size=max_size,
        )
    except BudgetError as exc:
        bar.close()
        _print_tried(exc.tried)
        raise
    finally:
        bar.close()
    _print_curve(auto_result.analysis)
    _print_tried(auto_result.tried)
    _print_verification(auto_result.verification or auto_result.auto.verification)
    return auto_result.slim, lora_file


def _print_tried(tried: Sequence[object]) -> None:
    """The files ``slim --auto --max-size`` tried: blocks, rank, size, share kept, verdict."""
    for c in tried:
        assert isinstance(c, BudgetCandidate)
        verdict = "not rendered" if c.passed is None else ("pass" if c.passed else "FAIL")
        click.echo(
            f"tried    {c.label}: {human_bytes(c.bytes)}, kept {_share(c.kept_share)}, {verdict}"
        )


def _print_slim(result: SlimResult, lora: LoraFile) -> None:
    if result.absent:
        click.echo(
            f"note: the LoRA has no {format_block_spec(result.absent)}; nothing to keep there",
            err=True,
        )
    click.echo(f"kept     {format_block_spec(result.kept_blocks)}")
    click.echo(f"dropped  {format_block_spec(result.dropped_blocks) or 'nothing'}")
    ratio = result.bytes_after / result.bytes_before if result.bytes_before else 1.0
    click.echo(
        f"size     {human_bytes(result.bytes_before)} -> {human_bytes(result.bytes_after)} "
        f"({100 * ratio:.1f}%), {result.tensors_before} -> {result.tensors_after} tensors"
    )
    click.echo(f"wrote    {result.output}")
    _print_recipes(result.kept_blocks, input_ranks(lora))


def _print_recipes(blocks: Sequence[str], ranks: tuple[int, ...] | None) -> None:
    click.echo("\nto retrain only these blocks:")
    for recipe in recipes_for(blocks, input_ranks=ranks):
        click.echo(f"  {recipe.trainer} ({recipe.where}):")
        for line in recipe.text.split("\n"):
            click.echo(f"    {line}")
        if recipe.note:
            click.echo(f"    note: {recipe.note}")


class _Bar:
    """A click progress bar fed by the library's (done, total) callbacks."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None
        self.done = 0

    def __call__(self, done: int, total: int) -> None:
        if self.bar is not None and (done < self.done or total != self.bar.length):
            # A new phase (ranking, then the pruning curve) starts a new bar.
            self.close()
            self.bar, self.done = None, 0
        if self.bar is None:
            self.bar = click.progressbar(
                length=total, label=self.label, show_eta=True, show_pos=True, file=sys.stderr
            )
            self.bar.__enter__()
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


def _print_ranking(analysis: Analysis, limit: int = 15, planted: Sequence[str] = ()) -> None:
    for mode in analysis.settings.render.modes:
        rows = analysis.rows_for(mode)
        ref = "no LoRA" if mode == "solo" else "full LoRA"
        click.echo(
            f"\n{mode}: one {'block on' if mode == 'solo' else 'block off'}, compared to {ref}"
        )
        mark = "  planted" if planted else ""
        click.echo(
            f"{'rank':>4}  {'block':<10} {'MSE':>10} {'+-':>8} {'SSIM':>7} {'norm':>9}{mark}"
        )
        for row in rows[:limit]:
            flag = ("  *" if row.block in planted else "") if planted else ""
            click.echo(
                f"{row.rank:>4}  {row.block:<10} {row.mse:>10.2f} {row.mse_std:>8.2f} "
                f"{row.ssim:>7.4f} {row.norm:>9.3g}{flag}"
            )
        if len(rows) > limit:
            click.echo(f"  ... {len(rows) - limit} more blocks in ranking.csv")
        rho = analysis.spearman.get(mode)
        if rho is not None:
            click.echo(f"Spearman (render rank vs weight-norm rank): {rho:.3f}")


def _print_suggestion(analysis: Analysis) -> None:
    s = analysis.suggestion
    if s.command is None:
        click.echo("\nno block changes the image: nothing to keep")
        return
    if s.criterion == "kept_share" and s.kept:
        click.echo(
            f"\nsuggested keep (pruning curve: keeps at worst {_share(min(s.kept.values()))} "
            f"of the LoRA's effect): {s.spec}"
        )
    else:
        click.echo(
            f"\nsuggested keep ({s.mode}, {100 * s.coverage:.0f}% of the influence, target "
            f"{100 * s.coverage_target:.0f}%, an estimate: --curve verifies it): {s.spec}"
        )
    click.echo(f"size {human_bytes(s.bytes_before)} -> about {human_bytes(s.bytes)}")
    click.echo(f"  {s.command}")
    _print_recipes(s.blocks, analysis.input_ranks)


@cli.command(epilog=EXIT_CODES_HELP)
@lora_arg
@render_options()
@click.option("--blocks", "blocks_spec", required=True, metavar="SPEC", help="Blocks to switch on.")
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path, dir_okay=False),
    required=True,
    help="Side-by-side PNG to write.",
)
@click.option("--force", is_flag=True, help="Replace an existing output (never an input).")
def render(
    lora: Path,
    spec: ModelSpec | None,
    request: RenderRequest,
    blocks_spec: str,
    output: Path,
    force: bool,
) -> None:
    """Render one block combination beside both references, with MSE and SSIM to each.

    The manual testing mode of the original workflow: no LoRA | full LoRA | chosen
    blocks | heatmap. Uses the first prompt and seed.

    Example: lora-prune render my_lora.safetensors --model tiny --prompt "a cat"
    --blocks double.7,single.20 -o combo.png
    """
    spec = _need_spec(spec)
    blocks = _spec(blocks_spec, "--blocks") or frozenset()
    model_file = None if spec.model == TINY_MODEL_ID else Path(spec.model)
    refuse_overwrite([lora, spec.transformer_file, model_file], [output])
    if output.exists() and not force:
        raise OutputExistsError("the output exists", output, "pass --force to replace it")
    lora_file = read_lora(lora)
    settings = request.settings(spec.model)
    chosen = frozenset(blocks) & set(lora_file.blocks)
    _require_render()
    from .render.combination import render_combination

    with _session(spec, lora_file) as sess:
        image = settings.image(
            settings.prompts[0], settings.seeds[0], sess.renderer.max_sequence_length
        )
        result = render_combination(sess.engine, chosen, image)
    save_png(result.picture, output)
    click.echo(f"blocks   {format_block_spec(chosen) or 'none'}")
    click.echo(f"vs no LoRA   MSE {result.mse_vs_base:10.2f}  SSIM {result.ssim_vs_base:.4f}")
    click.echo(f"vs full LoRA MSE {result.mse_vs_full:10.2f}  SSIM {result.ssim_vs_full:.4f}")
    click.echo(f"wrote    {output}")


@cli.command("analyze", epilog=EXIT_CODES_HELP)
@click.argument("lora", type=click.Path(path_type=Path), required=False, callback=_file_argument)
@render_options(required=False)
@click.option(
    "--mode",
    type=click.Choice(["solo", "loo", "both"]),
    default="solo",
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
    callback=_checked(check_coverage),
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
@picture_options
def analyze_cmd(
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
    options: PictureOptions,
) -> None:
    """Rank a LoRA's blocks by rendering one variant per block (MSE and SSIM).

    Writes DIR/ranking.csv, ranking.json, contact_sheet.png, influence.png,
    report.html, manifest.json, images/ and heatmaps/. Rerunning renders only
    what is missing or damaged (each cached image is checked against its record).

    \b
    Example: lora-prune analyze my_lora.safetensors --model black-forest-labs/FLUX.1-dev
             --prompt "portrait of sks woman" --seeds 0,1 --mode both --out my_lora.analysis
    Example: lora-prune analyze --from my_lora.analysis --heatmap-scale per-image

    \b
    Several GPUs: accelerate launch --num_processes 8 -m lora_prune.cli analyze ...
    (one process per GPU, each renders a share; see docs/performance.md).
    """
    result: Analysis | None
    if from_dir is not None:
        result = _analyze_from(from_dir, coverage, options)
    else:
        if lora is None or spec is None or not request.prompts:
            raise UsageError(
                "analyze needs LORA, --model and --prompt",
                "command line",
                "or use --from DIR to recompute an earlier run",
            )
        result = _analyze_render(
            lora,
            spec,
            request.settings(spec.model, ("solo", "loo") if mode == "both" else (mode,)),
            out_dir or _beside(lora, ".analysis"),
            batch_size=batch_size,
            coverage=coverage,
            options=options,
            curve=criterion if curve else None,
            distances=_distances(perceptual, spec.device) if curve else None,
        )
        if result is None:
            return  # a helper process of a multi-process sweep: the main one reports
    _print_ranking(result)
    _print_effects(result)
    _print_curve(result)
    _print_suggestion(result)
    click.echo(f"\nreport   {result.out_dir / 'report.html'}")


def _analyze_from(from_dir: Path, coverage: float, options: PictureOptions) -> Analysis:
    manifest = read_manifest(from_dir)
    lora_path = Path(manifest["lora"]["path"])
    lora_file = read_lora(lora_path) if lora_path.exists() else None
    return compute_analysis(manifest, from_dir, coverage=coverage, options=options, lora=lora_file)


def _analyze_render(
    lora: Path,
    spec: ModelSpec,
    settings: RenderSettings,
    out: Path,
    *,
    batch_size: int,
    coverage: float,
    options: PictureOptions,
    curve: Criterion | None,
    distances: dict[str, Distance] | None,
) -> Analysis | None:
    """Render and analyse; None in a helper process of a launched multi-process sweep."""
    refuse_overwrite([lora, spec.transformer_file], folders=[out])
    lora_file = read_lora(lora)
    shard = None
    from .render.distributed import launched_processes

    if launched_processes() > 1:
        _require_render()
        from .render.distributed import join_processes

        shard, spec = join_processes(spec)
    t0 = time.perf_counter()
    # One read of the LoRA's data gives its hash (the cache keys) and the manifest's norms.
    stats, sha = block_stats_and_sha256(lora_file)
    # One progress bar per terminal: the helper processes render quietly.
    bar = _Bar("rendering") if shard is None or shard.is_main else None
    result = None
    try:
        with _lazy_renderer(spec, lora_file) as renderer:
            if shard is not None and not shard.is_main:
                renders = render_sweep(
                    lora_file,
                    sha,
                    settings,
                    out,
                    renderer,
                    batch_size=batch_size,
                    stats=stats,
                    shard=shard,
                )
                shard.wait()
            else:
                result = analyze(
                    lora_file,
                    sha,
                    settings,
                    out,
                    renderer,
                    batch_size=batch_size,
                    coverage=coverage,
                    options=options,
                    progress=bar,
                    curve=curve,
                    distances=distances,
                    stats=stats,
                    shard=shard,
                )
                renders = result.renders
    finally:
        if bar is not None:
            bar.close()
    _print_renders(renders, time.perf_counter() - t0, shard)
    return result


def _print_renders(r: RenderStats, seconds: float, shard: Shard | None) -> None:
    who = "" if shard is None else f"process {shard.index + 1} of {shard.count}: "
    click.echo(
        f"{who}rendered {r.rendered} images ({r.cached} cached of {r.planned}) in {seconds:.1f} s"
    )
    if r.damaged:
        click.echo(
            f"note: {who}{r.damaged} cached image{'s were' if r.damaged != 1 else ' was'} "
            "damaged or had no record and rendered again",
            err=True,
        )


@cli.command(epilog=VERDICT_HELP + "\n\n" + EXIT_CODES_HELP)
@click.argument("full", type=click.Path(path_type=Path), callback=_file_argument)
@click.argument(
    "slim_file", metavar="SLIM", type=click.Path(path_type=Path), callback=_file_argument
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
    spec = _need_spec(spec)
    out = out_dir or _beside(slim_file, ".verify")
    refuse_overwrite([full, slim_file, spec.transformer_file], folders=[out])
    full_file, slim_lora_file = read_lora(full), read_lora(slim_file)
    sha = file_sha256(full)
    # A resize (slim --auto --max-size) is rendered as itself, beside the full LoRA.
    kept, resized = verify_target(full_file, sha, slim_lora_file)
    settings = request.settings(spec.model)
    with (
        _session(spec, full_file) as sess,
        _session(spec, slim_lora_file) if resized else contextlib.nullcontext() as cand,
    ):
        result = verify_slim(
            full_file,
            sha,
            kept,
            settings,
            sess.renderer,
            criterion=criterion,
            distances=_distances(perceptual, spec.device),
            slim_path=slim_file,
            out_dir=out,
            scale=max(1, 256 // settings.width),
            candidate=cand.renderer if cand is not None else None,
        )
    _print_verification(result)
    click.echo(f"wrote    {out / 'verify.png'}, {out / 'verify.json'}")
    if not result.measurable:
        raise result.no_effect_error()
    if not result.passed:
        sys.exit(EXIT_FAILED)


def _share(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _print_verification(result: VerifyResult) -> None:
    click.echo(f"kept blocks  {format_block_spec(result.kept_blocks) or 'none'}")
    click.echo("kept share = 1 - d(slim, full) / d(base, full); " + result.criterion.describe())
    click.echo(
        f"{'prompt':>6} {'seed':>6} {'effect MSE':>10} {'kept MSE':>9} {'kept SSIM':>9} "
        f"{'SSIM':>8}  verdict"
    )
    for i in result.images:
        verdict = ("pass" if i.passed else "FAIL") if i.measurable else "no effect"
        click.echo(
            f"{i.prompt:>6} {i.seed:>6} {i.effect['mse']:>10.2f} "
            f"{_share(i.kept.get('mse')):>9} {_share(i.kept.get('ssim')):>9} "
            f"{i.ssim:>8.4f}  {verdict}"
        )
    if not result.measurable:
        click.echo("overall: the LoRA shows no measurable effect on some image: NOT VERIFIED")
        return
    click.echo(
        f"overall: worst share of the effect kept {_share(result.kept_share)} "
        f"(min {100 * result.min_kept:g}%), worst SSIM {result.worst_ssim:.4f}: "
        f"{'PASS' if result.passed else 'FAIL'}"
    )


def _print_effects(analysis: Analysis) -> None:
    click.echo("\nthe LoRA's effect per image (base vs full):")
    prompts = analysis.settings.render.prompts
    for e in analysis.effects:
        click.echo(
            f"  prompt {e['prompt']} seed {e['seed']}: MSE {e['mse']:.2f}, "
            f"1-SSIM {e['ssim_distance']:.4f}  ({prompts[e['prompt']][:40]!r})"
        )
    for warning in analysis.warnings:
        click.echo(f"warning: {warning}", err=True)


def _print_curve(analysis: Analysis) -> None:
    if not analysis.curve:
        return
    click.echo(
        "\npruning curve (top-k blocks: worst share of the effect kept, MSE / 1-SSIM, size):"
    )
    for p in analysis.curve:
        mark = "" if p.rendered else "  (by definition)"
        click.echo(
            f"  k={p.k:>3}  {_share(p.worst.get('mse')):>7} / {_share(p.worst.get('ssim')):>7}"
            f"  {human_bytes(p.bytes):>10}  {'pass' if p.passed else '-'}{mark}"
        )
    click.echo(f"curve    {analysis.out_dir / 'pruning_curve.png'}")


@cli.command(epilog=EXIT_CODES_HELP)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("lora-prune-demo"),
    show_default=True,
    help="Output folder.",
)
def demo(out_dir: Path) -> None:
    """Run the whole loop on the built-in tiny model: no downloads, about a minute on a CPU.

    Makes a LoRA with a few planted strong blocks, analyzes it (solo and
    leave-one-out), slims it to the suggested keep set and verifies the result.
    """
    _require_render()
    from .render.workflows import run_demo

    bar = _Bar("rendering")
    try:
        result = run_demo(out_dir, progress=bar)
    finally:
        bar.close()
    click.echo(
        f"demo LoRA  {result.lora_path} (planted: "
        + ", ".join(f"{b} x{s:g}" for b, s in result.planted.items())
        + ")"
    )
    _print_ranking(result.analysis, limit=8, planted=list(result.planted))
    _print_suggestion(result.analysis)
    found = set(result.analysis.suggestion.blocks)
    planted = set(result.planted)
    click.echo(
        f"\nplanted blocks found: {len(found & planted)} of {len(planted)}"
        + (f"; extra: {format_block_spec(found - planted)}" if found - planted else "")
    )
    click.echo(
        f"slim       {result.slim.output}: {human_bytes(result.slim.bytes_before)} -> "
        f"{human_bytes(result.slim.bytes_after)}"
    )
    _print_verification(result.verification)
    click.echo(f"report     {result.analysis.out_dir / 'report.html'}")
    click.echo(f"done in {result.seconds:.1f} s")


@cli.command(epilog=CHECK_EXIT_HELP)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--policy",
    type=click.Path(path_type=Path),
    callback=_file_argument,
    help="TOML policy: max size, allowed/required blocks, metadata, verified slims.",
)
@click.option(
    "--format", "fmt", type=click.Choice(CHECK_FORMATS), default="text", show_default=True
)
@click.option(
    "--model",
    metavar="M",
    help="Re-render slim files against their full files instead of trusting the "
    "recorded verification (needs --prompt).",
)
@click.option("--prompt", "prompts", multiple=True, help="With --model: prompt (repeatable).")
@seeds_opt
@verdict_options("With --model: ")
def check(
    paths: tuple[Path, ...],
    policy: Path | None,
    fmt: str,
    model: str | None,
    prompts: tuple[str, ...],
    seeds: tuple[int, ...],
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
        settings = RenderRequest(prompts=prompts, seeds=seeds).settings(model)
        _require_render()
        from .render.workflows import make_reverify

        reverify = make_reverify(ModelSpec(model), settings, criterion)
    result = run_check(list(paths), load_policy(policy) if policy else None, reverify=reverify)
    click.echo(render_check(result, fmt), nl=False)
    sys.exit(result.exit_code)


def _block_ranks(value: str) -> list[tuple[str, frozenset[str], int]]:
    """``--ranks``: its ``SPEC=RANK`` entries as (spec, block ids, rank), in order.

    A SPEC is a block spec as ``--keep`` takes it, so it may hold commas itself
    (``double.0-2,double.7=32``: the parts before an ``=`` belong to its SPEC).
    """
    entries: list[tuple[str, frozenset[str], int]] = []
    parts: list[str] = []
    example = "e.g. --ranks double.0-7=32,single=8,input=16"
    for piece in value.split(","):
        head, eq, number = piece.partition("=")
        parts.append(head)
        if not eq:
            continue
        spec = ",".join(parts).strip()
        parts = []
        text = number.strip()
        if not text.isascii() or not text.isdigit() or int(text) < 1:
            raise UsageError(
                f"the rank {text!r} of {spec!r} is not an integer >= 1", "--ranks", example
            )
        entries.append((spec, _spec(spec, "--ranks") or frozenset(), int(text)))
    rest = ",".join(parts).strip()
    if rest or not entries:
        what = f"{rest!r} has no rank" if rest else "--ranks names no block"
        raise UsageError(what, "--ranks", f"write SPEC=RANK, {example}")
    return entries


@cli.command(epilog=EXIT_CODES_HELP)
@lora_arg
@click.option(
    "--rank",
    type=int,
    help="New rank of every plain LoRA module (>= 1); with --ranks, of the blocks it does not name.",
)
@click.option(
    "--energy",
    type=float,
    help="Per module, the smallest rank keeping this share of its energy, in (0, 1].",
)
@click.option(
    "--ranks",
    "ranks_spec",
    metavar="SPEC=R,...",
    help="Per-block ranks, e.g. double.0-7=32,single=8,input=16 (a later entry overrides an "
    "earlier one); blocks not named get --rank, or stay as they are without it.",
)
@click.option("--blocks", "blocks_spec", metavar="SPEC", help="Resize only these blocks.")
@lora_output_options(".resized")
@allow_unknown_opt
def resize(
    lora: Path,
    rank: int | None,
    energy: float | None,
    ranks_spec: str | None,
    blocks_spec: str | None,
    output: Path | None,
    force: bool,
    allow_unknown: bool,
) -> None:
    """Lower the rank of a LoRA's modules: exact SVD of each product, truncated.

    Alpha is rewritten so that every module's scale (alpha / rank) stays; keys
    and dtypes are the input's. LoHa, LoKr, full and other non-plain modules
    are kept as they are and listed. --ranks gives blocks their own rank, in
    block specs as --keep takes them; --blocks limits every rank to its blocks.

    \b
    Example: lora-prune resize my_lora.safetensors --rank 16
    Example: lora-prune resize my_lora.safetensors --energy 0.95 --blocks single
    Example: lora-prune resize my_lora.safetensors --rank 16 --ranks double.0-7=32,single=8
    """
    from .resize import resize_lora

    blocks = _spec(blocks_spec, "--blocks")
    source: Path | LoraFile = lora
    ranks: dict[str, int] | None = None
    if ranks_spec is not None:
        if energy is not None:
            raise UsageError(
                "--ranks and --energy do not combine",
                "--ranks",
                "give --ranks with or without --rank",
            )
        entries = _block_ranks(ranks_spec)
        if rank is not None and rank < 1:
            raise UsageError(
                f"--rank {rank} is not an integer >= 1", "--rank", "use e.g. --rank 16"
            )
        source = read_lora(lora, allow_unknown=allow_unknown)
        for spec, named, _ in entries:
            if not named & set(source.blocks):
                click.echo(f"note: the LoRA has no {spec}; --ranks changes nothing there", err=True)
        # --rank is the default of the blocks --ranks does not name; a later entry wins.
        ranks = dict.fromkeys(source.blocks, rank) if rank is not None else {}
        for _, named, k in entries:
            ranks.update(dict.fromkeys(named, k))
        rank = None
    result = resize_lora(
        source,
        output,
        rank=rank,
        energy=energy,
        ranks=ranks,
        blocks=blocks,
        force=force,
        allow_unknown=allow_unknown,
    )
    for stem, why in result.kept_as_is.items():
        click.echo(f"kept as is  {stem}: {why}")
    before = sum(m.rank_before for m in result.modules)
    after = sum(m.rank_after for m in result.modules)
    worst = min((m.energy_kept for m in result.modules), default=1.0)
    click.echo(
        f"resized  {len(result.resized)} of {len(result.modules)} modules, total rank "
        f"{before} -> {after}, least energy kept {100 * worst:.2f}%"
    )
    ratio = result.bytes_after / result.bytes_before if result.bytes_before else 1.0
    click.echo(
        f"size     {human_bytes(result.bytes_before)} -> {human_bytes(result.bytes_after)} "
        f"({100 * ratio:.1f}%)"
    )
    click.echo(f"wrote    {result.output}")


@cli.command(epilog=EXIT_CODES_HELP)
@_gather(model_file_options(), lambda kw: None)
@click.option(
    "--model",
    metavar="M",
    help="A diffusers FLUX.1 folder to take the tokenizers from when --comfy has none.",
)
@click.option("--dtype", type=click.Choice(["fp32", "bf16", "fp16"]), help="Compute dtype.")
@click.option("--steps", type=int, default=20, show_default=True)
@click.option("--size", type=int, default=768, show_default=True)
def doctor(
    comfy: Path | None,
    transformer_file: Path | None,
    clip_file: Path | None,
    t5_file: Path | None,
    vae_file: Path | None,
    model: str | None,
    dtype: str | None,
    steps: int,
    size: int,
) -> None:
    """Show the model files found, their sizes, the memory plan and a time estimate.

    Renders nothing and loads no weights (only safetensors headers are read).

    \b
    Example: lora-prune doctor --comfy ~/ComfyUI
    """
    from .comfy import diagnose
    from .memoryplan import free_gpu_bytes

    folder = Path(model).expanduser() if model else None
    found = diagnose(
        comfy,
        {"transformer": transformer_file, "clip": clip_file, "t5": t5_file, "vae": vae_file},
        tokenizer_folder=folder,
        dtype=dtype,
        gpu=free_gpu_bytes(),
        steps=steps,
        size=size,
    )
    for kind, part in found.models.chosen.items():
        click.echo(
            f"{kind:<12}{part.path} ({part.dtype}, {human_bytes(part.nbytes)}; "
            f"{human_bytes(found.compute_bytes[kind])} in {found.compute_dtype}): {part.reason}"
        )
    tok = found.models.tokenizers
    if tok is None:
        click.echo(f"tokenizers  missing: {found.models.tokenizer_problem}")
    else:
        click.echo(f"tokenizers  {tok.clip_vocab.parent} (CLIP), {tok.t5} (T5)")
    for part, why in found.models.others:
        click.echo(f"not used    {part.path}: {why}")
    for path, why in found.models.skipped:
        click.echo(f"skipped     {path}: {why}")
    gpu = found.gpu
    click.echo(
        "gpu         no GPU: cpu"
        if gpu is None
        else f"gpu         {gpu[0] / 2**30:.1f} GiB free of {gpu[1] / 2**30:.1f} GiB"
    )
    click.echo(f"plan        --memory auto -> {found.plan.plan} ({found.plan.reason})")
    click.echo(f"peak        ~{found.plan.peak_bytes / 2**30:.1f} GiB (estimate)")
    if found.seconds_per_image is None:
        click.echo("time        not estimated on a CPU (hours per image at FLUX.1's size)")
    else:
        click.echo(
            f"time        ~{found.seconds_per_image:.0f} s per image at {size}x{size}, {steps} "
            "steps (estimate: scaled from ~35 s on a 3090 Ti-class card)"
        )


def _terminated(signum: int, frame: FrameType | None) -> None:
    # Further TERMs must not cut the cleanup short; SIGKILL still ends the process.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> None:
    """The console entry point: SIGTERM ends a command like Ctrl-C does.

    Both raise KeyboardInterrupt, so that ``atomic_output`` removes its temp file
    on the way out and the command exits with EXIT_INTERRUPTED (130).
    """
    args = list(argv) if argv is not None else None
    if threading.current_thread() is not threading.main_thread():
        # Only the main thread may install signal handlers.
        cli.main(args=args, prog_name="lora-prune")
        return
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        cli.main(args=args, prog_name="lora-prune")
    finally:
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":  # pragma: no cover
    main()
