"""The ``lora-prune`` command line: parses arguments, calls the library, prints.

Nothing here computes: every command is a thin shell over a library verb.
Errors from :mod:`lora_prune.errors` become one ``error: ...`` line on stderr
and the exit code documented there.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__
from .blocks import format_block_spec, parse_block_spec
from .errors import EXIT_INTERRUPTED, LoraPruneError, UsageError
from .lora import read_lora
from .slim import slim_lora
from .stats import SORT_KEYS, LoraReport, inspect_lora

F = TypeVar("F", bound=Callable[..., Any])

EXIT_CODES_HELP = """\b
Exit codes: 0 ok, 1 verification/policy failed, 2 usage, 3 unreadable or
unsafe file, 4 unsupported LoRA, 5 missing optional dependency, 6 output
could not be written, 130 interrupted."""


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


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
    echo(f"tensors       {sum(b.tensors for b in report.blocks)}, {report.total_params:,} parameters")
    echo(f"dtypes        {_counter_text(report.dtypes)}")
    echo(f"adapters      {_counter_text(report.adapters)}")
    echo(f"ranks         {_counter_text(report.ranks)}")
    echo(f"alphas        {_counter_text(report.alphas, _alpha_text) if report.alphas else 'none (scale 1)'}")
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
    """A group whose commands report :class:`LoraPruneError` as one line."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LoraPruneError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("error: interrupted, run the command again to continue", err=True)
            sys.exit(EXIT_INTERRUPTED)


@click.group(cls=LoraPruneGroup, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="lora-prune")
def cli() -> None:
    """Find which blocks of a FLUX.1 LoRA matter and ship smaller LoRAs."""


lora_arg = click.argument("lora", type=click.Path(path_type=Path, dir_okay=False))
allow_unknown_opt = click.option(
    "--allow-unknown", is_flag=True, help="Report keys that match no FLUX.1 format as block 'other'."
)


@cli.command(epilog=EXIT_CODES_HELP)
@lora_arg
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--sort", type=click.Choice(SORT_KEYS), default="block", show_default=True,
              help="Order of the block rows.")
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
@click.option("-o", "--output", type=click.Path(path_type=Path, dir_okay=False),
              help="Output file [default: <stem>.slim.safetensors beside the input].")
@click.option("--force", is_flag=True, help="Replace an existing output (never the input).")
@allow_unknown_opt
def slim(
    lora: Path, keep: str | None, drop: str | None, output: Path | None, force: bool,
    allow_unknown: bool,
) -> None:
    """Write a LoRA that keeps only the chosen blocks, byte-identical for what it keeps.

    \b
    SPEC: block ids with ranges and groups, e.g. double.0-5,double.7,single.10-20,input;
    the groups double, single, te (clip+t5), all; a block-weight vector of 57, 58, 61
    or 19 comma-separated weights (0 = drop); or kohya's
    train_double_block_indices=0,1,8-12 (train_single_block_indices=...).

    Example: lora-prune slim my_lora.safetensors --keep double.7,double.12,single.7-20
    """
    result = slim_lora(
        lora,
        _spec(keep, "--keep"),
        drop=_spec(drop, "--drop"),
        output=output,
        force=force,
        allow_unknown=allow_unknown,
    )
    if result.absent:
        click.echo(f"note: the LoRA has no {format_block_spec(result.absent)}; nothing to keep there",
                   err=True)
    click.echo(f"kept     {format_block_spec(result.kept_blocks)}")
    click.echo(f"dropped  {format_block_spec(result.dropped_blocks) or 'nothing'}")
    ratio = result.bytes_after / result.bytes_before if result.bytes_before else 1.0
    click.echo(
        f"size     {human_bytes(result.bytes_before)} -> {human_bytes(result.bytes_after)} "
        f"({100 * ratio:.1f}%), {result.tensors_before} -> {result.tensors_after} tensors"
    )
    click.echo(f"wrote    {result.output}")


def main(argv: Sequence[str] | None = None) -> None:
    cli.main(args=list(argv) if argv is not None else None, prog_name="lora-prune")


if __name__ == "__main__":  # pragma: no cover
    main()
