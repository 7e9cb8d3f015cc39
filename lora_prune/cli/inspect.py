"""``lora-prune inspect``: a LoRA's format, dtypes, ranks, alphas and per-block norms."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..lora import read_lora
from ..stats import SORT_KEYS, inspect_lora
from ._app import EXIT_CODES_HELP
from ._options import allow_unknown_opt, lora_arg
from ._printers import print_report


@click.command(epilog=EXIT_CODES_HELP)
@lora_arg
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option(
    "--sort",
    type=click.Choice(SORT_KEYS),
    default=SORT_KEYS[0],
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
