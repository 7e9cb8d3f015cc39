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
import math
import pickle
import random
import re
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
    put(
        "text_readme",
        b"# My LoRA\n\nTrigger word: sks. Trained 2000 steps at rank 16.\n",
        NotSafetensorsError,
        "a text file, not a safetensors file (it begins '# My LoRA')",
    )
    put(
        "json_config",
        b'{\n  "_class_name": "FluxTransformer2DModel",\n  "num_layers": 19\n}\n',
        NotSafetensorsError,
        "a text file, not a safetensors file",
    )
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


# ---------------------------------------------------------------------------
# Fuzzing: seed LoRAs of every synthetic grammar and mutations of them, shared by
# tests/test_fuzz.py (hypothesis, in CI) and fuzz/fuzz_lora.py (atheris or plain, long runs).

#: Peak Python/numpy allocation one case may make (tracemalloc). Seeds are < 200 KB,
#: so anything near this is a parse that does not bound its work.
FUZZ_MEMORY_CAP = 128 * 1024 * 1024
#: Seconds one case may take before it counts as a hang.
FUZZ_TIME_CAP = 10.0
#: Largest mutated file the structured mutators write (tensor data is zeros).
_MAX_FUZZ_BYTES = 1 << 20

Tensors = list[tuple[str, str, list[int], bytes]]


def _seed_specs() -> list[object]:
    from lora_prune.testing import GRAMMARS, PEFT_METADATA_GRAMMARS, SynthSpec, supported_blocks

    specs: list[object] = []
    for grammar in GRAMMARS:
        supported = supported_blocks(grammar)
        blocks = tuple(b for b in ("double.0", "single.0", "final") if b in supported)
        te = "clip" in supported
        specs.append(SynthSpec(grammar=grammar, blocks=blocks, rank=2, text_encoders=te))
        if grammar in PEFT_METADATA_GRAMMARS:
            specs.append(
                SynthSpec(grammar=grammar, blocks=blocks, rank=2, alpha=3.0, alpha_in="metadata")
            )
    for adapter in ("loha", "lokr", "diff"):
        specs.append(SynthSpec(grammar="kohya", blocks=("double.0",), rank=2, adapter=adapter))
    specs.append(SynthSpec(grammar="comfyui", blocks=("single.0",), rank=2, dtype="F8_E4M3"))
    return specs


_SEEDS: list[tuple[dict[str, str], Tensors]] = []


def fuzz_seeds() -> list[tuple[dict[str, str], Tensors]]:
    """(metadata, tensors) of one small synthetic LoRA per grammar and adapter, built once."""
    if not _SEEDS:
        from lora_prune.testing import SynthSpec, synth_metadata, synth_tensors

        for spec in _seed_specs():
            assert isinstance(spec, SynthSpec)
            tensors = [(k, d, list(s), b) for k, (d, s, b) in synth_tensors(spec).items()]
            _SEEDS.append((dict(synth_metadata(spec)), tensors))
    return _SEEDS


def pack_tensors(metadata: dict[str, str] | None, tensors: Tensors) -> bytes:
    """A safetensors file of ``tensors`` laid out back to back (no validation: any shape)."""
    header: dict[str, object] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    data = bytearray()
    for key, dtype, shape, raw in tensors:
        header[key] = {
            "dtype": dtype,
            "shape": shape,
            "data_offsets": [len(data), len(data) + len(raw)],
        }
        data += raw
    return pack(header, bytes(data))


_ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "U8": 1}
_REGEX_ALPHABET = (
    list("abto_qkv.0123456789") + list(".*+?()[]{}|^$\\-,") + ["(a+)+", "(.*)*", "{999999999999}"]
)
_SUFFIXES = [
    ".lora_down.weight",
    ".lora_up.weight",
    ".lora_A.weight",
    ".lora_B.weight",
    ".alpha",
    ".lora_mid.weight",
    ".hada_w1_a",
    ".hada_w1_b",
    ".hada_w2_a",
    ".hada_w2_b",
    ".lokr_w1",
    ".lokr_w2",
    ".lokr_w1_a",
    ".lokr_w2_b",
    ".diff",
    ".diff_b",
    ".dora_scale",
    ".oft_blocks",
    "_lora.up.weight",
    "_lora.down.weight",
    ".lora_A",
    ".lora_B",
    ".set_weight",
]


#: Patterns that make a backtracking engine take exponential time on a module name.
_CATASTROPHIC = [
    "(.*.*)*z",
    "(\\w+\\w+)+!",
    "([a-z_.0-9]+)*!",
    "(a|aa)+$",
    "(" * 3000 + ")" * 3000,
    "a{99999999999999}",
]


def _regex(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return rng.choice(_CATASTROPHIC)
    return "".join(rng.choice(_REGEX_ALPHABET) for _ in range(rng.randint(0, 12)))


def _hostile_json(rng: random.Random) -> str:
    kind = rng.randrange(6)
    if kind == 0:
        depth = rng.choice([65, 1000, 100_000])
        return "[" * depth + "]" * depth
    if kind == 1:
        return '{"r": ' + "9" * rng.choice([41, 4301, 5000]) + "}"
    if kind == 2:
        return '{"r": 1e' + "9" * rng.randint(1, 400) + "}"
    if kind == 3:
        return "{" * rng.randint(1, 50)
    if kind == 4:
        return json.dumps(
            {
                "passed": rng.choice([True, False, 1, None]),
                "full_sha256": "0" * 64,
                "min_ssim": rng.choice([0.5, float("inf"), 10**30, "x"]),
            }
        )
    return json.dumps(rng.choice([[], 1, "s", None]))


def _peft_config(rng: random.Random) -> str:
    patterns = {
        _regex(rng): rng.choice([1, 2, 0, -1, 10**30, 1e308, True, "x"])
        for _ in range(rng.randint(1, 4))
    }
    config: dict[str, object] = {
        rng.choice(["r", "transformer.r"]): rng.choice([2, 0, -3, 1e-300, 10**19, None]),
        rng.choice(["lora_alpha", "transformer.lora_alpha"]): rng.choice([2, 1e300, -1, "a"]),
        rng.choice(["rank_pattern", "alpha_pattern", "transformer.rank_pattern"]): patterns,
        "use_rslora": rng.choice([True, False, None]),
    }
    return json.dumps(config)


def _shape(rng: random.Random, shape: list[int]) -> list[int]:
    kind = rng.randrange(8)
    if kind == 0:
        return []
    if kind == 1:
        return [0, *shape[1:]] if shape else [0]
    if kind == 2:
        return [*shape, 1, 1]
    if kind == 3:
        return [*shape, 3, 3]
    if kind == 4:
        return [rng.choice([1, 30720]), rng.choice([1, 30720])]
    if kind == 5:
        return shape[::-1]
    if kind == 6:
        return [d + rng.choice([-1, 1]) for d in shape]
    return [shape[0] if shape else 1]


def mutate(rng: random.Random, metadata: dict[str, str], tensors: Tensors) -> bytes:
    """One hostile variant of a seed: structured header/metadata/shape/key mutations,
    then maybe raw byte flips or a truncation."""
    meta = dict(metadata)
    out = list(tensors)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(9)
        i = rng.randrange(len(out))
        key, dtype, shape, raw = out[i]
        if op == 0:  # shapes: empty, scalar, conv, rank 30720, mismatched
            new_shape = _shape(rng, shape)
            n = math.prod(new_shape) * _ITEMSIZE.get(dtype, 4)
            if n <= _MAX_FUZZ_BYTES:
                out[i] = (key, dtype, new_shape, bytes(n))
        elif op == 1:  # digits of block indexes
            digits = rng.choice(["19", "38", "4" * 4301, "0" * 50 + "1", "99999999", "-1"])
            out[i] = (re.sub(r"\d+", digits, key, count=1), dtype, shape, raw)
        elif op == 2:  # role suffixes
            stem = key.rsplit(".", 1)[0] if "." in key else key
            out[i] = (stem + rng.choice(_SUFFIXES), dtype, shape, raw)
        elif op == 3:  # PEFT config with patterns
            meta["lora_adapter_metadata"] = _peft_config(rng)
        elif op == 4:  # hostile JSON in the metadata values lora-prune parses
            where = rng.choice(["lora_adapter_metadata", "lora_prune.verification"])
            meta[where] = _hostile_json(rng)
            meta.setdefault("lora_prune.source_sha256", "0" * 64)
        elif op == 5:  # alpha values
            value = rng.choice([1e300, -1e300, float("inf"), float("nan"), 0.0, -2.0, 1e-300, 1e7])
            from lora_prune.keys import split_role

            stem = (split_role(key) or (key, ""))[0]
            out[i] = (stem + ".alpha", "F64", [], struct.pack("<d", value))
        elif op == 6:  # dtypes (size no longer matches, or an integer/bool tensor)
            out[i] = (key, rng.choice(["I64", "U8", "BOOL", "F64", "X9"]), shape, raw)
        elif op == 7:  # drop a tensor (missing factor)
            if len(out) > 1:
                out.pop(i)
        else:  # duplicate a module under another block
            out.append((key.replace("0", "1", 1), dtype, shape, raw))
    data = pack_tensors(meta, out)
    tail = rng.randrange(8)
    if tail == 0:
        buf = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
        data = bytes(buf)
    elif tail == 1:
        data = data[: rng.randrange(len(data))]
    return data


def run_target(path: Path) -> str:
    """read_lora + inspect_lora + run_check on one file; the tool's own error class or "ok".

    Anything that is not a LoraPruneError propagates: that is an escape.
    """
    from lora_prune.check import run_check
    from lora_prune.lora import read_lora
    from lora_prune.stats import inspect_lora

    outcome = "ok"
    try:
        inspect_lora(read_lora(path, allow_unknown=True))
    except LoraPruneError as exc:
        outcome = type(exc).__name__
    result = run_check([path])
    assert result.exit_code in (0, 1, 3, 4), result.exit_code
    return outcome
