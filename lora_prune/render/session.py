"""One rendering session: a loaded pipeline with the block engine on a LoRA.

The commands that render (``render``, ``analyze``, ``verify``, ``slim --auto``,
``demo``) all open a session the same way; this is that one way, with the
per-model defaults (the tiny model renders at 64 px in 4 steps).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from ..lora import LoraFile
from .engine import BlockEngine
from .loading import LoadedModel, ModelSpec, load_pipeline
from .sweep import EngineRenderer
from .tiny import TINY_MAX_SEQUENCE_LENGTH, TINY_MODEL_ID, TINY_RESOLUTION, TINY_STEPS


@dataclass(frozen=True)
class RenderDefaults:
    size: int
    steps: int
    guidance: float
    max_sequence_length: int


def render_defaults(model: str) -> RenderDefaults:
    """Sensible defaults per model: FLUX.1-dev's for real ones, tiny's for tests and demos."""
    if model == TINY_MODEL_ID:
        return RenderDefaults(TINY_RESOLUTION, TINY_STEPS, 3.5, TINY_MAX_SEQUENCE_LENGTH)
    return RenderDefaults(768, 20, 3.5, 512)


@dataclass
class Session:
    loaded: LoadedModel
    engine: BlockEngine
    renderer: EngineRenderer


@contextmanager
def open_session(
    spec: ModelSpec, lora: LoraFile, *, show_progress: bool = False
) -> Iterator[Session]:
    """Load the model, attach the LoRA, and detach it again on exit."""
    loaded = load_pipeline(spec, show_progress=show_progress)
    engine = BlockEngine(loaded, lora)
    try:
        renderer = EngineRenderer(engine, loaded, render_defaults(spec.model).max_sequence_length)
        yield Session(loaded, engine, renderer)
    finally:
        engine.close()
