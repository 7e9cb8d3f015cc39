"""Tests of slim_lora: byte-identical kept tensors, refreshed metadata, loading, properties.

The expected block of every tensor comes from the synthetic generator's own module
table (:func:`lora_prune.testing.synth_modules`), which is written independently of
the key parser, and tensors are compared with the official ``safetensors``
reader, so a parser or writer bug cannot confirm itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import struct
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lora_prune
from lora_prune.blocks import block_vector, format_block_spec, parse_block_spec
from lora_prune.errors import (
    BlockSpecError,
    LoraPruneError,
    OutputExistsError,
    SameFileError,
    UsageError,
)
from lora_prune.families.flux1.blocks import BLOCK_IDS, LAYOUT
from lora_prune.lora import read_lora
from lora_prune.markers import pinned_blocks
from lora_prune.safetensors_io import TensorEntry, build_header
from lora_prune.slim import slim_lora
from lora_prune.stats import inspect_lora
from lora_prune.testing import GRAMMARS, SynthSpec, synth_modules, write_synth_lora

# The official reader, typed: name -> {"dtype", "shape", "data"} in file order.
deserialize: Callable[[bytes], list[tuple[str, dict[str, Any]]]] = safetensors.deserialize

#: name -> (dtype, shape, raw bytes), as the official reader sees the file.
Tensors = dict[str, tuple[str, tuple[int, ...], bytes]]

PROPERTY_SETTINGS = settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def official_tensors(path: Path) -> Tensors:
    """Every tensor's raw bytes through the safetensors package (handles BF16 and FP8)."""
    return {
        name: (info["dtype"], tuple(info["shape"]), bytes(info["data"]))
        for name, info in deserialize(path.read_bytes())
    }


def official_metadata(path: Path) -> dict[str, str]:
    with safetensors.safe_open(str(path), framework="numpy") as f:
        meta: dict[str, str] | None = f.metadata()
    return meta or {}


def data_section(path: Path) -> bytes:
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return raw[8 + header_len :]


def blocks_of_keys(spec: SynthSpec) -> dict[str, str]:
    """key -> block id, from the generator's table (not the parser)."""
    return {key: m.block for m in synth_modules(spec) for key in m.keys}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("slim")


@pytest.fixture(scope="module")
def source(workdir: Path) -> Callable[[SynthSpec], Path]:
    """A cache of synthetic LoRA files, one per spec (hypothesis reuses them)."""
    cache: dict[SynthSpec, Path] = {}

    def get(spec: SynthSpec) -> Path:
        if spec not in cache:
            cache[spec] = write_synth_lora(workdir / f"src{len(cache)}.safetensors", spec)
        return cache[spec]

    return get


_counter = iter(range(10**9))


def fresh(workdir: Path, stem: str = "out") -> Path:
    return workdir / f"{stem}{next(_counter)}.safetensors"


# --- kept tensors, format and dtypes ------------------------------------------------
@pytest.mark.parametrize("grammar", GRAMMARS)
def test_slim_keeps_exactly_the_chosen_blocks_byte_for_byte(
    grammar: str, source: Callable[[SynthSpec], Path], workdir: Path
) -> None:
    spec = SynthSpec(grammar=grammar, dtype="BF16", seed=3)
    src = source(spec)
    key_block = blocks_of_keys(spec)
    present = set(key_block.values())
    keep = {"double.0", "double.7", "single.3", "single.37", "final"} & present
    assert len(keep) >= 3, "every grammar names some of these blocks"
    # BFL control and XLabs files load only with their marker blocks (tests/test_markers.py).
    keep |= set(pinned_blocks(read_lora(src)))

    result = slim_lora(src, keep, output=fresh(workdir))

    before, after = official_tensors(src), official_tensors(result.output)
    expected = {k for k, b in key_block.items() if b in keep}
    assert set(after) == expected
    for name in expected:
        assert after[name] == before[name], name  # dtype, shape and every byte
    assert result.kept_blocks == sorted(keep, key=BLOCK_IDS.index)
    assert result.tensors_after == len(expected)
    assert result.bytes_after == result.output.stat().st_size
    assert read_lora(result.output).format == read_lora(src).format
    assert [b.block for b in inspect_lora(read_lora(result.output)).blocks] == result.kept_blocks


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"])
def test_slim_keeps_every_dtype_as_it_is(
    dtype: str, source: Callable[[SynthSpec], Path], workdir: Path
) -> None:
    spec = SynthSpec(
        grammar="comfyui", dtype=dtype, text_encoders=True, blocks=("double.1", "single.2")
    )
    src = source(spec)
    result = slim_lora(src, {"clip", "t5", "single.2"}, output=fresh(workdir))
    after = official_tensors(result.output)
    before = official_tensors(src)
    assert {d for d, _, _ in after.values()} == {d for d, _, _ in before.values()}
    assert after == {k: v for k, v in before.items() if "double_blocks" not in k}


def test_kept_block_norms_are_unchanged(source: Callable[[SynthSpec], Path], workdir: Path) -> None:
    # alpha travels with its module (kohya keys) or in the metadata (diffusers): the
    # slimmed blocks must act exactly as they did in the full LoRA.
    for spec in (
        SynthSpec(grammar="kohya", alpha=8.0, seed=5),
        SynthSpec(grammar="diffusers", alpha=2.0, alpha_in="metadata", seed=5),
    ):
        src = source(spec)
        keep = {"double.4", "single.9", "single.10"}
        out = slim_lora(src, keep, output=fresh(workdir)).output
        full = {b.block: b.norm for b in inspect_lora(read_lora(src)).blocks}
        slim = {b.block: b.norm for b in inspect_lora(read_lora(out)).blocks}
        assert slim == {b: full[b] for b in keep}
        assert all(v > 0 for v in slim.values())


# --- metadata ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def kohya_big(workdir: Path) -> Path:
    """A kohya file of ~1.7 MB with kohya's (stale) hashes and SAI modelspec metadata."""
    path = write_synth_lora(
        workdir / "kohya_big.safetensors",
        SynthSpec(grammar="kohya", rank=8, alpha=4.0, seed=11, metadata={"ss_output_name": "big"}),
    )
    assert path.stat().st_size > 1_500_000
    return path


def legacy_hash_of_resaved(output: Path) -> str:
    """kohya's legacy hash of ``output`` saved again with only its ss_* metadata."""
    tensors = official_tensors(output)
    ss_meta = {k: v for k, v in official_metadata(output).items() if k.startswith("ss_")}
    entries = [
        TensorEntry(name, dtype, shape, functools.partial(bytes, raw))
        for name, (dtype, shape, raw) in tensors.items()
    ]
    header, _ = build_header(entries, ss_meta)
    resaved = header + data_section(output)
    return sha256(resaved[0x100000 : 0x100000 + 0x10000])[:8]


def test_slim_recomputes_hashes_and_adds_provenance(kohya_big: Path, workdir: Path) -> None:
    before = official_metadata(kohya_big)
    out = fresh(workdir)
    slim_lora(kohya_big, drop={"single.30", "single.31", "single.32"}, output=out)
    after = official_metadata(out)
    data = data_section(out)
    assert out.stat().st_size > 1_100_000  # the legacy hash window lies inside the file

    assert after["sshs_model_hash"] == sha256(data) != before["sshs_model_hash"]
    assert after["modelspec.hash_sha256"] == "0x" + sha256(data)
    assert len(after["sshs_legacy_hash"]) == 8
    assert after["sshs_legacy_hash"] == legacy_hash_of_resaved(out) != before["sshs_legacy_hash"]

    assert after["lora_prune.source_sha256"] == sha256(kohya_big.read_bytes())
    assert after["lora_prune.kept_blocks"] == "double.0-18,single.0-29,single.33-37"
    assert after["lora_prune.version"] == lora_prune.__version__
    untouched = {
        k: v
        for k, v in before.items()
        if k not in ("sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256")
    }
    assert {k: after[k] for k in untouched} == untouched
    assert after["ss_output_name"] == "big"


def test_legacy_hash_of_a_file_under_one_mebibyte(kohya_big: Path, workdir: Path) -> None:
    # kohya seeks to 1 MiB and hashes what it reads there: nothing, for a small file.
    out = fresh(workdir)
    slim_lora(kohya_big, {"double.2"}, output=out)
    assert out.stat().st_size < 0x100000
    meta = official_metadata(out)
    assert meta["sshs_legacy_hash"] == sha256(b"")[:8] == legacy_hash_of_resaved(out)
    assert meta["sshs_model_hash"] == sha256(data_section(out))


def test_hash_keys_are_refreshed_not_invented(
    source: Callable[[SynthSpec], Path], workdir: Path
) -> None:
    src = source(SynthSpec(grammar="diffusers"))
    out = fresh(workdir)
    slim_lora(src, {"double.0"}, output=out)
    meta = official_metadata(out)
    assert not {"sshs_model_hash", "sshs_legacy_hash", "modelspec.hash_sha256"} & set(meta)
    assert meta["format"] == "pt"
    assert meta["lora_prune.kept_blocks"] == "double.0"


def diffusers_style_config(paths: list[str]) -> dict[str, Any]:
    """The adapter metadata diffusers' save_lora_weights writes: full module paths."""
    return {
        "transformer.r": 4,
        "transformer.lora_alpha": 8,
        "transformer.target_modules": sorted(paths),
        "transformer.rank_pattern": {p: 4 for p in paths if p.endswith("proj_mlp")},
        "transformer.alpha_pattern": {p: 8 for p in paths if p.endswith("attn.to_q")},
        "transformer.peft_type": "LORA",
    }


def test_adapter_metadata_is_narrowed_to_the_kept_modules(workdir: Path) -> None:
    base = SynthSpec(grammar="diffusers", blocks=("double.0", "double.3", "single.5", "single.6"))
    paths = [m.stem.removeprefix("transformer.") for m in synth_modules(base)]
    config = diffusers_style_config(paths)
    src = write_synth_lora(
        workdir / "diffusers_meta.safetensors",
        dataclasses.replace(base, metadata={"lora_adapter_metadata": json.dumps(config)}),
    )
    out = fresh(workdir)
    slim_lora(src, {"double.3", "single.6"}, output=out)
    narrowed = json.loads(official_metadata(out)["lora_adapter_metadata"])

    kept_paths = sorted(
        p for p in paths if p.startswith(("transformer_blocks.3.", "single_transformer_blocks.6."))
    )
    assert len(kept_paths) == 14 + 6
    assert narrowed["transformer.target_modules"] == kept_paths
    assert narrowed["transformer.rank_pattern"] == {"single_transformer_blocks.6.proj_mlp": 4}
    assert narrowed["transformer.alpha_pattern"] == {
        "transformer_blocks.3.attn.to_q": 8,
        "single_transformer_blocks.6.attn.to_q": 8,
    }
    assert {
        k: narrowed[k] for k in ("transformer.r", "transformer.lora_alpha", "transformer.peft_type")
    } == {"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.peft_type": "LORA"}


def test_short_target_names_keep_only_those_still_present(
    source: Callable[[SynthSpec], Path], workdir: Path
) -> None:
    src = source(SynthSpec(grammar="diffusers", alpha_in="metadata", alpha=2.0))
    out = fresh(workdir)
    slim_lora(src, {"double.1", "double.2"}, output=out)
    narrowed = json.loads(official_metadata(out)["lora_adapter_metadata"])
    # Double blocks have no proj_mlp / proj_out / norm.linear: those names must go.
    assert narrowed["transformer.target_modules"] == sorted(
        [
            "norm1.linear",
            "norm1_context.linear",
            "attn.to_q",
            "attn.to_k",
            "attn.to_v",
            "attn.to_out.0",
            "attn.add_q_proj",
            "attn.add_k_proj",
            "attn.add_v_proj",
            "attn.to_add_out",
            "ff.net.0.proj",
            "ff.net.2",
            "ff_context.net.0.proj",
            "ff_context.net.2",
        ]
    )
    assert narrowed["transformer.lora_alpha"] == 2.0


# --- loading the result with diffusers --------------------------------------------
# PEFT warns that short target names also match modules of dropped blocks; the
# state dict decides which modules get a LoRA, which the test checks.
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
def test_slimmed_diffusers_file_loads_into_the_tiny_pipeline(workdir: Path) -> None:
    torch = pytest.importorskip("torch")
    from lora_prune.render.tiny import build_tiny_pipeline

    torch.set_num_threads(1)
    spec = SynthSpec(
        grammar="diffusers",
        alpha=8.0,
        alpha_in="metadata",
        seed=2,
        blocks=("input", "double.0", "double.3", "single.5", "single.6", "single.7", "final"),
    )
    src = write_synth_lora(workdir / "to_load.safetensors", spec)
    keep = {"double.3", "single.5", "single.6", "final"}
    out = slim_lora(src, keep, output=fresh(workdir)).output
    assert [b.block for b in inspect_lora(read_lora(out)).blocks] == [
        "double.3",
        "single.5",
        "single.6",
        "final",
    ]

    pipe = build_tiny_pipeline()
    pipe.load_lora_weights(str(out), adapter_name="slim")
    transformer = pipe.transformer
    with_lora = {
        name
        for name, module in transformer.named_modules()
        if hasattr(module, "lora_A") and "slim" in module.lora_A
    }
    expected = {m.stem.removeprefix("transformer.") for m in synth_modules(spec) if m.block in keep}
    assert with_lora == expected
    tensors = official_tensors(out)
    for name in (
        "transformer_blocks.3.attn.to_q",
        "single_transformer_blocks.6.proj_out",
        "norm_out.linear",
    ):
        module = transformer.get_submodule(name)
        _, shape, raw = tensors[f"transformer.{name}.lora_B.weight"]
        want = np.frombuffer(raw, dtype="<f4").reshape(shape)
        got = module.lora_B["slim"].weight.detach().numpy()
        np.testing.assert_array_equal(got, want)
        assert module.scaling["slim"] == pytest.approx(8.0 / 4)


# --- torch-free --------------------------------------------------------------------
def test_inspect_and_slim_need_no_torch(workdir: Path) -> None:
    files = {
        dtype: write_synth_lora(
            workdir / f"notorch_{dtype}.safetensors",
            SynthSpec(
                grammar="kohya", dtype=dtype, text_encoders=True, blocks=("double.2", "single.4")
            ),
        )
        for dtype in ("BF16", "F8_E4M3", "F8_E5M2")
    }
    script = textwrap.dedent(
        """
        import json, sys
        for name in ("torch", "diffusers", "transformers", "safetensors"):
            sys.modules[name] = None  # any import of them now raises ImportError
        from lora_prune.lora import read_lora
        from lora_prune.stats import inspect_lora
        from lora_prune.slim import slim_lora
        out = {}
        for path in sys.argv[1:]:
            report = inspect_lora(read_lora(path))
            result = slim_lora(path, {"clip", "single.4"}, output=path + ".slim", force=True)
            out[path] = {
                "dtypes": report.dtypes,
                "norms": {b.block: b.norm for b in report.blocks},
                "kept": result.kept_blocks,
            }
        heavy = ("torch", "diffusers", "transformers")
        loaded = sorted(
            m for m in sys.modules if m.split(".")[0] in heavy and sys.modules[m] is not None
        )
        print(json.dumps({"results": out, "loaded": loaded}))
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, files.values())],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["loaded"] == []
    for dtype, path in files.items():
        result = got["results"][str(path)]
        assert result["dtypes"][dtype] > 0
        assert result["kept"] == ["clip", "single.4"]
        here = {b.block: b.norm for b in inspect_lora(read_lora(path)).blocks}
        assert result["norms"] == pytest.approx(here, rel=1e-12)
        assert all(v > 0 for v in here.values())
        slimmed = Path(str(path) + ".slim")
        before = official_tensors(path)
        assert official_tensors(slimmed) == {
            k: v for k, v in before.items() if "lora_te1_" in k or "single_blocks_4_" in k
        }


# --- output paths (library level; the CLI tests cover exit codes) -------------------
def test_output_defaults_beside_the_input_and_refuses_to_overwrite(
    source: Callable[[SynthSpec], Path], tmp_path: Path
) -> None:
    src = tmp_path / "my.lora.safetensors"
    src.write_bytes(source(SynthSpec()).read_bytes())
    result = slim_lora(src, {"double.0"})
    assert result.output == tmp_path / "my.lora.slim.safetensors"
    with pytest.raises(OutputExistsError):
        slim_lora(src, {"double.1"})
    with pytest.raises(SameFileError):
        slim_lora(src, {"double.1"}, output=src, force=True)
    assert slim_lora(src, {"double.1"}, force=True).kept_blocks == ["double.1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "my.lora.safetensors",
        "my.lora.slim.safetensors",
    ]


def test_keep_and_drop_are_exclusive_and_must_leave_something(
    source: Callable[[SynthSpec], Path], tmp_path: Path
) -> None:
    src = source(SynthSpec())
    with pytest.raises(UsageError, match="exactly one of --keep and --drop"):
        slim_lora(src, {"double.0"}, drop={"double.1"}, output=tmp_path / "o.safetensors")
    with pytest.raises(UsageError, match="exactly one of --keep and --drop"):
        slim_lora(src, output=tmp_path / "o.safetensors")
    with pytest.raises(UsageError, match="leaves no tensors"):
        slim_lora(src, {"input", "clip"}, output=tmp_path / "o.safetensors")
    assert list(tmp_path.iterdir()) == []


# --- properties ---------------------------------------------------------------------
spec_strategy = st.builds(
    SynthSpec,
    grammar=st.sampled_from(
        ["kohya", "comfyui", "diffusers", "onetrainer", "xlabs", "lycoris-kohya-loha"]
    ),
    dtype=st.sampled_from(["F32", "BF16", "F8_E4M3"]),
    seed=st.integers(0, 2),
    rank=st.just(2),
)


@PROPERTY_SETTINGS
@given(spec=spec_strategy)
def test_property_slim_all_is_the_input(
    spec: SynthSpec, source: Callable[[SynthSpec], Path], workdir: Path
) -> None:
    src = source(spec)
    out = slim_lora(src, parse_block_spec("all", LAYOUT), output=fresh(workdir)).output
    assert official_tensors(out) == official_tensors(src)
    # Same tensors in the same writer order: the data sections are identical too.
    assert data_section(out) == data_section(src)


def present_blocks(spec: SynthSpec) -> list[str]:
    return sorted({m.block for m in synth_modules(spec)}, key=BLOCK_IDS.index)


@st.composite
def spec_and_keep(draw: st.DrawFn) -> tuple[SynthSpec, frozenset[str]]:
    spec = draw(spec_strategy)
    # Include blocks the file lacks: they must change nothing.
    keep = draw(st.frozensets(st.sampled_from(BLOCK_IDS), max_size=20))
    return spec, keep


@PROPERTY_SETTINGS
@given(case=spec_and_keep())
def test_property_keep_and_drop_partition_the_tensors(
    case: tuple[SynthSpec, frozenset[str]], source: Callable[[SynthSpec], Path], workdir: Path
) -> None:
    spec, keep = case
    src = source(spec)
    everything = official_tensors(src)
    key_block = blocks_of_keys(spec)
    sides: list[Tensors] = []
    pinned = set(pinned_blocks(read_lora(src)))
    for kwargs in ({"keep": keep}, {"drop": keep}):
        kept_blocks = keep if "keep" in kwargs else set(key_block.values()) - keep
        try:
            out = slim_lora(src, **kwargs, output=fresh(workdir)).output  # type: ignore[arg-type]
        except UsageError as exc:
            if pinned - kept_blocks:
                # Dropping a marker block is refused before anything else (tests/test_markers.py).
                assert "marker keys" in str(exc)
                return
            assert "leaves no tensors" in str(exc)
            sides.append({})
            continue
        sides.append(official_tensors(out))
    kept, dropped = sides
    assert set(kept) == {k for k, b in key_block.items() if b in keep}
    assert not set(kept) & set(dropped)
    assert {**kept, **dropped} == everything


@PROPERTY_SETTINGS
@given(case=spec_and_keep())
def test_property_slim_is_idempotent(
    case: tuple[SynthSpec, frozenset[str]], source: Callable[[SynthSpec], Path], workdir: Path
) -> None:
    spec, keep = case
    src = source(spec)
    if not keep & set(present_blocks(spec)):
        keep = keep | {present_blocks(spec)[0]}
    keep = keep | set(pinned_blocks(read_lora(src)))
    once = slim_lora(src, keep, output=fresh(workdir))
    twice = slim_lora(once.output, keep, output=fresh(workdir))
    assert official_tensors(twice.output) == official_tensors(once.output)
    assert twice.kept_blocks == once.kept_blocks
    assert twice.dropped_blocks == []
    meta = official_metadata(twice.output)
    assert meta["lora_prune.source_sha256"] == sha256(once.output.read_bytes())


# Block specs from the grammar, with the set they must mean computed independently.
DOUBLES = [f"double.{i}" for i in range(19)]
SINGLES = [f"single.{i}" for i in range(38)]
EVERY = ["clip", "t5", "input", *DOUBLES, *SINGLES, "final"]


@st.composite
def spec_token(draw: st.DrawFn) -> tuple[str, set[str]]:
    kind = draw(st.sampled_from(["id", "range", "group", "named"]))
    if kind == "group":
        name = draw(st.sampled_from(["double", "single", "te", "all"]))
        members = {"double": DOUBLES, "single": SINGLES, "te": ["clip", "t5"], "all": EVERY}[name]
        return draw(st.sampled_from([name, name.upper()])), set(members)
    if kind == "named":
        name = draw(st.sampled_from(["clip", "t5", "input", "final"]))
        return name, {name}
    family = draw(st.sampled_from(["double", "single"]))
    count = 19 if family == "double" else 38
    lo = draw(st.integers(0, count - 1))
    if kind == "id":
        return f"{family}.{lo}", {f"{family}.{lo}"}
    hi = draw(st.integers(lo, count - 1))
    return f"{family}.{lo}-{hi}", {f"{family}.{i}" for i in range(lo, hi + 1)}


@settings(max_examples=200, deadline=None, derandomize=True, database=None)
@given(
    tokens=st.lists(spec_token(), min_size=1, max_size=8),
    separators=st.lists(st.sampled_from([",", ", ", " ", " ,"]), min_size=8, max_size=8),
)
def test_property_block_specs_parse_and_round_trip(
    tokens: list[tuple[str, set[str]]], separators: list[str]
) -> None:
    text = tokens[0][0] + "".join(
        sep + tok for sep, (tok, _) in zip(separators, tokens[1:], strict=False)
    )
    expected = set().union(*(members for _, members in tokens))
    assert parse_block_spec(text, LAYOUT) == expected
    canonical = format_block_spec(expected)
    assert parse_block_spec(canonical, LAYOUT) == expected
    assert format_block_spec(parse_block_spec(canonical, LAYOUT)) == canonical
    assert len(canonical) <= len(",".join(sorted(expected)))


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(blocks=st.frozensets(st.sampled_from(EVERY)))
def test_property_formatted_sets_round_trip(blocks: frozenset[str]) -> None:
    spec = format_block_spec(blocks)
    if blocks:
        assert parse_block_spec(spec, LAYOUT) == blocks
    else:
        assert spec == ""


@settings(max_examples=120, deadline=None, derandomize=True, database=None)
@given(
    length=st.sampled_from([57, 58, 61, 19]),
    data=st.data(),
)
def test_property_block_weight_vectors(length: int, data: st.DataObject) -> None:
    weights = data.draw(
        st.lists(
            st.sampled_from(["0", "1", "0.0", "1.0", "0e0", "1e0"]),
            min_size=length,
            max_size=length,
        )
    )
    on = [float(w) != 0.0 for w in weights]
    if length == 57:
        keep = {b for b, o in zip(DOUBLES + SINGLES, on, strict=True) if o} | {
            "clip",
            "t5",
            "input",
            "final",
        }
    elif length == 58:
        keep = {b for b, o in zip(DOUBLES + SINGLES, on[1:], strict=True) if o} | {"clip", "t5"}
        keep |= {"input", "final"} if on[0] else set()
    elif length == 61:
        keep = {b for b, o in zip(EVERY, on, strict=True) if o}
    else:
        keep = {"clip", "t5", "input", "final"}
        for i, o in enumerate(on):
            if o:
                keep |= {f"double.{i}", f"single.{2 * i}", f"single.{2 * i + 1}"}
    assert parse_block_spec(",".join(weights), LAYOUT) == keep
    # The emitted vector of a set means that set, up to the blocks the layout groups.
    assert parse_block_spec(block_vector(keep, length, LAYOUT), LAYOUT) == keep


@pytest.mark.parametrize("weight", ["0.5", "1.25", "-1", "2"])
def test_a_block_weight_between_keep_and_drop_is_refused(weight: str) -> None:
    vector = ["1"] * 57
    vector[7] = weight
    with pytest.raises(BlockSpecError, match=f"block weight {weight} is neither 0 nor 1"):
        parse_block_spec(",".join(vector), LAYOUT)


@pytest.mark.parametrize("spec", [",,", " , ", ",\t,"])
def test_a_spec_of_separators_alone_is_empty(spec: str) -> None:
    with pytest.raises(BlockSpecError, match="empty block spec"):
        parse_block_spec(spec, LAYOUT)


@settings(max_examples=80, deadline=None, derandomize=True, database=None)
@given(
    doubles=st.frozensets(st.integers(0, 18), min_size=1),
    singles=st.none() | st.frozensets(st.integers(0, 37), min_size=1),
)
def test_property_kohya_train_block_indices(
    doubles: frozenset[int], singles: frozenset[int] | None
) -> None:
    def ranges(ids: frozenset[int]) -> str:
        # Written by hand (not with format_block_spec) so the input is independent.
        parts: list[str] = []
        for i in sorted(ids):
            if parts and parts[-1].split("-")[-1] == str(i - 1):
                parts[-1] = parts[-1].split("-")[0] + f"-{i}"
            else:
                parts.append(str(i))
        return ",".join(parts)

    text = f"train_double_block_indices={ranges(doubles)}"
    expected = {"clip", "t5", "input", "final", *(f"double.{i}" for i in doubles)}
    if singles is None:
        expected |= set(SINGLES)
    else:
        text += f" train_single_block_indices={ranges(singles)}"
        expected |= {f"single.{i}" for i in singles}
    assert parse_block_spec(text, LAYOUT) == expected


def test_kohya_spec_examples() -> None:
    assert parse_block_spec("train_double_block_indices=0,1,8-12", LAYOUT) == {
        "clip",
        "t5",
        "input",
        "final",
        "double.0",
        "double.1",
        *(f"double.{i}" for i in range(8, 13)),
        *SINGLES,
    }
    assert parse_block_spec(
        "train_double_block_indices=none train_single_block_indices=all", LAYOUT
    ) == {
        "clip",
        "t5",
        "input",
        "final",
        *SINGLES,
    }


# --- hostile bytes ------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_source(workdir: Path) -> bytes:
    spec = SynthSpec(
        grammar="kohya",
        blocks=("double.0", "single.1", "final"),
        rank=2,
        dtype="BF16",
        metadata={"lora_adapter_metadata": json.dumps({"r": 2, "lora_alpha": 2})},
    )
    return write_synth_lora(workdir / "fuzz_source.safetensors", spec).read_bytes()


def run_everything(path: Path, out: Path) -> None:
    for allow_unknown in (False, True):
        lora = read_lora(path, allow_unknown=allow_unknown)
        inspect_lora(lora, sort="norm")
        slim_lora(lora, set(lora.blocks[:1]), output=out, force=True)


@st.composite
def byte_mutation(draw: st.DrawFn, size: int, header_end: int) -> Callable[[bytes], bytes]:
    kind = draw(st.sampled_from(["truncate", "overwrite", "insert", "delete", "data"]))
    if kind == "truncate":
        cut = draw(st.integers(0, size - 1))
        return lambda b: b[:cut]
    if kind == "data":
        pos = draw(st.integers(header_end, size - 1))
        value = draw(st.integers(0, 255))
        return lambda b: b[:pos] + bytes([value]) + b[pos + 1 :]
    pos = draw(st.integers(0, header_end - 1))
    if kind == "delete":
        n = draw(st.integers(1, 16))
        return lambda b: b[:pos] + b[pos + n :]
    chunk = draw(
        st.binary(min_size=1, max_size=8)
        | st.sampled_from([b"9", b"0", b",", b"]", b"_1", b'"', b"e"])
    )
    if kind == "insert":
        return lambda b: b[:pos] + chunk + b[pos:]
    return lambda b: b[:pos] + chunk + b[pos + len(chunk) :]


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(data=st.data())
def test_property_damaged_files_raise_only_lora_prune_errors(
    data: st.DataObject, fuzz_source: bytes, workdir: Path
) -> None:
    (header_len,) = struct.unpack("<Q", fuzz_source[:8])
    mutations = data.draw(
        st.lists(byte_mutation(len(fuzz_source), 8 + header_len), min_size=1, max_size=3)
    )
    damaged = fuzz_source
    for mutate in mutations:
        damaged = mutate(damaged) if damaged else damaged
    path = workdir / "damaged.safetensors"
    path.write_bytes(damaged)
    with contextlib.suppress(LoraPruneError):
        run_everything(path, workdir / "damaged.out.safetensors")


# Damage that keeps the safetensors container valid but breaks the LoRA's own
# consistency (a factor's shape, a missing factor, a bad rank pattern): what a buggy
# trainer or converter writes. inspect must refuse it with a LoraPruneError.
KOHYA = "lora_unet_double_blocks_0_img_attn_proj"
DIFFUSERS = "transformer.transformer_blocks.0.attn.to_q"


def f32(*shape: int) -> np.ndarray:
    return np.ones(shape, dtype=np.float32)


INCONSISTENT: dict[str, tuple[dict[str, np.ndarray], dict[str, str] | None]] = {
    "rank_mismatch": (
        {f"{KOHYA}.lora_down.weight": f32(2, 32), f"{KOHYA}.lora_up.weight": f32(32, 4)},
        None,
    ),
    "scalar_down": (
        {f"{KOHYA}.lora_down.weight": f32(), f"{KOHYA}.lora_up.weight": f32(32, 4)},
        None,
    ),
    "rank_zero": (
        {
            f"{KOHYA}.lora_down.weight": f32(0, 32),
            f"{KOHYA}.lora_up.weight": f32(32, 0),
            f"{KOHYA}.alpha": np.array(4.0, np.float32),
        },
        None,
    ),
    "loha_missing_factor": (
        {f"{KOHYA}.hada_w1_a": f32(32, 2), f"{KOHYA}.hada_w1_b": f32(2, 32)},
        None,
    ),
    "loha_rank_mismatch": (
        {
            f"{KOHYA}.hada_w1_a": f32(32, 2),
            f"{KOHYA}.hada_w1_b": f32(3, 32),
            f"{KOHYA}.hada_w2_a": f32(32, 2),
            f"{KOHYA}.hada_w2_b": f32(2, 32),
        },
        None,
    ),
    "lokr_missing_factor": ({f"{KOHYA}.lokr_w1": f32(4, 4)}, None),
}


@pytest.mark.parametrize("name", sorted(INCONSISTENT))
def test_inconsistent_modules_are_refused_with_a_lora_prune_error(
    name: str, tmp_path: Path
) -> None:
    tensors, metadata = INCONSISTENT[name]
    path = tmp_path / f"{name}.safetensors"
    safetensors.numpy.save_file(tensors, str(path), metadata=metadata)
    try:
        run_everything(path, tmp_path / "out.safetensors")
    except LoraPruneError as exc:
        assert path.name in str(exc)
        return
    raise AssertionError("an inconsistent module was inspected without complaint")


def test_a_rank_pattern_that_is_no_regex_is_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "pattern.safetensors"
    config = {"r": 2, "lora_alpha": 4, "rank_pattern": {"to_q(": 4}}
    safetensors.numpy.save_file(
        {f"{DIFFUSERS}.lora_A.weight": f32(2, 32), f"{DIFFUSERS}.lora_B.weight": f32(32, 2)},
        str(path),
        metadata={"lora_adapter_metadata": json.dumps(config)},
    )
    try:
        run_everything(path, tmp_path / "out.safetensors")
    except LoraPruneError as exc:
        assert path.name in str(exc)


def reshaped_header(raw: bytes, choose: Callable[[list[str]], str], factor: int) -> bytes:
    """The same file with one tensor's 2-D shape refactored (same byte count)."""
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    names = sorted(k for k, v in header.items() if k != "__metadata__" and len(v["shape"]) == 2)
    name = choose(names)
    rows, cols = header[name]["shape"]
    if cols % factor == 0:
        header[name]["shape"] = [rows * factor, cols // factor]
    else:
        header[name]["shape"] = [rows * cols]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + raw[8 + header_len :]


@settings(max_examples=40, deadline=None, derandomize=True, database=None)
@given(data=st.data())
def test_property_refactored_shapes_raise_only_lora_prune_errors(
    data: st.DataObject, fuzz_source: bytes, workdir: Path
) -> None:
    damaged = reshaped_header(
        fuzz_source,
        lambda names: data.draw(st.sampled_from(names)),
        data.draw(st.sampled_from([2, 4])),
    )
    path = workdir / "refactored.safetensors"
    path.write_bytes(damaged)
    with contextlib.suppress(LoraPruneError):
        run_everything(path, workdir / "refactored.out.safetensors")


def test_nan_weights_give_a_nan_norm_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "nan.safetensors"
    safetensors.numpy.save_file(
        {
            f"{KOHYA}.lora_down.weight": np.full((2, 32), np.nan, np.float32),
            f"{KOHYA}.lora_up.weight": f32(32, 2),
        },
        str(path),
    )
    report = inspect_lora(read_lora(path))
    assert math.isnan(report.blocks[0].norm)


@pytest.fixture(autouse=True)
def _no_temp_files_left(workdir: Path) -> Iterator[None]:
    yield
    assert not list(workdir.glob(".*.tmp"))
