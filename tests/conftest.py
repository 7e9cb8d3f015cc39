"""Shared test fixtures: synthetic LoRA files and hand-made safetensors files, in tmp_path."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from lora_prune.safetensors_io import TensorEntry, write_safetensors
from lora_prune.testing import SynthSpec, write_synth_lora

SynthFile = Callable[..., Path]
TensorFile = Callable[..., Path]


@pytest.fixture
def synth_file(tmp_path: Path) -> SynthFile:
    """``synth_file(spec=SynthSpec(), name="lora.safetensors")`` writes a synthetic LoRA."""

    def make(spec: SynthSpec | None = None, name: str = "lora.safetensors") -> Path:
        return write_synth_lora(tmp_path / name, spec if spec is not None else SynthSpec())

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
            entries.append(TensorEntry(key, "F32", tuple(array.shape), array.tobytes))
        return write_safetensors(tmp_path / name, entries, metadata)

    return make
