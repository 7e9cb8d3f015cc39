"""Benchmark: rank candidates of ``slim --auto --max-size`` rendered as per-image rank caps.

The budget search judges several lower-rank versions of one LoRA. The
baseline, run in the same process on the same pipeline, writes each
candidate with :func:`~lora_prune.resize.resize_lora`, attaches it to a fresh
block engine and renders it (what the search did before rank caps); the
measured path attaches the full LoRA once in its SVD basis
(``BlockEngine(truncatable=True)``) and renders every candidate in one batch
with its own rank caps. Both render the same images: the largest pixel
difference between them is printed with the times.

Runs on the tiny offline FLUX.1 pipeline by default (CPU, seconds); the
ratio, not the absolute time, is the figure to compare.

Usage::

    python benchmarks/bench_rank_candidates.py [--candidates 6] [--rank 8] [--size 64]
                                              [--steps 4] [--repeat 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from bench_inspect_slim import best_of

from lora_prune.families.flux1.blocks import BLOCK_IDS, TEXT_ENCODER_IDS
from lora_prune.lora import read_lora
from lora_prune.render.engine import BlockEngine
from lora_prune.render.loading import ModelSpec, load_pipeline
from lora_prune.render.tiny import TINY_MAX_SEQUENCE_LENGTH
from lora_prune.resize import resize_lora, resized_ranks
from lora_prune.settings import ImageSettings
from lora_prune.testing import SynthSpec, write_synth_lora


def run(
    folder: Path, candidates: int, rank: int, size: int, steps: int, repeat: int
) -> dict[str, Any]:
    torch.set_num_threads(max(1, (os.cpu_count() or 1)))
    blocks = tuple(b for b in BLOCK_IDS if b not in TEXT_ENCODER_IDS)
    path = write_synth_lora(
        folder / "full.safetensors", SynthSpec(blocks=blocks, rank=rank, alpha=float(rank))
    )
    lora = read_lora(path)
    loaded = load_pipeline(ModelSpec("tiny", device="cpu", dtype="fp32"))
    settings = ImageSettings(
        "a red fox", 0, size, size, steps, max_sequence_length=TINY_MAX_SEQUENCE_LENGTH
    )
    keep = frozenset(lora.blocks)
    ranks = [1 + i * (rank - 1) // max(1, candidates) for i in range(candidates)]
    caps = [resized_ranks(lora, keep, r) for r in ranks]

    def one_file_each() -> list[np.ndarray]:
        images = []
        for i, r in enumerate(ranks):
            out = folder / f"rank{i}.safetensors"
            resize_lora(lora, out, rank=r, force=True)
            with BlockEngine(loaded, read_lora(out)) as engine:
                images.extend(engine.render([keep], settings, output="float"))
        return images

    def rank_caps() -> list[np.ndarray]:
        with BlockEngine(loaded, lora, truncatable=True) as engine:
            return engine.render(
                [keep] * candidates,
                settings,
                batch_size=candidates,
                output="float",
                ranks=caps,
            )

    files_s = best_of(repeat, one_file_each)
    caps_s = best_of(repeat, rank_caps)
    diff = max(
        float(np.abs(a - b).max()) for a, b in zip(one_file_each(), rank_caps(), strict=True)
    )
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}",
        "model": "tiny (CPU, float32)",
        "candidates": candidates,
        "ranks": ranks,
        "lora_rank": rank,
        "size": size,
        "steps": steps,
        "one_file_each_s": files_s,
        "rank_caps_s": caps_s,
        "files/caps": files_s / caps_s,
        "max_pixel_diff": diff,
        "repeat": repeat,
    }


def report(r: dict[str, Any]) -> str:
    return "\n".join(
        [
            f"machine          {r['machine']}",
            f"model            {r['model']}, {r['size']}px, {r['steps']} steps",
            f"candidates       {r['candidates']} at ranks {r['ranks']} of a rank-{r['lora_rank']} LoRA",
            f"one file each    {r['one_file_each_s']:8.2f} s (resize, attach, render, per candidate)",
            f"rank caps        {r['rank_caps_s']:8.2f} s (attach once in the SVD basis, one batch)",
            f"speed-up         {r['files/caps']:8.2f} x",
            f"max pixel diff   {r['max_pixel_diff']:.2e} (0..1 floats)",
            f"(best of {r['repeat']})",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--candidates", type=int, default=6)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lora-prune-bench-") as folder:
        result = run(Path(folder), args.candidates, args.rank, args.size, args.steps, args.repeat)
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
