"""Benchmark: a 61-variant block sweep with the render engine vs diffusers' own LoRA loading.

The sweep is what ``analyze`` renders: no LoRA, the full LoRA, and each of the
59 transformer blocks (input, 19 double, 38 single, final) alone, all from the
same seed. Three ways, measured in the same process on the same pipeline:

* engine, batched: one :class:`~lora_prune.render.engine.BlockEngine`, variants
  rendered ``--batch-size`` per pipeline call;
* engine, one by one: the same engine, one variant per call;
* naive diffusers: per variant, ``pipe.load_lora_weights`` of the LoRA filtered
  to that block, render, ``pipe.unload_lora_weights`` (what a user without the
  engine would write).

The LoRA is a synthetic diffusers/PEFT-format file (the format diffusers loads
completely), so all three render the same images; the script checks that too.

    python benchmarks/bench_render.py            # tiny model, 64x64, 4 steps
    python benchmarks/bench_render.py --threads 1 --batch-size 61
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.torch import load_file

from lora_prune.blocks import DOUBLE_IDS, SINGLE_IDS
from lora_prune.lora import read_lora
from lora_prune.render.engine import BlockEngine, RenderSettings
from lora_prune.render.loading import ModelSpec, load_pipeline
from lora_prune.render.tiny import TINY_MAX_SEQUENCE_LENGTH
from lora_prune.synth import SynthSpec, write_synth_lora

TRANSFORMER_BLOCKS = ("input", *DOUBLE_IDS, *SINGLE_IDS, "final")
T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def naive_render(pipe: Any, settings: RenderSettings) -> np.ndarray:
    out = pipe(
        prompt=settings.prompt,
        height=settings.height,
        width=settings.width,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        max_sequence_length=settings.max_sequence_length,
        generator=torch.Generator("cpu").manual_seed(settings.seed),
        output_type="np",
    )
    return np.asarray((out.images[0] * 255).round().astype(np.uint8))


def naive_sweep(
    pipe: Any,
    state: dict[str, torch.Tensor],
    key_blocks: dict[str, str],
    variants: list[frozenset[str]],
    settings: RenderSettings,
) -> list[np.ndarray]:
    images = []
    for variant in variants:
        subset = {k: v for k, v in state.items() if key_blocks[k] in variant}
        if not subset:
            images.append(naive_render(pipe, settings))
            continue
        pipe.load_lora_weights(subset, adapter_name="sweep")
        try:
            images.append(naive_render(pipe, settings))
        finally:
            pipe.unload_lora_weights()
    return images


def max_level_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    return max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = RenderSettings(
        "a red fox in the snow",
        seed=0,
        width=args.size,
        height=args.size,
        steps=args.steps,
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
    )
    variants = [frozenset(), frozenset(TRANSFORMER_BLOCKS)]
    variants += [frozenset({b}) for b in TRANSFORMER_BLOCKS]

    with tempfile.TemporaryDirectory() as tmp:
        # No alpha (scale 1): a filtered state dict then means the same to diffusers as to us.
        spec = SynthSpec(grammar="diffusers", blocks=TRANSFORMER_BLOCKS, rank=args.rank, alpha=None)
        path = write_synth_lora(Path(tmp) / "lora.safetensors", spec)
        loaded = load_pipeline(ModelSpec("tiny"))
        pipe = loaded.pipe
        naive_render(pipe, settings)  # warm-up: first-call allocations and lazy imports

        lora, t_read = timed(lambda: read_lora(path))
        engine, t_attach = timed(lambda: BlockEngine(loaded, lora))
        with engine:
            batched, t_batched = timed(
                lambda: engine.render(variants, settings, batch_size=args.batch_size)
            )
            singles, t_single = timed(lambda: engine.render(variants, settings, batch_size=1))

        state = load_file(str(path))
        naive, t_naive = timed(
            lambda: naive_sweep(pipe, state, lora.key_blocks, variants, settings)
        )
        plain_renders, t_plain = timed(
            lambda: [naive_render(pipe, settings) for _ in range(len(variants))]
        )

    setup = t_read + t_attach
    print(
        f"tiny FLUX.1 pipeline, {len(variants)} variants, {args.size}x{args.size}, "
        f"{args.steps} steps, rank {args.rank}, torch threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}"
    )
    print(f"  engine setup (read LoRA + attach {engine.attached} modules): {setup:6.2f} s")
    print(f"  engine, batches of {args.batch_size:<2}      : {t_batched:6.2f} s")
    print(f"  engine, one by one         : {t_single:6.2f} s")
    print(f"  naive diffusers load/unload: {t_naive:6.2f} s")
    print(f"  plain renders, no LoRA     : {t_plain:6.2f} s  (the floor for one-by-one)")
    print(f"  naive / engine batched (incl. setup)   : {t_naive / (t_batched + setup):5.1f}x")
    print(f"  naive / engine one by one (incl. setup): {t_naive / (t_single + setup):5.1f}x")
    print(f"  engine one by one / engine batched     : {t_single / t_batched:5.1f}x")
    print(
        "  max difference in 8-bit levels: batched vs one by one "
        f"{max_level_diff(batched, singles)}, engine vs naive {max_level_diff(singles, naive)}, "
        f"no-LoRA variant vs plain {max_level_diff(singles[:1], plain_renders[:1])}"
    )


if __name__ == "__main__":
    main()
