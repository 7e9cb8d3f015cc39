"""Long fuzz runs of lora-prune's file readers: atheris when installed, else plain random.

The target is the one tests/test_fuzz.py runs in CI: a seed LoRA of one of the
synthetic grammars, mutated (header, metadata JSON, PEFT patterns, shapes, key
digits, byte flips, truncation), then ``read_lora`` + ``inspect_lora`` +
``run_check``. Only lora-prune's own errors may come out; a case over
FUZZ_TIME_CAP seconds is a hang and one whose tracemalloc peak passes
FUZZ_MEMORY_CAP is an over-cap allocation.

    python fuzz/fuzz_lora.py --plain 20000          # plain random, prints a tally
    python fuzz/fuzz_lora.py --plain 20000 --seed 7
    python fuzz/fuzz_lora.py -atheris_runs=100000   # coverage-guided (pip install atheris)

atheris is not a dependency of lora-prune; this file is the only user.
"""

from __future__ import annotations

import argparse
import random
import signal
import sys
import tempfile
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from types import FrameType

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hostile import FUZZ_MEMORY_CAP, FUZZ_TIME_CAP, fuzz_seeds, mutate, run_target


class Hang(Exception):
    pass


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang(f"case ran over {FUZZ_TIME_CAP} s")


def one_case(data: bytes, path: Path) -> tuple[str, float, int]:
    """(outcome, seconds, peak bytes) of one case; raises on an escape, hang or over-cap."""
    path.write_bytes(data)
    signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, FUZZ_TIME_CAP)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        outcome = run_target(path)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    elapsed = time.perf_counter() - started
    if peak > FUZZ_MEMORY_CAP:
        raise MemoryError(f"peak allocation {peak} bytes over the cap {FUZZ_MEMORY_CAP}")
    return outcome, elapsed, peak


def case_bytes(rng: random.Random) -> bytes:
    seeds = fuzz_seeds()
    metadata, tensors = seeds[rng.randrange(len(seeds))]
    return mutate(rng, metadata, tensors)


def plain(runs: int, seed: int) -> int:
    tally: Counter[str] = Counter()
    problems: Counter[str] = Counter()
    slowest = 0.0
    peak_max = 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.safetensors"
        for i in range(runs):
            rng = random.Random(seed * 1_000_003 + i)
            try:
                outcome, elapsed, peak = one_case(case_bytes(rng), path)
            except Hang:
                problems["hang"] += 1
                continue
            except MemoryError as exc:
                problems["over-cap"] += 1
                print(f"case {i}: {exc}", file=sys.stderr)
                continue
            except Exception as exc:  # an escape: what this run is here to find
                problems[f"escape {type(exc).__name__}"] += 1
                if problems[f"escape {type(exc).__name__}"] == 1:
                    print(f"case {i}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
                continue
            tally[outcome] += 1
            slowest = max(slowest, elapsed)
            peak_max = max(peak_max, peak)
    total = time.perf_counter() - started
    print(
        f"cases {runs}, seed {seed}, {total:.1f} s, slowest {slowest:.3f} s, "
        f"largest peak {peak_max / 2**20:.1f} MiB"
    )
    print("outcomes:", dict(tally.most_common()))
    print("escapes/hangs/over-cap:", dict(problems) or "none")
    return 1 if problems else 0


def atheris_main(argv: list[str]) -> None:
    import atheris  # optional: only long coverage-guided runs need it

    tmp = Path(tempfile.mkdtemp())
    path = tmp / "case.safetensors"

    def target(data: bytes) -> None:
        fdp = atheris.FuzzedDataProvider(data)
        rng = random.Random(fdp.ConsumeBytes(16))
        if fdp.ConsumeBool():
            one_case(case_bytes(rng), path)
        else:  # raw bytes too: the reader's first lines of defence
            one_case(fdp.ConsumeBytes(fdp.remaining_bytes()), path)

    atheris.Setup(argv, target)
    atheris.Fuzz()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain", type=int, metavar="N", help="N plain random cases, no atheris")
    parser.add_argument("--seed", type=int, default=0)
    args, rest = parser.parse_known_args()
    if args.plain is not None:
        return plain(args.plain, args.seed)
    atheris_main([sys.argv[0], *rest])
    return 0


if __name__ == "__main__":
    sys.exit(main())
