"""FLUX.1's marker sets: the keys ComfyUI and Forge need, all of them, to convert a file.

- BFL control LoRAs (FLUX.1 Canny/Depth): ``img_in.lora_A.weight`` and
  ``single_blocks.0.norm.key_norm.scale`` (ComfyUI ``comfy/lora_convert.py``
  ``convert_lora``, Comfy-Org/ComfyUI 2bffe2f4; Forge ``load_lora`` in
  ``packages_3rdparty/comfyui_lora_collection/lora.py``,
  lllyasviel/stable-diffusion-webui-forge dfdcbab6);
- XLabs/USO processor LoRAs, which ComfyUI converts (``convert_uso_lora``, same file):
  ``double_blocks.18.processor.qkv_lora2.up.weight`` and
  ``single_blocks.37.processor.qkv_lora.up.weight``.
"""

from __future__ import annotations

from ..base import MarkerSet

MARKER_SETS: tuple[MarkerSet, ...] = (
    MarkerSet(
        "BFL control LoRA",
        "ComfyUI and Forge",
        frozenset({"img_in.lora_A.weight", "single_blocks.0.norm.key_norm.scale"}),
    ),
    MarkerSet(
        "XLabs/USO processor LoRA",
        "ComfyUI",
        frozenset(
            {
                "double_blocks.18.processor.qkv_lora2.up.weight",
                "single_blocks.37.processor.qkv_lora.up.weight",
            }
        ),
    ),
)
