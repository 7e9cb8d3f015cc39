"""diffusers' own render of the tiny pipeline: the reference the engine's renders are held to."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from lora_prune.settings import ImageSettings


def pipe_render(pipe: Any, settings: ImageSettings) -> np.ndarray:
    """diffusers' own render from a seeded CPU generator, float output."""
    out = pipe(
        prompt=settings.prompt,
        height=settings.height,
        width=settings.width,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        max_sequence_length=settings.max_sequence_length,
        generator=torch.Generator("cpu").manual_seed(settings.seed),
        output_type="np",
    )
    return np.asarray(out.images[0], dtype=np.float32)
