"""Tests of the safe safetensors reader/writer against the official library and hostile files."""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import os
import pickle
import stat
import struct
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import safetensors.numpy
import safetensors.torch
import torch
from hostile import make_hostile_corpus, pack, valid_file_bytes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_prune import safetensors_io
from lora_prune.errors import (
    CorruptFileError,
    IncompleteFileError,
    LoraPruneError,
    OutputError,
    UnreadableFileError,
)
from lora_prune.safetensors_io import (
    DTYPE_ITEMSIZE,
    SafetensorsReader,
    TensorEntry,
    decode_array,
    file_sha256,
    read_header,
    write_safetensors,
)

torch.set_num_threads(1)

VALID = valid_file_bytes()

TORCH_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

HYPOTHESIS = settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def torch_bytes(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def random_tensor(dtype: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random values of every dtype; floats pass through float32 so fp8/bf16 round as torch does."""
    tdtype = TORCH_DTYPES[dtype]
    if tdtype.is_floating_point:
        return (torch.randn(shape, generator=gen) * 3).to(tdtype)
    if tdtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    info = torch.iinfo(tdtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=gen).to(tdtype)


def assert_same_floats(ours: npt.NDArray[Any], reference: npt.NDArray[Any]) -> None:
    """Bit-equal, except that any NaN matches any NaN (payloads are not specified)."""
    assert ours.dtype == reference.dtype
    assert ours.shape == reference.shape
    nan = np.isnan(reference)
    np.testing.assert_array_equal(np.isnan(ours), nan)
    width = {np.dtype(np.float32): np.uint32, np.dtype(np.float64): np.uint64}[ours.dtype]
    np.testing.assert_array_equal(ours[~nan].view(width), reference[~nan].view(width))


def read_everything(path: Path) -> None:
    header = read_header(path)
    with SafetensorsReader(path, header) as reader:
        for name, info in reader.header.tensors.items():
            assert len(reader.read_bytes(name)) == info.nbytes
            assert reader.read_array(name).shape == info.shape


# ---------------------------------------------------------------------------
# Decoding against torch


def test_fp8_e4m3fn_all_codes_match_torch() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    reference = codes.view(torch.float8_e4m3fn).float().numpy()
    ours = decode_array(bytes(range(256)), "F8_E4M3", (256,))
    assert_same_floats(ours, reference)
    # The format's landmarks, so that a table shared with torch's own bug would still fail.
    assert ours[0x7E] == 448.0 and ours[0xFE] == -448.0
    assert np.isnan(ours[0x7F]) and np.isnan(ours[0xFF])
    assert not np.isinf(ours).any()
    assert ours[0x01] == 2.0**-9
    assert np.signbit(ours[0x80]) and ours[0x80] == 0.0


def test_fp8_e5m2_all_codes_match_torch() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    reference = codes.view(torch.float8_e5m2).float().numpy()
    ours = decode_array(bytes(range(256)), "F8_E5M2", (16, 16))
    assert_same_floats(ours, reference.reshape(16, 16))
    assert ours.flat[0x7B] == 57344.0
    assert ours.flat[0x7C] == np.inf and ours.flat[0xFC] == -np.inf
    assert np.isnan(ours.flat[0x7D]) and np.isnan(ours.flat[0xFF])
    assert ours.flat[0x01] == 2.0**-16


@pytest.mark.parametrize("dtype", ["BF16", "F16"])
def test_16_bit_floats_all_codes_match_torch(dtype: str) -> None:
    codes = np.arange(65536, dtype=np.uint16)
    reference = torch.from_numpy(codes.view(np.int16)).view(TORCH_DTYPES[dtype]).float().numpy()
    ours = decode_array(codes.tobytes(), dtype, (256, 256))
    assert ours.dtype == np.float32
    assert_same_floats(ours, reference.reshape(256, 256))


def test_bf16_is_upper_half_of_float32() -> None:
    values = np.array([1.0, -2.5, 3.140625, 1e30, -1e-30, 0.0, np.inf], dtype=np.float32)
    bits = values.view(np.uint32)
    upper = (bits >> 16).astype("<u2")
    # Dropping the low 16 bits is exactly what bf16 keeps of a float32.
    expected = (bits & np.uint32(0xFFFF0000)).view(np.float32)
    decoded = decode_array(upper.tobytes(), "BF16", (7,))
    np.testing.assert_array_equal(decoded, expected)
    assert decoded[:3].tolist() == [1.0, -2.5, 3.140625]
    assert decoded[3] == np.float32(9.953037915854457e29)


def test_decode_array_dtypes_and_writability() -> None:
    f64 = decode_array(np.array([1.5, -2.0]).tobytes(), "F64", (2,))
    assert f64.dtype == np.float64 and f64.tolist() == [1.5, -2.0]
    i16 = decode_array(np.array([-3, 7], dtype="<i2").tobytes(), "I16", (2, 1))
    assert i16.dtype == np.int16 and i16.tolist() == [[-3], [7]]
    flags = decode_array(b"\x00\x01\x02\xff", "BOOL", (4,))
    assert flags.dtype == np.bool_ and flags.tolist() == [False, True, True, True]
    scalar = decode_array(struct.pack("<f", 4.0), "F32", ())
    assert scalar.shape == () and float(scalar) == 4.0
    for dtype, size in DTYPE_ITEMSIZE.items():
        arr = decode_array(bytes(2 * size), dtype, (2,))
        assert arr.flags.writeable, dtype
        arr[0] = 1  # callers scale in place


def test_decode_array_rejects_caller_bugs() -> None:
    with pytest.raises(ValueError, match="12 bytes do not hold a F32 tensor of shape"):
        decode_array(bytes(12), "F32", (2, 2))
    with pytest.raises(ValueError, match="unknown safetensors dtype 'U16'"):
        decode_array(bytes(2), "U16", (1,))


# ---------------------------------------------------------------------------
# Round trips with the official library


def test_reads_files_from_safetensors_numpy(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays: dict[str, npt.NDArray[Any]] = {
        "f64": rng.standard_normal((3, 5)),
        "f32": rng.standard_normal((4, 2)).astype(np.float32),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "i64": rng.integers(-(2**40), 2**40, (2, 2)),
        "i32": rng.integers(-1000, 1000, (3,)).astype(np.int32),
        "i16": rng.integers(-1000, 1000, (3,)).astype(np.int16),
        "i8": rng.integers(-100, 100, (5,)).astype(np.int8),
        "u8": rng.integers(0, 255, (5,)).astype(np.uint8),
        "bool": rng.integers(0, 2, (2, 3)).astype(np.bool_),
        "scalar": np.array(4.0, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
    }
    path = tmp_path / "numpy.safetensors"
    safetensors.numpy.save_file(arrays, str(path), metadata={"format": "np", "k": "v"})

    header = read_header(path)
    assert header.metadata == {"format": "np", "k": "v"}
    assert header.file_size == path.stat().st_size
    assert set(header.tensors) == set(arrays)
    begins = [info.begin for info in header.tensors.values()]
    assert begins == sorted(begins)
    assert header.tensors["f16"].dtype == "F16" and header.tensors["f16"].shape == (7,)
    assert header.tensors["scalar"].numel == 1 and header.tensors["scalar"].nbytes == 4
    assert header.tensors["empty"].nbytes == 0
    with SafetensorsReader(path) as reader:
        for name, expected in arrays.items():
            raw = reader.read_bytes(name)
            assert raw == expected.tobytes()
            got = reader.read_array(name)
            if expected.dtype == np.float16:
                expected = expected.astype(np.float32)
            assert got.dtype == expected.dtype, name
            np.testing.assert_array_equal(got, expected)


def test_reads_bf16_and_fp8_files_from_safetensors_torch(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(1)
    tensors = {
        f"t_{dtype}": random_tensor(dtype, (6, 5), gen)
        for dtype in ("BF16", "F8_E4M3", "F8_E5M2", "F16", "F32")
    }
    path = tmp_path / "torch.safetensors"
    safetensors.torch.save_file(tensors, str(path))
    with SafetensorsReader(path) as reader:
        for name, tensor in tensors.items():
            assert reader.header.tensors[name].dtype == name[2:]
            assert_same_floats(reader.read_array(name), tensor.float().numpy())


def entries_for(tensors: dict[str, torch.Tensor]) -> list[TensorEntry]:
    dtype_of = {v: k for k, v in TORCH_DTYPES.items()}
    calls: list[str] = []

    def data_of(name: str, t: torch.Tensor) -> Callable[[], bytes]:
        def data() -> bytes:
            calls.append(name)
            return torch_bytes(t)

        return data

    return [
        TensorEntry(name, dtype_of[t.dtype], tuple(t.shape), data_of(name, t))
        for name, t in tensors.items()
    ]


def test_written_files_load_bit_identically_in_safetensors_torch(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(2)
    tensors = {f"{name.lower()}.weight": random_tensor(name, (3, 4), gen) for name in TORCH_DTYPES}
    tensors["scalar.alpha"] = torch.tensor(8.0)
    tensors["zero"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    metadata = {"ss_network_dim": "4", "note": 'ünïcode "quoted"\n\x01'}
    dest = write_safetensors(tmp_path / "ours.safetensors", entries_for(tensors), metadata)

    loaded = safetensors.torch.load_file(str(dest))
    assert set(loaded) == set(tensors)
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype
        assert loaded[name].shape == tensor.shape
        assert torch_bytes(loaded[name]) == torch_bytes(tensor), name
    with safetensors.safe_open(str(dest), "pt") as f:
        assert f.metadata() == metadata
    # Our own reader agrees too, and sees the header written in 8-byte-aligned form.
    header = read_header(dest)
    assert header.metadata == metadata
    assert header.data_offset % 8 == 0


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_written_bytes_equal_official_writer(
    tmp_path: Path, metadata: dict[str, str] | None
) -> None:
    gen = torch.Generator().manual_seed(3)
    # Names and dtypes interleaved so that both sort keys (dtype rank, then name) matter.
    tensors = {
        f"{chr(ord('a') + (i * 7) % 26)}{i}": random_tensor(dtype, (i + 1, 3), gen)
        for i, dtype in enumerate(list(TORCH_DTYPES) * 2)
    }
    ours = write_safetensors(tmp_path / "ours.safetensors", entries_for(tensors), metadata)
    official = safetensors.torch.save(tensors, metadata=metadata)
    assert ours.read_bytes() == official


def test_writer_streams_each_tensor_once_in_file_order(tmp_path: Path) -> None:
    calls: list[str] = []

    def entry(name: str, dtype: str, value: bytes) -> TensorEntry:
        def data() -> bytes:
            calls.append(name)
            return value

        return TensorEntry(name, dtype, (len(value) // DTYPE_ITEMSIZE[dtype],), data)

    entries = [
        entry("b", "U8", b"\x01\x02"),
        entry("a", "U8", b"\x03"),
        entry("c", "F32", bytes(8)),
    ]
    dest = write_safetensors(tmp_path / "x.safetensors", entries, None)
    # Wider dtypes first, then by name, as the official writer lays files out.
    assert calls == ["c", "a", "b"]
    header = read_header(dest)
    assert list(header.tensors) == ["c", "a", "b"]
    assert header.metadata == {}
    with SafetensorsReader(dest) as reader:
        assert reader.read_bytes("b") == b"\x01\x02"


# ---------------------------------------------------------------------------
# Hostile files


@pytest.fixture(scope="module")
def corpus(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[Path, type[LoraPruneError], str]]:
    return make_hostile_corpus(tmp_path_factory.mktemp("hostile"))


HOSTILE_NAMES = [
    "torch_zip", "raw_pickle", "raw_pickle_p2", "lfs_pointer", "html_doctype", "html_tag",
    "text_readme", "json_config",
    "empty", "tiny", "truncated_header", "truncated_data", "header_too_big", "bad_json",
    "not_brace", "not_utf8", "duplicate_key", "bad_dtype", "negative_shape", "bool_in_shape",
    "overlap", "size_mismatch", "beyond_data", "bad_metadata", "missing", "directory",
]  # fmt: skip


def test_corpus_has_every_case(corpus: dict[str, tuple[Path, type[LoraPruneError], str]]) -> None:
    assert sorted(corpus) == sorted(HOSTILE_NAMES)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_hostile_file_is_refused_with_its_own_error(
    corpus: dict[str, tuple[Path, type[LoraPruneError], str]], name: str
) -> None:
    path, cls, fragment = corpus[name]
    with pytest.raises(LoraPruneError) as caught:
        read_header(path)
    err = caught.value
    assert type(err) is cls
    assert fragment in str(err)
    assert str(path) in str(err)
    assert "\n" not in str(err)
    assert err.fix
    # The reader sniffs and validates the same way when given no header.
    with pytest.raises(cls) as again:
        SafetensorsReader(path)
    assert str(again.value) == str(err)


def test_truncated_data_message_is_exact(tmp_path: Path) -> None:
    valid = valid_file_bytes()
    path = tmp_path / "cut.safetensors"
    path.write_bytes(valid[:-1])
    with pytest.raises(IncompleteFileError) as caught:
        read_header(path)
    assert str(caught.value) == (
        f"incomplete download: {len(valid) - 1} of {len(valid)} bytes, {path}, "
        "download the file again"
    )


def test_every_truncation_is_incomplete(tmp_path: Path) -> None:
    valid = valid_file_bytes()
    path = tmp_path / "cut.safetensors"
    for size in range(1, len(valid)):
        path.write_bytes(valid[:size])
        with pytest.raises(IncompleteFileError, match=rf"incomplete download: {size} of "):
            read_header(path)


def test_valid_corpus_base_file_reads(tmp_path: Path) -> None:
    path = tmp_path / "valid.safetensors"
    path.write_bytes(valid_file_bytes())
    header = read_header(path)
    assert header.metadata == {"format": "pt", "ss_network_dim": "2"}
    with SafetensorsReader(path, header) as reader:
        down = reader.read_array("lora_unet_double_blocks_0_img_attn_proj.lora_down.weight")
        assert down.tolist() == [[1.0] * 4, [-1.0] * 4]
        up = reader.read_array("lora_unet_double_blocks_0_img_attn_proj.lora_up.weight")
        assert up[0].tolist() == [2.0, 2.015625]
        assert reader.read_array("lora_unet_double_blocks_0_img_attn_proj.alpha").item() == 4.0


def test_header_length_that_looks_like_pickle_protocol_is_still_safetensors(tmp_path: Path) -> None:
    # A 640-byte header starts the file with b"\x80\x02", the opening of a protocol-2 pickle.
    base: dict[str, object] = {"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    filler = 640 - len(pack({"__metadata__": {"pad": ""}, **base})) + 8
    content = pack({"__metadata__": {"pad": "x" * filler}, **base}, b"\x07")
    assert content[:2] == b"\x80\x02"
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with SafetensorsReader(path) as reader:
        assert reader.read_bytes("w") == b"\x07"


HEADER_CASES: list[tuple[str, bytes, str]] = [
    ("length_zero", struct.pack("<Q", 0), "header length 0 is too small"),
    (
        "reversed_offsets",
        pack({"w": {"dtype": "U8", "shape": [0], "data_offsets": [4, 2]}}, bytes(4)),
        "tensor 'w' has invalid data_offsets [4, 2]",
    ),
    (
        "three_offsets",
        pack({"w": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}, bytes(2)),
        "tensor 'w' has invalid data_offsets",
    ),
    (
        "float_shape",
        pack({"w": {"dtype": "U8", "shape": [1.0], "data_offsets": [0, 1]}}, bytes(1)),
        "tensor 'w' has invalid shape [1.0]",
    ),
    ("entry_not_object", pack({"w": [1, 2]}), "tensor 'w' has a header entry that is not"),
    (
        "missing_dtype",
        pack({"w": {"shape": [1], "data_offsets": [0, 1]}}, bytes(1)),
        "tensor 'w' has no 'dtype'",
    ),
    ("metadata_not_object", pack({"__metadata__": "x"}), "'__metadata__' is not a JSON object"),
    (
        "empty_tensor_beyond_data",
        pack({"w": {"dtype": "U8", "shape": [0], "data_offsets": [9, 9]}}, bytes(4)),
        "tensor 'w' data_offsets [9, 9] lie beyond the 4 bytes of data",
    ),
    (
        "huge_shape",
        pack({"w": {"dtype": "F32", "shape": [2**40] * 2000, "data_offsets": [0, 4]}}, bytes(4)),
        "needs more than 2**63",
    ),
    (
        "huge_dim",
        pack({"w": {"dtype": "F32", "shape": [10**300] * 2000, "data_offsets": [0, 4]}}, bytes(4)),
        "header has an integer of 301 digits",
    ),
    ("deep_nesting", pack("{" + '"a":[' * 100_000), "header is not valid JSON"),
    ("deep_arrays", pack('{"a":' + "[" * 100_000 + "]" * 100_000 + "}"), "nests deeper than 64"),
    ("shallow_but_over_limit", pack('{"a":' + "[" * 65 + "]" * 65 + "}"), "nests deeper than 64"),
    ("huge_int", pack('{"a":' + "9" * 5000 + "}"), "header has an integer of 5000 digits"),
    (
        "wrong_case_dtype",
        pack({"w": {"dtype": "f32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
        "unsupported dtype 'f32'",
    ),
]


@pytest.mark.parametrize(
    ("content", "fragment"), [c[1:] for c in HEADER_CASES], ids=[c[0] for c in HEADER_CASES]
)
def test_inconsistent_header_is_corrupt(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content)
    started = time.perf_counter()
    with pytest.raises(CorruptFileError) as caught:
        read_header(path)
    assert time.perf_counter() - started < 2.0  # hostile shapes must not stall the parser
    assert fragment in str(caught.value)
    assert str(path) in str(caught.value)
    assert len(str(caught.value)) < 400  # a megabyte-long shape is not echoed back


def test_library_never_unpickles(
    corpus: dict[str, tuple[Path, type[LoraPruneError], str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle was called")

    for attr in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, attr, forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    for path, cls, _ in corpus.values():
        with pytest.raises(cls):
            read_header(path)


def test_module_imports_without_torch() -> None:
    code = "import sys, lora_prune.safetensors_io; assert 'torch' not in sys.modules"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def test_reader_does_not_use_pickle_torch_or_safetensors() -> None:
    tree = ast.parse(Path(safetensors_io.__file__).read_text(encoding="utf-8"))
    imported: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert imported.isdisjoint({"pickle", "torch", "safetensors", "dill", "joblib"}), imported
    assert "numpy" in imported  # the walk really saw the imports


@pytest.mark.parametrize(
    ("exc", "fragment"),
    [
        (PermissionError(13, "Permission denied"), "permission denied"),
        (OSError(5, "Input/output error"), "cannot read file (Input/output error)"),
    ],
)
def test_os_errors_are_wrapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exc: OSError, fragment: str
) -> None:
    # Simulated: the tests may run as root, for whom chmod 0 does not block reading.
    path = tmp_path / "x.safetensors"
    path.write_bytes(VALID)

    def failing_open(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(safetensors_io, "open", failing_open, raising=False)
    for call in (read_header, file_sha256, SafetensorsReader):
        with pytest.raises(UnreadableFileError) as caught:
            call(path)
        assert type(caught.value) is UnreadableFileError
        assert str(caught.value).startswith(f"{fragment}, {path}, ")


def test_special_files_are_refused(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(UnreadableFileError, match="not a regular file"):
        read_header(fifo)  # must not block waiting for a writer


# ---------------------------------------------------------------------------
# Property tests: damage only ever produces our errors


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mutations") / "m.safetensors"


@HYPOTHESIS
@given(
    edits=st.lists(
        st.tuples(
            # Most damage lands in the length prefix and the JSON, where it matters.
            st.one_of(st.integers(0, 7), st.integers(0, len(VALID) - 1)),
            st.integers(0, 255),
        ),
        min_size=1,
        max_size=8,
    ),
    cut=st.one_of(st.none(), st.integers(0, len(VALID))),
)
def test_mutated_bytes_raise_only_lora_prune_errors(
    scratch: Path, edits: list[tuple[int, int]], cut: int | None
) -> None:
    content = bytearray(VALID)
    for pos, value in edits:
        content[pos] = value
    scratch.write_bytes(bytes(content[:cut]))
    with contextlib.suppress(LoraPruneError):
        read_everything(scratch)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


@HYPOTHESIS
@given(
    tensor=st.integers(0, 4),
    field=st.sampled_from(["dtype", "shape", "data_offsets", None]),
    value=json_values,
    cut=st.one_of(st.none(), st.integers(0, 40)),
)
def test_mutated_header_fields_raise_only_lora_prune_errors(
    scratch: Path, tensor: int, field: str | None, value: object, cut: int | None
) -> None:
    (length,) = struct.unpack("<Q", VALID[:8])
    doc = json.loads(VALID[8 : 8 + length])
    key = list(doc)[tensor]  # index 0 is __metadata__
    if field is None:
        doc[key] = value
    else:
        doc[key][field] = value
    content = pack(doc, VALID[8 + length :])
    scratch.write_bytes(content if cut is None else content[:-cut] if cut else content)
    with contextlib.suppress(LoraPruneError):
        read_everything(scratch)


@HYPOTHESIS
@given(
    specs=st.lists(
        st.tuples(
            st.text(min_size=1, max_size=10).filter(lambda s: s != "__metadata__"),
            st.sampled_from(sorted(DTYPE_ITEMSIZE)),
            st.lists(st.integers(0, 4), max_size=3),
        ),
        max_size=6,
        unique_by=lambda spec: spec[0],
    ),
    metadata=st.one_of(
        st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3)
    ),
    seed=st.integers(0, 2**32 - 1),
)
def test_write_then_read_round_trips(
    scratch: Path,
    specs: list[tuple[str, str, list[int]]],
    metadata: dict[str, str] | None,
    seed: int,
) -> None:
    rng = np.random.default_rng(seed)
    payloads = {
        name: rng.integers(
            0, 256, int(np.prod(shape)) * DTYPE_ITEMSIZE[dtype], dtype=np.uint8
        ).tobytes()
        for name, dtype, shape in specs
    }
    entries = [
        TensorEntry(name, dtype, tuple(shape), functools.partial(payloads.__getitem__, name))
        for name, dtype, shape in specs
    ]
    write_safetensors(scratch, entries, metadata)
    header = read_header(scratch)
    assert header.metadata == (metadata or {})
    with SafetensorsReader(scratch, header) as reader:
        for name, dtype, shape in specs:
            info = header.tensors[name]
            assert (info.dtype, info.shape) == (dtype, tuple(shape))
            assert reader.read_bytes(name) == payloads[name]
            assert reader.read_array(name).shape == tuple(shape)


# ---------------------------------------------------------------------------
# Streaming and memory


def test_reading_streams_tensor_by_tensor(tmp_path: Path) -> None:
    mib = 1024 * 1024
    rng = np.random.default_rng(4)
    arrays = {f"t{i:02d}": rng.standard_normal(mib // 4).astype(np.float32) for i in range(24)}
    path = tmp_path / "big.safetensors"
    safetensors.numpy.save_file(arrays, str(path))
    assert path.stat().st_size > 24 * mib

    tracemalloc.start()
    try:
        header = read_header(path)
        header_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        total = 0.0
        with SafetensorsReader(path, header) as reader:
            for name in header.tensors:
                total += float(np.abs(reader.read_array(name)).sum())
                total += len(reader.read_bytes(name))
        read_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert total > 0
    assert header_peak < mib // 4  # the header only, not a tensor
    # One tensor's bytes plus one float32 temporary, far below the 24 MiB file.
    assert read_peak < 3.5 * mib


def test_reader_notices_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(VALID)
    header = read_header(path)
    with SafetensorsReader(path, header) as reader:
        with open(path, "r+b") as f:
            f.truncate(len(VALID) - 3)
        with pytest.raises(IncompleteFileError, match="file ended while reading tensor 'flag'"):
            reader.read_array("flag")
        with pytest.raises(IncompleteFileError, match=r"\(0 of 1 bytes\)"):
            reader.read_bytes("flag")
    with pytest.raises(
        UnreadableFileError, match=f"file changed since it was checked \\({len(VALID)} -> "
    ):
        SafetensorsReader(path, header)


def test_closed_reader_refuses_reads(tmp_path: Path) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(VALID)
    reader = SafetensorsReader(path)
    reader.close()
    reader.close()
    with pytest.raises(ValueError, match="is closed"):
        reader.read_bytes("flag")


def test_file_sha256_streams_in_chunks(tmp_path: Path) -> None:
    content = np.random.default_rng(5).integers(0, 256, 2_500_000, dtype=np.uint8).tobytes()
    path = tmp_path / "blob"
    path.write_bytes(content)
    assert file_sha256(path) == hashlib.sha256(content).hexdigest()
    with pytest.raises(UnreadableFileError, match="file not found"):
        file_sha256(tmp_path / "nope")


# ---------------------------------------------------------------------------
# Atomic writing


def u8_entry(name: str, value: bytes, shape: tuple[int, ...] | None = None) -> TensorEntry:
    return TensorEntry(name, "U8", shape if shape is not None else (len(value),), lambda: value)


def test_failed_check_leaves_destination_untouched(tmp_path: Path) -> None:
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"previous result")
    seen: list[Path] = []

    def check(temp: Path) -> None:
        seen.append(temp)
        # The check sees a complete file beside the destination.
        assert temp.parent == tmp_path and temp != dest
        assert read_header(temp).tensors["w"].nbytes == 3
        raise CorruptFileError("did not read back", temp, "report a bug")

    with pytest.raises(CorruptFileError, match="did not read back"):
        write_safetensors(dest, [u8_entry("w", b"abc")], {"a": "b"}, check=check)
    assert len(seen) == 1
    assert dest.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_passing_check_replaces_destination(tmp_path: Path) -> None:
    dest = tmp_path / "out.safetensors"
    dest.write_bytes(b"previous result")
    checked: list[Path] = []
    result = write_safetensors(dest, [u8_entry("w", b"abc")], None, check=checked.append)
    assert result == dest and len(checked) == 1
    assert not checked[0].exists()
    with SafetensorsReader(dest) as reader:
        assert reader.read_bytes("w") == b"abc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors"]


def test_written_file_permissions_follow_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        dest = write_safetensors(tmp_path / "out.safetensors", [u8_entry("w", b"a")], None)
    finally:
        os.umask(old)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o644


def test_wrong_data_length_is_a_bug_and_cleans_up(tmp_path: Path) -> None:
    dest = tmp_path / "out.safetensors"
    with pytest.raises(
        ValueError, match="tensor 'w': data\\(\\) gave 2 bytes, shape \\[3\\] of U8 needs 3"
    ):
        write_safetensors(dest, [u8_entry("w", b"ab", shape=(3,))], None)
    assert list(tmp_path.iterdir()) == []


def test_failing_data_source_cleans_up(tmp_path: Path) -> None:
    def boom() -> bytes:
        raise UnreadableFileError("source vanished", "in.safetensors", "check the path")

    with pytest.raises(UnreadableFileError, match="source vanished"):
        write_safetensors(tmp_path / "out.safetensors", [TensorEntry("w", "U8", (1,), boom)], None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([u8_entry("w", b"a"), u8_entry("w", b"b")], "tensor 'w' given twice"),
        ([TensorEntry("w", "U16", (1,), lambda: b"ab")], "unknown dtype 'U16'"),
        ([u8_entry("__metadata__", b"a")], "cannot be a tensor name"),
        ([TensorEntry("w", "U8", (-1,), lambda: b"")], "invalid shape"),
    ],
)
def test_bad_entries_are_caller_bugs(
    tmp_path: Path, entries: list[TensorEntry], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        write_safetensors(tmp_path / "out.safetensors", entries, None)
    assert list(tmp_path.iterdir()) == []


def test_unwritable_destination_is_output_error(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "out.safetensors"
    with pytest.raises(OutputError) as caught:
        write_safetensors(missing, [u8_entry("w", b"a")], None)
    assert str(missing) in str(caught.value)
    assert "No such file or directory" in str(caught.value)

    folder = tmp_path / "taken.safetensors"
    folder.mkdir()
    with pytest.raises(OutputError) as caught:
        write_safetensors(folder, [u8_entry("w", b"a")], None)
    assert str(folder) in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken.safetensors"]
