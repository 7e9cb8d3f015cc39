"""Tests of resize_lora: planted ranks recovered, exact truncation, formats kept, renders alike.

Planted files hold factors whose product has a known rank k below the stored
rank r (``up = A @ M`` with A ``[out, k]``), so the SVD must find exactly k.
Dense products are formed here, in the tests, only to check the answer.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from clitools import run_cli
from conftest import write_tensors
from safetensors.numpy import load_file

from lora_prune.errors import UnsupportedAdapterError, UsageError
from lora_prune.lora import LoraFile, LoraModule, read_lora
from lora_prune.provenance import MODEL_HASH_KEY, RESIZED_RANKS_KEY, SOURCE_SHA_KEY
from lora_prune.resize import resize_lora
from lora_prune.safetensors_io import SafetensorsReader, file_sha256, read_header
from lora_prune.testing import SynthSpec, synth_modules, write_synth_lora

STORED_RANK = 8
BLOCKS = ("double.0", "single.1", "final")


def planted_ranks(path: Path, *, alpha: float = 4.0) -> dict[str, int]:
    """A kohya LoRA whose module i has product rank 1 + i % 6 at stored rank 8; stem -> rank."""
    modules = synth_modules(SynthSpec(grammar="kohya", blocks=BLOCKS, rank=STORED_RANK))
    rng = np.random.default_rng(7)
    tensors: dict[str, npt.NDArray[np.float64]] = {}
    planted: dict[str, int] = {}
    for i, m in enumerate(modules):
        k = 1 + i % 6
        planted[m.stem] = k
        up = rng.standard_normal((m.out_features, k)) @ rng.standard_normal((k, STORED_RANK))
        down = rng.standard_normal((STORED_RANK, m.in_features)) / math.sqrt(m.in_features)
        tensors[f"{m.stem}.lora_up.weight"] = up
        tensors[f"{m.stem}.lora_down.weight"] = down
        tensors[f"{m.stem}.alpha"] = np.asarray(alpha)
    write_tensors(path, tensors, {"ss_network_dim": "8", "sshs_model_hash": "0" * 64})
    return planted


def product(lora: LoraFile, module: LoraModule) -> npt.NDArray[np.float64]:
    with SafetensorsReader(lora.path, lora.header) as r:
        up = r.read_array(module.tensors["up"].name).astype(np.float64)
        down = r.read_array(module.tensors["down"].name).astype(np.float64)
    return module.scale * up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


def rel(a: npt.NDArray[np.float64], b: npt.NDArray[np.float64]) -> float:
    return float(np.linalg.norm(a - b)) / max(float(np.linalg.norm(b)), 1e-30)


@pytest.fixture
def planted(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    path = tmp_path / "planted.safetensors"
    return path, planted_ranks(path)


def test_energy_close_to_one_recovers_the_planted_ranks(
    planted: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    path, ranks = planted
    result = resize_lora(path, tmp_path / "out.safetensors", energy=0.999999)
    assert {m.stem: m.rank_after for m in result.modules} == ranks
    before, after = read_lora(path), read_lora(result.output)
    assert {s: m.rank for s, m in after.modules.items()} == ranks
    for stem, module in after.modules.items():
        # Resizing to the product's true rank is lossless, and the scale stays.
        assert module.scale == pytest.approx(before.modules[stem].scale, rel=1e-6)
        assert rel(product(after, module), product(before, before.modules[stem])) < 1e-5


def test_rank_at_or_above_the_stored_rank_keeps_every_byte(
    planted: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    path, _ = planted
    with pytest.raises(UsageError, match=f"--rank {STORED_RANK} changes no module"):
        resize_lora(path, tmp_path / "out.safetensors", rank=STORED_RANK)
    assert not (tmp_path / "out.safetensors").exists()
    result = resize_lora(path, tmp_path / "out.safetensors", rank=STORED_RANK, allow_unchanged=True)
    assert result.resized == []
    a, b = read_header(path), read_header(result.output)
    with SafetensorsReader(path) as ra, SafetensorsReader(result.output) as rb:
        assert all(ra.read_bytes(n) == rb.read_bytes(n) for n in a.tensors)
    assert set(a.tensors) == set(b.tensors)


def test_fixed_rank_is_the_best_rank_k_approximation(tmp_path: Path) -> None:
    path = write_synth_lora(
        tmp_path / "small.safetensors",
        SynthSpec(grammar="kohya", blocks=("final",), rank=STORED_RANK, alpha=3.0),
    )
    result = resize_lora(path, tmp_path / "r3.safetensors", rank=3)
    before, after = read_lora(path), read_lora(result.output)
    assert result.resized
    for stem, module in before.modules.items():
        dense = product(before, module)
        u, s, vt = np.linalg.svd(dense, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vt[:3]
        assert rel(product(after, after.modules[stem]), best) < 1e-5
        kept = next(m.energy_kept for m in result.modules if m.stem == stem)
        assert kept == pytest.approx(float(np.sum(s[:3] ** 2) / np.sum(s**2)), rel=1e-6)
        assert after.modules[stem].alpha == pytest.approx(3.0 / STORED_RANK * 3)


def test_svd_sees_only_the_factors_and_an_r_by_r_core(
    planted: tuple[Path, dict[str, int]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path, _ = planted
    shapes: dict[str, list[tuple[int, ...]]] = {"svd": [], "eigh": []}
    real_svd, real_eigh = np.linalg.svd, np.linalg.eigh

    def svd(a: npt.NDArray[np.float64], *args: object, **kw: object) -> object:
        shapes["svd"].append(a.shape)
        return real_svd(a, *args, **kw)  # type: ignore[call-overload]

    def eigh(a: npt.NDArray[np.float64], *args: object, **kw: object) -> object:
        shapes["eigh"].append(a.shape)
        return real_eigh(a, *args, **kw)  # type: ignore[call-overload]

    # resize calls numpy.linalg through the module, so patching numpy's sees every call.
    monkeypatch.setattr(np.linalg, "svd", svd)
    monkeypatch.setattr(np.linalg, "eigh", eigh)
    resize_lora(path, tmp_path / "out.safetensors", rank=2)
    lora = read_lora(path)
    assert shapes["svd"] and max(max(s) for s in shapes["svd"]) <= STORED_RANK
    # The factors' bases come from r x r Gram matrices, two per module: never an
    # out x in product, nor an out x out or in x in one.
    assert shapes["eigh"] and set(shapes["eigh"]) == {(STORED_RANK, STORED_RANK)}
    assert len(shapes["eigh"]) == 2 * len(shapes["svd"])
    assert len(shapes["svd"]) == len(lora.modules)


@pytest.mark.parametrize(
    ("grammar", "dtype"), [("kohya", "BF16"), ("diffusers", "F16"), ("comfyui", "F8_E4M3")]
)
def test_key_format_and_dtypes_are_kept(grammar: str, dtype: str, tmp_path: Path) -> None:
    spec = SynthSpec(grammar=grammar, blocks=BLOCKS, rank=STORED_RANK, dtype=dtype, alpha=8.0)
    path = write_synth_lora(tmp_path / "in.safetensors", spec)
    result = resize_lora(path, tmp_path / "out.safetensors", rank=2)
    a, b = read_header(path), read_header(result.output)
    assert set(a.tensors) == set(b.tensors)
    assert {n: t.dtype for n, t in a.tensors.items()} == {n: t.dtype for n, t in b.tensors.items()}
    before, after = read_lora(path), read_lora(result.output)
    assert after.format == before.format
    for stem, module in after.modules.items():
        assert module.rank == 2
        assert module.scale == pytest.approx(before.modules[stem].scale, rel=1e-6)


@pytest.mark.parametrize("grammar", ["lycoris-kohya-loha", "lycoris-kohya-lokr", "kohya-diff"])
def test_modules_that_are_not_plain_low_rank_are_kept_and_named(
    grammar: str, tmp_path: Path
) -> None:
    path = write_synth_lora(tmp_path / "in.safetensors", SynthSpec(grammar=grammar, blocks=BLOCKS))
    with pytest.raises(UnsupportedAdapterError, match="nothing to resize"):
        resize_lora(path, tmp_path / "out.safetensors", rank=1)
    result = resize_lora(path, tmp_path / "out.safetensors", rank=1, allow_unchanged=True)
    lora = read_lora(path)
    assert set(result.kept_as_is) == set(lora.modules) and result.modules == []
    assert all("adapter" in why or "delta" in why for why in result.kept_as_is.values())
    with SafetensorsReader(path) as ra, SafetensorsReader(result.output) as rb:
        assert all(ra.read_bytes(n) == rb.read_bytes(n) for n in lora.header.tensors)


def test_blocks_limit_the_resize_and_the_rest_is_byte_identical(
    planted: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    path, _ = planted
    result = resize_lora(path, tmp_path / "out.safetensors", rank=1, blocks={"single.1"})
    lora = read_lora(path)
    assert {m.block for m in result.modules} == {"single.1"} and result.resized
    with SafetensorsReader(path) as ra, SafetensorsReader(result.output) as rb:
        for m in lora.modules.values():
            if m.block != "single.1":
                assert all(
                    ra.read_bytes(t.name) == rb.read_bytes(t.name) for t in m.tensors.values()
                )


def test_metadata_hashes_ranks_and_provenance(
    planted: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    path, ranks = planted
    sha_before = file_sha256(path)
    result = resize_lora(path, tmp_path / "out.safetensors", energy=0.999999)
    meta = read_header(result.output).metadata
    raw = result.output.read_bytes()
    data = raw[8 + int.from_bytes(raw[:8], "little") :]
    assert meta[MODEL_HASH_KEY] == hashlib.sha256(data).hexdigest()
    assert meta["ss_network_dim"] == "Dynamic"  # kohya's word for per-module ranks
    record = json.loads(meta[RESIZED_RANKS_KEY])
    assert record["source_sha256"] == sha_before and record["energy"] == 0.999999
    assert record["modules"] == {s: [STORED_RANK, k] for s, k in ranks.items()}
    assert SOURCE_SHA_KEY not in meta  # not a slim: check must not prove it a subset
    assert file_sha256(path) == sha_before  # the input is unchanged

    uniform = resize_lora(path, tmp_path / "r1.safetensors", rank=1)
    assert read_header(uniform.output).metadata["ss_network_dim"] == "1"


def test_peft_metadata_gets_rank_and_alpha_patterns(tmp_path: Path) -> None:
    spec = SynthSpec(grammar="diffusers", blocks=BLOCKS, rank=STORED_RANK, alpha_in="metadata")
    path = write_synth_lora(tmp_path / "in.safetensors", spec)
    out = resize_lora(path, tmp_path / "out.safetensors", rank=2).output
    before, after = read_lora(path), read_lora(out)
    config = after.peft_config or {}
    patterns = config["transformer.rank_pattern"]
    assert isinstance(patterns, dict) and set(patterns.values()) == {2}
    for stem, module in after.modules.items():
        assert module.rank == 2
        assert module.scale == pytest.approx(before.modules[stem].scale, rel=1e-6)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--rank", "0"], "--rank 0 is not an integer >= 1"),
        (["--energy", "0"], "--energy 0.0 is not a finite number in (0, 1]"),
        (["--energy", "1.5"], "--energy 1.5"),
        (["--rank", "2", "--energy", "0.9"], "give --rank and/or --ranks, or --energy"),
        ([], "give --rank and/or --ranks, or --energy"),
        (["--rank", "2", "--blocks", "double.99"], "double block index 99"),
        (["--ranks", "double=0"], "the rank '0' of 'double' is not an integer >= 1"),
        (["--ranks", "double=x2"], "the rank 'x2' of 'double' is not an integer >= 1"),
        (["--ranks", "double=4,single"], "'single' has no rank"),
        (["--ranks", ""], "--ranks names no block"),
        (["--ranks", "=4"], "empty block spec, --ranks"),
        (["--ranks", "bogus=4"], "unknown block 'bogus'"),
        (["--ranks", "double.99=4"], "double block index 99"),
        (["--ranks", "double=4", "--energy", "0.9"], "--ranks and --energy do not combine"),
        (["--rank", "0", "--ranks", "double=4"], "--rank 0 is not an integer >= 1"),
    ],
)
def test_cli_errors_are_one_line_and_leave_the_input(
    planted: tuple[Path, dict[str, int]], args: list[str], needle: str
) -> None:
    path, _ = planted
    sha = file_sha256(path)
    result = run_cli("resize", path, *args)
    err = result.stderr
    assert result.exit_code == 2 and result.stdout == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and needle in err
    assert file_sha256(path) == sha
    assert not path.with_name("planted.resized.safetensors").exists()


def _cli_ranks(path: Path, out: Path, *args: str) -> tuple[dict[str, int], str]:
    """Resize on the command line; the output's rank per block (one per block here) and stderr."""
    result = run_cli("resize", path, *args, "-o", out)
    assert result.exit_code == 0, result.output
    per_block: dict[str, set[int]] = {}
    for m in read_lora(out).modules.values():
        per_block.setdefault(m.block, set()).add(m.tensors["down"].shape[0])
    assert all(len(r) == 1 for r in per_block.values()), per_block
    return {b: r.pop() for b, r in per_block.items()}, result.stderr


def test_cli_ranks_give_blocks_their_own_rank(
    planted: tuple[Path, dict[str, int]], tmp_path: Path
) -> None:
    path, _ = planted  # double.0, single.1 and final, stored rank 8
    got, err = _cli_ranks(path, tmp_path / "a.st", "--ranks", "double=2,final=3")
    assert got == {"double.0": 2, "single.1": STORED_RANK, "final": 3} and err == ""
    # --rank is the default of the blocks --ranks leaves out; the record names the LoRA's blocks.
    got, _ = _cli_ranks(path, tmp_path / "b.st", "--rank", "1", "--ranks", "single.1=4")
    assert got == {"double.0": 1, "single.1": 4, "final": 1}
    record = json.loads(read_header(tmp_path / "b.st").metadata[RESIZED_RANKS_KEY])
    assert record["ranks"] == {"double.0": 1, "final": 1, "single.1": 4}
    # A SPEC holds commas as --keep's does; a later entry overrides an earlier one.
    got, _ = _cli_ranks(path, tmp_path / "c.st", "--ranks", "single,double=4,single.1=6")
    assert got == {"double.0": 4, "single.1": 6, "final": STORED_RANK}
    # --blocks limits every rank, --ranks's too.
    args = ["--rank", "1", "--ranks", "final=2,single=5", "--blocks", "double.0,final"]
    got, _ = _cli_ranks(path, tmp_path / "d.st", *args)
    assert got == {"double.0": 1, "single.1": STORED_RANK, "final": 2}
    # An entry for blocks the LoRA lacks is noted, not refused.
    got, err = _cli_ranks(path, tmp_path / "e.st", "--ranks", "input=4,double=2")
    assert got == {"double.0": 2, "single.1": STORED_RANK, "final": STORED_RANK}
    assert err == "note: the LoRA has no input; --ranks changes nothing there\n"


def test_cli_refuses_the_input_as_output_and_prints_what_it_did(
    planted: tuple[Path, dict[str, int]],
) -> None:
    path, _ = planted
    sha = file_sha256(path)
    refused = run_cli("resize", path, "--rank", "2", "-o", path, "--force")
    assert refused.exit_code != 0
    assert refused.stderr.startswith("error: the output would replace the input")
    assert file_sha256(path) == sha
    result = run_cli("resize", path, "--rank", "2")
    assert result.exit_code == 0, result.stdout
    assert "resized  " in result.stdout
    assert path.with_name("planted.resized.safetensors").exists()


def test_cli_groups_the_modules_kept_as_they_are_by_reason(tmp_path: Path) -> None:
    plain = write_synth_lora(tmp_path / "a.st", SynthSpec(grammar="kohya", blocks=("double.0",)))
    loha_spec = SynthSpec(grammar="lycoris-kohya-loha", blocks=("single.0", "single.1", "final"))
    loha = write_synth_lora(tmp_path / "b.st", loha_spec)
    mixed = write_tensors(tmp_path / "mixed.safetensors", {**load_file(plain), **load_file(loha)})
    result = run_cli("resize", mixed, "--rank", "1", "-o", tmp_path / "out.safetensors")
    assert result.exit_code == 0, result.output
    stems = [m.stem for m in read_lora(loha).modules.values()]
    lines = [line for line in result.stdout.splitlines() if line.startswith("kept as is")]
    assert lines == [
        f"kept as is  {len(stems)} modules (loha adapter): {', '.join(stems[:3])} "
        f"and {len(stems) - 3} more"
    ]


def test_a_resize_that_changes_nothing_writes_nothing_and_says_why(tmp_path: Path) -> None:
    loha = write_synth_lora(
        tmp_path / "loha.safetensors", SynthSpec(grammar="lycoris-kohya-loha", blocks=("final",))
    )
    result = run_cli("resize", loha, "--rank", "1")
    assert result.exit_code == 4, result.output
    assert result.stderr.startswith("error: nothing to resize: none of the ")
    assert "plain low-rank" in result.stderr and result.stderr.count("\n") == 1
    plain = write_synth_lora(
        tmp_path / "plain.safetensors", SynthSpec(grammar="kohya", blocks=("double.0",), rank=4)
    )
    result = run_cli("resize", plain, "--rank", "32")
    assert result.exit_code == 2, result.output
    assert "nothing to resize: --rank 32 changes no module (the highest rank is 4)" in result.stderr
    assert "give a rank below 4" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loha.safetensors", "plain.safetensors"]


def test_a_resized_file_renders_like_the_original(tmp_path: Path) -> None:
    """On the tiny model, the resized file keeps the verdict's share of the full LoRA's effect."""
    from lora_prune.render.loading import ModelSpec
    from lora_prune.render.session import open_session
    from lora_prune.settings import AnalyzeSettings
    from lora_prune.verify import verify_slim

    path = tmp_path / "planted.safetensors"
    planted_ranks(path, alpha=16.0)
    out = resize_lora(path, tmp_path / "resized.safetensors", energy=0.999999).output
    settings = AnalyzeSettings(prompts=("a red fox",), seeds=(0,), width=32, height=32, steps=2)
    full, resized = read_lora(path), read_lora(out)
    spec = ModelSpec(model="tiny")
    with open_session(spec, full) as a, open_session(spec, resized) as b:
        result = verify_slim(
            full, file_sha256(path), resized.blocks, settings, a.renderer, candidate=b.renderer
        )
        cut = resize_lora(path, tmp_path / "r1.safetensors", rank=1).output
        with open_session(spec, read_lora(cut)) as c:
            worse = verify_slim(
                full, file_sha256(path), resized.blocks, settings, a.renderer, candidate=c.renderer
            )
    assert result.measurable and result.passed, result.worst_kept
    assert result.kept_share is not None and result.kept_share > 0.99
    # The check can fail: a rank-1 cut of rank-1..6 products keeps visibly less.
    assert worse.kept_share is not None and worse.kept_share < result.kept_share
