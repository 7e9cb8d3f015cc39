"""FLUX.1's pipeline call: CLIP pooled + T5 embeddings, packed latents, distilled guidance.

dev, schnell and Krea render text to image with ``FluxPipeline``; an image to
edit (``--image``: FLUX.1 Kontext) renders with ``FluxKontextPipeline`` built
on the same components, its input image resized to the render's size.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch
from PIL import Image

from ...errors import UnreadableFileError
from ...settings import ImageSettings, InputImage
from .base import Conditioning

#: Where the Kontext view of a loaded pipeline is kept (it shares every component).
_KONTEXT = "_lora_prune_kontext"


def kontext_view(pipe: Any) -> Any:
    """``FluxKontextPipeline`` on ``pipe``'s components, built once per pipeline."""
    view = getattr(pipe, _KONTEXT, None)
    if view is None:
        diffusers: Any = importlib.import_module("diffusers")
        view = diffusers.FluxKontextPipeline(**pipe.components)
        view.set_progress_bar_config(disable=True)
        object.__setattr__(pipe, _KONTEXT, view)
    return view


def edit_inputs(image: InputImage, width: int, height: int) -> dict[str, Any]:
    """A Kontext call's arguments for an edit of ``image`` at the render's size.

    The image is read as RGB and resized to ``width`` x ``height`` (PIL refuses
    decompression bombs); Kontext would otherwise resize the output to ~1 MP and
    the input to its preferred sizes.
    """
    try:
        with Image.open(image.path) as opened:
            pixels = opened.convert("RGB").resize((width, height), Image.Resampling.LANCZOS)
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UnreadableFileError(
            f"cannot read the image to edit ({type(exc).__name__})",
            image.path,
            "give a PNG, JPEG or WebP file",
        ) from exc
    return {"image": pixels, "max_area": width * height, "_auto_resize": False}


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
        edit: dict[str, Any] = {}
        if settings.image is not None:
            pipe = kontext_view(pipe)
            edit = edit_inputs(settings.image, settings.width, settings.height)
        result = pipe(
            **edit,
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
