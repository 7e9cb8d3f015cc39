"""FLUX.1's pipeline call (dev, schnell): CLIP pooled + T5 embeddings, packed latents, distilled guidance."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ...settings import ImageSettings
from .base import Conditioning


class FluxCall:
    """:class:`~.base.PipelineCall` of a diffusers ``FluxPipeline``."""

    text_blocks: tuple[str, ...] = ("clip", "t5")

    def encode(self, pipe: Any, settings: ImageSettings) -> Conditioning:
        with torch.no_grad():
            embeds, pooled, _ids = pipe.encode_prompt(
                prompt=settings.prompt,
                prompt_2=None,
                device=pipe._execution_device,
                num_images_per_prompt=1,
                max_sequence_length=settings.max_sequence_length,
            )
        return (embeds, pooled)

    def latent(self, pipe: Any, settings: ImageSettings, dtype: torch.dtype) -> torch.Tensor:
        # A CPU generator draws the same noise on every device; packed once, repeated per image.
        generator = torch.Generator(device="cpu").manual_seed(settings.seed)
        channels = pipe.transformer.config.in_channels // 4
        latents, _ids = pipe.prepare_latents(
            1, channels, settings.height, settings.width, dtype, pipe._execution_device, generator
        )
        return torch.as_tensor(latents)

    def denoise(
        self, pipe: Any, conditioning: Conditioning, latents: torch.Tensor, settings: ImageSettings
    ) -> np.ndarray:
        embeds, pooled = conditioning
        result = pipe(
            prompt_embeds=embeds,
            pooled_prompt_embeds=pooled,
            latents=latents,
            height=settings.height,
            width=settings.width,
            num_inference_steps=settings.steps,
            guidance_scale=settings.guidance,
            max_sequence_length=settings.max_sequence_length,
            output_type="np",
            return_dict=False,
        )
        return np.asarray(result[0], dtype=np.float32)
