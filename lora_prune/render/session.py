"""One rendering session: a loaded pipeline with the block engine on a LoRA.

The commands that render (``render``, ``analyze``, ``verify``, ``slim --auto``,
``demo``) all open a session the same way; this is that one way, with the model's
prompt length from :func:`lora_prune.settings.model_defaults`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..lora import LoraFile
from ..settings import model_defaults
from .engine import BlockEngine
from .loading import LoadedModel, ModelSpec, load_pipeline
from .sweep import EngineRenderer


@dataclass
class Session:
    loaded: LoadedModel
    engine: BlockEngine
    renderer: EngineRenderer


@contextmanager
def open_session(
    spec: ModelSpec,
    lora: LoraFile,
    *,
    show_progress: bool = False,
    loaded: LoadedModel | None = None,
    truncatable: bool = False,
) -> Iterator[Session]:
    """Load the model, attach the LoRA, and detach it again on exit.

    On a CPU, torch renders with ``spec.threads`` threads (or the model's default)
    for the session, and with as many as before after it.

    ``loaded``: a pipeline an earlier (closed) session loaded, to attach another
    LoRA to without loading the model again. ``truncatable``: attach it so that
    the renderer takes per-image rank caps (see :class:`BlockEngine`).
    """
    if loaded is None:
        loaded = load_pipeline(spec, show_progress=show_progress)
    defaults = model_defaults(spec.model)
    threads = spec.threads or defaults.cpu_threads
    with _cpu_threads(threads if loaded.device.type == "cpu" else None):
        engine = BlockEngine(loaded, lora, compile=spec.compile, truncatable=truncatable)
        try:
            renderer = EngineRenderer(engine, loaded, defaults.max_sequence_length)
            yield Session(loaded, engine, renderer)
        finally:
            engine.close()


@contextmanager
def _cpu_threads(threads: int | None) -> Iterator[None]:
    """torch's CPU threads set to ``threads`` for the block (None: left as they are)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
