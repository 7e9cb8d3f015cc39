"""Generators of hostile and broken "safetensors" files, shared by the reader and CLI tests.

Each corpus entry is a file a user could plausibly point lora-prune at (a pickle
checkpoint renamed to .safetensors, an LFS pointer, an HTML error page, a cut
download, a tampered header) together with the exact error class and a message
fragment the reader must produce for it. Files are built byte by byte here,
independently of the library's writer, so that a writer bug cannot hide a reader
bug.
"""

from __future__ import annotations

import json
import pickle
import struct
from pathlib import Path

from lora_prune.errors import (
    CorruptFileError,
    IncompleteFileError,
    LoraPruneError,
    NotSafetensorsError,
    UnreadableFileError,
    UnsafeFileError,
)

Corpus = dict[str, tuple[Path, type[LoraPruneError], str]]


def pack(header: dict[str, object] | str | bytes, data: bytes = b"", pad: bool = True) -> bytes:
    """A safetensors file from a header (object, JSON text or raw bytes) and a data section.

    ``pad`` adds spaces up to a multiple of 8, as real writers do.
    """
    if isinstance(header, dict):
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    elif isinstance(header, str):
        raw = header.encode("utf-8")
    else:
        raw = header
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


def valid_file_bytes() -> bytes:
    """A small, complete, valid file: a LoRA pair in BF16, an F32 alpha and a U8 flag.

    The data values are arbitrary but fixed; 0x3F80 is 1.0 in bfloat16.
    """
    down = struct.pack("<8H", *([0x3F80] * 4 + [0xBF80] * 4))  # 2x4 bf16: 1.0 and -1.0
    up = struct.pack("<6H", *range(0x4000, 0x4006))  # 3x2 bf16, 2.0 upwards
    alpha = struct.pack("<f", 4.0)
    flag = b"\x01"
    header: dict[str, object] = {
        "__metadata__": {"format": "pt", "ss_network_dim": "2"},
        "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": {
            "dtype": "BF16",
            "shape": [2, 4],
            "data_offsets": [0, 16],
        },
        "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": {
            "dtype": "BF16",
            "shape": [3, 2],
            "data_offsets": [16, 28],
        },
        "lora_unet_double_blocks_0_img_attn_proj.alpha": {
            "dtype": "F32",
            "shape": [],
            "data_offsets": [28, 32],
        },
        "flag": {"dtype": "U8", "shape": [1], "data_offsets": [32, 33]},
    }
    return pack(header, down + up + alpha + flag)


def _one(name: str, dtype: str, shape: list[object], offsets: list[object]) -> dict[str, object]:
    return {name: {"dtype": dtype, "shape": shape, "data_offsets": offsets}}


def make_hostile_corpus(dir: Path) -> Corpus:
    """Write every hostile file into ``dir``; name -> (path, error class, message fragment).

    The error class is the exact class expected (not a base class). Two entries
    are not files: ``missing`` does not exist and ``directory`` is a folder.
    """
    import torch  # only here: CLI tests that never build the corpus stay torch-free

    dir.mkdir(parents=True, exist_ok=True)
    corpus: Corpus = {}

    def put(
        name: str, content: bytes, cls: type[LoraPruneError], fragment: str, suffix: str = ""
    ) -> None:
        path = dir / f"{name}{suffix or '.safetensors'}"
        path.write_bytes(content)
        corpus[name] = (path, cls, fragment)

    torch_path = dir / "torch_zip.safetensors"
    torch.save({"lora_down.weight": torch.zeros(2, 2)}, torch_path)
    corpus["torch_zip"] = (torch_path, UnsafeFileError, "torch.save")

    harmless = {"lora_down.weight": [0.0, 1.0], "alpha": 4}
    put(
        "raw_pickle",
        pickle.dumps(harmless, protocol=4),
        UnsafeFileError,
        "pickle data (protocol 4)",
    )
    put("raw_pickle_p2", pickle.dumps(harmless, protocol=2), UnsafeFileError, "(protocol 2)")
    put(
        "lfs_pointer",
        b"version https://git-lfs.github.com/spec/v1\n"
        b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        b"size 171969472\n",
        NotSafetensorsError,
        "run `git lfs pull`",
    )
    put(
        "html_doctype",
        b"\r\n  \t<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n",
        NotSafetensorsError,
        "web page (HTML)",
    )
    put("html_tag", b"<HTML><BODY>404 Not Found</BODY></HTML>", NotSafetensorsError, "web page")
    put("empty", b"", NotSafetensorsError, "empty file")
    put("tiny", b"\x10\x00\x00", IncompleteFileError, "incomplete download: 3 of at least 8 bytes")

    valid = valid_file_bytes()
    (header_len,) = struct.unpack("<Q", valid[:8])
    put(
        "truncated_header",
        valid[:40],
        IncompleteFileError,
        f"incomplete download: 40 of at least {8 + header_len} bytes",
    )
    cut = len(valid) - 10
    put(
        "truncated_data",
        valid[:cut],
        IncompleteFileError,
        f"incomplete download: {cut} of {len(valid)} bytes",
    )

    put(
        "header_too_big",
        struct.pack("<Q", 200 * 1024 * 1024) + b'{"a":' + b" " * 64,
        CorruptFileError,
        "exceeds the 100 MiB limit",
    )
    put("bad_json", pack('{"w": {"dtype": "F32",'), CorruptFileError, "header is not valid JSON")
    put(
        "not_brace",
        pack('["w", "F32"]', b""),
        CorruptFileError,
        "header does not start with '{'",
    )
    put("not_utf8", pack(b'{"w\xff\xfe": {}}'), CorruptFileError, "not valid UTF-8")
    put(
        "duplicate_key",
        pack(
            '{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
            '"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}',
            b"\x00" * 8,
        ),
        CorruptFileError,
        "header has duplicate key 'w'",
    )
    put(
        "bad_dtype",
        pack(_one("w", "F128", [1], [0, 16]), b"\x00" * 16),
        CorruptFileError,
        "tensor 'w' has unsupported dtype 'F128'",
    )
    put(
        "negative_shape",
        pack(_one("w", "F32", [-1, 4], [0, 16]), b"\x00" * 16),
        CorruptFileError,
        "tensor 'w' has invalid shape [-1, 4]",
    )
    put(
        "bool_in_shape",
        pack(_one("w", "F32", [True], [0, 4]), b"\x00" * 4),
        CorruptFileError,
        "tensor 'w' has invalid shape [True]",
    )
    overlap: dict[str, object] = {
        **_one("a", "F32", [4], [0, 16]),
        **_one("b", "F32", [2], [8, 16]),
    }
    put(
        "overlap",
        pack(overlap, b"\x00" * 16),
        CorruptFileError,
        "tensor 'b' overlaps tensor 'a'",
    )
    put(
        "size_mismatch",
        pack(_one("w", "F32", [2, 2], [0, 12]), b"\x00" * 12),
        CorruptFileError,
        "tensor 'w' has 12 bytes of data but shape [2, 2] of F32 needs 16",
    )
    put(
        "beyond_data",
        pack(_one("w", "F32", [4], [64, 80]), b"\x00" * 16),
        CorruptFileError,
        "tensor 'w' data_offsets end at 80, beyond the 16 bytes of data",
    )
    put(
        "bad_metadata",
        pack({"__metadata__": {"x": 1}, **_one("w", "U8", [1], [0, 1])}, b"\x00"),
        CorruptFileError,
        "'__metadata__' entry 'x' is not a string",
    )

    corpus["missing"] = (dir / "missing.safetensors", UnreadableFileError, "file not found")
    folder = dir / "folder.safetensors"
    folder.mkdir(exist_ok=True)
    corpus["directory"] = (folder, UnreadableFileError, "is a folder, not a file")
    return corpus
