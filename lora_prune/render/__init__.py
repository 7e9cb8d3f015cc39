"""Rendering with diffusers: the tiny offline FLUX.1 pipeline and loading real pipelines.

Needs the ``render`` extra. Importing this package does not import torch: the
names below are loaded on first use, after :func:`require_render` has turned a
missing dependency into a one-line :class:`~lora_prune.errors.MissingDependencyError`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .deps import require_render

if TYPE_CHECKING:
    from .checkpoints import shipped_transformer_config
    from .loading import LoadedModel, ModelSpec, load_pipeline, resolve_device_dtype
    from .tiny import (
        TINY_MAX_SEQUENCE_LENGTH,
        TINY_MODEL_ID,
        TINY_RESOLUTION,
        TINY_STEPS,
        build_tiny_pipeline,
    )
    from .transformerfile import convert_transformer_checkpoint

_LAZY: dict[str, str] = {
    "LoadedModel": "loading",
    "ModelSpec": "loading",
    "convert_transformer_checkpoint": "transformerfile",
    "load_pipeline": "loading",
    "resolve_device_dtype": "loading",
    "shipped_transformer_config": "checkpoints",
    "TINY_MAX_SEQUENCE_LENGTH": "tiny",
    "TINY_MODEL_ID": "tiny",
    "TINY_RESOLUTION": "tiny",
    "TINY_STEPS": "tiny",
    "build_tiny_pipeline": "tiny",
}

__all__ = [
    "TINY_MAX_SEQUENCE_LENGTH",
    "TINY_MODEL_ID",
    "TINY_RESOLUTION",
    "TINY_STEPS",
    "LoadedModel",
    "ModelSpec",
    "build_tiny_pipeline",
    "convert_transformer_checkpoint",
    "load_pipeline",
    "require_render",
    "resolve_device_dtype",
    "shipped_transformer_config",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    require_render()
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value
