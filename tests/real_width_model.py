"""A FLUX.1-dev transformer at real widths and 1 double + 1 single block, for tests.

Hidden 3072, mlp 12288, text context 4096, 24 heads (~0.55 B parameters, fp32,
CPU), with fixed random weights and forward inputs: the shapes where a row
split, a Kronecker layout or diffusers' single-file converter (which assumes
FLUX.1's real widths) can go wrong without the tiny model noticing.
"""

from __future__ import annotations

from typing import Any

import diffusers
import torch

from lora_prune.families.flux1.geometry import FLUX1_DEV
from lora_prune.render.loading import shipped_transformer_config


def real_width_config() -> dict[str, Any]:
    """The shipped FLUX.1-dev transformer config, cut to 1 double and 1 single block."""
    config = {k: v for k, v in shipped_transformer_config(True).items() if not k.startswith("_")}
    config.update(num_layers=1, num_single_layers=1)
    return config


def build_real_width_transformer(seed: int = 0) -> torch.nn.Module:
    """The reduced-depth FLUX.1-dev transformer, fp32 on the CPU, weights N(0, 0.02)."""
    flux_cls: Any = diffusers.FluxTransformer2DModel
    with torch.device("meta"):
        model: torch.nn.Module = flux_cls(**real_width_config())
    # Uninitialised storage filled once below: diffusers' own init would double the build time.
    model = model.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02, generator=gen)
    return model


def real_width_inputs(seed: int = 1) -> dict[str, torch.Tensor]:
    """Fixed forward inputs: a 2 x 2 latent and 4 text tokens (the forward is bound by its weights)."""
    gen = torch.Generator().manual_seed(seed)
    tokens, text = 4, 4
    img_ids = torch.zeros(tokens, 3)
    img_ids[:, 1] = torch.arange(tokens) // 2
    img_ids[:, 2] = torch.arange(tokens) % 2
    return {
        "hidden_states": torch.randn(1, tokens, FLUX1_DEV.in_channels, generator=gen),
        "encoder_hidden_states": torch.randn(1, text, FLUX1_DEV.context_dim, generator=gen),
        "pooled_projections": torch.randn(1, FLUX1_DEV.pooled_dim, generator=gen),
        "timestep": torch.tensor([0.6]),
        "guidance": torch.tensor([3.5]),
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text, 3),
    }


def forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """The transformer's output on ``inputs``, without gradients."""
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
    assert isinstance(out, torch.Tensor)
    return out
