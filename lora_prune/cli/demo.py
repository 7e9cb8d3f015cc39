"""``lora-prune demo``: the whole loop on the built-in tiny model, no downloads."""

from __future__ import annotations

from pathlib import Path

import click

from ..blocks import format_block_spec
from ..render import require_render
from ..units import human_bytes
from ._app import EXIT_CODES_HELP
from ._printers import ProgressBar, print_ranking, print_suggestion, print_verification


@click.command(epilog=EXIT_CODES_HELP)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=Path("lora-prune-demo"),
    show_default=True,
    help="Output folder.",
)
def demo(out_dir: Path) -> None:
    """Run the whole loop on the built-in tiny model: no downloads, under a minute on a CPU.

    Makes a LoRA with a few planted strong blocks, analyzes it (solo and
    leave-one-out), slims it to the suggested keep set and verifies the result.
    """
    require_render()
    from ..render.workflows import run_demo

    with ProgressBar("rendering") as bar:
        result = run_demo(out_dir, progress=bar)
    click.echo(
        f"demo LoRA  {result.lora_path} (planted: "
        + ", ".join(f"{b} x{s:g}" for b, s in result.planted.items())
        + ")"
    )
    print_ranking(result.analysis, limit=8, planted=list(result.planted))
    print_suggestion(result.analysis)
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
    print_verification(result.verification)
    click.echo(f"report     {result.analysis.out_dir / 'report.html'}")
    click.echo(f"done in {result.seconds:.1f} s")
