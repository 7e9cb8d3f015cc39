"""``lora-prune resize``: lower the rank of a LoRA's modules by exact, truncated SVD."""

from __future__ import annotations

from pathlib import Path

import click

from ..resize import BlockRanks, resize_lora
from ..units import human_bytes
from ._app import EXIT_CODES_HELP
from ._options import allow_unknown_opt, block_spec, lora_arg, lora_output_options
from ._printers import print_kept_as_is


@click.command(epilog=EXIT_CODES_HELP)
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
    result = resize_lora(
        lora,
        output,
        rank=rank,
        energy=energy,
        block_ranks=BlockRanks.parse(ranks_spec) if ranks_spec is not None else None,
        blocks=block_spec(blocks_spec, "--blocks"),
        force=force,
        allow_unknown=allow_unknown,
    )
    for spec in result.unmatched:
        click.echo(f"note: the LoRA has no {spec}; --ranks changes nothing there", err=True)
    print_kept_as_is(result.kept_as_is)
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
