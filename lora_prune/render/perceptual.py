"""The optional perceptual distance of the verdict: ``1 - cosine`` of image embeddings.

The layer-importance literature on FLUX (Stable Flow, CVPR 2025) measures a
layer's effect with DINOv2 embeddings rather than pixels; any transformers image
encoder works (DINOv2, CLIP vision, a full CLIP model through its image
features). The model comes from a local folder or a hub id; nothing beyond the
``render`` extra is needed.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..verdict import BASE_DISTANCES, Distance

# ImageNet statistics, as DINOv2's and most encoders' processors use, for models
# saved without a preprocessor config.
_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
_CACHE = 32


class PerceptualDistance:
    """``d(a, b) = 1 - cos(embed(a), embed(b))`` for 8-bit RGB images.

    Embeddings are cached by image content: the verdict compares every slim
    render to the same base and full renders.
    """

    def __init__(self, model: str, device: str = "cpu") -> None:
        from transformers import AutoConfig, AutoModel

        try:
            config = AutoConfig.from_pretrained(model)
            self.model: Any = AutoModel.from_pretrained(model).to(device).eval()
        except (OSError, ValueError) as exc:
            raise UsageError(
                f"cannot load image encoder {model!r} ({exc.__class__.__name__})",
                "--perceptual",
                "give a local folder or hub id of a DINOv2 or CLIP vision model",
            ) from exc
        self.device = device
        vision = getattr(config, "vision_config", config)
        self.size = int(getattr(vision, "image_size", 224))
        self.processor: Any = None
        try:
            from transformers import AutoImageProcessor

            self.processor = AutoImageProcessor.from_pretrained(model)
        except (OSError, ValueError):
            self.processor = None
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()

    def _pixels(self, image: np.ndarray) -> torch.Tensor:
        if self.processor is not None:
            batch = self.processor(images=[image], return_tensors="pt")
            pixels: torch.Tensor = batch["pixel_values"].to(self.device)
            return pixels
        from PIL import Image

        resized = Image.fromarray(image).resize((self.size, self.size), Image.Resampling.BICUBIC)
        arr = (np.asarray(resized, dtype=np.float32) / 255.0 - _MEAN) / _STD
        return torch.from_numpy(arr.transpose(2, 0, 1)[None]).to(self.device)

    @torch.no_grad()
    def embed(self, image: np.ndarray) -> np.ndarray:
        key = hashlib.sha1(image.tobytes() + str(image.shape).encode()).digest()
        hit = self._cache.get(key)
        if hit is not None:
            self._cache.move_to_end(key)
            return hit
        pixels = self._pixels(image)
        if hasattr(self.model, "get_image_features"):
            features = self.model.get_image_features(pixel_values=pixels)
            vec = getattr(features, "pooler_output", features)
        else:
            out = self.model(pixel_values=pixels)
            pooled = getattr(out, "pooler_output", None)
            vec = pooled if pooled is not None else out.last_hidden_state[:, 0]
        result: np.ndarray = np.asarray(vec[0].float().cpu().numpy(), dtype=np.float32)
        self._cache[key] = result
        if len(self._cache) > _CACHE:
            self._cache.popitem(last=False)
        return result

    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        if np.array_equal(a, b):
            return 0.0
        ea, eb = self.embed(a), self.embed(b)
        denom = float(np.linalg.norm(ea) * np.linalg.norm(eb))
        if denom == 0.0:
            return 0.0
        return float(max(0.0, 1.0 - float(np.dot(ea, eb)) / denom))


def verdict_distances(perceptual: str | None, device: str | None) -> dict[str, Distance]:
    """The verdict's distances: MSE and 1-SSIM, and ``perceptual``'s model when given."""
    if perceptual is None:
        return dict(BASE_DISTANCES)
    return {**BASE_DISTANCES, "perceptual": PerceptualDistance(perceptual, device or "cpu")}
