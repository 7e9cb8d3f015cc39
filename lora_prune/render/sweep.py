"""The analyze sweep's renderer: :class:`lora_prune.renderer.Renderer` on the block engine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..settings import RenderSettings
from .device import render_versions
from .engine import BlockEngine, RankCaps
from .loading import LoadedModel


class EngineRenderer:
    """Renders one batch of block variants per call, exactly as asked.

    The caller chooses the batches (see :func:`lora_prune.analysis.batches`), so
    the engine must not split them further.
    """

    def __init__(self, engine: BlockEngine, loaded: LoadedModel, max_sequence_length: int) -> None:
        self.engine = engine
        self.model_id = loaded.model_id
        self.max_sequence_length = max_sequence_length
        # Images differ between devices and dtypes: they are part of every cache key.
        self.versions: Mapping[str, str] = render_versions(loaded.device, loaded.dtype)

    def __call__(
        self,
        variants: Sequence[frozenset[str]],
        prompt: str,
        seed: int,
        settings: RenderSettings,
        ranks: Sequence[RankCaps] | None = None,
    ) -> list[np.ndarray]:
        """``ranks``: per variant its rank caps, for a session opened ``truncatable``."""
        return self.engine.render(
            list(variants),
            settings.image(prompt, seed, self.max_sequence_length),
            batch_size=max(1, len(variants)),
            ranks=ranks,
        )
