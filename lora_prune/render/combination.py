"""The manual mode of ``lora-prune render``: base, full and chosen renders compared.

One engine batch renders no LoRA, the whole LoRA and the chosen blocks; the
numbers come from :mod:`lora_prune.metrics` and the side-by-side picture from
:func:`lora_prune.pictures.combination_picture`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..blocks import format_block_spec
from ..metrics import mse, ssim
from ..pictures import combination_picture
from ..settings import ImageSettings
from .engine import BlockEngine

__all__ = ["CombinationResult", "render_combination"]


@dataclass(frozen=True)
class CombinationResult:
    """The manual mode's renders and numbers (MSE in 8-bit units, 0..65025)."""

    blocks: frozenset[str]
    settings: ImageSettings
    base: np.ndarray
    full: np.ndarray
    chosen: np.ndarray
    mse_vs_base: float
    ssim_vs_base: float
    mse_vs_full: float
    ssim_vs_full: float
    #: base | full | chosen | heatmap of chosen vs full, labelled
    picture: Image.Image = field(repr=False)


def render_combination(
    engine: BlockEngine,
    blocks: frozenset[str],
    settings: ImageSettings,
    *,
    scale: int | None = None,
) -> CombinationResult:
    """Render no LoRA, the whole LoRA and ``blocks`` in one batch and compare them.

    Args:
        engine: a :class:`~lora_prune.render.engine.BlockEngine` with the LoRA attached.
        blocks: the block ids to switch on for the "chosen" render.
        settings: prompt, seed, size, steps, guidance and strength of the renders.
        scale: upscale factor of the picture's tiles; None upscales small
            renders to about 256 px so captions stay legible.

    The heatmap shows where the chosen blocks differ from the full LoRA (what
    dropping the other blocks costs).

    Example::

        with open_session(ModelSpec(model="tiny"), read_lora("style.safetensors")) as s:
            result = render_combination(s.engine, frozenset({"double.7"}), settings)
        save_png(result.picture, Path("combo.png"))
    """
    chosen_blocks = frozenset(blocks)
    base, full, chosen = engine.render(
        [frozenset(), frozenset(engine.blocks), chosen_blocks], settings, batch_size=3
    )
    mse_full = mse(chosen, full)
    ssim_full = ssim(chosen, full)
    picture = combination_picture(
        base,
        full,
        chosen,
        format_block_spec(chosen_blocks) or "none",
        full_mse=mse(full, base),
        chosen_mse=mse_full,
        chosen_ssim=ssim_full,
        scale=scale,
    )
    return CombinationResult(
        blocks=chosen_blocks,
        settings=settings,
        base=base,
        full=full,
        chosen=chosen,
        mse_vs_base=mse(chosen, base),
        ssim_vs_base=ssim(chosen, base),
        mse_vs_full=mse_full,
        ssim_vs_full=ssim_full,
        picture=picture,
    )
