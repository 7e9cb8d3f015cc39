"""Hostile file contents: every reproducer of issue 10 by name, and a fixed-seed fuzz run.

Each reproducer is one small file that used to escape as a traceback (ValueError,
RecursionError, OverflowError, IndexError), hang, or allocate gigabytes; each must
now end in lora-prune's own error (exit 3 or 4) or a ``check`` finding. The fuzz
test mutates a seed LoRA of every synthetic grammar (tests/hostile.py, shared with
fuzz/fuzz_lora.py for long runs) and allows nothing but LoraPruneError, within a
per-case time and allocation cap.
"""

from __future__ import annotations

import json
import random
import re
import struct
import time
import tracemalloc
import warnings
from pathlib import Path

import pytest
from hostile import FUZZ_MEMORY_CAP, FUZZ_TIME_CAP, fuzz_seeds, mutate, pack, run_target
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_prune.check import run_check
from lora_prune.errors import (
    EXIT_UNREADABLE,
    EXIT_UNSUPPORTED,
    BlockIndexError,
    CorruptFileError,
    LoraPruneError,
    UnsupportedLoraError,
)
from lora_prune.lora import compile_peft_pattern, read_lora
from lora_prune.stats import inspect_lora

_STEM = "lora_unet_double_blocks_0_img_attn_proj"
_PEFT = "transformer.transformer_blocks.0.attn.to_q"


def _file(
    tmp_path: Path,
    tensors: dict[str, tuple[int, ...]],
    metadata: dict[str, str] | None = None,
    f64: dict[str, float] | None = None,
) -> Path:
    """F32 tensors of 0.5 (F64 scalars for ``f64``) packed by hand, so any shape is possible."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    data = b""
    for key, shape in tensors.items():
        n = 1
        for d in shape:
            n *= d
        raw = struct.pack(f"<{n}f", *([0.5] * n))
        header[key] = {
            "dtype": "F32",
            "shape": list(shape),
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    for key, value in (f64 or {}).items():
        raw = struct.pack("<d", value)
        header[key] = {"dtype": "F64", "shape": [], "data_offsets": [len(data), len(data) + 8]}
        data += raw
    path = tmp_path / "hostile.safetensors"
    path.write_bytes(pack(header, data))
    return path


def _refused(
    path: Path,
    cls: type[LoraPruneError],
    fragment: str,
    exit_code: int,
    check_exit: int | None = None,
) -> None:
    """read+inspect raise ``cls`` naming ``fragment`` (the CLI exits ``exit_code``, 3 or 4).

    ``check`` reports the file as unreadable (3) or failed (1), or ``check_exit``.
    """
    started = time.perf_counter()
    with pytest.raises(cls) as caught:
        inspect_lora(read_lora(path))
    assert fragment in str(caught.value)
    assert caught.value.exit_code == exit_code
    result = run_check([path])
    expected = check_exit or (EXIT_UNREADABLE if exit_code == EXIT_UNREADABLE else 1)
    assert result.exit_code == expected, [f.message for f in result.files[0].findings]
    assert time.perf_counter() - started < 5.0


def _peft_file(tmp_path: Path, config: dict[str, object] | str) -> Path:
    raw = config if isinstance(config, str) else json.dumps(config)
    return _file(
        tmp_path,
        {f"{_PEFT}.lora_A.weight": (2, 8), f"{_PEFT}.lora_B.weight": (8, 2)},
        {"lora_adapter_metadata": raw},
    )


# --- reproducers ---------------------------------------------------------------------------
def test_regex_dos_pattern_is_refused_not_run(tmp_path: Path) -> None:
    # re.search(r"(^|\.)(.*.*)*z$", <module name>) takes exponential time.
    path = _peft_file(tmp_path, {"r": 2, "lora_alpha": 2, "rank_pattern": {"(.*.*)*z": 4}})
    _refused(path, UnsupportedLoraError, "'(.*.*)*z' uses '('", EXIT_UNSUPPORTED)


def test_deep_group_pattern_is_refused(tmp_path: Path) -> None:
    pattern = "(" * 3000 + "a" + ")" * 3000
    path = _peft_file(tmp_path, {"r": 2, "lora_alpha": 2, "alpha_pattern": {pattern: 4}})
    _refused(path, UnsupportedLoraError, "6001 characters (at most 256)", EXIT_UNSUPPORTED)


def test_huge_repeat_pattern_is_refused(tmp_path: Path) -> None:
    path = _peft_file(
        tmp_path, {"r": 2, "lora_alpha": 2, "rank_pattern": {"a{99999999999999999999}": 4}}
    )
    _refused(path, UnsupportedLoraError, "uses '{'", EXIT_UNSUPPORTED)


def test_deep_json_in_adapter_metadata(tmp_path: Path) -> None:
    path = _peft_file(tmp_path, "[" * 100_000 + "]" * 100_000)
    _refused(
        path, CorruptFileError, "'lora_adapter_metadata' nests deeper than 64", EXIT_UNREADABLE
    )


def test_5000_digit_int_in_adapter_metadata(tmp_path: Path) -> None:
    path = _peft_file(tmp_path, '{"r": ' + "9" * 5000 + "}")
    _refused(path, CorruptFileError, "has an integer of 5000 digits", EXIT_UNREADABLE)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ("[" * 100_000 + "]" * 100_000, "nests deeper than 64 levels"),
        ('{"passed": true, "min_ssim": ' + "9" * 5000 + "}", "has an integer of 5000 digits"),
    ],
    ids=["deep_json", "5000_digit_int"],
)
def test_hostile_verification_record_is_a_finding(tmp_path: Path, record: str, reason: str) -> None:
    path = _file(
        tmp_path,
        {f"{_STEM}.lora_down.weight": (2, 8), f"{_STEM}.lora_up.weight": (8, 2)},
        {"lora_prune.verification": record, "lora_prune.source_sha256": "0" * 64},
    )
    result = run_check([path])
    findings = [f for f in result.files[0].findings if f.code == "bad_verification"]
    assert len(findings) == 1 and reason in findings[0].message


def test_4301_digit_block_index(tmp_path: Path) -> None:
    path = _file(
        tmp_path, {f"lora_unet_double_blocks_{'1' * 4301}_img_attn_proj.lora_down.weight": (2, 8)}
    )
    _refused(
        path,
        BlockIndexError,
        "block index of over 6 digits is out of range 0..18",
        EXIT_UNSUPPORTED,
    )


@pytest.mark.parametrize(
    ("tensors", "fragment"),
    [
        ({"lora_down.weight": (0, 8), "lora_up.weight": (8, 0)}, "an empty factor"),
        ({"lora_down.weight": (2, 8), "lora_up.weight": (0, 2)}, "an empty factor"),
        ({"lora_down.weight": (2, 8), "lora_up.weight": (8, 2, 3, 3)}, "a convolution kernel"),
        (
            {"lora_down.weight": (2, 8), "lora_mid.weight": (2, 2, 3, 3), "lora_up.weight": (8, 2)},
            "a convolution kernel",
        ),
        (
            {"hada_w1_a": (3, 2), "hada_w1_b": (2, 8), "hada_w2_a": (5, 2), "hada_w2_b": (2, 8)},
            "LoHa products 3x[8] and 5x[8] differ in shape",
        ),
        (
            {"hada_w1_a": (3, 2), "hada_w1_b": (), "hada_w2_a": (3, 2), "hada_w2_b": (2, 8)},
            "a factor needs 2 dimensions",
        ),
        ({"lokr_w1": (), "lokr_w2": (4, 8)}, "a factor needs 2 dimensions"),
        ({"lokr_w1": (2, 2), "lokr_w2_a": (), "lokr_w2_b": (2, 4)}, "a factor needs 2 dimensions"),
    ],
    ids=[
        "zero_rows",
        "zero_rows_up",
        "conv_up",
        "conv_mid",
        "loha_rows_differ",
        "scalar_loha",
        "scalar_lokr",
        "scalar_lokr_factor",
    ],
)
def test_bad_factor_shapes(
    tmp_path: Path, tensors: dict[str, tuple[int, ...]], fragment: str
) -> None:
    path = _file(tmp_path, {f"{_STEM}.{role}": shape for role, shape in tensors.items()})
    # check lists the module as a finding and goes on: a failed file, not an unreadable one
    _refused(path, CorruptFileError, fragment, EXIT_UNREADABLE, check_exit=1)
    codes = {f.code for f in run_check([path]).files[0].findings}
    assert codes & {"bad_shape", "rank_mismatch"}


def test_alpha_1e300(tmp_path: Path) -> None:
    path = _file(
        tmp_path,
        {f"{_STEM}.lora_down.weight": (2, 8), f"{_STEM}.lora_up.weight": (8, 2)},
        f64={f"{_STEM}.alpha": 1e300},
    )
    _refused(path, CorruptFileError, "alpha 1e+300 is beyond 1e+06", EXIT_UNREADABLE, check_exit=1)
    codes = [f.code for f in run_check([path]).files[0].findings]
    assert codes == ["bad_alpha"]


def test_rank_30720_in_a_small_file_stays_small(tmp_path: Path) -> None:
    # 61 KB of F8 data declaring rank 30720: r x r Grams would need ~7.5 GiB each.
    rank = 30720
    header: dict[str, object] = {
        f"{_STEM}.lora_down.weight": {
            "dtype": "F8_E4M3",
            "shape": [rank, 1],
            "data_offsets": [0, rank],
        },
        f"{_STEM}.lora_up.weight": {
            "dtype": "F8_E4M3",
            "shape": [1, rank],
            "data_offsets": [rank, 2 * rank],
        },
    }
    path = tmp_path / "rank.safetensors"
    path.write_bytes(pack(header, b"\x38" * (2 * rank)))  # 0x38 is 1.0 in e4m3fn
    assert path.stat().st_size < 62_000
    tracemalloc.start()
    report = inspect_lora(read_lora(path))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 16 * 2**20
    # up @ down is the 1 x 1 sum of 30720 ones
    assert report.blocks[0].norm == pytest.approx(float(rank))
    assert run_check([path]).exit_code == 0


def test_first_matching_pattern_wins_as_in_peft(tmp_path: Path) -> None:
    config = {"r": 2, "lora_alpha": 2, "rank_pattern": {"attn.to_q": 4, "to_q": 8}}
    lora = read_lora(_peft_file(tmp_path, config))
    # PEFT's get_pattern_key takes "attn.to_q" (r=4): scale 2/4, as an alpha over rank 2.
    (module,) = lora.modules.values()
    assert module.alpha == pytest.approx(1.0)
    config["rank_pattern"] = {"to_q": 8, "attn.to_q": 4}
    (module,) = read_lora(_peft_file(tmp_path, config)).modules.values()
    assert module.alpha == pytest.approx(0.5)


# --- the PEFT pattern matcher against re, on patterns of its subset ------------------------
_NAMES = [
    "transformer_blocks.0.attn.to_q",
    "single_transformer_blocks.12.proj_out",
    "attn.to_k",
    "norm1.linear",
    "x.",
    "a",
]


@settings(derandomize=True, max_examples=400, deadline=None)
@given(st.text(alphabet=list("ato_qk.19[]^-*+?\\$dw"), max_size=10))
def test_pattern_matcher_agrees_with_peft_regex(pattern: str) -> None:
    try:
        compiled = compile_peft_pattern(pattern)
        expected_ok = True
    except ValueError:
        expected_ok = False
    if not expected_ok:
        return
    try:
        with warnings.catch_warnings():  # "[[" reads as a possible nested set to re
            warnings.simplefilter("ignore", FutureWarning)
            regex = re.compile(rf"(.*\.)?({pattern})$")
    except re.error:
        return  # not a regex at all; PEFT would crash, lora-prune reads it in its subset
    for name in _NAMES:
        assert compiled.matches(name) == (regex.match(name) is not None), (pattern, name)


# --- the fuzz run -----------------------------------------------------------------------------
def test_seeds_read_cleanly(tmp_path: Path) -> None:
    from hostile import pack_tensors

    path = tmp_path / "seed.safetensors"
    for metadata, tensors in fuzz_seeds():
        path.write_bytes(pack_tensors(metadata, tensors))
        assert run_target(path) == "ok"


@pytest.mark.slow
@settings(
    derandomize=True,
    max_examples=2500,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(st.randoms(use_true_random=False))
def test_fuzz_only_own_errors(tmp_path_factory: pytest.TempPathFactory, rng: random.Random) -> None:
    seeds = fuzz_seeds()
    metadata, tensors = seeds[rng.randrange(len(seeds))]
    data = mutate(rng, metadata, tensors)
    path = tmp_path_factory.getbasetemp() / "fuzz.safetensors"
    path.write_bytes(data)
    tracemalloc.start()
    started = time.perf_counter()
    try:
        run_target(path)  # anything but a LoraPruneError fails the test
    finally:
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert elapsed < FUZZ_TIME_CAP
    assert peak < FUZZ_MEMORY_CAP
