"""Benchmark: inspect and slim of a real-size FLUX.1 LoRA against plain file I/O.

Generates a rank-16 kohya LoRA with FLUX.1-dev's real module shapes (304
modules, BF16, about 150 MB) with :mod:`lora_prune.testing`, then measures in one
process, with the file in the page cache:

* reading the file once (sequential ``readinto`` of every byte), the floor
  that ``inspect`` is measured against;
* the same read and ``inspect`` with the file evicted from the page cache
  first (``posix_fadvise(DONTNEED)`` on this one file, where the OS has it), as
  when a user inspects a LoRA they just downloaded or have not touched for a while;
* ``read_lora`` alone (header, key parsing, alpha scalars);
* ``inspect_lora(read_lora(...))`` (adds every tensor's decode and the norms);
* ``slim_lora`` keeping about half of the blocks, against ``shutil.copyfile``
  of as many bytes as slim writes;
* peak memory: tracemalloc's peak of Python/numpy allocations per operation,
  and peak RSS of a fresh interpreter doing only that operation.

Usage::

    python benchmarks/bench_inspect_slim.py [--dir DIR] [--repeat 3] [--json]
                                            [--profile]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lora_prune.blocks import format_block_spec, parse_block_spec
from lora_prune.families.flux1.blocks import LAYOUT
from lora_prune.families.flux1.geometry import FLUX1_DEV
from lora_prune.lora import read_lora
from lora_prune.slim import slim_lora
from lora_prune.stats import inspect_lora
from lora_prune.testing import SynthSpec, synth_modules, write_synth_lora

#: About half of the file: doubles are 2.7x the bytes of singles in this geometry.
DEFAULT_KEEP = "double.0-8,single.0-18"
_CHUNK = 1 << 20


def best_of(repeat: int, fn: Callable[[], object]) -> float:
    """The fastest of ``repeat`` runs, in seconds (the least disturbed by other load)."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def read_all(path: Path) -> int:
    """Read every byte once, sequentially, into one reused buffer."""
    buf = bytearray(_CHUNK)
    view = memoryview(buf)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(view):
            total += n
    return total


def evict(path: Path) -> bool:
    """Drop this file's pages from the page cache; False where the OS cannot."""
    if not hasattr(os, "posix_fadvise"):
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # dirty pages cannot be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return True


def best_cold(repeat: int, path: Path, fn: Callable[[], object]) -> float | None:
    """Like :func:`best_of`, evicting ``path`` from the page cache before each run."""
    times = []
    for _ in range(repeat):
        if not evict(path):
            return None
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def traced_peak(fn: Callable[[], object]) -> int:
    """Peak bytes allocated through Python's allocators (numpy included) during ``fn``."""
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


_RSS_CHILD = """
import resource, sys
from pathlib import Path
from lora_prune.blocks import parse_block_spec
from lora_prune.families.flux1.blocks import LAYOUT
from lora_prune.lora import read_lora
from lora_prune.slim import slim_lora
from lora_prune.stats import inspect_lora
op, path, keep, out = sys.argv[1:]
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
if op == "inspect":
    inspect_lora(read_lora(path))
elif op == "slim":
    slim_lora(path, parse_block_spec(keep, LAYOUT), output=out, force=True)
elif op == "read":
    buf = bytearray(1 << 20)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(before, after)
"""


def child_rss_kib(op: str, path: Path, keep: str, out: Path) -> tuple[int, int]:
    """Peak RSS (KiB) of a fresh interpreter after its imports and after ``op``."""
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_CHILD, op, str(path), keep, str(out)],
        capture_output=True,
        text=True,
        check=True,
    )
    before, after = proc.stdout.split()
    return int(before), int(after)


def profile_inspect(path: Path, top: int = 12) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    inspect_lora(read_lora(path))
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def run(folder: Path, repeat: int, keep_spec: str, rank: int, profile: bool) -> dict[str, Any]:
    spec = SynthSpec(
        grammar="kohya", geometry=FLUX1_DEV, rank=rank, alpha=float(rank), dtype="BF16"
    )
    path = folder / f"flux1-dev_kohya_r{rank}_bf16.safetensors"
    start = time.perf_counter()
    write_synth_lora(path, spec)
    generate_s = time.perf_counter() - start
    size = path.stat().st_size
    keep = parse_block_spec(keep_spec, LAYOUT)
    out = folder / "slim.safetensors"
    copy = folder / "copy.safetensors"

    read_all(path)  # warm the page cache
    read_s = best_of(repeat, lambda: read_all(path))
    parse_s = best_of(repeat, lambda: read_lora(path))
    inspect_s = best_of(repeat, lambda: inspect_lora(read_lora(path)))
    slim_s = best_of(repeat, lambda: slim_lora(path, keep, output=out, force=True))
    slim_size = out.stat().st_size
    copy_s = best_of(repeat, lambda: shutil.copyfile(out, copy))
    copy_full_s = best_of(repeat, lambda: shutil.copyfile(path, copy))

    cold_read_s = best_cold(repeat, path, lambda: read_all(path))
    cold_inspect_s = best_cold(repeat, path, lambda: inspect_lora(read_lora(path)))
    read_all(path)  # warm again for the memory runs

    inspect_traced = traced_peak(lambda: inspect_lora(read_lora(path)))
    slim_traced = traced_peak(lambda: slim_lora(path, keep, output=out, force=True))
    largest_tensor = max(t.nbytes for t in read_lora(path).header.tensors.values())
    rss = {op: child_rss_kib(op, path, keep_spec, out) for op in ("read", "inspect", "slim")}

    result: dict[str, Any] = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {platform.python_version()}",
        "file": {
            "modules": len(synth_modules(spec)),
            "rank": rank,
            "bytes": size,
            "largest_tensor_bytes": largest_tensor,
            "generate_s": generate_s,
        },
        "keep": format_block_spec(keep),
        "slim_bytes": slim_size,
        "seconds": {
            "read_file": read_s,
            "read_lora": parse_s,
            "inspect": inspect_s,
            "slim": slim_s,
            "copy_slim_bytes": copy_s,
            "copy_whole_file": copy_full_s,
            "cold_read_file": cold_read_s,
            "cold_inspect": cold_inspect_s,
        },
        "ratios": {
            "inspect/read": inspect_s / read_s,
            "slim/copy": slim_s / copy_s,
            "cold_inspect/cold_read": (
                cold_inspect_s / cold_read_s if cold_inspect_s and cold_read_s else None
            ),
        },
        "memory": {
            "inspect_traced_peak": inspect_traced,
            "slim_traced_peak": slim_traced,
            "rss_kib_after_imports_and_after_op": rss,
        },
        "repeat": repeat,
    }
    if profile:
        result["profile_inspect"] = profile_inspect(path)
    return result


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def report(r: dict[str, Any]) -> str:
    s, f, m = r["seconds"], r["file"], r["memory"]
    rss = m["rss_kib_after_imports_and_after_op"]
    lines = [
        f"machine          {r['machine']}",
        f"file             {mb(f['bytes'])}, {f['modules']} modules, BF16 rank {f['rank']} "
        f"(generated in {f['generate_s']:.1f} s)",
        f"read file once   {1e3 * s['read_file']:8.1f} ms  ({f['bytes'] / s['read_file'] / 1e9:.1f} GB/s)",
        f"read_lora        {1e3 * s['read_lora']:8.1f} ms",
        f"inspect          {1e3 * s['inspect']:8.1f} ms  = {r['ratios']['inspect/read']:.1f} x read",
        f"slim             {1e3 * s['slim']:8.1f} ms  keep {r['keep']} -> {mb(r['slim_bytes'])}",
        f"copy same bytes  {1e3 * s['copy_slim_bytes']:8.1f} ms  slim = {r['ratios']['slim/copy']:.1f} x copy",
        f"copy whole file  {1e3 * s['copy_whole_file']:8.1f} ms",
    ]
    if s["cold_read_file"] is not None:
        lines += [
            f"cold read once   {1e3 * s['cold_read_file']:8.1f} ms  (file evicted from the page cache)",
            f"cold inspect     {1e3 * s['cold_inspect']:8.1f} ms  = "
            f"{r['ratios']['cold_inspect/cold_read']:.1f} x cold read",
        ]
    lines += [
        f"traced peak      inspect {mb(m['inspect_traced_peak'])}, slim {mb(m['slim_traced_peak'])} "
        f"(largest tensor {mb(f['largest_tensor_bytes'])})",
    ]
    for op, (before, after) in rss.items():
        lines.append(
            f"peak RSS {op:<8}{after / 1024:8.1f} MiB ({(after - before) / 1024:+.1f} MiB over imports)"
        )
    lines.append(f"(best of {r['repeat']}; warm page cache unless marked cold)")
    if "profile_inspect" in r:
        lines += [
            "",
            "cProfile of inspect_lora(read_lora(...)), by own time:",
            r["profile_inspect"],
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="where to write the files [default: a temp dir]")
    parser.add_argument("--repeat", type=int, default=3, help="runs per measurement (best is kept)")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--keep", default=DEFAULT_KEEP, help="blocks slim keeps")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    parser.add_argument("--profile", action="store_true", help="add a cProfile of inspect")
    args = parser.parse_args(argv)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        result = run(args.dir, args.repeat, args.keep, args.rank, args.profile)
    else:
        with tempfile.TemporaryDirectory(prefix="lora-prune-bench-") as folder:
            result = run(Path(folder), args.repeat, args.keep, args.rank, args.profile)
    print(json.dumps(result, indent=2) if args.json else report(result))


if __name__ == "__main__":
    main()
