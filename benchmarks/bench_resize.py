"""Benchmark: ``resize --rank 32`` of a real-size FLUX.1-dev rank-64 LoRA against reading it.

Generates a rank-64 kohya LoRA with FLUX.1-dev's real module shapes (304
modules, BF16, about 610 MB) with :mod:`lora_prune.testing`, then measures in
one process, with the file in the page cache: reading the file once
(sequential ``readinto`` of every byte), and :func:`~lora_prune.resize.resize_lora`
to rank 32 (bases of both factors from their Gram matrices, SVD of the 64 x 64 core, the new factors,
hashes, the atomic write and its read-back check), plus the traced peak of
Python/numpy allocations during the resize.

Usage::

    python benchmarks/bench_resize.py [--dir DIR] [--rank 64] [--to 32] [--repeat 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

from bench_inspect_slim import best_of, read_all

from lora_prune.families.flux1.geometry import FLUX1_DEV
from lora_prune.lora import read_lora
from lora_prune.resize import resize_lora
from lora_prune.testing import SynthSpec, write_synth_lora


def run(folder: Path, rank: int, to: int, repeat: int) -> dict[str, Any]:
    spec = SynthSpec(
        grammar="kohya", geometry=FLUX1_DEV, rank=rank, alpha=float(rank), dtype="BF16"
    )
    path = folder / f"flux1-dev_kohya_r{rank}_bf16.safetensors"
    start = time.perf_counter()
    write_synth_lora(path, spec)
    generate_s = time.perf_counter() - start
    out = folder / "resized.safetensors"
    read_all(path)  # warm the page cache
    read_s = best_of(repeat, lambda: read_all(path))
    resize_s = best_of(repeat, lambda: resize_lora(path, out, rank=to, force=True))
    tracemalloc.start()
    try:
        resize_lora(path, out, rank=to, force=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    largest = max(t.nbytes for t in read_lora(path).header.tensors.values())
    return {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "rank": rank,
        "to": to,
        "bytes": path.stat().st_size,
        "out_bytes": out.stat().st_size,
        "generate_s": generate_s,
        "read_s": read_s,
        "resize_s": resize_s,
        "resize/read": resize_s / read_s,
        "traced_peak": peak,
        "largest_tensor_bytes": largest,
        "repeat": repeat,
    }


def report(r: dict[str, Any]) -> str:
    mb = 1e6
    return "\n".join(
        [
            f"machine         {r['machine']}",
            f"file            {r['bytes'] / mb:.1f} MB, BF16 rank {r['rank']} "
            f"(generated in {r['generate_s']:.1f} s)",
            f"read file once  {1e3 * r['read_s']:9.1f} ms",
            f"resize to {r['to']:<4}  {1e3 * r['resize_s']:9.1f} ms  = {r['resize/read']:.1f} x read"
            f" -> {r['out_bytes'] / mb:.1f} MB",
            f"traced peak     {r['traced_peak'] / mb:.1f} MB "
            f"(largest tensor {r['largest_tensor_bytes'] / mb:.1f} MB)",
            f"(best of {r['repeat']}; warm page cache)",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="where to write the files [default: a temp dir]")
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--to", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        result = run(args.dir, args.rank, args.to, args.repeat)
    else:
        with tempfile.TemporaryDirectory(prefix="lora-prune-bench-") as folder:
            result = run(Path(folder), args.rank, args.to, args.repeat)
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
