"""``slim --auto --max-size`` on the tiny model: a file under the budget that passes verify, or why not.

The LoRA is planted (only known blocks do anything) and its products have rank
1 at stored rank 4, so that halving the rank keeps the whole effect: a budget
the full-rank keep set misses is met by a resized file. A second one keeps
single.7 at its full rank 4 and the other blocks at rank 1: only per-block
ranks meet a budget between that allocation's size and uniform rank 2's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
from click.testing import Result
from clitools import run_cli
from conftest import PLANTED, write_tensors

from lora_prune.budget import allocate_ranks, budget_ranks, plan_budget, record_reserve
from lora_prune.lora import LoraFile, read_lora
from lora_prune.provenance import RESIZED_RANKS_KEY, SOURCE_SHA_KEY, VERIFICATION_KEY
from lora_prune.resize import ModuleSpectrum, module_spectra, resize_lora, resized_size
from lora_prune.safetensors_io import SafetensorsReader, file_sha256
from lora_prune.settings import check_max_size
from lora_prune.slim import keep_size

torch.set_num_threads(1)

RENDER = ["--model", "tiny", "--prompt", "a red fox", "--seeds", "0,1", "--size", "32"]
RENDER += ["--steps", "2", "--min-ssim", "0.999"]
IMAGES = 2


def _planted(source: Path, folder: Path, full_rank: frozenset[str]) -> Path:
    """The planted LoRA ``source`` with the up factor's columns made equal (products of
    rank 1) in every block but ``full_rank``."""
    lora = read_lora(source)
    block_of = {t.name: m.block for m in lora.modules.values() for t in m.tensors.values()}
    tensors: dict[str, npt.NDArray[np.float32]] = {}
    with SafetensorsReader(source, lora.header) as reader:
        for info in sorted(lora.header.tensors.values(), key=lambda t: t.begin):
            array = reader.read_array(info.name).astype("<f4")
            if info.name.endswith("lora_up.weight") and block_of[info.name] not in full_rank:
                array = np.repeat(array[:, :1], array.shape[1], axis=1)
            tensors[info.name] = array
    return write_tensors(folder / "planted.safetensors", tensors, dict(lora.metadata))


@pytest.fixture(scope="module")
def low_rank(planted: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The planted LoRA with products of rank 1 everywhere."""
    return _planted(planted, tmp_path_factory.mktemp("budget"), frozenset())


@pytest.fixture(scope="module")
def mixed_rank(planted: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """single.7's products keep their full rank 4; double.3's and final's have rank 1."""
    return _planted(planted, tmp_path_factory.mktemp("mixed"), frozenset({"single.7"}))


def auto(lora: Path, out: Path, max_size: str) -> Result:
    work = lora.with_name("work")  # shared: the ranking renders once for all tests
    return run_cli(
        "slim", lora, "--auto", *RENDER, "--max-size", max_size, "-o", out, "--work-dir", work
    )


def within_budget(lora: Path, out: Path, budget: int) -> tuple[LoraFile, str]:
    """``slim --auto --max-size budget``: the file written (under the budget, every planted block)."""
    result = auto(lora, out, str(budget))
    assert result.exit_code == 0, result.output
    assert out.stat().st_size <= budget
    small = read_lora(out)
    assert set(PLANTED) <= set(small.blocks)
    return small, result.output


def verify_and_check(full: Path, out: Path) -> None:
    verified = run_cli("verify", full, out, *RENDER)
    assert verified.exit_code == 0, verified.output
    policy = out.with_name("policy.toml")
    policy.write_text("require_verified = true\n")
    checked = run_cli("check", out, full, "--policy", policy)
    assert checked.exit_code == 0 and "PASS" in checked.output, checked.output


def test_sizes_and_ranks_are_planned_from_shapes(low_rank: Path, tmp_path: Path) -> None:
    lora = read_lora(low_rank)
    assert budget_ranks(lora) == [2, 1]
    keep = sorted(PLANTED)
    # At the stored rank the size is that of the slim; the factors halve with the rank.
    assert resized_size(lora, keep, None) == keep_size(lora, keep)
    assert run_cli("resize", low_rank, "--rank", "2", "-o", tmp_path / "r2.st").exit_code == 0
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
    result = auto(low_rank, out, "100MB")
    output = result.output
    assert result.exit_code == 0, output
    slim = read_lora(out)
    assert set(slim.blocks) == set(PLANTED)
    assert out.stat().st_size <= 100_000_000
    assert slim.metadata[SOURCE_SHA_KEY] == file_sha256(low_rank)
    assert "tried    double.3,single.7,final at full rank" in output and ", pass" in output
    verify_and_check(low_rank, out)


def test_a_budget_the_full_rank_file_fits_with_its_record_is_met_at_full_rank(
    low_rank: Path, tmp_path: Path
) -> None:
    # The size of the file plain --auto writes, verification record and provenance included.
    plain = tmp_path / "plain.safetensors"
    done = auto(low_rank, plain, "100MB")
    assert done.exit_code == 0, done.output
    exact = plain.stat().st_size
    # A reserve counted over every module of the source would not fit it: the file does.
    assert (
        keep_size(read_lora(low_rank), sorted(PLANTED))
        + record_reserve(read_lora(low_rank), IMAGES)
        > exact
    )
    out = tmp_path / "exact.safetensors"
    _, output = within_budget(low_rank, out, exact)
    assert out.read_bytes() == plain.read_bytes()
    assert "at rank" not in output and "at full rank" in output


def test_a_budget_met_by_a_lower_rank_writes_a_verified_resize(
    low_rank: Path, tmp_path: Path
) -> None:
    lora = read_lora(low_rank)
    keep = sorted(PLANTED)
    full, half = keep_size(lora, keep), resized_size(lora, keep, 2)
    budget = record_reserve(lora, IMAGES, keep) + (full + half) // 2
    assert half < full
    out = tmp_path / "budget.safetensors"
    small, output = within_budget(low_rank, out, budget)
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
    # The candidates were rendered as rank caps, unwritten: only the one chosen became a file.
    assert [p.name for p in (low_rank.with_name("work") / "budget").iterdir()] == [
        "rank2.safetensors"
    ]
    verify_and_check(low_rank, out)


def test_an_impossible_budget_names_the_smallest_size_that_passes(
    low_rank: Path, tmp_path: Path
) -> None:
    out = tmp_path / "none.safetensors"
    result = auto(low_rank, out, "2KB")
    output = result.output
    assert result.exit_code == 1, output
    errors = [line for line in output.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1
    smallest = keep_size(read_lora(low_rank), sorted(PLANTED))
    assert f"{smallest / 1000:.1f} KB" in errors[0]
    assert "double.3,single.7,final at full rank" in errors[0] and "--max-size" in errors[0]
    # No reduced rank fits 2 KB: none was rendered, and the message does not count the full rank.
    assert "no keep set that can pass fits in 2.0 KB" in errors[0], errors[0]
    assert not out.exists()
    result = run_cli("slim", low_rank, "--keep", "all", "--max-size", "1MB")
    assert result.exit_code == 2 and "--max-size needs --auto" in result.output


def spectrum(
    stem: str, energies: list[float], per_rank: int = 100, block: str = ""
) -> ModuleSpectrum:
    return ModuleSpectrum(stem, block or stem, tuple(energies), per_rank)


def factor_bytes(modules: list[ModuleSpectrum], ranks: dict[str, int]) -> int:
    return sum(ranks[m.stem] * m.bytes_per_rank for m in modules)


def test_the_allocation_never_exceeds_the_budget() -> None:
    rng = np.random.default_rng(0)
    for trial in range(50):
        modules = [
            spectrum(
                f"m{i}",
                sorted(rng.exponential(size=int(rng.integers(1, 9))).tolist(), reverse=True),
                int(rng.integers(10, 300)),
                block=f"b{i % 3}",
            )
            for i in range(int(rng.integers(1, 7)))
        ]
        weights = {f"b{j}": float(rng.uniform(0.1, 2.0)) for j in range(3)}
        floor = sum(m.bytes_per_rank for m in modules)
        budget = floor + int(rng.integers(0, 3000))
        ranks = allocate_ranks(modules, budget, weights)
        assert ranks is not None, trial
        assert factor_bytes(modules, ranks) <= budget
        assert all(1 <= ranks[m.stem] <= len(m.energies) for m in modules)
        # Greedy to the end: no module that can still grow fits in what is left.
        left = budget - factor_bytes(modules, ranks)
        assert all(ranks[m.stem] == len(m.energies) or m.bytes_per_rank > left for m in modules), (
            trial
        )
    assert allocate_ranks([spectrum("a", [1.0], 100)], 99) is None


def test_the_allocation_gives_rank_where_it_keeps_more_energy_per_byte() -> None:
    flat, steep = spectrum("flat", [1.0, 1.0, 1.0, 1.0]), spectrum("steep", [1.0, 0.01, 0.01, 0.01])
    assert allocate_ranks([flat, steep], 600) == {"flat": 4, "steep": 2}
    cheap, dear = spectrum("cheap", [1.0] * 4, 100), spectrum("dear", [1.0] * 4, 300)
    assert allocate_ranks([cheap, dear], 800) == {"cheap": 4, "dear": 1}
    # A product of true rank 1 gets no bytes for its noise, however many are left.
    noise = spectrum("noise", [1.0, 1e-14, 1e-15, 1e-16])
    assert allocate_ranks([noise, flat], 10_000) == {"noise": 1, "flat": 4}
    # The block's influence weighs its energy: the same spectra, the heavier block grows first.
    a, b = spectrum("a", [1.0] * 4), spectrum("b", [1.0] * 4)
    assert allocate_ranks([a, b], 500, {"a": 1.0, "b": 3.0}) == {"a": 1, "b": 4}


def test_alike_modules_get_the_uniform_rank() -> None:
    modules = [spectrum(f"m{i}", [4.0, 2.0, 1.0, 0.5, 0.25, 0.1], 128) for i in range(5)]
    for rank in range(1, 7):
        ranks = allocate_ranks(modules, rank * 5 * 128 + 127, {m.stem: 0.5 for m in modules})
        assert ranks == {m.stem: rank for m in modules}


def test_a_rank_mapping_resizes_per_block_and_per_module(mixed_rank: Path, tmp_path: Path) -> None:
    lora = read_lora(mixed_rank)
    stems = [m.stem for m in lora.modules.values() if m.block == "single.7"]
    ranks = {"double.3": 1, "single.7": 3, stems[0]: 2}
    keep = sorted(PLANTED)
    out = tmp_path / "mapped.safetensors"
    result = resize_lora(mixed_rank, out, ranks=ranks, keep=keep)
    got = {m.stem: m.rank for m in read_lora(out).modules.values()}
    for module in lora.modules.values():
        if module.block == "double.3":
            assert got[module.stem] == 1
        elif module.block == "single.7":
            assert got[module.stem] == (2 if module.stem == stems[0] else 3)
        elif module.block == "final":
            assert got[module.stem] == 4  # in no entry: as stored
    planned = resized_size(lora, keep, ranks)
    assert planned < result.bytes_after <= planned + record_reserve(lora, 0)
    provenance = json.loads(result.metadata[RESIZED_RANKS_KEY])
    assert provenance["ranks"] == dict(sorted(ranks.items())) and provenance["rank"] is None
    # The rank-1 products of double.3 lose nothing; single.7's full-rank ones do.
    kept = {m.stem: m.energy_kept for m in result.modules}
    assert min(kept[s] for s in kept if s.startswith("lora_unet_double")) > 1 - 1e-9
    assert max(kept[s] for s in stems) < 0.999
    refused = run_cli("resize", mixed_rank, "--rank", "0", "-o", tmp_path / "x")
    assert refused.exit_code == 2 and "--rank 0" in refused.output


def test_a_budget_only_per_block_ranks_meet_passes_verify(mixed_rank: Path, tmp_path: Path) -> None:
    lora = read_lora(mixed_rank)
    keep = sorted(PLANTED)
    spectra = module_spectra(lora, keep)
    allocation = {s: 4 if m.block == "single.7" else 1 for s, m in spectra.items()}
    needed, uniform2 = resized_size(lora, keep, allocation), resized_size(lora, keep, 2)
    assert needed < uniform2 < keep_size(lora, keep)
    budget = record_reserve(lora, IMAGES, keep) + (needed + uniform2) // 2
    out = tmp_path / "mixed.safetensors"
    small, output = within_budget(mixed_rank, out, budget)
    ranks = {m.block: m.rank for m in small.modules.values() if m.block in PLANTED}
    assert ranks == {"double.3": 1, "single.7": 4, "final": 1}
    # The uniform rank 1 that fits loses single.7's effect; the allocation is what passes.
    tried = [line for line in output.splitlines() if line.startswith("tried ")]
    assert any("at rank 1" in line and line.endswith("FAIL") for line in tried), output
    assert any("double.3@1,single.7@4,final@1" in line and line.endswith("pass") for line in tried)
    assert len(list((mixed_rank.with_name("work") / "budget").iterdir())) == 1
    record = json.loads(small.metadata[VERIFICATION_KEY])
    assert record["passed"] is True and min(record["worst_kept"].values()) > 0.99
    provenance = json.loads(small.metadata[RESIZED_RANKS_KEY])
    assert provenance["rank"] is None and provenance["source_sha256"] == file_sha256(mixed_rank)
    verify_and_check(mixed_rank, out)
