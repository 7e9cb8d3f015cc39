"""diffusers' own render of a pipeline, without any LoRA machinery.

The reference the engine's renders are held to in tests (same prompt, seed and
settings give the same image when no block is on) and the floor the
benchmarks measure the engine against.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..settings import ImageSettings
from .families.flux1 import edit_inputs, kontext_view


def plain_render(pipe: Any, settings: ImageSettings) -> np.ndarray:
    """One image from ``pipe`` itself, seeded by a CPU generator: float32 HxWx3 in [0, 1].

    An edit (``settings.image``) renders with diffusers' ``FluxKontextPipeline`` on
    ``pipe``'s components, given the image as the engine gives it.
    """
    edit: dict[str, Any] = {}
    if settings.image is not None:
        pipe = kontext_view(pipe)
        edit = edit_inputs(settings.image, settings.width, settings.height)
    out = pipe(
        **edit,
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
