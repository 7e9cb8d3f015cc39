"""Benchmark: what the render engine holds for one LoKr / LoHa module on a real-width ``linear1``.

Builds only the four Linears FLUX.1's ``single_blocks.0.linear1`` lands on in
diffusers (``attn.to_q/to_k/to_v`` 3072 -> 3072 each, ``proj_mlp`` 3072 -> 12288,
fp32, uninitialised storage), writes a one-module LyCORIS LoKr and LoHa LoRA
with FLUX.1-dev's shapes (:mod:`lora_prune.testing`), attaches each with
:class:`~lora_prune.render.engine.BlockEngine` and reports the bytes the hooks
hold (:attr:`~lora_prune.render.engine.BlockEngine.attached_bytes`) against the
file's tensor bytes and against a dense fp32 delta (out x in), plus the time
of one forward of 256 tokens through the four layers with the block on.

Usage::

    python benchmarks/bench_adapters.py [--rank 16] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from lora_prune.families.flux1.geometry import FLUX1_DEV
from lora_prune.lora import read_lora
from lora_prune.render.engine import BlockEngine
from lora_prune.render.loading import LoadedModel
from lora_prune.testing import SynthSpec, write_synth_lora

_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")


def single_block(hidden: int, mlp: int) -> torch.nn.Module:
    """A stand-in transformer holding just ``single_transformer_blocks.0``'s linear1 split."""
    with torch.device("meta"):
        block = torch.nn.Module()
        block.attn = torch.nn.Module()
        for name in ("to_q", "to_k", "to_v"):
            setattr(block.attn, name, torch.nn.Linear(hidden, hidden))
        block.proj_mlp = torch.nn.Linear(hidden, mlp)
        root = torch.nn.Module()
        root.single_transformer_blocks = torch.nn.ModuleList([block])
    return root.to_empty(device="cpu")


def measure(root: torch.nn.Module, folder: Path, grammar: str, rank: int) -> dict[str, Any]:
    spec = SynthSpec(grammar=grammar, geometry=FLUX1_DEV, blocks=("single.0",), rank=rank, seed=1)
    path = write_synth_lora(folder / f"{grammar}.safetensors", spec)
    lora = read_lora(path)
    linear1 = [m for m in lora.modules.values() if str(m.stem).endswith("single_blocks_0_linear1")]
    assert len(linear1) == 1
    stored = sum(info.nbytes for role, info in linear1[0].tensors.items() if role != "alpha")
    dense = FLUX1_DEV.hidden * (3 * FLUX1_DEV.hidden + FLUX1_DEV.mlp) * 4
    lora = dataclasses.replace(lora, modules={linear1[0].stem: linear1[0]})
    loaded = LoadedModel(
        SimpleNamespace(transformer=root), "bench", torch.device("cpu"), torch.float32
    )
    x = torch.randn(1, 256, FLUX1_DEV.hidden)
    with BlockEngine(loaded, lora) as engine, torch.no_grad():
        held = engine.attached_bytes
        block = root.get_submodule("single_transformer_blocks.0")
        with engine.activated(frozenset({"single.0"})):
            start = time.perf_counter()
            for name in _TARGETS:
                block.get_submodule(name)(x)
            seconds = time.perf_counter() - start
    return {
        "grammar": grammar,
        "rank": rank,
        "stored_bytes": stored,
        "attached_bytes": held,
        "dense_fp32_bytes": dense,
        "attached_over_stored": held / stored,
        "dense_over_attached": dense / held,
        "forward_256_tokens_s": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    root = single_block(FLUX1_DEV.hidden, FLUX1_DEV.mlp)
    with tempfile.TemporaryDirectory() as tmp:
        rows = [
            measure(root, Path(tmp), g, args.rank)
            for g in ("lycoris-kohya-lokr", "lycoris-kohya-loha")
        ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(
            f"{r['grammar']:20s} rank {r['rank']}: file {r['stored_bytes']:,} B, "
            f"attached {r['attached_bytes']:,} B ({r['attached_over_stored']:.2f}x the file), "
            f"dense fp32 {r['dense_fp32_bytes']:,} B ({r['dense_over_attached']:,.0f}x attached), "
            f"forward of 256 tokens {r['forward_256_tokens_s']:.3f} s"
        )


if __name__ == "__main__":
    main()
