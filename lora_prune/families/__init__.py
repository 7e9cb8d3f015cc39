"""Model families: one module knows a model, the registry knows the modules.

Every fact of a model (blocks, LoRA key grammars, checkpoint layouts, render
defaults) lives in its family module and reaches the rest of lora-prune through
its :class:`~lora_prune.families.base.Family`. ``docs/architecture.md`` has the
recipe for adding one.
"""

from __future__ import annotations

from .base import Family as Family
from .flux1 import FLUX1 as FLUX1
from .unsupported import guess_base_model as guess_base_model

#: Every family lora-prune supports, in the order a LoRA's keys are tried against them.
FAMILIES: tuple[Family, ...] = (FLUX1,)


def family_named(name: str) -> Family | None:
    """The family with this :attr:`~Family.name` (``flux1``), or None."""
    return next((f for f in FAMILIES if f.name == name), None)
