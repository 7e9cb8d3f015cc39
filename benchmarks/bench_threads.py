"""Benchmark: the tiny model's sweep with one CPU thread against torch's default, idle and busy.

Small CPU renders oversubscribe: torch starts one thread per core, and on a
machine whose cores are busy with other work each matmul of the tiny model waits
for every thread. This script renders the same ``analyze`` sweep of a planted
LoRA (solo and leave-one-out, 2 prompts x 2 seeds, 64 px, 4 steps: the demo's
sweep) in one process with ``--threads 1`` (the tiny model's default) and with
torch's default thread count, first on an idle machine, then with one busy-loop
process per core beside it, and prints the seconds and the ratios.

Usage::

    python benchmarks/bench_threads.py [--load N] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from lora_prune.analysis import analyze
from lora_prune.lora import read_lora
from lora_prune.render.loading import load_pipeline
from lora_prune.render.session import open_session
from lora_prune.render.workflows import DEMO_PLANTED, DEMO_PROMPTS, DEMO_SEEDS
from lora_prune.safetensors_io import file_sha256
from lora_prune.settings import MODES, ModelSpec, RenderRequest
from lora_prune.testing import planted_lora


def _spin() -> None:
    while True:
        pass


@contextmanager
def busy(processes: int) -> Iterator[None]:
    """``processes`` busy loops beside the benchmark (none for 0)."""
    workers = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(processes)]
    for w in workers:
        w.start()
    try:
        yield
    finally:
        for w in workers:
            w.terminate()
            w.join()


def sweep_seconds(folder: Path, threads: int | None) -> float:
    """Seconds for the demo's sweep, rendered from scratch with ``threads`` (None: torch's)."""
    lora_path = folder / "lora.safetensors"
    if not lora_path.exists():
        planted_lora(lora_path, DEMO_PLANTED, grammar="kohya", rank=4, seed=0)
    lora = read_lora(lora_path)
    spec = ModelSpec(model="tiny", device="cpu", threads=threads or torch.get_num_threads())
    settings = RenderRequest(prompts=DEMO_PROMPTS, seeds=DEMO_SEEDS).settings(spec.model, MODES)
    loaded = load_pipeline(spec)
    out = Path(tempfile.mkdtemp(dir=folder))
    t0 = time.perf_counter()
    with open_session(spec, lora, loaded=loaded) as session:
        analyze(lora, file_sha256(lora_path), settings, out, session.renderer, batch_size=32)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--load", type=int, default=os.cpu_count() or 1, help="busy processes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    default = torch.get_num_threads()
    results: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sweep_seconds(folder, 1)  # warm-up: imports, first allocations
        for load in (0, args.load):
            with busy(load):
                for threads in (1, default):
                    results[f"load {load}, {threads} thread(s)"] = sweep_seconds(folder, threads)
    ratios = {
        "default/1 idle": results[f"load 0, {default} thread(s)"] / results["load 0, 1 thread(s)"],
        "default/1 busy": results[f"load {args.load}, {default} thread(s)"]
        / results[f"load {args.load}, 1 thread(s)"],
    }
    if args.json:
        print(json.dumps({"seconds": results, "ratios": ratios, "cores": os.cpu_count()}))
        return
    print(f"cores {os.cpu_count()}, torch default threads {default}")
    for name, seconds in results.items():
        print(f"  {name:<28} {seconds:8.1f} s")
    for name, ratio in ratios.items():
        print(f"  {name:<28} {ratio:8.2f}x")


if __name__ == "__main__":
    main()
