"""Synthetic FLUX.1 LoRA files in every key grammar of the field guide, with numpy only.

Shipped with the package (as click ships ``click.testing``) because the
``demo`` command plants a LoRA with it; the tests, benchmarks and fuzzers use it
too. It needs LoRAs whose every key, shape and value is known:
:func:`synth_tensors` builds one for a :class:`SynthSpec` (grammar, geometry,
blocks, rank, alpha, dtype, per-block strength) and :func:`write_synth_lora`
writes it. Shapes are the real module shapes of the geometry (``TINY`` for
tests, ``FLUX1_DEV`` for real-size checks). A block whose strength is 0 gets
exactly zero "up" factors, so its weight delta is exactly zero:
:func:`planted_lora` uses that to plant influence in chosen blocks only.

Example::

    from lora_prune.testing import SynthSpec, planted_lora, write_synth_lora

    write_synth_lora("kohya.safetensors", SynthSpec(grammar="kohya", rank=8))
    planted_lora("planted.safetensors", {"double.3": 1.0, "single.10": 0.5})

The generator's module tables are written independently of the parser's
(:mod:`lora_prune.keys`), so that the tests compare two readings of the field
guide rather than the parser with itself.
"""

from __future__ import annotations

from ..families.flux1.synth_grammars import (
    ADAPTERS,
    ALPHA_KEY_GRAMMARS,
    GRAMMARS,
    PEFT_METADATA_GRAMMARS,
    SYNTH_DTYPES,
    SynthModule,
    SynthSpec,
    expected_scale,
)
from ..families.flux1.synth_modules import (
    default_blocks,
    diffusers_linear_shapes,
    supported_blocks,
    synth_modules,
)
from ._files import planted_lora, synth_metadata, synth_tensors, write_synth_lora

__all__ = [
    "ADAPTERS",
    "ALPHA_KEY_GRAMMARS",
    "GRAMMARS",
    "PEFT_METADATA_GRAMMARS",
    "SYNTH_DTYPES",
    "SynthModule",
    "SynthSpec",
    "default_blocks",
    "diffusers_linear_shapes",
    "expected_scale",
    "planted_lora",
    "supported_blocks",
    "synth_metadata",
    "synth_modules",
    "synth_tensors",
    "write_synth_lora",
]
