"""Shared test fixtures and the suite's scheduling.

Function-scoped: synthetic LoRA files and hand-made safetensors files, in
tmp_path (:func:`write_tensors` writes the latter anywhere, for scoped fixtures).
Session-scoped (built once per worker, shared by every file that asks): the tiny
pipeline, the planted LoRA and the real-width reduced-depth transformer; a test
must not change them (engines attach hooks and remove them on close).
Slow tests are collected first so that the workers start on them and the run
does not end waiting on one long test (docs/performance.md, test suite times).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import numpy.typing as npt
import pytest

from lora_prune.safetensors_io import TensorEntry, write_safetensors
from lora_prune.testing import SynthSpec, planted_lora, write_synth_lora

if TYPE_CHECKING:  # the core's tests must import without the render extra's torch
    import torch

    from lora_prune.render.loading import LoadedModel

#: The planted LoRA's strong blocks: every other block is present with zero weights.
PLANTED = {"double.3": 1.0, "single.7": 1.0, "final": 0.8}

SynthFile = Callable[..., Path]


class TensorFile(Protocol):
    """The ``tensor_file`` fixture's writer."""

    def __call__(
        self,
        tensors: Mapping[str, npt.ArrayLike],
        metadata: Mapping[str, str] | None = None,
        name: str = "tensors.safetensors",
    ) -> Path: ...


@pytest.fixture
def synth_file(tmp_path: Path) -> SynthFile:
    """``synth_file(spec=SynthSpec(), name="lora.safetensors")`` writes a synthetic LoRA."""

    def make(spec: SynthSpec | None = None, name: str = "lora.safetensors") -> Path:
        return write_synth_lora(tmp_path / name, spec if spec is not None else SynthSpec())

    return make


def write_tensors(
    path: Path, tensors: Mapping[str, npt.ArrayLike], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write ``tensors`` as F32 with the project's writer, creating ``path``'s folders.

    For files no generator makes: other base models, unknown keys, odd shapes, planted
    ranks. Each tensor keeps its shape, a 0-d alpha too, as kohya stores it.
    A plain function, so module- and session-scoped fixtures write with it as well.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = []
    for key, value in tensors.items():
        # Not ascontiguousarray: it makes a 0-d array 1-d. tobytes() is C order anyway.
        array = np.asarray(value, dtype="<f4")
        entries.append(TensorEntry(key, "F32", tuple(array.shape), array.tobytes))
    return write_safetensors(path, entries, metadata)


@pytest.fixture
def tensor_file(tmp_path: Path) -> TensorFile:
    """``tensor_file(tensors, metadata=None, name="tensors.safetensors")``: :func:`write_tensors`.

    ``name`` is relative to tmp_path and may name sub-folders ("loras/a.safetensors").
    """

    def make(
        tensors: Mapping[str, npt.ArrayLike],
        metadata: Mapping[str, str] | None = None,
        name: str = "tensors.safetensors",
    ) -> Path:
        return write_tensors(tmp_path / name, tensors, metadata)

    return make


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Longest first: xdist hands out tests in collection order. The sort is stable and
    # the same on every worker, as xdist requires.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture(scope="session")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The planted LoRA (:data:`PLANTED`, kohya, rank 4) for the tiny model; read-only."""
    return planted_lora(tmp_path_factory.mktemp("planted") / "planted.safetensors", PLANTED)


@pytest.fixture(scope="session")
def tiny_model() -> LoadedModel:
    """The tiny pipeline, loaded once per worker."""
    from lora_prune.render.loading import ModelSpec, load_pipeline

    # Pinned: on a GPU machine "tiny" would default to cuda/bf16, where bit-exact checks do not hold.
    return load_pipeline(ModelSpec("tiny", device="cpu", dtype="fp32"))


@pytest.fixture(scope="session")
def real_width_transformer() -> torch.nn.Module:
    """The real-width, 1 double + 1 single block FLUX.1-dev transformer (:mod:`real_width_model`)."""
    from real_width_model import build_real_width_transformer

    return build_real_width_transformer()
