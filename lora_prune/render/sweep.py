"""The analyze sweep's renderer: :class:`lora_prune.analysis.Renderer` on the block engine."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import diffusers
import numpy as np
import torch

from .. import __version__
from ..analysis import AnalyzeSettings
from .engine import BlockEngine, RenderSettings
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
        self.versions: Mapping[str, str] = {
            "lora_prune": __version__,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "device": loaded.device.type,
            "dtype": str(loaded.dtype).removeprefix("torch."),
        }

    def settings_for(self, prompt: str, seed: int, settings: AnalyzeSettings) -> RenderSettings:
        return RenderSettings(
            prompt=prompt,
            seed=seed,
            width=settings.width,
            height=settings.height,
            steps=settings.steps,
            guidance=settings.guidance,
            strength=settings.strength,
            max_sequence_length=self.max_sequence_length,
        )

    def __call__(
        self, variants: Sequence[frozenset[str]], prompt: str, seed: int, settings: AnalyzeSettings
    ) -> list[np.ndarray]:
        return self.engine.render(
            list(variants),
            self.settings_for(prompt, seed, settings),
            batch_size=max(1, len(variants)),
        )
