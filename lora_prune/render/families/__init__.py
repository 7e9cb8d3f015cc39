"""The render side of the model families: how each family's diffusers pipeline is called.

The engine attaches a LoRA and switches its blocks per image; encoding the
prompt, drawing the starting noise and calling the pipeline differ per family
(FLUX.1: CLIP + T5 and distilled guidance; Chroma: T5 and true CFG; Kontext:
an input image). Each family's :class:`PipelineCall` lives beside its facts.
"""

from __future__ import annotations

from ...errors import UnsupportedLoraError
from ...families import Family
from .base import PipelineCall as PipelineCall
from .flux1 import FluxCall

_CALLS: dict[str, PipelineCall] = {"flux1": FluxCall()}


def pipeline_call(family: Family) -> PipelineCall:
    """The pipeline call of ``family``; refused for a family lora-prune cannot render."""
    call = _CALLS.get(family.name)
    if call is None:
        raise UnsupportedLoraError(
            f"rendering {family.display} is not supported yet",
            family.display,
            "use inspect, slim, resize and check, which need no rendering",
        )
    return call
