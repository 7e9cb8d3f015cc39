"""``lora-prune render``: one block combination beside both references, with MSE and SSIM."""

from __future__ import annotations

from pathlib import Path

import click

from ..blocks import BlockSpec, format_block_spec
from ..render import require_render
from ..settings import ModelSpec, RenderRequest
from ._app import EXIT_CODES_HELP
from ._model_options import render_options
from ._options import lora_arg, need_spec


@click.command(epilog=EXIT_CODES_HELP)
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
    spec = need_spec(spec)
    blocks = BlockSpec(blocks_spec, "--blocks")
    require_render()
    from ..render.workflows import render_blocks

    result = render_blocks(lora, spec, request.settings(spec.model), blocks, output, force=force)
    click.echo(f"blocks   {format_block_spec(result.blocks) or 'none'}")
    click.echo(f"vs no LoRA   MSE {result.mse_vs_base:10.2f}  SSIM {result.ssim_vs_base:.4f}")
    click.echo(f"vs full LoRA MSE {result.mse_vs_full:10.2f}  SSIM {result.ssim_vs_full:.4f}")
    click.echo(f"wrote    {output}")
