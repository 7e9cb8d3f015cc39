"""lora-prune: find which blocks of a LoRA for a diffusion transformer matter and ship smaller LoRAs.

The public API is this module's ``__all__``: the verbs :func:`read_lora`,
:func:`inspect_lora`, :func:`plan_slim`, :func:`slim_lora`, :func:`resize_lora`,
:func:`parse_block_spec`/:func:`format_block_spec` (no rendering needed; a
LoRA's blocks are its family's, ``lora.family.blocks``, of :data:`FAMILIES`),
:func:`analyze`, :func:`verify_slim`, :func:`auto_keep` (rank and prove with a
renderer) and :func:`run_check` (the CI gate); the dataclasses they return; and
the exception tree of :mod:`lora_prune.errors`, whose root
:class:`LoraPruneError` is every error a user can cause. Rendering with
diffusers lives in :mod:`lora_prune.render` (the ``render`` extra);
synthetic LoRAs for tests in :mod:`lora_prune.testing`. Names not exported here
or in a submodule's ``__all__`` are internal and may change.

Example::

    from lora_prune import inspect_lora, parse_block_spec, read_lora, slim_lora

    lora = read_lora("my_lora.safetensors")
    print([(b.block, b.norm) for b in inspect_lora(lora, sort="norm").blocks[:5]])
    keep = parse_block_spec("double.7,single.20", lora.family.blocks)
    slim_lora(lora, keep, output="small.safetensors")
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .blocks import BlockLayout, BlockSpec, format_block_spec, parse_block_spec
from .errors import (
    BlockIndexError,
    BlockSpecError,
    BudgetError,
    CorruptFileError,
    IncompleteFileError,
    LoraPruneError,
    MissingDependencyError,
    ModelMismatchError,
    NoEffectError,
    NotASubsetError,
    NotSafetensorsError,
    OutputError,
    OutputExistsError,
    SameFileError,
    UnknownKeysError,
    UnreadableFileError,
    UnsafeFileError,
    UnsupportedAdapterError,
    UnsupportedLoraError,
    UsageError,
    WrongBaseModelError,
)
from .families import FAMILIES, Family
from .lora import LoraFile, LoraModule, read_lora
from .slim import SlimPlan, SlimResult, plan_slim, slim_lora
from .stats import BlockStats, LoraReport, inspect_lora

if TYPE_CHECKING:
    from .analysis import Analysis, AnalyzeSettings, analyze
    from .check import CheckResult, Policy, load_policy, run_check
    from .resize import ModuleResize, ResizeResult, resize_lora
    from .verdict import Criterion
    from .verify import AutoResult, VerifyResult, auto_keep, verify_slim

# Loaded on first use: they pull in Pillow and the picture code (resize: through
# the settings' checks), which inspect, slim and the CLI's start-up do not need.
_LAZY: dict[str, str] = {
    "Analysis": "analysis",
    "AnalyzeSettings": "analysis",
    "analyze": "analysis",
    "CheckResult": "check",
    "Policy": "check",
    "load_policy": "check",
    "run_check": "check",
    "ModuleResize": "resize",
    "ResizeResult": "resize",
    "resize_lora": "resize",
    "Criterion": "verdict",
    "AutoResult": "verify",
    "VerifyResult": "verify",
    "auto_keep": "verify",
    "verify_slim": "verify",
}

__all__ = [
    "FAMILIES",
    "Analysis",
    "AnalyzeSettings",
    "AutoResult",
    "BlockIndexError",
    "BlockLayout",
    "BlockSpec",
    "BlockSpecError",
    "BlockStats",
    "BudgetError",
    "CheckResult",
    "CorruptFileError",
    "Criterion",
    "Family",
    "IncompleteFileError",
    "LoraFile",
    "LoraModule",
    "LoraPruneError",
    "LoraReport",
    "MissingDependencyError",
    "ModelMismatchError",
    "ModuleResize",
    "NoEffectError",
    "NotASubsetError",
    "NotSafetensorsError",
    "OutputError",
    "OutputExistsError",
    "Policy",
    "ResizeResult",
    "SameFileError",
    "SlimPlan",
    "SlimResult",
    "UnknownKeysError",
    "UnreadableFileError",
    "UnsafeFileError",
    "UnsupportedAdapterError",
    "UnsupportedLoraError",
    "UsageError",
    "VerifyResult",
    "WrongBaseModelError",
    "__version__",
    "analyze",
    "auto_keep",
    "format_block_spec",
    "inspect_lora",
    "load_policy",
    "parse_block_spec",
    "plan_slim",
    "read_lora",
    "resize_lora",
    "run_check",
    "slim_lora",
    "verify_slim",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
