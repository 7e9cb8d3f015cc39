"""``slim --auto --max-size`` on the tiny model: a file under the budget that passes verify, or why not.

The LoRA is planted (only known blocks do anything) and its products have rank
1 at stored rank 4, so that halving the rank keeps the whole effect: a budget
the full-rank keep set misses is met by a resized file.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lora_prune.analysis import keep_size
from lora_prune.budget import budget_ranks, plan_budget, record_reserve
from lora_prune.cli import cli
from lora_prune.lora import read_lora
from lora_prune.provenance import RESIZED_RANKS_KEY, SOURCE_SHA_KEY, VERIFICATION_KEY
from lora_prune.resize import resized_size
from lora_prune.safetensors_io import SafetensorsReader, TensorEntry, file_sha256, write_safetensors
from lora_prune.settings import check_max_size
from lora_prune.testing import planted_lora

torch.set_num_threads(1)

PLANTED = {"double.3": 1.0, "single.7": 1.0, "final": 0.8}
RENDER = ["--model", "tiny", "--prompt", "a red fox", "--seeds", "0,1", "--size", "32"]
RENDER += ["--steps", "2", "--min-ssim", "0.999"]
IMAGES = 2


@pytest.fixture(scope="module")
def low_rank(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The planted LoRA with every up factor's columns made equal: products of rank 1."""
    folder = tmp_path_factory.mktemp("budget")
    source = planted_lora(folder / "rank4.safetensors", PLANTED, rank=4)
    lora = read_lora(source)
    entries = []
    with SafetensorsReader(source, lora.header) as reader:
        for info in sorted(lora.header.tensors.values(), key=lambda t: t.begin):
            array = reader.read_array(info.name).astype("<f4")
            if info.name.endswith("lora_up.weight"):
                array = np.repeat(array[:, :1], array.shape[1], axis=1)
            data = np.ascontiguousarray(array).tobytes()
            entries.append(
                TensorEntry(info.name, "F32", info.shape, functools.partial(bytes, data))
            )
    path = folder / "planted.safetensors"
    write_safetensors(path, entries, dict(lora.metadata))
    return path


def run_cli(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def auto(lora: Path, out: Path, max_size: str) -> tuple[int, str]:
    work = lora.with_name("work")  # shared: the ranking renders once for all tests
    return run_cli(
        "slim", str(lora), "--auto", *RENDER, "--max-size", max_size, "-o", str(out),
        "--work-dir", str(work),
    )  # fmt: skip


def verify_and_check(full: Path, out: Path) -> None:
    code, output = run_cli("verify", str(full), str(out), *RENDER)
    assert code == 0, output
    policy = out.with_name("policy.toml")
    policy.write_text("require_verified = true\n")
    code, output = run_cli("check", str(out), str(full), "--policy", str(policy))
    assert code == 0 and "PASS" in output, output


def test_sizes_and_ranks_are_planned_from_shapes(low_rank: Path, tmp_path: Path) -> None:
    lora = read_lora(low_rank)
    assert budget_ranks(lora) == [2, 1]
    keep = sorted(PLANTED)
    # At the stored rank the size is that of the slim; the factors halve with the rank.
    assert resized_size(lora, keep, None) == keep_size(lora, keep)
    code, _ = run_cli("resize", str(low_rank), "--rank", "2", "-o", str(tmp_path / "r2.st"))
    assert code == 0
    r2 = read_lora(tmp_path / "r2.st")
    # The tensors are as planned; the resize's provenance fits in the reserve.
    planned = resized_size(lora, lora.blocks, 2)
    assert {m.rank for m in r2.modules.values()} == {2}
    assert planned < (tmp_path / "r2.st").stat().st_size <= planned + record_reserve(lora, 0)
    # Per rank, the most top-ranked blocks that fit, and never fewer than k_pass.
    order = ["double.3", "single.7", "final", "double.0", "double.1"]
    budget = resized_size(lora, order[:4], 1)
    plan = plan_budget(lora, order, 3, budget)
    assert [(c.rank, len(c.blocks)) for c in plan] == [(2, 3), (1, 4)]
    assert plan_budget(lora, order, 3, resized_size(lora, order[:3], 1) - 1) == []
    assert check_max_size("20MB") == 20_000_000 and check_max_size("1.5 KiB") == 1536


def test_a_budget_the_keep_set_fits_is_plain_auto(low_rank: Path, tmp_path: Path) -> None:
    out = tmp_path / "auto.safetensors"
    code, output = auto(low_rank, out, "100MB")
    assert code == 0, output
    slim = read_lora(out)
    assert set(slim.blocks) == set(PLANTED)
    assert out.stat().st_size <= 100_000_000
    assert slim.metadata[SOURCE_SHA_KEY] == file_sha256(low_rank)
    assert "tried    double.3,single.7,final at full rank" in output and ", pass" in output
    verify_and_check(low_rank, out)


def test_a_budget_met_by_a_lower_rank_writes_a_verified_resize(
    low_rank: Path, tmp_path: Path
) -> None:
    lora = read_lora(low_rank)
    keep = sorted(PLANTED)
    full, half = keep_size(lora, keep), resized_size(lora, keep, 2)
    budget = record_reserve(lora, IMAGES) + (full + half) // 2
    assert half < full
    out = tmp_path / "budget.safetensors"
    code, output = auto(low_rank, out, str(budget))
    assert code == 0, output
    assert out.stat().st_size <= budget
    small = read_lora(out)
    assert set(PLANTED) <= set(small.blocks)
    # Rank 2 and rank 1 both keep a rank-1 product whole: a tie, the higher rank is written.
    (rank,) = {m.rank for m in small.modules.values()}
    assert rank == 2
    assert SOURCE_SHA_KEY not in small.metadata
    provenance = json.loads(small.metadata[RESIZED_RANKS_KEY])
    assert provenance["source_sha256"] == file_sha256(low_rank) and provenance["rank"] == rank
    record = json.loads(small.metadata[VERIFICATION_KEY])
    assert record["passed"] is True and record["full_sha256"] == file_sha256(low_rank)
    assert min(record["worst_kept"].values()) > 0.99
    assert "at full rank" in output and "at rank 2" in output and "at rank 1" in output
    assert "FAIL" not in output
    verify_and_check(low_rank, out)


def test_an_impossible_budget_names_the_smallest_size_that_passes(
    low_rank: Path, tmp_path: Path
) -> None:
    out = tmp_path / "none.safetensors"
    code, output = auto(low_rank, out, "2KB")
    assert code == 1, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    smallest = keep_size(read_lora(low_rank), sorted(PLANTED))
    assert f"{smallest / 1000:.1f} KB" in errors[0]
    assert "double.3,single.7,final at full rank" in errors[0] and "--max-size" in errors[0]
    assert not out.exists()
    code, output = run_cli("slim", str(low_rank), "--keep", "all", "--max-size", "1MB")
    assert code == 2 and "--max-size needs --auto" in output
