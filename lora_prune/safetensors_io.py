"""Safe reading and atomic writing of safetensors files, without the safetensors package.

LoRA files come from the internet, so everything here treats input as hostile:
pickle checkpoints are refused before a byte is interpreted, the JSON header is
validated field by field, and tensor data is read one tensor at a time so that
memory stays near the largest tensor, not the file size. Floats of every width a
FLUX LoRA ships in (F32, F16, BF16, FP8 e4m3fn/e5m2) decode to float32 with numpy
alone, so statistics never need torch; :func:`encode_array` writes them back.

Writing goes to a temp file in the destination folder, is checked by the caller,
and only then renamed over the destination, so a crash or a failed check never
leaves a half-written LoRA where the user expects a good one.

One module of about 800 lines, on purpose: the reader, the dtype codecs and the
writer share the header rules and dtype tables, and the format is small enough
that one file holds all of it.
"""

from __future__ import annotations

import bisect
import errno
import hashlib
import io
import json
import math
import os
import stat
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from lora_prune.boundedjson import JsonLimitError, loads_bounded
from lora_prune.errors import (
    CorruptFileError,
    IncompleteFileError,
    NotSafetensorsError,
    UnreadableFileError,
    UnsafeFileError,
)
from lora_prune.fileio import atomic_output

__all__ = [
    "DTYPE_ITEMSIZE",
    "ENCODABLE_DTYPES",
    "HEADER_SIZE_LIMIT",
    "SafetensorsHeader",
    "SafetensorsReader",
    "TensorEntry",
    "TensorInfo",
    "build_header",
    "decode_array",
    "encode_array",
    "file_sha256",
    "read_header",
    "write_safetensors",
]

DTYPE_ITEMSIZE: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}

# The official library refuses bigger headers too; a LoRA header is well under 1 MiB.
HEADER_SIZE_LIMIT = 100 * 1024 * 1024

# Position of each dtype in the official writer's layout: it sorts by its Rust
# `Dtype` enum, descending, which groups by alignment but is not plain itemsize
# order (I64 before F64, F32 before I32). Matching it makes our files
# byte-identical to `safetensors.torch.save` for the same tensors.
_WRITE_ORDER: dict[str, int] = {
    name: rank
    for rank, name in enumerate(
        ["I64", "F64", "F32", "I32", "BF16", "F16", "I16", "F8_E4M3", "F8_E5M2", "I8", "U8", "BOOL"]
    )
}

_SNIFF_BYTES = 4096
_HASH_CHUNK = 1024 * 1024
#: What a hashing reader keeps of tensors it read ahead of their turn.
_STASH_LIMIT = 256 * 1024 * 1024
# One pread per tensor; Linux caps a single read near 2 GiB, so bigger ones loop.
_MAX_SINGLE_READ = 1 << 30

_REDOWNLOAD = "download the file again"
_CORRUPT_FIX = "the file is damaged or not a safetensors file; download it again"


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are in the file and how to interpret them."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated header: every tensor lies inside the file and none overlap."""

    path: Path
    file_size: int
    data_offset: int
    metadata: dict[str, str]
    tensors: dict[str, TensorInfo]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor's shape, by name (what checkpoint readers look at)."""
        return {name: info.shape for name, info in self.tensors.items()}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor to write; ``data`` is called once, when its turn comes, to stream."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    data: Callable[[], bytes]


# ---------------------------------------------------------------------------
# Reading


def _unreadable(path: Path, exc: OSError) -> UnreadableFileError:
    if isinstance(exc, FileNotFoundError):
        return UnreadableFileError("file not found", path, "check the path")
    if isinstance(exc, IsADirectoryError):
        return UnreadableFileError("is a folder, not a file", path, "give the .safetensors file")
    if isinstance(exc, PermissionError):
        return UnreadableFileError("permission denied", path, "check the file's permissions")
    reason = exc.strerror or exc.__class__.__name__
    return UnreadableFileError(f"cannot read file ({reason})", path, "check the file and its disk")


def _open_regular(path: Path) -> io.BufferedReader:
    """Open for reading, refusing folders and devices (a FIFO would block forever)."""
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, "Is a directory", str(path))
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFileError(
                "not a regular file", path, "give the path of a .safetensors file"
            )
        return open(path, "rb")
    except OSError as exc:
        raise _unreadable(path, exc) from exc


def _pread(f: io.BufferedReader, n: int, offset: int) -> bytes:
    """Read up to ``n`` bytes at ``offset``; shorter only at end of file."""
    if n <= 0:
        return b""
    if hasattr(os, "pread"):
        first = os.pread(f.fileno(), min(n, _MAX_SINGLE_READ), offset)
        if len(first) == n or not first:
            return first
        parts = [first]
        got = len(first)
        while got < n:
            chunk = os.pread(f.fileno(), min(n - got, _MAX_SINGLE_READ), offset + got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)
    f.seek(offset)
    return f.read(n)


def _pread_into(f: io.BufferedReader, buf: bytearray, offset: int) -> int:
    """Fill ``buf`` from ``offset``; returns how many bytes were read (less at EOF)."""
    view = memoryview(buf)
    got = 0
    while got < len(buf):
        target = view[got : got + _MAX_SINGLE_READ]
        if hasattr(os, "preadv"):
            n = os.preadv(f.fileno(), [target], offset + got)
        else:
            f.seek(offset + got)
            n = f.readinto(target)
        if not n:
            break
        got += n
    return got


def sniff_head(head: bytes, path: Path) -> None:
    """Refuse the usual wrong downloads before interpreting any byte as a header."""
    if not head:
        raise NotSafetensorsError("empty file", path, _REDOWNLOAD)
    if head.startswith(b"PK\x03\x04"):
        raise UnsafeFileError(
            "zip archive as torch.save writes for .pt/.ckpt/.bin checkpoints (pickle code "
            "inside): refusing to load it",
            path,
            "lora-prune never unpickles files: get the .safetensors version of this LoRA",
        )
    if head.startswith(b"version https://git-lfs"):
        raise NotSafetensorsError(
            "git-LFS pointer file, not the LoRA itself",
            path,
            "run `git lfs pull` in the repository or download the real file",
        )
    text = head.removeprefix(b"\xef\xbb\xbf").lstrip().lower()
    if text.startswith((b"<!doctype", b"<html")):
        raise NotSafetensorsError(
            "web page (HTML), not a safetensors file",
            path,
            "the link gave a web page: download the file itself",
        )
    text_start = _text_start(head)
    if text_start is not None:
        raise NotSafetensorsError(
            f"a text file, not a safetensors file (it begins {text_start!r})",
            path,
            "this is not the LoRA's weights: download the .safetensors file itself",
        )
    # A pickle starts with PROTO (0x80) and a protocol number. A safetensors file
    # whose header length happens to start with the same two bytes (e.g. 640) has
    # its JSON `{` at byte 8, which a pickle never has there.
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[8:9] != b"{":
        raise UnsafeFileError(
            f"pickle data (protocol {head[1]}) as in .pt/.ckpt/.bin checkpoints: "
            "refusing to load it",
            path,
            "lora-prune never unpickles files: get the .safetensors version of this LoRA",
        )


def _text_start(head: bytes) -> str | None:
    """The first line of ``head`` when it is text (UTF-8, printable), else None.

    A safetensors file starts with its header's length, 8 little-endian bytes
    that hold NULs for any length below 2**56: text there is never a header.
    """
    sample = head[:512]
    if len(sample) < 8 or b"\x00" in sample[:8]:
        return None
    try:
        text = sample.decode("utf-8")
    except UnicodeDecodeError as exc:
        if exc.start < len(sample) - 3:  # not merely a character cut at the end
            return None
        text = sample[: exc.start].decode("utf-8")
    if not all(c.isprintable() or c in "\t\n\r" for c in text):
        return None
    first = text.lstrip("\ufeff").strip().split("\n", 1)[0].strip()
    return first[:40] + ("..." if len(first) > 40 else "")


class _DuplicateKeyError(Exception):  # not ValueError: loads_bounded wraps those
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def _is_int(value: object) -> bool:
    # bool is an int subclass in Python; `true` is not a valid size in a header.
    return type(value) is int


_LIMIT = 1 << 63  # no file offset or size reaches this


def _short(value: object) -> str:
    """repr for messages; a hostile header may hold megabyte-long lists or huge numbers."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's digit limit for str()
        return "<huge number>"
    return text if len(text) <= 80 else text[:77] + "..."


def _bounded_numel(shape: tuple[int, ...]) -> int:
    """Element count, or _LIMIT when it is too large for any file to hold.

    Multiplying a hostile shape of many huge dims exactly would take minutes and
    gigabytes; past _LIMIT the answer no longer matters.
    """
    if 0 in shape:
        return 0
    numel = 1
    for dim in shape:
        numel *= dim
        if numel >= _LIMIT:
            return _LIMIT
    return numel


def _parse_entry(key: str, raw: object, path: Path) -> tuple[str, tuple[int, ...], int, int]:
    def bad(what: str) -> CorruptFileError:
        return CorruptFileError(f"tensor {_short(key)} {what}", path, _CORRUPT_FIX)

    if not isinstance(raw, dict):
        raise bad("has a header entry that is not a JSON object")
    for field in ("dtype", "shape", "data_offsets"):
        if field not in raw:
            raise bad(f"has no {field!r} in its header entry")
    dtype = raw["dtype"]
    if not isinstance(dtype, str) or dtype not in DTYPE_ITEMSIZE:
        raise bad(f"has unsupported dtype {_short(dtype)} (supported: {' '.join(DTYPE_ITEMSIZE)})")
    shape = raw["shape"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad(f"has invalid shape {_short(shape)} (need a list of non-negative integers)")
    offsets = raw["data_offsets"]
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1] < _LIMIT
    ):
        raise bad(
            f"has invalid data_offsets {_short(offsets)} (need [begin, end], 0 <= begin <= end)"
        )
    begin, end = offsets[0], offsets[1]
    shape_t = tuple(shape)
    expected = _bounded_numel(shape_t) * DTYPE_ITEMSIZE[dtype]
    if end - begin != expected:
        needs = str(expected) if expected < _LIMIT else "more than 2**63"
        raise bad(
            f"has {end - begin} bytes of data but shape {_short(list(shape_t))} of {dtype} "
            f"needs {needs}"
        )
    return dtype, shape_t, begin, end


_Entry = tuple[int, int, str, str, tuple[int, ...]]


def _parse_header(f: io.BufferedReader, path: Path, file_size: int) -> SafetensorsHeader:
    raw, data_offset = _header_bytes(f, path, file_size)
    doc = _decode_header(raw, path)
    metadata = _parse_metadata(doc.pop("__metadata__", None), path)
    parsed: list[_Entry] = []
    for key, entry in doc.items():
        dtype, shape, begin, end = _parse_entry(key, entry, path)
        parsed.append((begin, end, key, dtype, shape))
    parsed.sort()
    _check_layout(parsed, path, file_size, data_offset)
    tensors = {
        key: TensorInfo(key, dtype, shape, data_offset + begin, data_offset + end)
        for begin, end, key, dtype, shape in parsed
    }
    return SafetensorsHeader(path, file_size, data_offset, metadata, tensors)


def _header_bytes(f: io.BufferedReader, path: Path, file_size: int) -> tuple[bytes, int]:
    """The JSON header's bytes, and where the tensor data starts, after checking the frame."""
    head = _pread(f, min(file_size, _SNIFF_BYTES), 0)
    sniff_head(head, path)
    if len(head) < 8:
        raise IncompleteFileError(
            f"incomplete download: {len(head)} of at least 8 bytes", path, _REDOWNLOAD
        )
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > HEADER_SIZE_LIMIT:
        raise CorruptFileError(
            f"header length {header_len} bytes exceeds the "
            f"{HEADER_SIZE_LIMIT // (1024 * 1024)} MiB limit",
            path,
            _CORRUPT_FIX,
        )
    if header_len < 2:
        raise CorruptFileError(
            f"header length {header_len} is too small for a JSON header", path, _CORRUPT_FIX
        )
    if len(head) > 8 and head[8:9] != b"{":
        raise CorruptFileError(
            "header does not start with '{' (not a safetensors JSON header)", path, _CORRUPT_FIX
        )
    data_offset = 8 + header_len
    if data_offset > file_size:
        raise IncompleteFileError(
            f"incomplete download: {file_size} of at least {data_offset} bytes",
            path,
            _REDOWNLOAD,
        )
    raw = head[8:data_offset] if data_offset <= len(head) else _pread(f, header_len, 8)
    if len(raw) != header_len:
        raise IncompleteFileError(
            f"incomplete download: {8 + len(raw)} of at least {data_offset} bytes",
            path,
            _REDOWNLOAD,
        )
    return raw, data_offset


def _decode_header(raw: bytes, path: Path) -> dict[str, Any]:
    """The header's JSON object, bounded and without duplicate keys."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CorruptFileError(
            f"header is not valid UTF-8 (byte {8 + exc.start})", path, _CORRUPT_FIX
        ) from exc
    try:
        doc = loads_bounded(text, max_bytes=HEADER_SIZE_LIMIT, object_pairs_hook=_no_duplicates)
    except _DuplicateKeyError as exc:
        raise CorruptFileError(
            f"header has duplicate key {_short(exc.key)}", path, _CORRUPT_FIX
        ) from exc
    except JsonLimitError as exc:
        raise CorruptFileError(f"header {exc.reason}", path, _CORRUPT_FIX) from exc
    if not isinstance(doc, dict):
        raise CorruptFileError("header is not a JSON object", path, _CORRUPT_FIX)
    return doc


def _parse_metadata(raw_meta: object, path: Path) -> dict[str, str]:
    """The ``__metadata__`` entry: string values only (None: no metadata)."""
    metadata: dict[str, str] = {}
    if raw_meta is not None:
        if not isinstance(raw_meta, dict):
            raise CorruptFileError(
                "header key '__metadata__' is not a JSON object", path, _CORRUPT_FIX
            )
        for mkey, mvalue in raw_meta.items():
            if not isinstance(mvalue, str):
                raise CorruptFileError(
                    f"header key '__metadata__' entry {_short(mkey)} is not a string",
                    path,
                    _CORRUPT_FIX,
                )
            metadata[mkey] = mvalue
    return metadata


def _check_layout(parsed: list[_Entry], path: Path, file_size: int, data_offset: int) -> None:
    """No two tensors overlap and all lie within the data; a cut-off file is incomplete."""
    data_size = file_size - data_offset
    # Sorted by begin, a tensor overlaps an earlier one iff it starts before the
    # furthest end seen so far; empty tensors occupy no bytes and cannot overlap.
    reach = 0
    reach_key = ""
    covered_to = 0
    contiguous = True
    for begin, end, key, _, _ in parsed:
        if begin == end:
            continue
        if begin < reach:
            raise CorruptFileError(
                f"tensor {_short(key)} overlaps tensor {_short(reach_key)} in the data",
                path,
                _CORRUPT_FIX,
            )
        contiguous = contiguous and begin == covered_to
        covered_to = end
        reach, reach_key = end, key

    if reach > data_size:
        # A complete writer packs tensors back to back from offset 0, so a header
        # that does so but runs past the end is a cut download; one with holes
        # that points past the end is a broken header.
        if contiguous:
            raise IncompleteFileError(
                f"incomplete download: {file_size} of {data_offset + reach} bytes",
                path,
                _REDOWNLOAD,
            )
        raise CorruptFileError(
            f"tensor {_short(reach_key)} data_offsets end at {reach}, beyond the "
            f"{data_size} bytes of data",
            path,
            _CORRUPT_FIX,
        )
    for begin, end, key, _, _ in parsed:
        if end > data_size:  # only empty tensors are left unchecked by `reach`
            raise CorruptFileError(
                f"tensor {_short(key)} data_offsets [{begin}, {end}] lie beyond the "
                f"{data_size} bytes of data",
                path,
                _CORRUPT_FIX,
            )


def _file_size(f: io.BufferedReader, path: Path) -> int:
    try:
        return os.fstat(f.fileno()).st_size
    except OSError as exc:
        raise _unreadable(path, exc) from exc


def read_header(path: str | Path) -> SafetensorsHeader:
    """Sniff and validate a safetensors file, reading only its header.

    Raises :class:`UnreadableFileError` or a subclass for anything that is not a
    complete, consistent safetensors file.
    """
    p = Path(path)
    with _open_regular(p) as f:
        try:
            return _parse_header(f, p, _file_size(f, p))
        except OSError as exc:
            raise _unreadable(p, exc) from exc


# Numpy dtypes for the formats that numpy reads as they are (safetensors is little-endian).
_NATIVE: dict[str, str] = {
    "F64": "<f8",
    "F32": "<f4",
    "I64": "<i8",
    "I32": "<i4",
    "I16": "<i2",
    "I8": "i1",
    "U8": "u1",
}


def _fp8_table(exp_bits: int, man_bits: int, bias: int, ieee_specials: bool) -> npt.NDArray[Any]:
    """float32 value of each of the 256 codes of an FP8 format.

    ``ieee_specials``: e5m2 keeps IEEE inf/NaN at the top exponent; e4m3fn ("fn"
    = finite) has no inf and uses only all-ones exponent+mantissa as NaN.
    """
    codes = np.arange(256, dtype=np.int64)
    sign = np.where(codes >> 7 == 1, -1.0, 1.0)
    exp = (codes >> man_bits) & ((1 << exp_bits) - 1)
    man = codes & ((1 << man_bits) - 1)
    scale = float(1 << man_bits)
    normal = (1.0 + man / scale) * np.exp2(exp.astype(np.float64) - bias)
    subnormal = (man / scale) * 2.0 ** (1 - bias)
    values = sign * np.where(exp == 0, subnormal, normal)
    top = (1 << exp_bits) - 1
    if ieee_specials:
        values = np.where((exp == top) & (man == 0), sign * np.inf, values)
        values = np.where((exp == top) & (man != 0), np.nan, values)
    else:
        values = np.where((exp == top) & (man == (1 << man_bits) - 1), np.nan, values)
    table: npt.NDArray[Any] = values.astype(np.float32)
    table.flags.writeable = False
    return table


_FP8_E4M3FN = _fp8_table(4, 3, 7, ieee_specials=False)
_FP8_E5M2 = _fp8_table(5, 2, 15, ieee_specials=True)


def decode_array(
    raw: bytes | bytearray | memoryview, dtype: str, shape: tuple[int, ...]
) -> npt.NDArray[Any]:
    """Decode one tensor's little-endian bytes into a writable numpy array.

    Float dtypes become float32 (F64 stays float64); integers and bools keep
    their own numpy dtype. When no conversion is needed and ``raw`` is writable
    (a ``bytearray``) the array shares its memory instead of copying it. A
    length that does not match ``shape`` is a caller bug (headers are validated
    before reading) and raises ``ValueError``.
    """
    if dtype not in DTYPE_ITEMSIZE:
        raise ValueError(f"unknown safetensors dtype {dtype!r}")
    view = memoryview(raw).cast("B")
    expected = math.prod(shape) * DTYPE_ITEMSIZE[dtype]
    if view.nbytes != expected:
        raise ValueError(
            f"{view.nbytes} bytes do not hold a {dtype} tensor of shape {list(shape)} "
            f"({expected} bytes)"
        )
    out: npt.NDArray[Any]
    if dtype == "BF16":
        # bfloat16 is the top half of a float32: widen and shift, exact for every code.
        widened = np.frombuffer(view, dtype="<u2").astype(np.uint32)
        widened <<= 16  # in place: one float32-sized allocation per tensor, not two
        out = widened.view(np.float32)
    elif dtype == "F16":
        out = np.frombuffer(view, dtype="<f2").astype(np.float32)
    elif dtype == "F8_E4M3":
        out = _FP8_E4M3FN[np.frombuffer(view, dtype=np.uint8)]
    elif dtype == "F8_E5M2":
        out = _FP8_E5M2[np.frombuffer(view, dtype=np.uint8)]
    elif dtype == "BOOL":
        # Any non-zero byte is true; a numpy bool holding 2 would compare oddly.
        out = np.frombuffer(view, dtype=np.uint8) != 0
    else:
        src = np.frombuffer(view, dtype=_NATIVE[dtype])
        # frombuffer over immutable bytes is read-only; callers may scale in place.
        writable = src.flags.writeable and src.dtype.isnative
        out = src if writable else src.astype(src.dtype.newbyteorder("="))
    return out.reshape(shape)


#: Float dtypes :func:`encode_array` writes (the widths FLUX LoRAs ship in).
ENCODABLE_DTYPES: tuple[str, ...] = ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")


@lru_cache(maxsize=2)
def _fp8_codebook(dtype: str) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.uint8]]:
    """Finite values of an FP8 format in ascending order, and their codes.

    Decoding every code with the reader's own table means the encoder and the
    decoder cannot disagree on what a code is worth.
    """
    values = decode_array(bytes(range(256)), dtype, (256,)).astype(np.float64)
    codes = np.arange(256, dtype=np.uint8)
    finite = np.isfinite(values)
    order = np.argsort(values[finite], kind="stable")
    return values[finite][order], codes[finite][order]


def _encode_fp8(x: npt.NDArray[np.float32], dtype: str) -> bytes:
    values, codes = _fp8_codebook(dtype)
    flat = np.clip(x.astype(np.float64).reshape(-1), values[0], values[-1])
    hi = np.clip(np.searchsorted(values, flat), 1, len(values) - 1)
    lo = hi - 1
    d_lo, d_hi = flat - values[lo], values[hi] - flat
    # Round to nearest, ties to the even code (as IEEE and torch's casts do).
    take_lo = (d_lo < d_hi) | ((d_lo == d_hi) & (codes[lo] % 2 == 0))
    return np.where(take_lo, codes[lo], codes[hi]).astype(np.uint8).tobytes()


def encode_array(values: npt.ArrayLike, dtype: str) -> bytes:
    """Little-endian bytes of ``values`` in a safetensors float dtype.

    BF16 rounds float32 to its upper 16 bits (to nearest, ties to even); FP8
    takes the nearest finite code (ties to even), saturating at the largest.
    """
    x = np.asarray(values, dtype=np.float32)
    if dtype == "F32":
        return x.astype("<f4").tobytes()
    if dtype == "F16":
        return x.astype("<f2").tobytes()
    if dtype == "BF16":
        # uint64 constants: numpy < 2 promotes uint64 with a Python int to float64.
        bits = x.view(np.uint32).astype(np.uint64)
        one, sixteen = np.uint64(1), np.uint64(16)
        rounded = (bits + np.uint64(0x7FFF) + ((bits >> sixteen) & one)) >> sixteen
        return rounded.astype("<u2").tobytes()
    if dtype in ("F8_E4M3", "F8_E5M2"):
        return _encode_fp8(x, dtype)
    raise ValueError(f"cannot encode dtype {dtype!r}; use one of {', '.join(ENCODABLE_DTYPES)}")


class SafetensorsReader:
    """An open safetensors file from which tensors are read one at a time.

    On POSIX every read is positional (``pread``), so threads may share a
    reader; where the OS lacks it reads seek, and a reader must stay in one thread.
    """

    header: SafetensorsHeader

    def __init__(
        self, path: str | Path, header: SafetensorsHeader | None = None, *, sha256: bool = False
    ) -> None:
        self.path = Path(path)
        # With sha256, the file's hash is taken from the same reads as the tensors
        # (see file_sha256): a command that needs both reads the data once.
        self._digest = hashlib.sha256() if sha256 else None
        self._hashed = 0
        # Tensors read for the hash ahead of their turn, until their read_array.
        self._stash: dict[str, bytearray] = {}
        self._stash_bytes = 0
        self._starts: dict[int, TensorInfo] | None = None
        self._begins: list[int] = []
        self._file: io.BufferedReader | None = _open_regular(self.path)
        try:
            size = _file_size(self._file, self.path)
            if header is None:
                try:
                    header = _parse_header(self._file, self.path, size)
                except OSError as exc:
                    raise _unreadable(self.path, exc) from exc
            elif size != header.file_size:
                raise UnreadableFileError(
                    f"file changed since it was checked ({header.file_size} -> {size} bytes)",
                    self.path,
                    "run again and do not modify the file while lora-prune reads it",
                )
        except BaseException:
            self.close()
            raise
        self.header = header

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open_file(self) -> io.BufferedReader:
        if self._file is None:
            raise ValueError(f"reader for {self.path} is closed")
        return self._file

    def _short_read(self, info: TensorInfo, got: int) -> IncompleteFileError:
        return IncompleteFileError(
            f"file ended while reading tensor {info.name!r} ({got} of {info.nbytes} bytes); "
            "it changed or shrank after its header was read",
            self.path,
            _REDOWNLOAD,
        )

    def read_bytes(self, name: str) -> bytes:
        """Raw little-endian bytes of one tensor."""
        info = self.header.tensors[name]
        try:
            data = _pread(self._open_file(), info.nbytes, info.begin)
        except OSError as exc:
            raise _unreadable(self.path, exc) from exc
        if len(data) != info.nbytes:
            raise self._short_read(info, len(data))
        return data

    def read_array(self, name: str) -> npt.NDArray[Any]:
        """One tensor decoded by :func:`decode_array` (floats as float32)."""
        info = self.header.tensors[name]
        buf = self._stash.pop(name, None)
        if buf is not None:
            self._stash_bytes -= len(buf)
        else:
            self._hash_to(info.begin)
            buf = self._read_tensor(info)
            if self._digest is not None and info.begin == self._hashed:
                self._digest.update(buf)
                self._hashed += info.nbytes
        return decode_array(buf, info.dtype, info.shape)

    def _read_tensor(self, info: TensorInfo) -> bytearray:
        # Read into a mutable buffer so that decode_array can return it without a copy.
        buf = bytearray(info.nbytes)
        try:
            got = _pread_into(self._open_file(), buf, info.begin)
        except OSError as exc:
            raise _unreadable(self.path, exc) from exc
        if got != info.nbytes:
            raise self._short_read(info, got)
        return buf

    def _hash_to(self, offset: int) -> None:
        """Hash the file up to ``offset``, keeping tensors read on the way for their read_array.

        A module's tensors are usually adjacent but read in another order (up
        before down), so what the hash reads ahead is kept, up to a bound, and
        not read again.
        """
        if self._digest is None:
            return
        if self._starts is None:
            self._starts = {t.begin: t for t in self.header.tensors.values() if t.nbytes}
            self._begins = sorted(self._starts)
        while self._hashed < offset:
            info = self._starts.get(self._hashed)
            if info is not None and info.end <= offset:
                buf = self._read_tensor(info)
                if self._stash_bytes + len(buf) <= _STASH_LIMIT:
                    self._stash[info.name] = buf
                    self._stash_bytes += len(buf)
                self._digest.update(buf)
                self._hashed = info.end
                continue
            # Bytes that are no tensor (header, gaps): up to the next tensor, in chunks.
            i = bisect.bisect_right(self._begins, self._hashed)
            stop = min(offset, self._begins[i]) if i < len(self._begins) else offset
            self._hash_bytes(min(stop, self._hashed + _HASH_CHUNK))

    def _hash_bytes(self, stop: int) -> None:
        """Hash the bytes that are no tensor (the header, gaps) from ``_hashed`` to ``stop``."""
        n = stop - self._hashed
        try:
            data = _pread(self._open_file(), n, self._hashed)
        except OSError as exc:
            raise _unreadable(self.path, exc) from exc
        if len(data) != n:
            raise IncompleteFileError(
                f"file ended at byte {self._hashed + len(data)} while hashing it",
                self.path,
                _REDOWNLOAD,
            )
        assert self._digest is not None
        self._digest.update(data)
        self._hashed = stop

    def sha256(self) -> str:
        """The whole file's hex SHA-256 (a reader opened with ``sha256=True``).

        Tensors read in file order were hashed as they were read; the rest
        (header, tensors not read, gaps) is read now. Equal to :func:`file_sha256`.
        """
        if self._digest is None:
            raise ValueError("this reader was not opened with sha256=True")
        self._hash_to(self.header.file_size)
        return self._digest.hexdigest()


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed in 1 MiB chunks."""
    p = Path(path)
    digest = hashlib.sha256()
    buf = bytearray(_HASH_CHUNK)
    view = memoryview(buf)
    with _open_regular(p) as f:
        try:
            while n := f.readinto(view):
                digest.update(view[:n])
        except OSError as exc:
            raise _unreadable(p, exc) from exc
    return digest.hexdigest()


# ---------------------------------------------------------------------------
# Writing


def build_header(
    entries: Sequence[TensorEntry], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[tuple[TensorEntry, int]]]:
    """The bytes :func:`write_safetensors` puts before the data, and its tensor order.

    Returns the length prefix plus padded JSON header (so ``len()`` of it is the
    data's file offset) and the entries in file order, each with its byte size.
    Lets callers hash or size an output before writing it. Bad entries raise
    ``ValueError``; ``data`` is not called.
    """
    seen: set[str] = set()
    for entry in entries:
        if entry.dtype not in DTYPE_ITEMSIZE:
            raise ValueError(f"tensor {entry.name!r}: unknown dtype {entry.dtype!r}")
        if entry.name == "__metadata__":
            raise ValueError("'__metadata__' cannot be a tensor name")
        if entry.name in seen:
            raise ValueError(f"tensor {entry.name!r} given twice")
        if not all(_is_int(d) and d >= 0 for d in entry.shape):
            raise ValueError(f"tensor {entry.name!r}: invalid shape {entry.shape!r}")
        seen.add(entry.name)
    ordered = sorted(entries, key=lambda e: (_WRITE_ORDER[e.dtype], e.name))

    doc: dict[str, object] = {}
    if metadata is not None:
        for key, value in metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise ValueError(f"metadata {key!r}: keys and values must be strings")
        doc["__metadata__"] = dict(metadata)
    sized: list[tuple[TensorEntry, int]] = []
    offset = 0
    for entry in ordered:
        nbytes = math.prod(entry.shape) * DTYPE_ITEMSIZE[entry.dtype]
        doc[entry.name] = {
            "dtype": entry.dtype,
            "shape": list(entry.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        sized.append((entry, nbytes))
        offset += nbytes
    # Compact separators and raw UTF-8 match the official (serde_json) output.
    text = json.dumps(doc, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    # Spaces up to a multiple of 8 keep the data 8-byte aligned, as the official writer does.
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, sized


def write_safetensors(
    dest: str | Path,
    entries: Sequence[TensorEntry],
    metadata: Mapping[str, str] | None,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write a safetensors file atomically and return its path.

    The file is written to a temp file beside ``dest``, flushed and fsynced, then
    ``check(temp_path)`` runs; if it raises, the temp file is removed, ``dest``
    is left as it was and the exception propagates. Otherwise the temp file
    replaces ``dest``. A ``data()`` of the wrong length or a bad entry is a bug
    in the caller and raises ``ValueError``; filesystem failures raise
    :class:`OutputError`.
    """
    dest_path = Path(dest)
    header, sized = build_header(entries, metadata)
    with atomic_output(dest_path, check) as f:
        f.write(header)
        for entry, nbytes in sized:
            data = entry.data()
            got = memoryview(data).nbytes
            if got != nbytes:
                raise ValueError(
                    f"tensor {entry.name!r}: data() gave {got} bytes, shape "
                    f"{list(entry.shape)} of {entry.dtype} needs {nbytes}"
                )
            f.write(data)
    return dest_path
