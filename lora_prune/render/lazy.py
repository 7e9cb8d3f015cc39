"""A renderer that loads its model on the first render, for sweeps that may need none.

``analyze`` plans its images and checks the cache before it renders; with
:func:`lazy_renderer` a rerun whose images are all cached imports neither
diffusers nor builds a pipeline. That needs the cache identity (model id and
versions) before loading: :func:`~lora_prune.render.device.predicted_identity`
knows it for the tiny model; for other models the session opens at once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Protocol

import numpy as np

from ..renderer import Renderer
from ..settings import ModelSpec, RenderSettings
from .device import predicted_identity


class _HasRenderer(Protocol):
    @property
    def renderer(self) -> Renderer: ...


Opener = Callable[[], AbstractContextManager[_HasRenderer]]


class _LazyRenderer:
    def __init__(
        self, model_id: str, versions: Mapping[str, str], opener: Opener, stack: ExitStack
    ) -> None:
        self.model_id = model_id
        self.versions = versions
        self._opener = opener
        self._stack = stack
        self._renderer: Renderer | None = None

    def __call__(
        self, variants: Sequence[frozenset[str]], prompt: str, seed: int, settings: RenderSettings
    ) -> list[np.ndarray]:
        if self._renderer is None:
            renderer = self._stack.enter_context(self._opener()).renderer
            if (renderer.model_id, dict(renderer.versions)) != (self.model_id, dict(self.versions)):
                # The cache keys were computed from the prediction: they would be wrong.
                raise RuntimeError(
                    f"predicted render identity {self.model_id} {dict(self.versions)} differs "
                    f"from the session's {renderer.model_id} {dict(renderer.versions)}"
                )
            self._renderer = renderer
        return self._renderer(variants, prompt, seed, settings)


@contextmanager
def lazy_renderer(spec: ModelSpec, opener: Opener) -> Iterator[Renderer]:
    """A :class:`~lora_prune.renderer.Renderer` for ``spec`` whose session ``opener()`` opens on first use.

    The session (when opened) is closed when the block ends.
    """
    with ExitStack() as stack:
        predicted = predicted_identity(spec)
        if predicted is None:
            yield stack.enter_context(opener()).renderer
        else:
            yield _LazyRenderer(*predicted, opener, stack)
