"""Benchmark: a 61-variant block sweep with the render engine vs diffusers' own LoRA loading.

The sweep is what ``analyze`` renders: no LoRA, the full LoRA, and each of the
59 transformer blocks (input, 19 double, 38 single, final) alone, all from the
same seed. Three ways, measured in the same process on the same pipeline:

* engine, batched: one :class:`~lora_prune.render.engine.BlockEngine`, variants
  rendered ``--batch-size`` per pipeline call (default: 8, and all 61 at once);
* engine, one by one: the same engine, one variant per call;
* naive diffusers: per variant, ``pipe.load_lora_weights`` of the LoRA filtered
  to that block, render, ``pipe.unload_lora_weights`` (what a user without the
  engine would write).

The LoRA is a synthetic diffusers/PEFT-format file (the format diffusers loads
completely), so all three render the same images; the script checks that too.
Each round runs every approach once (rounds interleave, so load from other
processes hits all approaches alike) and each approach's fastest round counts;
a plain render loop without any LoRA is the floor for one-by-one rendering.

    python benchmarks/bench_render.py            # tiny model, 64x64, 4 steps
    python benchmarks/bench_render.py --threads 1 --batch-size 16 --repeat 5
"""

from __future__ import annotations

import argparse
import functools
import math
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import load_file

from lora_prune.families.flux1.blocks import DOUBLE_IDS, SINGLE_IDS
from lora_prune.lora import read_lora
from lora_prune.render.engine import BlockEngine
from lora_prune.render.loading import ModelSpec, load_pipeline
from lora_prune.render.plain import plain_render
from lora_prune.render.tiny import TINY_MAX_SEQUENCE_LENGTH
from lora_prune.settings import ImageSettings
from lora_prune.testing import SynthSpec, write_synth_lora

TRANSFORMER_BLOCKS = ("input", *DOUBLE_IDS, *SINGLE_IDS, "final")
T = TypeVar("T")


def timed(fn: Callable[[], T]) -> tuple[T, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def naive_render(pipe: Any, settings: ImageSettings) -> np.ndarray:
    return np.asarray((plain_render(pipe, settings) * 255).round().astype(np.uint8))


def naive_sweep(
    pipe: Any,
    state: dict[str, torch.Tensor],
    key_blocks: dict[str, str],
    variants: list[frozenset[str]],
    settings: ImageSettings,
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


def print_ratio(name: str, value: float, op: str, target: float) -> None:
    """One acceptance line: ``ratio <name>: <value>x (target <op> <target>x) PASS|FAIL``."""
    ok = value <= target if op == "<=" else value < target if op == "<" else value >= target
    print(f"  ratio {name}: {value:.3f}x (target {op} {target:g}x) {'PASS' if ok else 'FAIL'}")


def max_level_diff(a: list[np.ndarray], b: list[np.ndarray]) -> int:
    return max(int(np.abs(x.astype(int) - y.astype(int)).max()) for x, y in zip(a, b, strict=True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument(
        "--batch-size",
        type=int,
        action="append",
        help="engine batch size (repeatable; default 8 and 61)",
    )
    parser.add_argument(
        "--repeat", type=int, default=3, help="rounds; each approach's fastest counts"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, mps (default cpu)")
    parser.add_argument("--dtype", default="fp32", help="fp32, bf16, fp16 (default fp32)")
    args = parser.parse_args()
    # Filtered state dicts make diffusers/PEFT warn on every load; the numbers are what matters.
    diffusers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="peft")
    batch_sizes: list[int] = args.batch_size or [8, 61]
    if args.threads:
        torch.set_num_threads(args.threads)

    settings = ImageSettings(
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
        loaded = load_pipeline(ModelSpec("tiny", device=args.device, dtype=args.dtype))
        pipe = loaded.pipe
        naive_render(pipe, settings)  # warm-up: first-call allocations and lazy imports

        state = load_file(str(path))
        best: dict[str, float] = {}
        images: dict[str, list[np.ndarray]] = {}

        def run(name: str, fn: Callable[[], T]) -> T:
            value, seconds = timed(fn)
            best[name] = min(best.get(name, math.inf), seconds)
            return value

        # Rounds interleave the approaches, so load from other processes hits all of them alike.
        for _round in range(args.repeat):
            lora = run("read", lambda: read_lora(path))
            engine = run("attach", functools.partial(BlockEngine, loaded, lora))
            with engine:
                for size in batch_sizes:
                    render = functools.partial(engine.render, variants, settings, batch_size=size)
                    images[f"batch{size}"] = run(f"batch{size}", render)
                render = functools.partial(engine.render, variants, settings, batch_size=1)
                images["single"] = run("single", render)
            sweep = functools.partial(naive_sweep, pipe, state, lora.key_blocks, variants, settings)
            images["naive"] = run("naive", sweep)
            images["plain"] = run(
                "plain", lambda: [naive_render(pipe, settings) for _ in range(len(variants))]
            )

    setup = best["read"] + best["attach"]
    singles = images["single"]
    print(
        f"tiny FLUX.1 pipeline, {len(variants)} variants, {args.size}x{args.size}, "
        f"{args.steps} steps, rank {args.rank}, torch threads {torch.get_num_threads()}, "
        f"torch {torch.__version__}, {loaded.device} {args.dtype}, "
        f"best of {args.repeat} interleaved rounds"
    )
    print(f"  engine setup (read LoRA + attach {engine.attached} modules): {setup:6.2f} s")
    for size in batch_sizes:
        print(f"  engine, batches of {size:<3}      : {best[f'batch{size}']:6.2f} s")
    print(f"  engine, one by one          : {best['single']:6.2f} s")
    print(f"  naive diffusers load/unload : {best['naive']:6.2f} s")
    print(f"  plain renders, no LoRA      : {best['plain']:6.2f} s  (the floor for one by one)")
    for size in batch_sizes:
        ratio = best["naive"] / (best[f"batch{size}"] + setup)
        print(f"  naive / engine batches of {size:<3} (incl. setup): {ratio:5.1f}x")
    ratio = best["naive"] / (best["single"] + setup)
    print(f"  naive / engine one by one (incl. setup)    : {ratio:5.1f}x")
    batched = min(best[f"batch{size}"] for size in batch_sizes) + setup
    print("acceptance (issue 12), one run:")
    print_ratio("one by one / floor", (best["single"] + setup) / best["plain"], "<=", 1.1)
    print_ratio("batched / floor", batched / best["plain"], "<", 1.0)
    print_ratio("naive / batched", best["naive"] / batched, ">=", 10.0)
    diffs = ", ".join(
        f"batches of {size} vs one by one {max_level_diff(images[f'batch{size}'], singles)}"
        for size in batch_sizes
    )
    print(
        f"  max difference in 8-bit levels: {diffs}, engine vs naive "
        f"{max_level_diff(singles, images['naive'])}, no-LoRA variant vs plain "
        f"{max_level_diff(singles[:1], images['plain'][:1])}"
    )


if __name__ == "__main__":
    main()
