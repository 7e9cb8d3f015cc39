"""Tests of the ``lora-prune inspect`` and ``lora-prune slim`` commands.

They run the click command in-process (CliRunner) and, for a few cases, the
installed console script in a subprocess. Expected counts, sizes and norms are
computed here from the synthetic generator's tables and tensors, not taken from
the library under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from click.testing import Result
from clitools import run_cli
from hostile import Corpus, make_hostile_corpus

from lora_prune import fileio
from lora_prune.lora import read_lora
from lora_prune.testing import (
    SynthSpec,
    supported_blocks,
    synth_metadata,
    synth_modules,
    synth_tensors,
    write_synth_lora,
)

DOUBLES = [f"double.{i}" for i in range(19)]
SINGLES = [f"single.{i}" for i in range(38)]
EVERY = ["clip", "t5", "input", *DOUBLES, *SINGLES, "final"]
ORDER = {b: i for i, b in enumerate([*EVERY, "other"])}


# The official reader, typed: name -> {"dtype", "shape", "data"} in file order.
deserialize: Callable[[bytes], list[tuple[str, dict[str, Any]]]] = safetensors.deserialize


def metadata_of(path: Path) -> dict[str, str]:
    with safetensors.safe_open(str(path), framework="numpy") as f:
        meta: dict[str, str] | None = f.metadata()
    return meta or {}


def inspect_json(path: Path, *extra: str) -> dict[str, Any]:
    result = run_cli("inspect", path, "--json", *extra)
    assert result.exit_code == 0, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def official_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    return {
        name: (info["dtype"], tuple(info["shape"]), bytes(info["data"]))
        for name, info in deserialize(path.read_bytes())
    }


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file of a folder with its bytes and mtime: to prove nothing changed."""
    return {
        p.name: (p.read_bytes() if p.is_file() else b"", p.lstat().st_mtime_ns)
        for p in sorted(folder.iterdir())
    }


def assert_one_error_line(result: Result, code: int, *fragments: str) -> str:
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def kb(n: int) -> str:
    """Sizes as the CLI prints them (decimal units, one decimal)."""
    if n < 1000:
        return f"{n} B"
    if n < 1_000_000:
        return f"{n / 1000:.1f} KB"
    return f"{n / 1_000_000:.1f} MB"


# --- expected values, from the generator ------------------------------------------
def expected_blocks(spec: SynthSpec) -> dict[str, dict[str, int]]:
    """block -> modules, tensors, params and bytes, from the synthetic tensors."""
    tensors = synth_tensors(spec)
    out: dict[str, dict[str, int]] = {}
    for module in synth_modules(spec):
        row = out.setdefault(module.block, {"modules": 0, "tensors": 0, "params": 0, "bytes": 0})
        row["modules"] += 1
        for key in module.keys:
            _, shape, raw = tensors[key]
            row["tensors"] += 1
            row["params"] += int(np.prod(shape, dtype=np.int64))
            row["bytes"] += len(raw)
    return out


def expected_lora_norms(spec: SynthSpec) -> dict[str, float]:
    """Per-block sum of ||alpha/rank * up @ down||_F, forming the product in float64."""
    assert spec.dtype == "F32" and spec.alpha is not None
    tensors = synth_tensors(spec)

    def array(key: str) -> np.ndarray:
        _, shape, raw = tensors[key]
        return np.frombuffer(raw, dtype="<f4").reshape(shape).astype(np.float64)

    norms: dict[str, float] = {}
    for module in synth_modules(spec):
        down = next(k for k in module.keys if ".lora_down." in k or ".lora_A." in k)
        up = next(k for k in module.keys if ".lora_up." in k or ".lora_B." in k)
        delta = (spec.alpha / spec.rank) * (array(up) @ array(down))
        norms[module.block] = norms.get(module.block, 0.0) + float(np.linalg.norm(delta))
    return norms


INSPECT_SPECS = {
    "kohya": (SynthSpec(grammar="kohya", text_encoders=True, seed=1), "kohya"),
    "diffusers": (
        SynthSpec(
            grammar="diffusers",
            dtype="BF16",
            alpha=8.0,
            seed=2,
            blocks=("input", "double.0", "double.5", "single.0", "single.20", "final"),
        ),
        "diffusers",
    ),
    "comfyui": (
        SynthSpec(grammar="comfyui", dtype="F16", rank=8, alpha=2.0, text_encoders=True),
        "comfyui",
    ),
    "loha": (
        SynthSpec(grammar="lycoris-kohya-loha", blocks=("double.3", "single.7")),
        "lycoris-kohya",
    ),
    "xlabs": (SynthSpec(grammar="xlabs", alpha=None), "xlabs"),
    "fp8": (SynthSpec(grammar="onetrainer", dtype="F8_E4M3"), "onetrainer"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("inspect")
    return {
        name: write_synth_lora(folder / f"{name}.safetensors", spec)
        for name, (spec, _) in INSPECT_SPECS.items()
    }


def table_rows(stdout: str) -> list[list[str]]:
    """The block rows of the inspect table (between the two dashed rules)."""
    lines = stdout.splitlines()
    rules = [i for i, line in enumerate(lines) if line and set(line) == {"-"}]
    assert len(rules) == 2, stdout
    return [line.split() for line in lines[rules[0] + 1 : rules[1]]]


def summary(stdout: str) -> dict[str, str]:
    """The labelled lines above the table: labels fill the first 14 columns."""
    out = {}
    for line in stdout.splitlines():
        if line.startswith("block "):
            break
        if line and not line.startswith(" "):
            out[line[:14].strip()] = line[14:]
    return out


# --- inspect ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(INSPECT_SPECS))
def test_inspect_prints_summary_and_one_row_per_block(name: str, files: dict[str, Path]) -> None:
    spec, fmt = INSPECT_SPECS[name]
    result = run_cli("inspect", files[name])
    assert result.exit_code == 0 and result.stderr == ""
    info = summary(result.stdout)
    assert info["format"] == fmt

    modules = synth_modules(spec)
    tensors = synth_tensors(spec)
    dtype_counts: dict[str, int] = {}
    for dtype, _, _ in tensors.values():
        dtype_counts[dtype] = dtype_counts.get(dtype, 0) + 1
    assert sorted(info["dtypes"].split(", ")) == sorted(
        f"{d} x{n}" for d, n in dtype_counts.items()
    )
    linear = [m for m in modules if m.kind == "linear"]
    assert info["ranks"] == f"{spec.rank} x{len(linear)}"
    has_alpha = any(k.endswith(".alpha") for k in tensors)
    assert info["alphas"] == (f"{spec.alpha:g} x{len(linear)}" if has_alpha else "none (scale 1)")
    te = [b for b in ("clip", "t5") if any(m.block == b for m in modules)]
    assert info["text encoders"] == (", ".join(te) or "none")
    assert info["metadata"] == f"{len(synth_metadata(spec))} keys"
    if spec.grammar == "kohya":
        assert f"  ss_network_dim = {spec.rank}" in result.stdout.splitlines()

    expected = expected_blocks(spec)
    rows = table_rows(result.stdout)
    assert [r[0] for r in rows] == sorted(expected, key=ORDER.__getitem__)
    total_bytes = sum(e["bytes"] for e in expected.values())
    for row in rows:
        want = expected[row[0]]
        assert row[1:4] == [str(want["modules"]), str(want["tensors"]), f"{want['params']:,}"]
        assert " ".join(row[4:6]) == kb(want["bytes"])
        assert row[6] == f"{100 * want['bytes'] / total_bytes:.1f}%"
        assert float(row[7]) > 0 and row[8].endswith("%")
    assert sum(float(r[8].rstrip("%")) for r in rows) == pytest.approx(100, abs=0.05 * len(rows))


@pytest.mark.parametrize("name", sorted(INSPECT_SPECS))
def test_inspect_json_has_the_promised_fields_and_values(name: str, files: dict[str, Path]) -> None:
    spec, fmt = INSPECT_SPECS[name]
    doc = inspect_json(files[name])
    tensors = synth_tensors(spec)
    assert doc["format"] == fmt
    assert doc["total_params"] == sum(
        int(np.prod(s, dtype=np.int64)) for _, s, _ in tensors.values()
    )
    assert doc["total_bytes"] == sum(len(raw) for _, _, raw in tensors.values())
    expected = expected_blocks(spec)
    assert [b["block"] for b in doc["blocks"]] == sorted(expected, key=ORDER.__getitem__)
    for row in doc["blocks"]:
        assert {"block", "modules", "tensors", "params", "bytes", "norm"} <= set(row)
        want = expected[row["block"]]
        assert {k: row[k] for k in want} == want
        assert row["norm"] > 0
    assert sum(b["share_norm"] for b in doc["blocks"]) == pytest.approx(1.0)
    assert sum(b["share_bytes"] for b in doc["blocks"]) == pytest.approx(1.0)


def test_inspect_norms_match_the_full_product(tmp_path: Path) -> None:
    for spec in (
        SynthSpec(grammar="kohya", alpha=8.0, rank=4, seed=4, text_encoders=True),
        SynthSpec(
            grammar="diffusers", alpha=2.0, rank=2, seed=4, blocks=("input", "double.1", "final")
        ),
    ):
        path = write_synth_lora(tmp_path / f"{spec.grammar}.safetensors", spec)
        doc = inspect_json(path)
        want = expected_lora_norms(spec)
        got = {b["block"]: b["norm"] for b in doc["blocks"]}
        # A tolerance that allows float32 Gram matrices, not a wrong scale or factor.
        assert got == pytest.approx(want, rel=1e-5)
        assert doc["total_norm"] == pytest.approx(sum(want.values()), rel=1e-5)


PLANTED = SynthSpec(
    grammar="kohya",
    blocks=("input", "double.2", "double.3", "double.7", "single.10", "single.11", "final"),
    strength={"double.3": 5.0, "final": 2.0, "single.10": 1.0, "double.7": 0.1},
    rank=2,
)


@pytest.fixture(scope="module")
def planted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synth_lora(tmp_path_factory.mktemp("planted") / "planted.safetensors", PLANTED)


def test_inspect_sort_orders_the_rows(planted: Path) -> None:
    by_block = [r[0] for r in table_rows(run_cli("inspect", planted).stdout)]
    assert by_block == [
        "input",
        "double.2",
        "double.3",
        "double.7",
        "single.10",
        "single.11",
        "final",
    ]

    want = expected_lora_norms(PLANTED)
    by_norm = [r[0] for r in table_rows(run_cli("inspect", planted, "--sort", "norm").stdout)]
    # Planted strengths set the order; zero-strength blocks follow in model order.
    assert by_norm == sorted(want, key=lambda b: (-want[b], ORDER[b]))
    assert by_norm[0] == "double.3" and by_norm[-3:] == ["input", "double.2", "single.11"]
    norms = [b["norm"] for b in inspect_json(planted, "--sort", "norm")["blocks"]]
    assert norms == sorted(norms, reverse=True) and norms[-1] == 0.0

    by_size = inspect_json(planted, "--sort", "size")["blocks"]
    sizes = [b["bytes"] for b in by_size]
    assert sizes == sorted(sizes, reverse=True)
    assert [b["block"] for b in by_size] == [
        r[0] for r in table_rows(run_cli("inspect", planted, "--sort", "size").stdout)
    ]
    assert by_size[0]["block"] == "double.2"  # a double block is the biggest; ties in model order
    assert run_cli("inspect", planted, "--sort", "sideways").exit_code == 2


@pytest.fixture(scope="module")
def console_script() -> str:
    beside = Path(sys.executable).with_name("lora-prune")
    path = str(beside) if beside.exists() else shutil.which("lora-prune") or str(beside)
    assert Path(path).exists(), "the lora-prune console script is installed (pip install -e .)"
    return path


def script(console_script: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [console_script, *map(str, args)], capture_output=True, text=True, timeout=120, check=False
    )


def test_console_script_inspects_several_grammars(
    console_script: str, files: dict[str, Path]
) -> None:
    for name in ("kohya", "diffusers", "xlabs", "fp8"):
        proc = script(console_script, "inspect", files[name], "--json", "--sort", "size")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc == inspect_json(files[name], "--sort", "size")
        assert doc["format"] == INSPECT_SPECS[name][1]
    proc = script(console_script, "inspect", files["comfyui"])
    assert proc.returncode == 0 and proc.stdout == run_cli("inspect", files["comfyui"]).stdout


def test_console_script_slims_and_reports_errors(
    console_script: str, files: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "slim.safetensors"
    proc = script(console_script, "slim", files["kohya"], "--keep", "double.0-2,clip", "-o", out)
    assert proc.returncode == 0, proc.stderr
    assert [b["block"] for b in inspect_json(out)["blocks"]] == [
        "clip",
        "double.0",
        "double.1",
        "double.2",
    ]

    pickle_file = tmp_path / "model.safetensors"
    pickle_file.write_bytes(b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94.")
    proc = script(console_script, "inspect", pickle_file)
    assert proc.returncode == 3
    assert proc.stdout == "" and proc.stderr.count("\n") == 1
    assert proc.stderr.startswith("error: pickle data") and "model.safetensors" in proc.stderr


# --- slim: block specs ------------------------------------------------------------------
@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A kohya LoRA with every block of FLUX.1, text encoders included (all 61)."""
    folder = tmp_path_factory.mktemp("full")
    spec = SynthSpec(grammar="kohya", blocks=supported_blocks("kohya"), rank=2, seed=8)
    path = write_synth_lora(folder / "full.safetensors", spec)
    assert {m.block for m in synth_modules(spec)} == set(EVERY)
    return path


def vector(on: set[str], layout: list[list[str]]) -> str:
    return ",".join("1" if any(b in on for b in group) else "0" for group in layout)


LAYOUT_57 = [[b] for b in DOUBLES + SINGLES]
LAYOUT_58 = [["input", "final"], *LAYOUT_57]
LAYOUT_61 = [[b] for b in EVERY]
LAYOUT_19 = [[f"double.{i}", f"single.{2 * i}", f"single.{2 * i + 1}"] for i in range(19)]
FIXED = {"clip", "t5", "input", "final"}

SPEC_CASES: dict[str, tuple[str, set[str]]] = {
    "ids_and_ranges": (
        "double.0-5,double.7,single.10-20,input",
        {*DOUBLES[:6], "double.7", *SINGLES[10:21], "input"},
    ),
    "spaces": ("double.1 single.2, final", {"double.1", "single.2", "final"}),
    "group_double": ("double", set(DOUBLES)),
    "group_single": ("single", set(SINGLES)),
    "group_te": ("te", {"clip", "t5"}),
    "group_all": ("all", set(EVERY)),
    "groups_mixed": ("te,single,double.18", {"clip", "t5", *SINGLES, "double.18"}),
    "vector_57": (vector({"double.7", "single.20"}, LAYOUT_57), {"double.7", "single.20", *FIXED}),
    "vector_58": (vector({"double.12"}, LAYOUT_58), {"double.12", "clip", "t5"}),
    "vector_58_base_on": (
        vector({"input", "single.0"}, LAYOUT_58),
        {"input", "final", "single.0", "clip", "t5"},
    ),
    "vector_61": (vector({"t5", "double.0", "final"}, LAYOUT_61), {"t5", "double.0", "final"}),
    "vector_19": (vector({"double.4"}, LAYOUT_19), {"double.4", "single.8", "single.9", *FIXED}),
    "kohya_double": (
        "train_double_block_indices=0,1,8-12",
        {"double.0", "double.1", *DOUBLES[8:13], *SINGLES, *FIXED},
    ),
    "kohya_both": (
        "train_double_block_indices=none train_single_block_indices=0-3,37",
        {*SINGLES[:4], "single.37", *FIXED},
    ),
}


@pytest.mark.parametrize("case", sorted(SPEC_CASES))
def test_slim_keep_and_drop_understand_every_spec_form(
    case: str, full: Path, tmp_path: Path
) -> None:
    spec, keep = SPEC_CASES[case]
    kept_out, dropped_out = tmp_path / "kept.safetensors", tmp_path / "dropped.safetensors"
    assert run_cli("slim", full, "--keep", spec, "-o", kept_out).exit_code == 0
    kept = [b["block"] for b in inspect_json(kept_out)["blocks"]]
    assert kept == sorted(keep, key=ORDER.__getitem__)
    if keep != set(EVERY):
        assert run_cli("slim", full, "--drop", spec, "-o", dropped_out).exit_code == 0
        dropped = [b["block"] for b in inspect_json(dropped_out)["blocks"]]
        assert dropped == sorted(set(EVERY) - keep, key=ORDER.__getitem__)
        assert (
            official_tensors(kept_out).keys() | official_tensors(dropped_out).keys()
            == official_tensors(full).keys()
        )
    else:
        result = run_cli("slim", full, "--drop", spec, "-o", dropped_out)
        assert_one_error_line(result, 2, "leaves no tensors")
        assert not dropped_out.exists()


def test_slim_writes_beside_the_input_and_reports_sizes(full: Path, tmp_path: Path) -> None:
    src = tmp_path / "my lora.safetensors"
    shutil.copyfile(full, src)
    result = run_cli("slim", src, "--keep", "double.7,single.7-20")
    assert result.exit_code == 0, result.stderr
    out = tmp_path / "my lora.slim.safetensors"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "my lora.safetensors",
        "my lora.slim.safetensors",
    ]
    before, after = src.stat().st_size, out.stat().st_size
    n_before, n_after = len(official_tensors(src)), len(official_tensors(out))
    lines = result.stdout.splitlines()
    # Then where the retraining recipes are (tests/test_recipes.py): one line, not the recipes.
    assert lines[4:] == [
        "retrain  --recipes prints the kohya, ai-toolkit and OneTrainer settings for these blocks"
    ]
    assert lines[:4] == [
        "kept     double.7,single.7-20",
        "dropped  clip,t5,input,double.0-6,double.8-18,single.0-6,single.21-37,final",
        f"size     {kb(before)} -> {kb(after)} ({100 * after / before:.1f}%), "
        f"{n_before} -> {n_after} tensors",
        f"wrote    {out}",
    ]
    meta = metadata_of(out)
    assert meta["lora_prune.source_sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert meta["lora_prune.kept_blocks"] == "double.7,single.7-20"


def test_slim_notes_blocks_the_lora_lacks(files: dict[str, Path], tmp_path: Path) -> None:
    result = run_cli(
        "slim", files["loha"], "--keep", "double.3,double.4", "-o", tmp_path / "o.safetensors"
    )
    assert result.exit_code == 0
    assert result.stderr == "note: the LoRA has no double.4; nothing to keep there\n"


@pytest.mark.parametrize(
    ("spec", "note"),
    [
        ("all", ""),
        ("double,single", ""),
        (",".join(["1"] * 57), ""),  # keeps input, final and the text encoders unnamed
        ("train_double_block_indices=0-18", ""),
        ("clip,double.3", "note: the LoRA has no clip; nothing to keep there\n"),
    ],
    ids=["all", "groups", "vector_57", "kohya", "named"],
)
def test_slim_notes_only_the_absent_blocks_the_user_named(
    files: dict[str, Path], tmp_path: Path, spec: str, note: str
) -> None:
    assert "clip" not in read_lora(files["loha"]).blocks
    result = run_cli("slim", files["loha"], "--keep", spec, "-o", tmp_path / "o.safetensors")
    assert result.exit_code == 0, result.output
    assert result.stderr == note


# --- slim: output safety -------------------------------------------------------------------
@pytest.fixture
def lone(full: Path, tmp_path: Path) -> Path:
    """A copy of the full LoRA alone in its own folder."""
    folder = tmp_path / "lone"
    folder.mkdir()
    src = folder / "lora.safetensors"
    shutil.copyfile(full, src)
    os.utime(src, ns=(1_000_000_000_000_000_000, 1_000_000_000_000_000_000))
    return src


def same_file_targets(src: Path) -> dict[str, Path]:
    folder = src.parent
    (folder / "link.safetensors").symlink_to(src.name)
    os.link(src, folder / "hard.safetensors")
    return {
        "itself": src,
        "dotted": folder / "." / src.name,
        "via_parent": folder / ".." / folder.name / src.name,
        "symlink": folder / "link.safetensors",
        "hardlink": folder / "hard.safetensors",
    }


@pytest.mark.parametrize("force", [False, True])
def test_slim_never_writes_over_its_input(lone: Path, force: bool) -> None:
    targets = same_file_targets(lone)
    before = snapshot(lone.parent)
    for name, target in targets.items():
        result = run_cli(
            "slim", lone, "--keep", "double", "-o", target, *(["--force"] if force else [])
        )
        assert_one_error_line(result, 2, "would replace the input")
        assert snapshot(lone.parent) == before, name
    # ... and not when the input is named through a link and the output is the real file.
    result = run_cli("slim", targets["symlink"], "--keep", "double", "-o", lone, "--force")
    assert_one_error_line(result, 2, "would replace the input")
    assert snapshot(lone.parent) == before


def test_slim_refuses_an_existing_output_unless_forced(lone: Path) -> None:
    out = lone.with_name("out.safetensors")
    out.write_bytes(b"precious")
    before = snapshot(lone.parent)
    result = run_cli("slim", lone, "--keep", "double.0", "-o", out)
    assert_one_error_line(result, 2, "the output exists", "out.safetensors", "--force")
    assert snapshot(lone.parent) == before

    result = run_cli("slim", lone, "--keep", "double.0", "-o", out, "--force")
    assert result.exit_code == 0, result.stderr
    assert [b["block"] for b in inspect_json(out)["blocks"]] == ["double.0"]
    assert lone.read_bytes() == before[lone.name][0]
    assert sorted(p.name for p in lone.parent.iterdir()) == ["lora.safetensors", "out.safetensors"]


def test_slim_output_folder_problems_are_usage_errors(lone: Path) -> None:
    result = run_cli(
        "slim", lone, "--keep", "double.0", "-o", lone.parent / "missing" / "o.safetensors"
    )
    assert_one_error_line(result, 2, "does not exist")


def test_slim_output_that_is_a_folder_is_one_error_line(lone: Path) -> None:
    folder = lone.parent / "a folder"
    folder.mkdir()
    result = run_cli("slim", lone, "--keep", "double.0", "-o", folder)
    assert_one_error_line(result, 2, "the output is a folder", "a folder")
    assert list(folder.iterdir()) == []


class _OsProxy:
    """The os module with some functions replaced, for one module's eyes only."""

    def __init__(self, **overrides: Any) -> None:
        self.__dict__.update(overrides)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


@pytest.fixture
def existing_output(lone: Path) -> Path:
    out = lone.with_name("out.safetensors")
    out.write_bytes(b"the previous output")
    return out


def test_slim_that_cannot_rename_leaves_no_temp_file(
    lone: Path, existing_output: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fileio, "os", _OsProxy(replace=no_space))
    before = snapshot(lone.parent)
    result = run_cli("slim", lone, "--keep", "double.0", "-o", existing_output, "--force")
    assert_one_error_line(result, 6, "No space left on device", "out.safetensors")
    assert snapshot(lone.parent) == before


def test_slim_interrupted_while_writing_leaves_no_temp_file(
    lone: Path, existing_output: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupt(fd: int) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio, "os", _OsProxy(fsync=interrupt))
    before = snapshot(lone.parent)
    result = run_cli("slim", lone, "--keep", "double.0", "-o", existing_output, "--force")
    assert_one_error_line(result, 130, "interrupted")
    assert snapshot(lone.parent) == before


def test_slim_output_that_reads_back_wrong_is_not_kept(
    lone: Path, existing_output: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A disk that corrupts a byte between write and read-back.
    real_fsync = os.fsync

    def corrupting_fsync(fd: int) -> None:
        size = os.fstat(fd).st_size
        if size > 4096:
            os.pwrite(fd, b"\xff\xff\xff\xff", size - 4)
        real_fsync(fd)

    monkeypatch.setattr(fileio, "os", _OsProxy(fsync=corrupting_fsync))
    before = snapshot(lone.parent)
    result = run_cli("slim", lone, "--keep", "double.0-3", "-o", existing_output, "--force")
    assert_one_error_line(result, 6, "does not read back identical")
    assert snapshot(lone.parent) == before


# --- errors ----------------------------------------------------------------------------------
def _corpus_names() -> list[str]:
    with tempfile.TemporaryDirectory() as folder:
        return sorted(make_hostile_corpus(Path(folder)))


CORPUS_NAMES = _corpus_names()
# click's own check of the argument turns a folder into a multi-line usage error (exit 2)
# before the library's "is a folder, not a file" (exit 3) can speak.


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return make_hostile_corpus(tmp_path_factory.mktemp("hostile"))


@pytest.mark.parametrize("command", ["inspect", "slim"])
@pytest.mark.parametrize(
    "name",
    CORPUS_NAMES,
)
def test_hostile_files_give_exit_3_and_one_error_line(
    name: str, command: str, corpus: Corpus, tmp_path: Path
) -> None:
    path, _cls, fragment = corpus[name]
    args: list[str | Path] = (
        ["--keep", "all", "-o", tmp_path / "o.safetensors"] if command == "slim" else []
    )
    result = run_cli(command, path, *args)
    assert_one_error_line(result, 3, fragment, path.name)
    assert result.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_the_corpus_has_what_the_parametrization_expects(corpus: Corpus) -> None:
    assert sorted(corpus) == CORPUS_NAMES and len(CORPUS_NAMES) >= 20


def write_f32(path: Path, tensors: Mapping[str, tuple[int, ...]]) -> Path:
    rng = np.random.default_rng(0)
    safetensors.numpy.save_file(
        {k: rng.standard_normal(s).astype(np.float32) for k, s in tensors.items()}, str(path)
    )
    return path


SDXL = {
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_k.lora_down.weight": (4, 64),
    "lora_unet_input_blocks_4_1_transformer_blocks_1_attn1_to_k.lora_up.weight": (64, 4),
    "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": (4, 32),
}
FLUX_KEY = "lora_unet_double_blocks_0_img_attn_proj"


def test_other_base_models_and_unknown_keys_give_exit_4(tmp_path: Path) -> None:
    sdxl = write_f32(tmp_path / "sdxl.safetensors", SDXL)
    for command in (["inspect"], ["slim", "--keep", "all"]):
        assert_one_error_line(
            run_cli(*command[:1], sdxl, *command[1:]), 4, "SDXL", "sdxl.safetensors"
        )

    flux2 = write_f32(
        tmp_path / "flux2.safetensors",
        {
            "lora_unet_single_blocks_45_linear1.lora_down.weight": (4, 32),
            "lora_unet_single_blocks_45_linear1.lora_up.weight": (32, 4),
        },
    )
    assert_one_error_line(run_cli("inspect", flux2), 4, "FLUX.2", "flux2.safetensors")

    mixed = write_f32(
        tmp_path / "mixed.safetensors",
        {
            f"{FLUX_KEY}.lora_down.weight": (4, 32),
            f"{FLUX_KEY}.lora_up.weight": (32, 4),
            "some_adapter.weird_key": (3,),
            "another.thing": (2, 2),
        },
    )
    assert_one_error_line(
        run_cli("inspect", mixed), 4, "2 keys match no FLUX.1 LoRA format", "--allow-unknown"
    )
    assert_one_error_line(run_cli("slim", mixed, "--keep", "double.0"), 4, "--allow-unknown")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "flux2.safetensors",
        "mixed.safetensors",
        "sdxl.safetensors",
    ]


def test_allow_unknown_reports_and_keeps_block_other(tmp_path: Path) -> None:
    mixed = write_f32(
        tmp_path / "mixed.safetensors",
        {
            f"{FLUX_KEY}.lora_down.weight": (4, 32),
            f"{FLUX_KEY}.lora_up.weight": (32, 4),
            "lora_unet_single_blocks_3_linear2.lora_down.weight": (4, 160),
            "lora_unet_single_blocks_3_linear2.lora_up.weight": (32, 4),
            "some_adapter.weird_key": (3,),
            "another.thing": (2, 2),
        },
    )
    doc = inspect_json(mixed, "--allow-unknown")
    rows = {b["block"]: b for b in doc["blocks"]}
    assert list(rows) == ["double.0", "single.3", "other"]
    assert (rows["other"]["tensors"], rows["other"]["params"], rows["other"]["norm"]) == (2, 7, 0.0)
    text = run_cli("inspect", mixed, "--allow-unknown").stdout
    assert [r[0] for r in table_rows(text)] == ["double.0", "single.3", "other"]

    out = tmp_path / "out.safetensors"
    result = run_cli("slim", mixed, "--allow-unknown", "--drop", "single.3", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert set(official_tensors(out)) == {
        f"{FLUX_KEY}.lora_down.weight",
        f"{FLUX_KEY}.lora_up.weight",
        "some_adapter.weird_key",
        "another.thing",
    }


def test_keep_all_keeps_every_tensor_also_unknown_ones(tmp_path: Path) -> None:
    mixed = write_f32(
        tmp_path / "mixed.safetensors",
        {
            f"{FLUX_KEY}.lora_down.weight": (4, 32),
            f"{FLUX_KEY}.lora_up.weight": (32, 4),
            "some_adapter.weird_key": (3,),
        },
    )
    out = tmp_path / "out.safetensors"
    result = run_cli("slim", mixed, "--allow-unknown", "--keep", "all", "-o", out)
    assert result.exit_code == 0, result.stderr
    assert official_tensors(out) == official_tensors(mixed)


BAD_SPECS = {
    "double_out_of_range": ("double.19", "out of range 0..18"),
    "single_out_of_range": ("single.38", "out of range 0..37"),
    "empty_range": ("double.5-3", "empty range"),
    "unknown_word": ("doubles", "unknown block 'doubles'"),
    "empty": ("", "empty block spec"),
    "vector_of_3": ("1,0,1", "3 values has no known layout"),
    "kohya_out_of_range": ("train_double_block_indices=0,19", "outside 0..18"),
    "kohya_garbage": ("train_double_block_indices=a-b", "cannot read block index"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
@pytest.mark.parametrize("option", ["--keep", "--drop"])
def test_bad_block_specs_give_exit_2(case: str, option: str, full: Path, tmp_path: Path) -> None:
    spec, fragment = BAD_SPECS[case]
    result = run_cli("slim", full, option, spec, "-o", tmp_path / "o.safetensors")
    assert_one_error_line(result, 2, fragment)
    assert list(tmp_path.iterdir()) == []


def test_keep_and_drop_together_or_neither_give_exit_2(full: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.safetensors"
    assert_one_error_line(
        run_cli("slim", full, "--keep", "double", "--drop", "single", "-o", out), 2, "exactly one"
    )
    assert_one_error_line(run_cli("slim", full, "-o", out), 2, "exactly one")
    assert list(tmp_path.iterdir()) == []


def test_inspect_json_is_strict_json_even_for_nan_weights(tmp_path: Path) -> None:
    path = tmp_path / "nan.safetensors"
    safetensors.numpy.save_file(
        {
            f"{FLUX_KEY}.lora_down.weight": np.full((2, 32), np.nan, np.float32),
            f"{FLUX_KEY}.lora_up.weight": np.ones((32, 2), np.float32),
        },
        str(path),
    )
    result = run_cli("inspect", path, "--json")
    assert result.exit_code == 0

    def refuse(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    json.loads(result.stdout, parse_constant=refuse)


@pytest.mark.parametrize(
    "command",
    ["inspect", "slim", "render", "analyze", "verify", "demo", "check", "resize", "doctor"],
)
def test_a_help_that_points_below_has_what_it_points_to(command: str) -> None:
    shown = run_cli(command, "--help").output
    if "see Verdict below" in shown:
        below = shown[shown.index("see Verdict below") :]
        assert "Verdict: for every image" in below, command


def test_progress_is_not_written_into_a_log(monkeypatch: pytest.MonkeyPatch) -> None:
    from lora_prune.cli._printers import ProgressBar

    log = io.StringIO()  # no terminal, as a log file or a CI job's output is not
    monkeypatch.setattr(sys, "stderr", log)
    bar = ProgressBar("ranking blocks")
    for i in range(3):
        bar(i, 2 if i < 2 else 5)  # a second phase would open a second bar on a terminal
    bar.close()
    assert bar.bar is None and log.getvalue() == ""
