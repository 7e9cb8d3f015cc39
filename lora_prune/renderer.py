"""What the torch-free library asks of a renderer: :class:`Renderer`.

``analyze`` (:mod:`lora_prune.analysis`) and ``verify`` (:mod:`lora_prune.verify`)
take a renderer as an argument and never build one; the render extra's session
(:mod:`lora_prune.render.sweep`), the cache in front of it
(:class:`lora_prune.analysis.CachingRenderer`) and the tests' fakes implement
it. Both sides import it from here, below either of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from .settings import AnalyzeSettings

__all__ = ["Renderer"]


class Renderer(Protocol):
    """Renders variants (sets of active blocks) for one prompt and seed."""

    model_id: str
    versions: Mapping[str, str]

    def __call__(
        self, variants: Sequence[frozenset[str]], prompt: str, seed: int, settings: AnalyzeSettings
    ) -> list[np.ndarray]: ...
