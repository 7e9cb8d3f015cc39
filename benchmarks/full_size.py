"""Benchmark: a 61-variant block sweep on the real FLUX.1-dev architecture (random weights).

Nothing is downloaded. The transformer is ``FluxTransformer2DModel`` with
FLUX.1-dev's shipped config (12B parameters), the VAE has FLUX.1's config, and
the text encoders are 1-layer CLIP-L / T5-XXL of real width, so their OUTPUTS
have the real sizes (T5 4096 wide x 512 tokens, CLIP pooled 768) while encoding
is cheap; they are labelled as such in the output. The LoRA is a rank-16 kohya
file of FLUX.1-dev shape. In one run it times the engine's sweep (batched and
one by one), 61 plain renders without any LoRA machinery (the floor) and the
naive diffusers load/render/unload loop on a few variants, extrapolated to 61
and labelled so. It prints ratios, peak GPU memory and seconds per image.

    python benchmarks/full_size.py              # on a CUDA GPU: 768x768, 20 steps
    python benchmarks/full_size.py --smoke      # tiny sizes on the CPU (default without CUDA)
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import diffusers as _diffusers
import torch
import transformers
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file

from lora_prune.families.flux1.blocks import DOUBLE_IDS, SINGLE_IDS
from lora_prune.families.flux1.geometry import FLUX1_DEV, TINY
from lora_prune.lora import read_lora
from lora_prune.render.checkpoints import shipped_config, shipped_transformer_config
from lora_prune.render.engine import BlockEngine
from lora_prune.render.loading import LoadedModel
from lora_prune.render.plain import plain_render
from lora_prune.render.tiny import build_tiny_pipeline, tiny_tokenizers
from lora_prune.settings import ImageSettings
from lora_prune.testing import SynthSpec, write_synth_lora

# diffusers is only partly typed (untyped constructors): used as Any, as in render/tiny.py.
diffusers: Any = _diffusers

TRANSFORMER_BLOCKS = ("input", *DOUBLE_IDS, *SINGLE_IDS, "final")


def full_pipeline(dtype: torch.dtype, device: str) -> Any:
    """FLUX.1-dev's transformer and VAE at full size, 1-layer text encoders of real width."""
    tokenizer, tokenizer_2 = tiny_tokenizers()
    clip = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=FLUX1_DEV.clip_hidden,
            intermediate_size=FLUX1_DEV.clip_ffn,
            num_hidden_layers=1,
            num_attention_heads=12,
            max_position_embeddings=77,
            projection_dim=FLUX1_DEV.clip_hidden,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    t5 = transformers.T5EncoderModel(
        transformers.T5Config(
            vocab_size=len(tokenizer_2),
            d_model=FLUX1_DEV.t5_d_model,
            d_kv=64,
            d_ff=FLUX1_DEV.t5_ff,
            num_layers=1,
            num_heads=64,
            feed_forward_proj="gated-gelu",
            dropout_rate=0.0,
            pad_token_id=tokenizer_2.pad_token_id,
            eos_token_id=tokenizer_2.eos_token_id,
            is_encoder_decoder=False,
        )
    )
    vae = diffusers.AutoencoderKL.from_config(shipped_config("flux1-vae.json"))
    config = {k: v for k, v in shipped_transformer_config(True).items() if not k.startswith("_")}
    transformer = diffusers.FluxTransformer2DModel(**config)
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(
            shipped_config("flux1-scheduler.json")
        ),
        vae=vae,
        text_encoder=clip,
        tokenizer=tokenizer,
        text_encoder_2=t5,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.to(device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def plain(pipe: Any, settings: ImageSettings) -> object:
    """One render without any LoRA machinery (the floor)."""
    return plain_render(pipe, settings)


def timed(fn: Callable[[], object]) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (default without CUDA)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--naive", type=int, default=3, help="naive variants to time")
    args = parser.parse_args(argv)
    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="peft")
    smoke = args.smoke or not torch.cuda.is_available()
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    if smoke:
        pipe, geometry, what = build_tiny_pipeline(0), TINY, "SMOKE: tiny FLUX.1 architecture"
        size, steps, seq = 32, 2, 32
    else:
        pipe, geometry = full_pipeline(dtype, device), FLUX1_DEV
        what = "FLUX.1-dev transformer + VAE (random weights), 1-layer real-width text encoders"
        size, steps, seq = 768, 20, 512
    settings = ImageSettings(
        "a red fox", seed=0, width=size, height=size, steps=steps, max_sequence_length=seq
    )
    variants = [frozenset(), frozenset(TRANSFORMER_BLOCKS)] + [
        frozenset({b}) for b in TRANSFORMER_BLOCKS
    ]
    loaded = LoadedModel(pipe, what, torch.device(device), dtype)
    times: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # diffusers' kohya converter hard-codes FLUX.1's widths: the tiny smoke model gets PEFT keys.
        spec = SynthSpec(grammar="diffusers", geometry=geometry, rank=16, alpha=None)
        if not smoke:
            spec = SynthSpec(grammar="kohya", geometry=geometry, rank=16, alpha=16.0, dtype="BF16")
        path = write_synth_lora(Path(tmp) / "lora.safetensors", spec)
        plain(pipe, settings)  # warm-up
        times["plain"] = timed(lambda: [plain(pipe, settings) for _ in variants])
        with BlockEngine(loaded, read_lora(path)) as engine:
            times["batched"] = timed(
                lambda: engine.render(variants, settings, batch_size=args.batch_size)
            )
            times["single"] = timed(lambda: engine.render(variants, settings, batch_size=1))
        state = load_file(str(path))
        blocks = read_lora(path).key_blocks
        few = variants[3 : 3 + args.naive]  # double.0 onward

        def naive() -> None:
            for variant in few:
                subset = {k: v for k, v in state.items() if blocks[k] in variant}
                if subset:
                    pipe.load_lora_weights(subset)
                plain(pipe, settings)
                if subset:
                    pipe.unload_lora_weights()

        times["naive"] = timed(naive) * len(variants) / len(few)
    n = len(variants)
    print(
        f"{what}; {n} variants, {size}x{size}, {steps} steps, {device} {dtype}, rank-16 kohya LoRA"
    )
    for name in ("plain", "single", "batched"):
        print(f"  {name:8}: {times[name]:8.2f} s  ({times[name] / n:.3f} s per image)")
    print(f"  naive   : {times['naive']:8.2f} s  EXTRAPOLATED from {len(few)} variants")
    ratios = {
        "one by one / floor": times["single"] / times["plain"],
        "batched / floor": times["batched"] / times["plain"],
        "naive (extrapolated) / batched": times["naive"] / times["batched"],
    }
    for name, value in ratios.items():
        print(f"  ratio {name}: {value:.3f}x")
    if torch.cuda.is_available() and not smoke:
        print(f"  peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    assert all(math.isfinite(v) for v in ratios.values())
    return ratios


if __name__ == "__main__":
    main()
