"""lora-prune: find which blocks of a FLUX.1 LoRA matter and ship smaller LoRAs.

The public API is a handful of verbs: :func:`read_lora`, :func:`inspect_lora`,
:func:`slim_lora` and :func:`parse_block_spec`; rendering lives in
:mod:`lora_prune.render` (needs the ``render`` extra). Every error a user can
cause is a :class:`LoraPruneError` (see :mod:`lora_prune.errors`).
"""

from __future__ import annotations

__version__ = "0.1.0"

from .blocks import BLOCK_IDS, format_block_spec, parse_block_spec
from .errors import LoraPruneError
from .lora import LoraFile, LoraModule, read_lora
from .slim import SlimResult, plan_slim, slim_lora
from .stats import LoraReport, inspect_lora

__all__ = [
    "BLOCK_IDS",
    "LoraFile",
    "LoraModule",
    "LoraPruneError",
    "LoraReport",
    "SlimResult",
    "__version__",
    "format_block_spec",
    "inspect_lora",
    "parse_block_spec",
    "plan_slim",
    "read_lora",
    "slim_lora",
]
