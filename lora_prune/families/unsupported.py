"""Other models' LoRAs, named: key patterns of the families lora-prune has no module for.

When no family's grammar reads a LoRA, :func:`guess_base_model` names the model
its keys most likely belong to, so that the refusal says "for SDXL", not only
"unknown keys".
"""

from __future__ import annotations

import re
from collections.abc import Iterable

_BASE_MODEL_HINTS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"double_stream_modulation|single_stream_modulation|to_qkv_mlp_proj"), "FLUX.2"),
    (re.compile(r"joint_blocks|context_block\.|x_block\."), "SD3"),
    (
        re.compile(
            r"(down_blocks|up_blocks|input_blocks|output_blocks)[._]\d+[._].*transformer_blocks[._][1-9]"
        ),
        "SDXL",
    ),
    (re.compile(r"lora_te2_text_model|text_encoder_2\.text_model|label_emb|add_embedding"), "SDXL"),
    (
        re.compile(r"down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block"),
        "SD1.5",
    ),
    (
        re.compile(r"^(diffusion_model\.|lora_unet_)?blocks[._]\d+[._](self_attn|cross_attn|ffn)"),
        "Wan",
    ),
)


def guess_base_model(keys: Iterable[str]) -> str | None:
    """The model a set of keys no family reads most likely belongs to, or None."""
    keys = list(keys)
    for pattern, name in _BASE_MODEL_HINTS:
        if any(pattern.search(k) for k in keys):
            return name
    return None
