"""Shared test fixtures: synthetic LoRA files and hand-made safetensors files, in tmp_path."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from lora_prune.safetensors_io import TensorEntry, write_safetensors
from lora_prune.synth import SynthSpec, write_synth_lora

SynthFile = Callable[..., Path]
TensorFile = Callable[..., Path]


@pytest.fixture
def synth_file(tmp_path: Path) -> SynthFile:
    """``synth_file(spec=None, name="lora.safetensors", **fields)`` writes a synthetic LoRA.

    Fields given as keywords replace those of ``spec`` (default: ``SynthSpec()``).
    """

    def make(
        spec: SynthSpec | None = None, name: str = "lora.safetensors", **fields: object
    ) -> Path:
        base = spec if spec is not None else SynthSpec()
        if fields:
            base = SynthSpec(**{**base.__dict__, **fields})  # type: ignore[arg-type]
        return write_synth_lora(tmp_path / name, base)

    return make


@pytest.fixture
def tensor_file(tmp_path: Path) -> TensorFile:
    """``tensor_file(tensors, metadata=None, name="tensors.safetensors")`` writes F32 tensors.

    For files no generator makes: other base models, unknown keys, odd shapes.
    """

    def make(
        tensors: Mapping[str, npt.ArrayLike],
        metadata: Mapping[str, str] | None = None,
        name: str = "tensors.safetensors",
    ) -> Path:
        entries = []
        for key, value in tensors.items():
            array = np.ascontiguousarray(value, dtype="<f4")
            entries.append(
                TensorEntry(key, "F32", tuple(array.shape), lambda a=array: a.tobytes())
            )
        return write_safetensors(tmp_path / name, entries, metadata)

    return make
