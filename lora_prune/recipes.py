"""Retraining recipes: the trainer settings that train only a keep set, as its family writes them.

The settings themselves are family facts (FLUX.1's kohya ``train_double_block_indices``,
ai-toolkit module paths, OneTrainer patterns: :mod:`lora_prune.families.flux1.recipes`);
this module asks the LoRA's family.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .families import Family
from .families.base import Recipe as Recipe
from .lora import LoraFile

__all__ = ["Recipe", "input_ranks", "recipes_for"]


def input_ranks(lora: LoraFile) -> tuple[int, ...]:
    """The LoRA's ranks on its input layers, as its family's recipes take them."""
    return lora.family.input_ranks(lora.modules.values())


def recipes_for(
    family: Family, blocks: Iterable[str], *, input_ranks: Sequence[int] | None = None
) -> list[Recipe]:
    """The settings that train only ``blocks`` of a ``family`` model, one per trainer.

    Example::

        for r in recipes_for(lora.family, {"double.7", "single.20"}, input_ranks=input_ranks(lora)):
            print(r.trainer, r.text)
    """
    return family.recipes_for(blocks, input_ranks)
