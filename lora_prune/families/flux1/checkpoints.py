"""FLUX.1's single-file transformers: recognised, and their widths, depth and variant read.

One reader of a transformer checkpoint's tensor names and shapes, in BFL naming
(ComfyUI's and BFL's files, GGUF) or diffusers naming, for ``--comfy``/``doctor``
(:mod:`lora_prune.comfy`), the single-file loader and the GGUF loader. dev has
a guidance embedder, schnell none.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..base import count_blocks, strip_wrapper
from .keys import is_guidance_path
from .variants import checkpoint_name

#: Per naming: (the key that marks it, the image/text/pooled input weights, the first
#: attention norm, the double- and single-block prefixes).
_NAMINGS: dict[str, tuple[str, tuple[str, str, str], str, str, str]] = {
    "bfl": (
        "double_blocks.0.img_attn.qkv.weight",
        ("img_in.weight", "txt_in.weight", "vector_in.in_layer.weight"),
        "double_blocks.0.img_attn.norm.query_norm.scale",
        "double_blocks.",
        "single_blocks.",
    ),
    "diffusers": (
        "transformer_blocks.0.attn.to_q.weight",
        (
            "x_embedder.weight",
            "context_embedder.weight",
            "time_text_embed.text_embedder.linear_1.weight",
        ),
        "transformer_blocks.0.attn.norm_q.weight",
        "transformer_blocks.",
        "single_transformer_blocks.",
    ),
}
_MISSING_INPUTS = {
    "bfl": "BFL-named blocks but no txt_in/vector_in/img_in: not a FLUX.1 transformer",
    "diffusers": "diffusers-named blocks but no context/text/x embedder: not a FLUX.1 transformer",
}
#: FLUX.1's input widths, for a file whose tensors cannot be listed (GGUF without the package).
WIDTHS = {"txt": 4096, "pooled": 768, "latent": 16}
#: Real FLUX.1's width: diffusers' single-file converter assumes it for GGUF files.
HIDDEN = 3072
#: The transformer classes and pipeline of diffusers.
TRANSFORMER_CLASS = "FluxTransformer2DModel"


@dataclass(frozen=True)
class TransformerLayout:
    """What a FLUX.1 transformer checkpoint holds, read from its names and shapes."""

    naming: str  # "bfl" or "diffusers"
    variant: str  # "dev" (a guidance embedder) or "schnell"
    prefix: str  # the wrapper before the transformer's names ("" for a bare file)
    hidden: int
    in_channels: int
    txt: int
    pooled: int
    #: the attention head width (the query norm's size); None where the file does not say
    head: int | None
    doubles: int
    singles: int

    @property
    def widths(self) -> dict[str, int]:
        return {"txt": self.txt, "pooled": self.pooled, "latent": self.in_channels // 4}

    def describe(self, storage: str | None = None, file_name: str = "") -> str:
        """``FLUX.1-dev transformer, BFL naming: 19 double + 38 single blocks, guidance_in present``.

        ``storage`` replaces the naming (``"GGUF (quantised)"``), without the guidance note;
        ``file_name`` may name the model (Krea has dev's layout).
        """
        bfl = self.naming == "bfl"
        where = storage or f"{'BFL' if bfl else 'diffusers'} naming"
        model = checkpoint_name(self.variant, file_name)
        text = f"{model} transformer, {where}: {self.doubles} double + {self.singles} single blocks"
        if storage is None:
            guidance = "guidance_in" if bfl else "guidance embedder"
            text += f", {guidance} present" if self.variant == "dev" else f", no {guidance}"
        return text

    def diffusers_config(self, base: dict[str, Any]) -> dict[str, Any]:
        """``base`` (a shipped FluxTransformer2DModel config) with this file's widths and depth."""
        config = dict(base)
        head = self.head or 128
        config.update(
            in_channels=self.in_channels,
            num_attention_heads=self.hidden // head,
            attention_head_dim=head,
            joint_attention_dim=self.txt,
            pooled_projection_dim=self.pooled,
            num_layers=self.doubles,
            num_single_layers=self.singles,
            guidance_embeds=self.variant == "dev",
            # FLUX.1's rotary split (16, 56, 56) of 128, at any head width.
            axes_dims_rope=[head // 8, 7 * head // 16, 7 * head // 16],
        )
        return config


def read_transformer(shapes: Mapping[str, Sequence[int]]) -> TransformerLayout | str | None:
    """The layout of a FLUX.1 transformer checkpoint, from its tensors' shapes by name.

    Returns None when the names are no FLUX.1 transformer's, a reason (str) when
    they are but the input layers are missing.
    """

    def shape(name: str) -> Sequence[int]:
        return shapes.get(name, ())

    prefix, paths = strip_wrapper(shapes)
    present = set(paths)
    for naming, (marker, inputs, norm, doubles, singles) in _NAMINGS.items():
        if marker not in present:
            continue
        if naming == "diffusers" and not any(p.startswith(singles) for p in present):
            continue
        img, txt, pooled = (tuple(shape(prefix + n)) for n in inputs)
        if len(img) != 2 or len(txt) != 2 or len(pooled) != 2:
            return _MISSING_INPUTS[naming]
        head = tuple(shape(prefix + norm))
        return TransformerLayout(
            naming=naming,
            variant="dev" if any(is_guidance_path(p) for p in present) else "schnell",
            prefix=prefix,
            hidden=img[0],
            in_channels=img[1],
            txt=txt[1],
            pooled=pooled[1],
            head=head[0] if len(head) == 1 else None,
            doubles=count_blocks(present, doubles),
            singles=count_blocks(present, singles),
        )
    return None
