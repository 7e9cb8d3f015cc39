"""A tiny FLUX.1-architecture pipeline built offline from seeded random weights.

Its transformer has FLUX.1-dev's exact block structure (19 double and 38 single
blocks, the same module names, guidance embedding) at toy widths, so every
transformer key of a real FLUX.1 LoRA has a target of the same name; the VAE
(scale factor 8) and scheduler behave as FLUX.1-dev's. The text encoders are
2-layer toys: CLIP-L/T5 LoRA keys for layers 2+ have no target here. It is what
tests and demos render with (model ``"tiny"``): no download, built in about
0.1 s, a 64x64 image in 4 steps in about 0.15 s on a CPU.

The weights are not trained: images are structured noise, but they are
deterministic (same seed, same dtype -> bit-identical weights), depend on the
prompt and the seed, and every block changes them.
"""

from __future__ import annotations

import json
import math
import string
import tempfile
from pathlib import Path
from typing import Any

import diffusers as _diffusers
import torch
import transformers as _transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

from ..families.flux1.blocks import DOUBLE_BLOCKS, SINGLE_BLOCKS

# The model id, its T5 tokens per prompt (FLUX's default 512 is slow here) and the
# size and steps it is made for live with the other per-model defaults.
from ..settings import TINY_MAX_SEQUENCE_LENGTH as TINY_MAX_SEQUENCE_LENGTH
from ..settings import TINY_MODEL_ID as TINY_MODEL_ID
from ..settings import TINY_RESOLUTION as TINY_RESOLUTION
from ..settings import TINY_STEPS as TINY_STEPS
from .checkpoints import shipped_config

# Both libraries are only partly typed (untyped constructors, lazily exported
# names), so they are used as Any here instead of scattering type: ignores.
diffusers: Any = _diffusers
transformers: Any = _transformers

_WIDTH = 32  # transformer inner dim = text widths: FLUX ties joint/pooled dims to them
_CLIP_MAX_LENGTH = 77  # as FLUX.1's CLIP-L, so prompt truncation happens at the same place

TINY_TRANSFORMER_CONFIG: dict[str, object] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": DOUBLE_BLOCKS,
    "num_single_layers": SINGLE_BLOCKS,
    "attention_head_dim": 16,
    "num_attention_heads": 2,
    "joint_attention_dim": _WIDTH,
    "pooled_projection_dim": _WIDTH,
    "guidance_embeds": True,
    # Must sum to attention_head_dim with even entries (rotary embedding halves each axis).
    "axes_dims_rope": (4, 6, 6),
}

# Bias and norm-scale spread; large enough that no layer is a no-op, small
# enough that 57 residual blocks do not saturate the image.
_BIAS_STD = 0.05
_NORM_STD = 0.1


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


# Both tokenizers are written as files and read back with from_pretrained, the
# one constructor that transformers 4 (files only) and 5 (in-memory vocab) share,
# and the way render/singlefile reads ComfyUI's copies of the real ones.


def _clip_tokenizer(folder: Path) -> Any:
    # Byte-level vocab without merges: every byte of every prompt has an id, so
    # different prompts always get different ids (no <unk> collapse).
    chars = list(_byte_to_unicode().values())
    vocab: dict[str, int] = {}
    for piece in [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]:
        vocab[piece] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    return transformers.CLIPTokenizer.from_pretrained(
        str(folder), local_files_only=True, model_max_length=_CLIP_MAX_LENGTH
    )


def _t5_tokenizer(folder: Path) -> Any:
    # T5's id layout (<pad>=0, </s>=1, <unk>=2) then word-initial and inner
    # characters, so a prompt segments into characters and stays distinguishable.
    visible = [c for c in string.printable if not c.isspace()]
    pieces: list[tuple[str, float]] = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    pieces += [("▁" + c, -3.0) for c in visible]
    pieces += [(c, -3.0) for c in visible]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    backend.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    backend.save(str(folder / "tokenizer.json"))
    return transformers.T5TokenizerFast.from_pretrained(
        str(folder),
        local_files_only=True,
        model_max_length=TINY_MAX_SEQUENCE_LENGTH,
        extra_ids=0,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
    )


def tiny_tokenizers() -> tuple[Any, Any]:
    """The tiny model's CLIP and T5 tokenizers (byte- and character-level toys)."""
    with tempfile.TemporaryDirectory(prefix="lora-prune-tiny-") as folder:
        (Path(folder) / "clip").mkdir()
        (Path(folder) / "t5").mkdir()
        return _clip_tokenizer(Path(folder) / "clip"), _t5_tokenizer(Path(folder) / "t5")


def _reinitialise(modules: list[torch.nn.Module], seed: int, dtype: torch.dtype) -> None:
    """Replace every parameter by a draw from one seeded generator, cast to ``dtype``.

    Library init schemes differ between versions and some zero-initialise layers
    (a zero layer would make its block invisible to a LoRA sweep), so nothing of
    them is kept: the weights depend only on the seed and the parameter order.
    Drawing in float32 and casting makes each dtype a rounding of the same model.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in modules:
            for name, param in module.named_parameters():
                noise = torch.randn(param.shape, generator=gen, dtype=torch.float32)
                if param.dim() >= 2:
                    # Linear/conv/embedding: unit-variance outputs for unit inputs.
                    fan_in = math.prod(param.shape[1:])
                    value = noise / math.sqrt(fan_in)
                elif name.endswith("weight"):
                    value = 1.0 + _NORM_STD * noise  # norm scale
                else:
                    value = _BIAS_STD * noise
                # Assigning .data casts without ModelMixin.to(), which logs a
                # warning about fp32-kept modules on every cast.
                param.data = value.to(dtype)


def build_tiny_pipeline(seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """Build the tiny FLUX.1 ``diffusers.FluxPipeline`` on the CPU, weights drawn from ``seed``.

    Offline and deterministic; torch's global random state is left untouched.
    Render it with ``height=width=TINY_RESOLUTION``,
    ``num_inference_steps=TINY_STEPS`` and
    ``max_sequence_length=TINY_MAX_SEQUENCE_LENGTH``.
    """
    tokenizer, tokenizer_2 = tiny_tokenizers()
    # Module constructors draw from the global generator; fork it so building a
    # pipeline does not change the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        text_encoder = transformers.CLIPTextModel(
            transformers.CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=_WIDTH,
                intermediate_size=2 * _WIDTH,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=_CLIP_MAX_LENGTH,
                projection_dim=_WIDTH,
                hidden_act="quick_gelu",
                # CLIP pools at the first eos: it must be the tokenizer's eos.
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        text_encoder_2 = transformers.T5EncoderModel(
            transformers.T5Config(
                vocab_size=len(tokenizer_2),
                d_model=_WIDTH,
                d_kv=8,
                d_ff=2 * _WIDTH,
                num_layers=2,
                num_heads=4,
                relative_attention_num_buckets=8,
                relative_attention_max_distance=TINY_MAX_SEQUENCE_LENGTH,
                feed_forward_proj="gated-gelu",
                dropout_rate=0.0,
                pad_token_id=tokenizer_2.pad_token_id,
                eos_token_id=tokenizer_2.eos_token_id,
                is_encoder_decoder=False,
            )
        )
        vae = diffusers.AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 16, 32, 32),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            sample_size=TINY_RESOLUTION,
            use_quant_conv=False,
            use_post_quant_conv=False,
            # FLUX.1's latent statistics, so latents are scaled as in the real model.
            scaling_factor=0.3611,
            shift_factor=0.1159,
        )
        transformer = diffusers.FluxTransformer2DModel(**TINY_TRANSFORMER_CONFIG)
    modules: list[torch.nn.Module] = [transformer, vae, text_encoder, text_encoder_2]
    _reinitialise(modules, seed, dtype)
    # FLUX.1-dev's own scheduler.
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
        shipped_config("flux1-scheduler.json")
    )
    for module in modules:
        module.eval()
        module.requires_grad_(False)
    pipe = diffusers.FluxPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
