"""Layer widths of FLUX.1 models (real and the tiny test model), without torch.

The synthetic LoRA generator, the shape checks and the tiny pipeline builder
all take their widths from here, so that a LoRA made for a geometry fits the
model built from it.
"""

from __future__ import annotations

from dataclasses import dataclass

from .blocks import DOUBLE_BLOCKS, SINGLE_BLOCKS


@dataclass(frozen=True)
class FluxGeometry:
    name: str
    hidden: int  # heads * head_dim
    heads: int
    mlp_ratio: int
    in_channels: int  # latent channels after 2x2 packing
    context_dim: int  # T5 width (txt_in input)
    pooled_dim: int  # CLIP pooled width (vector_in input)
    time_dim: int = 256  # sinusoidal timestep embedding width
    guidance: bool = True
    double_blocks: int = DOUBLE_BLOCKS
    single_blocks: int = SINGLE_BLOCKS
    clip_hidden: int = 768
    clip_ffn: int = 3072
    clip_layers: int = 12
    t5_d_model: int = 4096
    t5_inner: int = 4096  # heads * d_kv
    t5_ff: int = 10240
    t5_layers: int = 24

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def mlp(self) -> int:
        return self.hidden * self.mlp_ratio

    @property
    def out_channels(self) -> int:
        return self.in_channels


FLUX1_DEV = FluxGeometry(
    name="flux1-dev",
    hidden=3072,
    heads=24,
    mlp_ratio=4,
    in_channels=64,
    context_dim=4096,
    pooled_dim=768,
)
FLUX1_SCHNELL = FluxGeometry(
    name="flux1-schnell",
    hidden=3072,
    heads=24,
    mlp_ratio=4,
    in_channels=64,
    context_dim=4096,
    pooled_dim=768,
    guidance=False,
)
#: The tiny FLUX.1-architecture test model (``--model tiny``): 2 heads x 16.
TINY = FluxGeometry(
    name="tiny",
    hidden=32,
    heads=2,
    mlp_ratio=4,
    in_channels=64,
    context_dim=32,
    pooled_dim=32,
    clip_hidden=32,
    clip_ffn=64,
    clip_layers=2,
    t5_d_model=32,
    t5_inner=32,
    t5_ff=64,
    t5_layers=2,
)
