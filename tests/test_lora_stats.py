"""Tests of read_lora's grouping and alpha, and of the render-free statistics.

Module norms are checked against the weight delta formed explicitly in numpy
(``scale * up @ down``, LoHa's Hadamard product, LoKr's Kronecker product,
full diffs) from the same decoded tensors, in every dtype a LoRA ships in.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from conftest import SynthFile

from lora_prune.lora import LoraModule, read_lora
from lora_prune.safetensors_io import SafetensorsReader, decode_array, encode_array
from lora_prune.stats import block_stats, inspect_lora, module_norm
from lora_prune.testing import (
    SYNTH_DTYPES,
    SynthSpec,
    expected_scale,
    planted_lora,
    supported_blocks,
    synth_metadata,
    synth_modules,
    synth_tensors,
)

_FEW_BLOCKS = ("clip", "t5", "input", "double.0", "double.10", "single.1", "final")


def _few_blocks(grammar: str) -> tuple[str, ...]:
    return tuple(b for b in _FEW_BLOCKS if b in supported_blocks(grammar))


# --- grouping and alpha -----------------------------------------------------------------
def test_kohya_default_groups_912_tensors_into_304_modules(synth_file: SynthFile) -> None:
    lora = read_lora(synth_file(SynthSpec(rank=8, alpha=4.0, dtype="BF16")))
    assert len(lora.modules) == 304
    assert len(lora.header.tensors) == 912
    assert sum(len(m.tensors) for m in lora.modules.values()) == 912
    per_block = Counter(m.block for m in lora.modules.values())
    assert set(per_block.values()) == {10, 3}
    assert per_block["double.0"] == 10 and per_block["single.37"] == 3
    assert len(lora.blocks) == 57
    assert {(m.adapter, m.rank, m.alpha, m.scale) for m in lora.modules.values()} == {
        ("lora", 8, 4.0, 0.5)
    }
    assert lora.metadata["ss_network_dim"] == "8" and lora.metadata["ss_network_alpha"] == "4"


@pytest.mark.parametrize(
    ("grammar", "double", "single", "input", "final"),
    [
        ("kohya", 10, 3, 8, 2),
        ("diffusers", 14, 6, 8, 2),
        ("onetrainer", 14, 6, 8, 2),
        ("bfl-control", 14, 5, 8, 2),
        ("peft-bfl", 10, 3, 8, 2),
        ("xlabs", 4, 2, 0, 0),
        ("diffsynth", 10, 3, 0, 0),
        ("lycoris", 14, 6, 8, 2),
    ],
)
def test_module_counts_per_block(
    grammar: str, double: int, single: int, input: int, final: int, synth_file: SynthFile
) -> None:
    asked = ("input", "double.4", "single.30", "final")
    blocks = tuple(b for b in asked if b in supported_blocks(grammar))
    lora = read_lora(synth_file(SynthSpec(grammar=grammar, blocks=blocks)))
    counts = {b: len(lora.modules_of(b)) for b in asked}
    assert counts == {"input": input, "double.4": double, "single.30": single, "final": final}


@pytest.mark.parametrize("dtype", ["F32", "BF16", "F16", "F8_E4M3"])
def test_alpha_is_read_from_the_alpha_tensor(dtype: str, synth_file: SynthFile) -> None:
    spec = SynthSpec(rank=4, alpha=16.0, dtype=dtype, blocks=("double.1",))
    lora = read_lora(synth_file(spec))
    assert {m.alpha for m in lora.modules.values()} == {16.0}
    assert {m.scale for m in lora.modules.values()} == {4.0} == {expected_scale(spec)}
    assert all(m.tensors["alpha"].shape == () for m in lora.modules.values())


def test_no_alpha_means_scale_one(synth_file: SynthFile) -> None:
    lora = read_lora(synth_file(SynthSpec(rank=4, alpha=None, blocks=("double.1",))))
    assert not any(k.endswith(".alpha") for k in lora.header.tensors)
    assert {(m.alpha, m.scale) for m in lora.modules.values()} == {(None, 1.0)}


@pytest.mark.parametrize("grammar", ["diffusers", "diffusers-default"])
def test_alpha_is_read_from_peft_metadata(grammar: str, synth_file: SynthFile) -> None:
    spec = SynthSpec(
        grammar=grammar,
        rank=4,
        alpha=16.0,
        alpha_in="metadata",
        blocks=("double.0", "final"),
        text_encoders=True,
    )
    lora = read_lora(synth_file(spec))
    assert not any(k.endswith(".alpha") for k in lora.header.tensors)
    config = json.loads(lora.metadata["lora_adapter_metadata"])
    assert (config["transformer.r"], config["transformer.lora_alpha"]) == (4, 16.0)
    assert config["text_encoder.r"] == 4
    assert lora.peft_config == config
    assert {m.block for m in lora.modules.values()} == {"clip", "double.0", "final"}
    assert {(m.alpha, m.scale) for m in lora.modules.values()} == {(16.0, 4.0)}


# --- module norms against the explicit weight delta ---------------------------------------
def _explicit_norm(module: LoraModule, arrays: dict[str, np.ndarray], scale: float) -> float:
    """||scale * dW||_F (and the bias delta) with dW formed as a full matrix."""
    a = {role: x.astype(np.float64) for role, x in arrays.items()}
    delta: np.ndarray = np.zeros(1)
    bias: np.ndarray = np.zeros(1)
    if "down" in a:
        delta = scale * (a["up"] @ a["down"])
        if "up_bias" in a:
            bias = scale * a["up_bias"]
    elif "hada_w1_a" in a:
        delta = scale * (a["hada_w1_a"] @ a["hada_w1_b"]) * (a["hada_w2_a"] @ a["hada_w2_b"])
    elif "lokr_w1" in a:
        delta = scale * np.kron(a["lokr_w1"], a["lokr_w2_a"] @ a["lokr_w2_b"])
    elif "diff" in a:
        delta, bias = a["diff"], a["diff_b"]  # full deltas carry no scale
    else:
        assert set(a) == {"set_weight"}  # a replacement, not a delta: no known change
    return float(np.sqrt(np.sum(delta**2) + np.sum(bias**2)))


@pytest.mark.parametrize(
    ("grammar", "dtype"),
    [
        ("kohya", "F32"),
        ("kohya", "F16"),
        ("kohya", "BF16"),
        ("kohya", "F8_E4M3"),
        ("kohya", "F8_E5M2"),
        ("lycoris-kohya-loha", "BF16"),
        ("lycoris-kohya-loha", "F8_E4M3"),
        ("lycoris-kohya-lokr", "BF16"),
        ("lycoris-kohya-lokr", "F8_E5M2"),
        ("kohya-diff", "BF16"),
        ("kohya-diff", "F8_E4M3"),
        ("bfl-control", "BF16"),
        ("lycoris", "F32"),
        ("xlabs", "F16"),
        ("diffusers", "BF16"),
    ],
)
def test_module_norm_equals_the_explicit_delta(
    grammar: str, dtype: str, synth_file: SynthFile
) -> None:
    alpha_in: Literal["keys", "metadata"] = "metadata" if grammar == "diffusers" else "keys"
    spec = SynthSpec(
        grammar=grammar,
        dtype=dtype,
        rank=3,
        alpha=6.0,
        blocks=_few_blocks(grammar),
        alpha_in=alpha_in,
        seed=7,
    )
    lora = read_lora(synth_file(spec))
    planned = {m.stem: m for m in synth_modules(spec)}
    scale = expected_scale(spec)
    with SafetensorsReader(lora.path) as reader:
        for module in lora.modules.values():
            arrays = {role: reader.read_array(info.name) for role, info in module.tensors.items()}
            if "lokr_w1" in arrays:
                w2 = arrays["lokr_w2_a"] @ arrays["lokr_w2_b"]
                plan = planned[module.stem]
                assert np.kron(arrays["lokr_w1"], w2).shape == (plan.out_features, plan.in_features)
            if module.adapter != "full":
                assert module.scale == pytest.approx(scale, rel=1e-12)
            expected = _explicit_norm(module, arrays, scale)
            assert module_norm(reader, module) == pytest.approx(expected, rel=1e-5, abs=1e-30)
            # every delta is non-zero; a control LoRA's norm scales replace weights instead
            assert (expected > 0) == (set(arrays) != {"set_weight"})


def test_decoded_values_are_the_generated_ones() -> None:
    """The norms above use what the file holds; check that is what synth meant to write."""
    spec = SynthSpec(dtype="BF16", blocks=("double.0",), seed=3)
    tensors = synth_tensors(spec)
    f32 = synth_tensors(SynthSpec(dtype="F32", blocks=("double.0",), seed=3))
    for key, (dtype, shape, raw) in tensors.items():
        assert dtype == "BF16"
        got = decode_array(raw, dtype, shape)
        want = decode_array(f32[key][2], "F32", shape)
        # bf16 keeps 8 significant bits: rounding to nearest errs by at most 2**-8 relative
        assert np.all(np.abs(got - want) <= np.abs(want) * 2.0**-8)
        assert key.endswith(".alpha") or not np.array_equal(got, want)


def test_file_holds_exactly_the_synth_tensors(synth_file: SynthFile) -> None:
    spec = SynthSpec(grammar="bfl-control", dtype="F8_E4M3", blocks=("input", "single.3"))
    path = synth_file(spec)
    tensors = synth_tensors(spec)
    with SafetensorsReader(path) as reader:
        assert set(reader.header.tensors) == set(tensors)
        for key, (dtype, shape, raw) in tensors.items():
            info = reader.header.tensors[key]
            assert (info.dtype, info.shape) == (dtype, shape)
            assert reader.read_bytes(key) == raw


def test_kohya_metadata(synth_file: SynthFile) -> None:
    meta = read_lora(synth_file(SynthSpec(rank=8, alpha=2.5, blocks=("double.0",)))).metadata
    assert meta["ss_network_module"] == "networks.lora_flux"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "2.5")
    assert meta["ss_base_model_version"] == "flux1"
    assert len(meta["sshs_model_hash"]) == 64
    assert meta["sshs_legacy_hash"] == meta["sshs_model_hash"][:8]
    assert meta["modelspec.hash_sha256"] == "0x" + meta["sshs_model_hash"]
    loha_spec = SynthSpec(grammar="lycoris-kohya-loha", metadata={"ss_network_dim": "99"})
    loha = synth_metadata(loha_spec)
    assert loha["ss_network_module"] == "lycoris.kohya"
    assert json.loads(loha["ss_network_args"]) == {"algo": "loha"}
    assert loha["ss_network_dim"] == "99"  # the caller's metadata wins
    assert synth_metadata(SynthSpec(grammar="xlabs")) == {}


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (SynthSpec(grammar="kohya_ss"), "unknown grammar"),
        (SynthSpec(grammar="xlabs", text_encoders=True), "no text encoder"),
        (SynthSpec(grammar="diffusers", blocks=("t5",)), "cannot name"),
        (SynthSpec(grammar="diffsynth", blocks=("final",)), "cannot name"),
        (SynthSpec(blocks=("double.19",)), "unknown block"),
        (SynthSpec(grammar="diffusers", adapter="loha"), "cannot carry"),
        (SynthSpec(adapter="oft"), "unknown adapter"),
        (SynthSpec(grammar="kohya", alpha_in="metadata"), "metadata"),
        (SynthSpec(rank=0), "rank"),
        (SynthSpec(strength={"double.99": 1.0}), "unknown block"),
    ],
)
def test_bad_specs_are_refused(spec: SynthSpec, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        synth_modules(spec)


# --- dtype encoding ---------------------------------------------------------------------
def test_bf16_rounds_to_nearest_even() -> None:
    values = np.array([1.0, 1 + 2**-8, 1 + 3 * 2**-8, -2.0, 0.0, 1 + 2**-7 + 2**-9], np.float32)
    codes = np.frombuffer(encode_array(values, "BF16"), dtype="<u2")
    assert [hex(c) for c in codes] == ["0x3f80", "0x3f80", "0x3f82", "0xc000", "0x0", "0x3f81"]


@pytest.mark.parametrize(("dtype", "largest"), [("F8_E4M3", 448.0), ("F8_E5M2", 57344.0)])
def test_fp8_encoding_is_nearest_and_saturating(dtype: str, largest: float) -> None:
    every = decode_array(bytes(range(256)), dtype, (256,))
    finite = every[np.isfinite(every)]
    # every representable value encodes to a code of the same value
    assert np.array_equal(decode_array(encode_array(finite, dtype), dtype, finite.shape), finite)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(2000).astype(np.float32) * 10
    got = decode_array(encode_array(x, dtype), dtype, x.shape)
    nearest = np.min(np.abs(finite[None, :] - x[:, None]), axis=1)
    assert np.array_equal(np.abs(got - x), nearest)
    big = decode_array(encode_array(np.array([1e9, -1e9], np.float32), dtype), dtype, (2,))
    assert big.tolist() == [largest, -largest]


def test_unknown_dtype_is_refused() -> None:
    with pytest.raises(ValueError, match="dtype"):
        synth_modules(SynthSpec(dtype="F64"))


@pytest.mark.parametrize("dtype", SYNTH_DTYPES)
def test_files_declare_the_asked_dtype(dtype: str, synth_file: SynthFile) -> None:
    lora = read_lora(synth_file(SynthSpec(dtype=dtype, blocks=("single.2",))))
    weights = {i.dtype for k, i in lora.header.tensors.items() if not k.endswith(".alpha")}
    assert weights == {dtype}


# --- inspect ----------------------------------------------------------------------------
@pytest.mark.parametrize("grammar", ["kohya", "bfl-control", "onetrainer"])
def test_inspect_block_sizes_sum_to_the_file(grammar: str, synth_file: SynthFile) -> None:
    spec = SynthSpec(grammar=grammar, blocks=supported_blocks(grammar), dtype="BF16", rank=2)
    lora = read_lora(synth_file(spec))
    report = inspect_lora(lora)
    assert sum(b.params for b in report.blocks) == report.total_params == lora.total_params
    assert sum(b.bytes for b in report.blocks) == report.total_bytes == lora.total_bytes
    assert sum(b.tensors for b in report.blocks) == len(lora.header.tensors)
    assert sum(b.modules for b in report.blocks) == len(synth_modules(spec))
    assert report.file_bytes == Path(lora.path).stat().st_size
    assert report.file_bytes == lora.header.data_offset + report.total_bytes
    expected_params = sum(
        int(np.prod(shape)) for _dtype, shape, _raw in synth_tensors(spec).values()
    )
    assert report.total_params == expected_params
    assert [b.block for b in report.blocks] == list(supported_blocks(grammar))
    assert sum(b.share_bytes for b in report.blocks) == pytest.approx(1.0)
    assert sum(b.share_norm for b in report.blocks) == pytest.approx(1.0)


# --- planted LoRAs ------------------------------------------------------------------------
_PLANTED = {"input": 2.0, "double.3": 1.0, "double.13": 0.25, "single.20": 0.5}


@pytest.mark.parametrize(
    "grammar", ["kohya", "diffusers", "lycoris-kohya-loha", "lycoris-kohya-lokr", "kohya-diff"]
)
def test_planted_blocks_are_the_only_nonzero_ones(grammar: str, tmp_path: Path) -> None:
    path = planted_lora(tmp_path / "planted.safetensors", _PLANTED, grammar=grammar, seed=5)
    lora = read_lora(path)
    assert len(lora.blocks) == 58  # every double and single block, plus the planted input
    norms = {b.block: b.norm for b in block_stats(lora)}
    assert {b for b, n in norms.items() if n > 0} == set(_PLANTED)
    assert all(n == 0.0 for b, n in norms.items() if b not in _PLANTED)
    report = inspect_lora(lora, sort="norm")
    assert {b.block for b in report.blocks[:4]} == set(_PLANTED)


def test_planted_strength_scales_the_norm_linearly(tmp_path: Path) -> None:
    one = read_lora(planted_lora(tmp_path / "one.safetensors", {"double.3": 1.0}, seed=2))
    three = read_lora(planted_lora(tmp_path / "three.safetensors", {"double.3": 3.0}, seed=2))
    n1 = {b.block: b.norm for b in block_stats(one)}["double.3"]
    n3 = {b.block: b.norm for b in block_stats(three)}["double.3"]
    assert n1 > 0
    assert n3 == pytest.approx(3 * n1, rel=1e-6)


def test_planted_text_encoder_block(tmp_path: Path) -> None:
    path = planted_lora(tmp_path / "te.safetensors", {"t5": 1.0}, grammar="kohya")
    norms = {b.block: b.norm for b in block_stats(read_lora(path))}
    assert norms["t5"] > 0
    assert sum(norms.values()) == norms["t5"]


def test_planted_block_the_grammar_cannot_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot name"):
        planted_lora(tmp_path / "x.safetensors", {"input": 1.0}, grammar="xlabs")


@pytest.mark.parametrize("grammar", ["lycoris-kohya-loha", "diffusers-kohya-suffix"])
def test_one_grammar_per_file(grammar: str, synth_file: SynthFile) -> None:
    lora = read_lora(synth_file(SynthSpec(grammar=grammar, blocks=("double.0",))))
    assert len(lora.grammars) == 1
    assert {m.grammar for m in lora.modules.values()} == {lora.format}


@pytest.mark.parametrize(
    "grammar",
    ["kohya", "diffusers", "comfyui", "lycoris-kohya-loha", "lycoris-kohya-lokr", "kohya-diff"],
)
def test_stats_and_hash_come_from_one_read_of_the_data(
    grammar: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lora_prune.safetensors_io as sio
    from lora_prune.safetensors_io import file_sha256
    from lora_prune.stats import block_stats_and_sha256
    from lora_prune.testing import SynthSpec, write_synth_lora

    spec = SynthSpec(grammar=grammar, rank=4, alpha=2.0)
    lora = read_lora(write_synth_lora(tmp_path / "lora.safetensors", spec))
    expected_stats, expected_sha = block_stats(lora), file_sha256(lora.path)
    read: list[int] = []
    real_pread, real_pread_into = sio._pread, sio._pread_into

    def pread(f: Any, n: int, offset: int) -> bytes:
        read.append(n)
        return real_pread(f, n, offset)

    def pread_into(f: Any, buf: bytearray, offset: int) -> int:
        read.append(len(buf))
        return real_pread_into(f, buf, offset)

    monkeypatch.setattr(sio, "_pread", pread)
    monkeypatch.setattr(sio, "_pread_into", pread_into)
    stats, sha = block_stats_and_sha256(lora)
    assert sha == expected_sha
    assert stats == expected_stats
    # Every byte once: the hash reuses the tensor reads (two passes would read it twice).
    assert sum(read) == lora.header.file_size
