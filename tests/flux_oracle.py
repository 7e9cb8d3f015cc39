"""An independent reading of the field guide for tests: FLUX.1 module names and LoRA deltas.

The render engine's references: which diffusers modules (and rows) a kohya/BFL
module lands on, from the guide's tables rather than :mod:`lora_prune.keys`, and
each adapter's full delta expanded explicitly (``up @ down``, LoHa's Hadamard
product, LoKr's ``torch.kron``), as the engine did before it kept factors factored.
"""

from __future__ import annotations

import numpy as np
import torch

KOHYA_DOUBLE = {
    "img_mod_lin": ("norm1.linear",),
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
}
KOHYA_SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
KOHYA_GLOBAL = {
    "img_in": ("input", "x_embedder"),
    "txt_in": ("input", "context_embedder"),
    "time_in_in_layer": ("input", "time_text_embed.timestep_embedder.linear_1"),
    "time_in_out_layer": ("input", "time_text_embed.timestep_embedder.linear_2"),
    "vector_in_in_layer": ("input", "time_text_embed.text_embedder.linear_1"),
    "vector_in_out_layer": ("input", "time_text_embed.text_embedder.linear_2"),
    "guidance_in_in_layer": ("input", "time_text_embed.guidance_embedder.linear_1"),
    "guidance_in_out_layer": ("input", "time_text_embed.guidance_embedder.linear_2"),
    "final_layer_linear": ("final", "proj_out"),
    "final_layer_adaLN_modulation_1": ("final", "norm_out.linear"),
}


def kohya_targets(stem: str) -> tuple[str, list[str]]:
    """(block, diffusers module paths) of a kohya stem, from the field guide's tables."""
    path = stem.removeprefix("lora_unet_")
    for kind, root, table in (
        ("double", "transformer_blocks", KOHYA_DOUBLE),
        ("single", "single_transformer_blocks", KOHYA_SINGLE),
    ):
        prefix = f"{kind}_blocks_"
        if path.startswith(prefix):
            index, _, rest = path[len(prefix) :].partition("_")
            return f"{kind}.{index}", [f"{root}.{index}.{m}" for m in table[rest]]
    block, module = KOHYA_GLOBAL[path]
    return block, [module]


def dense_delta(
    t: dict[str, np.ndarray],
    stem: str,
    default_scale: float = 1.0,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """A kohya- or PEFT-suffix module's full delta in the LoRA's row order, expanded explicitly.

    ``default_scale`` is a LoRA's scale where it has no alpha key (alpha in metadata);
    ``dtype`` the arithmetic's (float32 at real width, where float64 deltas take GBs).
    """
    roles = {k[len(stem) + 1 :] for k in t if k.startswith(stem + ".")}
    alpha = float(t[f"{stem}.alpha"]) if "alpha" in roles else None
    f = {r: torch.from_numpy(t[f"{stem}.{r}"]).to(dtype) for r in roles if r != "alpha"}
    for d, u in (("lora_down.weight", "lora_up.weight"), ("lora_A.weight", "lora_B.weight")):
        if d not in roles:
            continue
        down, up = f[d], f[u]
        return (up @ down) * (default_scale if alpha is None else alpha / down.shape[0])
    if "hada_w1_a" in roles:
        rank = f["hada_w1_b"].shape[0]
        dw = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"])
        return dw * (1.0 if alpha is None else alpha / rank)
    w1 = f["lokr_w1"] if "lokr_w1" in roles else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in roles else f["lokr_w2_a"] @ f["lokr_w2_b"]
    low = "lokr_w2_b" if "lokr_w2_b" in roles else "lokr_w1_b" if "lokr_w1_b" in roles else None
    scale = 1.0 if alpha is None or low is None else alpha / f[low].shape[0]
    return torch.kron(w1, w2) * scale
