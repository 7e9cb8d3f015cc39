"""What the engine asks a family's pipeline: conditioning, starting noise, one batched call."""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
import torch

from ...settings import ImageSettings

#: A prompt's conditioning tensors, each with the batch on dimension 0 (concatenated per batch).
Conditioning = tuple[torch.Tensor, ...]


class PipelineCall(Protocol):
    """A family's way of rendering with its diffusers pipeline."""

    #: the blocks that act in the prompt's encoding (their hooks run in :meth:`encode`)
    text_blocks: tuple[str, ...]

    def encode(self, pipe: Any, settings: ImageSettings) -> Conditioning:
        """The conditioning of ``settings.prompt`` for one image."""
        ...

    def latent(self, pipe: Any, settings: ImageSettings, dtype: torch.dtype) -> torch.Tensor:
        """The starting noise of one image (``settings.seed``, drawn on the CPU)."""
        ...

    def denoise(
        self, pipe: Any, conditioning: Conditioning, latents: torch.Tensor, settings: ImageSettings
    ) -> np.ndarray:
        """The batch's images, float32 ``N x H x W x 3`` in 0..1."""
        ...
