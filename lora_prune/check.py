"""``lora-prune check``: lint LoRA files for CI and pre-commit, without torch.

:func:`run_check` walks the given paths and, for every ``.safetensors`` file,
runs the reader's integrity checks, recognises the FLUX.1 key format, scans
every float tensor for NaN/Inf (one tensor at a time), checks the rank and
alpha of every module, reports dtypes and the base model, and applies an
optional :class:`Policy` (size, blocks, metadata, verified slim files).
Pickle checkpoints in the tree are reported as unsafe and never loaded.

The result is data (:class:`CheckResult`); ``render_text``, ``render_json``,
``render_junit`` and ``render_github`` turn it into the four output formats,
so the CLI only parses arguments, calls :func:`run_check`, prints one
rendering and exits with :attr:`CheckResult.exit_code`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import stat
import sys
import unicodedata
import xml.etree.ElementTree as ET
import zipfile
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import numpy as np

from .blocks import OTHER, format_block_spec, parse_block_spec, sort_blocks
from .errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREADABLE,
    BlockSpecError,
    CorruptFileError,
    IncompleteFileError,
    LoraPruneError,
    MissingDependencyError,
    NotSafetensorsError,
    UnknownKeysError,
    UnreadableFileError,
    UnsafeFileError,
    UnsupportedLoraError,
    UsageError,
    WrongBaseModelError,
)
from .lora import ALPHA_LIMIT, LoraFile, LoraModule, factor_problem, read_lora
from .provenance import CRITERION, VERIFICATION_KEY, VerificationRecord
from .safetensors_io import (
    SafetensorsHeader,
    SafetensorsReader,
    file_sha256,
    read_header,
    sniff_head,
)
from .slim import PROVENANCE_PREFIX

__all__ = [
    "FORMATS",
    "PICKLE_SUFFIXES",
    "POLICY_KEYS",
    "CheckResult",
    "FileResult",
    "Finding",
    "Policy",
    "Reverify",
    "SlimPair",
    "VerifyOutcome",
    "github_escape_data",
    "github_escape_property",
    "load_policy",
    "parse_policy",
    "parse_size",
    "render",
    "render_github",
    "render_json",
    "render_junit",
    "render_text",
    "run_check",
]

Level = Literal["error", "warning", "info"]
Status = Literal["pass", "fail", "unreadable", "unsafe"]

#: Output formats of :func:`render`.
FORMATS: tuple[str, ...] = ("text", "json", "junit", "github")
#: Extensions of pickle-based checkpoints: reported unsafe, never opened beyond a sniff.
PICKLE_SUFFIXES: frozenset[str] = frozenset({".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"})
SAFETENSORS_SUFFIX = ".safetensors"
#: Version-control folders are never LoRA payloads and can be huge.
_SKIP_DIRS = frozenset({".git", ".hg", ".svn"})
_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
_SNIFF_BYTES = 16
_SHOW_KEYS = 5
_VERIFICATION_KEY = VERIFICATION_KEY
_SOURCE_SHA_KEY = PROVENANCE_PREFIX + "source_sha256"
_SOURCE_NAME_KEY = PROVENANCE_PREFIX + "source_name"
_NEVER_LOADED = "lora-prune never unpickles files: publish the .safetensors version instead"


# ---------------------------------------------------------------------------
# Result types


@dataclass
class Finding:
    """One observation about a file. ``error`` findings fail the file."""

    level: Level
    code: str
    message: str
    key: str | None = None


@dataclass
class FileResult:
    """Everything ``check`` found out about one file."""

    path: Path
    status: Status
    findings: list[Finding] = field(default_factory=list)
    #: dominant key grammar (``kohya``, ``diffusers``, ...), None when not parsed
    format: str | None = None
    #: ``FLUX.1-dev``, ``FLUX.1-schnell``, ``FLUX.1`` (variant unknown), or another model
    base_model: str | None = None
    #: dtype -> number of tensors
    dtypes: dict[str, int] = field(default_factory=dict)
    bytes: int | None = None
    tensors: int | None = None
    blocks: list[str] = field(default_factory=list)
    #: rank -> number of modules
    ranks: dict[int, int] = field(default_factory=dict)
    #: alpha -> number of modules
    alphas: dict[float, int] = field(default_factory=dict)
    #: the full file a slim file was checked against
    full_file: Path | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "error"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.level == "warning"]

    def to_dict(self) -> dict[str, object]:
        return {
            "path": str(self.path),
            "status": self.status,
            "format": self.format,
            "base_model": self.base_model,
            "bytes": self.bytes,
            "tensors": self.tensors,
            "dtypes": self.dtypes,
            "blocks": self.blocks,
            "ranks": {str(k): v for k, v in self.ranks.items()},
            "alphas": {_number_text(k): v for k, v in self.alphas.items()},
            "full_file": str(self.full_file) if self.full_file is not None else None,
            "findings": [
                {"level": f.level, "code": f.code, "message": f.message, "key": f.key}
                for f in self.findings
            ],
        }


@dataclass
class CheckResult:
    """The verdict on every file found under the checked paths."""

    files: list[FileResult]
    policy: Path | None = None

    def count(self, status: Status) -> int:
        return sum(1 for f in self.files if f.status == status)

    @property
    def exit_code(self) -> int:
        """3 if any file is unreadable or unsafe, else 1 if any failed, else 0.

        An unreadable file wins over a policy failure: nothing can be said
        about a file that could not be read, and that needs fixing first.
        """
        if any(f.status in ("unreadable", "unsafe") for f in self.files):
            return EXIT_UNREADABLE
        if any(f.status == "fail" for f in self.files):
            return EXIT_FAILED
        return EXIT_OK

    def to_dict(self) -> dict[str, object]:
        return {
            "exit_code": self.exit_code,
            "policy": str(self.policy) if self.policy is not None else None,
            "summary": {
                "files": len(self.files),
                **{s: self.count(s) for s in ("pass", "fail", "unreadable", "unsafe")},
            },
            "files": [f.to_dict() for f in self.files],
        }


class VerifyOutcome(Protocol):
    """What a re-verification by rendering (``check --model``) reports.

    Structural: the verify module's own result type satisfies it when it has
    these attributes.
    """

    @property
    def passed(self) -> bool: ...

    @property
    def worst_ssim(self) -> float: ...

    @property
    def min_ssim(self) -> float | None: ...

    @property
    def min_kept(self) -> float: ...

    @property
    def kept_share(self) -> float | None: ...


Reverify = Callable[[Path, Path], VerifyOutcome]


# ---------------------------------------------------------------------------
# Policy


@dataclass(frozen=True)
class SlimPair:
    """A ``[[slim]]`` table: a slim file and the full file it was cut from."""

    file: Path
    full: Path


@dataclass(frozen=True)
class Policy:
    """Rules a repository sets for its LoRA files (see docs/ci.md)."""

    max_bytes: int | None = None
    #: blocks a file may contain; None = any
    allowed_blocks: frozenset[str] | None = None
    required_blocks: frozenset[str] = frozenset()
    required_metadata: tuple[str, ...] = ()
    #: every slim file (one with lora_prune provenance) must carry a passed verification
    require_verified: bool = False
    #: the lowest SSIM threshold a recorded verification may have used
    min_ssim: float | None = None
    #: the lowest share of the LoRA's effect a verification must have demanded and found
    min_kept: float | None = None
    slim: tuple[SlimPair, ...] = ()
    source: Path | None = None


#: Top-level keys a policy file may hold.
POLICY_KEYS: tuple[str, ...] = (
    "max_bytes",
    "max_size",
    "allowed_blocks",
    "required_blocks",
    "required_metadata",
    "require_verified",
    "min_ssim",
    "min_kept",
    "slim",
)
_SLIM_KEYS = ("file", "full")

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}


def parse_size(text: str, where: str = "max_size") -> int:
    """Bytes of a human size: ``"50MB"`` (10^6), ``"1.5 GiB"`` (2^30), ``"1200"`` (bytes)."""
    m = _SIZE_RE.match(text)
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _SIZE_UNITS:
        raise UsageError(
            f"cannot read size {text!r}",
            where,
            "write a number with an optional unit: B, KB, MB, GB, TB (powers of 1000) "
            'or KiB, MiB, GiB, TiB (powers of 1024), e.g. "50MB"',
        )
    return int(float(m.group(1)) * _SIZE_UNITS[unit])


def _toml_loads(text: str, path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - exercised on Python 3.10 only
        try:
            import tomli as tomllib
        except ModuleNotFoundError as exc:
            raise MissingDependencyError(
                "reading a policy file on Python 3.10 needs the tomli package",
                path,
                "pip install tomli",
            ) from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"policy file is not valid TOML ({exc})", path, "fix its syntax") from exc


def load_policy(path: str | Path) -> Policy:
    """Read a TOML policy file; any mistake in it is a :class:`UsageError`."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise UsageError("policy file not found", p, "check the --policy path") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read the policy file ({exc})", p, "check the file") from exc
    return parse_policy(_toml_loads(text, p), base=p.parent, source=p)


def _bad(key: str, source: Path | None, what: str, fix: str) -> UsageError:
    where = f"{source}: {key}" if source is not None else key
    return UsageError(what, where, fix)


def _block_set(value: object, key: str, source: Path | None) -> frozenset[str]:
    specs = [value] if isinstance(value, str) else value
    if not isinstance(specs, list) or not specs or not all(isinstance(s, str) for s in specs):
        raise _bad(
            key,
            source,
            f"policy key {key!r} must be a block spec or a list of them",
            'write e.g. "double.0-18,single" or ["double.7", "single.10-20"]',
        )
    out: set[str] = set()
    for spec in specs:
        try:
            out |= parse_block_spec(spec)
        except BlockSpecError as exc:
            raise _bad(key, source, exc.what, exc.fix or "fix the block spec") from exc
    return frozenset(out)


def parse_policy(
    data: Mapping[str, Any], base: Path = Path("."), source: Path | None = None
) -> Policy:
    """A :class:`Policy` from parsed TOML; ``[[slim]]`` paths are relative to ``base``."""
    for key in data:
        if key not in POLICY_KEYS:
            raise _bad(
                key,
                source,
                f"unknown policy key {key!r}",
                f"use only {', '.join(POLICY_KEYS)} (see docs/ci.md)",
            )
    max_bytes: int | None = None
    if "max_bytes" in data and "max_size" in data:
        raise _bad("max_size", source, "give max_bytes or max_size, not both", "remove one")
    if "max_bytes" in data:
        value = data["max_bytes"]
        if type(value) is not int or value < 0:
            raise _bad(
                "max_bytes",
                source,
                "max_bytes must be a non-negative integer",
                'write e.g. max_bytes = 50000000 or max_size = "50MB"',
            )
        max_bytes = value
    if "max_size" in data:
        value = data["max_size"]
        if type(value) is int and value >= 0:
            max_bytes = value
        elif isinstance(value, str):
            max_bytes = parse_size(value, f"{source}: max_size" if source else "max_size")
        else:
            raise _bad(
                "max_size",
                source,
                'max_size must be a size like "50MB"',
                'write e.g. max_size = "50MB"',
            )

    allowed = (
        _block_set(data["allowed_blocks"], "allowed_blocks", source)
        if "allowed_blocks" in data
        else None
    )
    required = (
        _block_set(data["required_blocks"], "required_blocks", source)
        if "required_blocks" in data
        else frozenset()
    )

    meta_value = data.get("required_metadata", [])
    meta_keys = [meta_value] if isinstance(meta_value, str) else meta_value
    if not isinstance(meta_keys, list) or not all(isinstance(k, str) and k for k in meta_keys):
        raise _bad(
            "required_metadata",
            source,
            "required_metadata must be a list of key names",
            'write e.g. required_metadata = ["modelspec.trigger_phrase"]',
        )

    require_verified = data.get("require_verified", False)
    if not isinstance(require_verified, bool):
        raise _bad(
            "require_verified",
            source,
            "require_verified must be true or false",
            "write require_verified = true",
        )

    min_ssim = data.get("min_ssim")
    if min_ssim is not None and (
        isinstance(min_ssim, bool)
        or not isinstance(min_ssim, (int, float))
        or not 0.0 <= float(min_ssim) <= 1.0
    ):
        raise _bad(
            "min_ssim",
            source,
            "min_ssim must be a number from 0 to 1",
            "write e.g. min_ssim = 0.95",
        )

    min_kept = data.get("min_kept")
    if min_kept is not None and (
        isinstance(min_kept, bool)
        or not isinstance(min_kept, (int, float))
        or not 0.0 < float(min_kept) <= 1.0
    ):
        raise _bad(
            "min_kept",
            source,
            "min_kept must be a number above 0 and at most 1",
            "write e.g. min_kept = 0.9",
        )

    slim_value = data.get("slim", [])
    if not isinstance(slim_value, list) or not all(isinstance(t, dict) for t in slim_value):
        raise _bad(
            "slim",
            source,
            "slim must be a list of tables",
            'write [[slim]] tables with file = "..." and full = "..."',
        )
    pairs: list[SlimPair] = []
    for i, table in enumerate(slim_value):
        for key in table:
            if key not in _SLIM_KEYS:
                raise _bad(
                    f"slim[{i}].{key}",
                    source,
                    f"unknown policy key {key!r} in [[slim]]",
                    "a [[slim]] table holds only file and full",
                )
        for key in _SLIM_KEYS:
            if not isinstance(table.get(key), str) or not table[key]:
                raise _bad(
                    f"slim[{i}].{key}",
                    source,
                    f'[[slim]] needs {key} = "<path>"',
                    "name the slim file and the full file it was cut from",
                )
        pairs.append(SlimPair(base / table["file"], base / table["full"]))

    return Policy(
        max_bytes=max_bytes,
        allowed_blocks=allowed,
        required_blocks=required,
        required_metadata=tuple(meta_keys),
        require_verified=require_verified,
        min_ssim=float(min_ssim) if min_ssim is not None else None,
        min_kept=float(min_kept) if min_kept is not None else None,
        slim=tuple(pairs),
        source=source,
    )


# ---------------------------------------------------------------------------
# Finding the files


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _walk(root: Path) -> Iterator[Path | OSError]:
    """Files under ``root`` in a stable order, and the errors of folders that cannot be listed."""
    errors: list[OSError] = []
    for folder, dirs, files in os.walk(root, onerror=errors.append):
        yield from errors
        errors.clear()
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS)
        for name in sorted(files):
            yield Path(folder) / name
    yield from errors


_Candidate = tuple[Path, bool, OSError | None]


def _candidates(paths: Sequence[str | Path]) -> list[_Candidate]:
    """(file, explicitly given, listing error) in a stable order, each file once."""
    out: list[_Candidate] = []
    seen: set[str] = set()

    def add(path: Path, explicit: bool, error: OSError | None = None) -> None:
        ident = os.path.realpath(path)
        if ident not in seen:
            seen.add(ident)
            out.append((path, explicit, error))

    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for found in _walk(path):
                if isinstance(found, OSError):
                    # A folder that cannot be listed may hide LoRA files: say so.
                    add(Path(found.filename or path), False, found)
                else:
                    add(found, False)
        elif path.exists() or path.is_symlink():
            add(path, True)
        else:
            raise UsageError("path not found", path, "give existing files or folders to check")
    return out


def _pickle_sniff(path: Path) -> str | None:
    """What pickle content the file's bytes show, or None. Nothing is unpickled."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError:
        return None
    if head.startswith(b"PK\x03\x04"):
        try:
            # Reading the zip directory runs no code; only names ending in .pkl
            # make it a torch.save archive rather than any zip (.npz, .zip).
            with zipfile.ZipFile(path) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return None
        if any(n.endswith(".pkl") for n in names):
            return "a zip archive with pickle code inside, as torch.save writes"
        return None
    try:
        sniff_head(head, path)
    except UnsafeFileError:
        return f"pickle data (protocol {head[1]})"
    except NotSafetensorsError:
        pass
    return None


def _unsafe_result(path: Path, sniffed: str | None) -> FileResult:
    suffix = path.suffix.lower()
    if sniffed is not None:
        what = f"{sniffed}: refusing to load it"
    else:
        what = f"{suffix} checkpoint, which loaders unpickle by its extension: refusing to load it"
    finding = Finding("error", "unsafe", f"{what}, {_NEVER_LOADED}")
    return FileResult(path, "unsafe", [finding], bytes=_size(path))


# ---------------------------------------------------------------------------
# Checking one file


def _error_code(exc: LoraPruneError) -> str:
    for cls, code in (
        (UnsafeFileError, "unsafe"),
        (IncompleteFileError, "incomplete"),
        (CorruptFileError, "corrupt"),
        (NotSafetensorsError, "not_safetensors"),
        (WrongBaseModelError, "wrong_base_model"),
        (UnknownKeysError, "unknown_keys"),
        (UnreadableFileError, "unreadable"),
        (UnsupportedLoraError, "unsupported"),
    ):
        if isinstance(exc, cls):
            return code
    return "error"


def _finding_from(exc: LoraPruneError, path: Path) -> Finding:
    # The path is the result's own; a key named by the error goes into `key`.
    key = exc.where if exc.where is not None and exc.where != str(path) else None
    message = exc.what + (f", {exc.fix}" if exc.fix else "")
    return Finding("error", _error_code(exc), message.replace("\n", " "), key)


def _size(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


def _unreadable_result(path: Path, exc: UnreadableFileError) -> FileResult:
    status: Status = "unsafe" if isinstance(exc, UnsafeFileError) else "unreadable"
    return FileResult(path, status, [_finding_from(exc, path)], bytes=_size(path))


def _scan_values(reader: SafetensorsReader, header: SafetensorsHeader) -> list[Finding]:
    """NaN/Inf per float tensor, read one at a time in file order."""
    out: list[Finding] = []
    for info in sorted(header.tensors.values(), key=lambda t: t.begin):
        if info.dtype not in _FLOAT_DTYPES or info.numel == 0:
            continue
        values = reader.read_array(info.name)
        finite = np.isfinite(values)
        if bool(finite.all()):
            continue
        nan = int(np.count_nonzero(np.isnan(values)))
        inf = int(values.size - np.count_nonzero(finite)) - nan
        parts = [f"{n} {label}" for n, label in ((nan, "NaN"), (inf, "Inf")) if n]
        out.append(
            Finding(
                "error",
                "nonfinite",
                f"{' and '.join(parts)} of {values.size} values in tensor {info.name!r}, "
                "the LoRA is broken (a diverged training run or a bad conversion): "
                "retrain or re-export it",
                info.name,
            )
        )
    return out


# Pairs of factors whose inner dimension must agree: (left, right) with
# left.shape[1] == right.shape[0], as in dW = left @ right.
_FACTOR_PAIRS: tuple[tuple[str, str], ...] = (
    ("up", "down"),
    ("hada_w1_a", "hada_w1_b"),
    ("hada_w2_a", "hada_w2_b"),
    ("lokr_w1_a", "lokr_w1_b"),
    ("lokr_w2_a", "lokr_w2_b"),
)


def _module_findings(module: LoraModule) -> list[Finding]:
    out: list[Finding] = []
    t = module.tensors
    if module.adapter == "lora" and ("down" in t) != ("up" in t):
        have, missing = ("down", "up") if "down" in t else ("up", "down")
        out.append(
            Finding(
                "error",
                "missing_factor",
                f"module {module.stem!r} has a {have} tensor but no {missing} tensor, "
                "the file is incomplete: re-export the LoRA",
                t[have].name,
            )
        )
    for left, right in _FACTOR_PAIRS:
        if left not in t or right not in t:
            continue
        a, b = t[left], t[right]
        if len(a.shape) < 2 or len(b.shape) < 2:
            bad = a if len(a.shape) < 2 else b
            out.append(
                Finding(
                    "error",
                    "bad_shape",
                    f"tensor {bad.name!r} has shape {list(bad.shape)}, a factor needs "
                    "at least 2 dimensions: re-export the LoRA",
                    bad.name,
                )
            )
        elif a.shape[1] != b.shape[0]:
            out.append(
                Finding(
                    "error",
                    "rank_mismatch",
                    f"rank mismatch in module {module.stem!r}: {b.name!r} has "
                    f"{b.shape[0]} rows ({list(b.shape)}) but {a.name!r} has {a.shape[1]} "
                    f"columns ({list(a.shape)}), the factors do not multiply: "
                    "re-export the LoRA",
                    b.name,
                )
            )
    if not any(f.code in ("bad_shape", "rank_mismatch") for f in out):
        problem = factor_problem(module)
        if problem is not None:
            out.append(
                Finding(
                    "error",
                    "bad_shape",
                    f"module {module.stem!r}: {problem}: re-export the LoRA",
                    module.keys[0] if module.keys else None,
                )
            )
    alpha = module.alpha
    if alpha is not None and not (math.isfinite(alpha) and 0 < alpha <= ALPHA_LIMIT):
        info = t.get("alpha")
        out.append(
            Finding(
                "error",
                "bad_alpha",
                f"alpha of module {module.stem!r} is {alpha!r}, expected a finite "
                f"positive number up to {ALPHA_LIMIT:g}: fix or re-export the LoRA",
                info.name if info is not None else None,
            )
        )
    if module.adapter == "unsupported":
        out.append(
            Finding(
                "warning",
                "unsupported_adapter",
                f"module {module.stem!r} is an adapter type (OFT/GLoRA) that lora-prune "
                "cannot render or slim-verify",
                module.keys[0] if module.keys else None,
            )
        )
    return out


def _has_guidance(lora: LoraFile) -> bool:
    return any(
        m.target is not None
        and ("guidance_in" in m.target.name or "guidance_embedder" in m.target.name)
        for m in lora.modules.values()
    )


def _metadata_claim(metadata: Mapping[str, str]) -> tuple[str, str, str] | None:
    """(key, value, claimed base) from the metadata, or None when it names none."""
    for key in ("modelspec.architecture", "ss_base_model_version"):
        value = metadata.get(key, "").strip()
        if not value:
            continue
        low = value.lower()
        if re.search(r"flux[-_. ]?2", low):
            return key, value, "FLUX.2"
        if re.search(r"flux[-_. ]?1|^flux(\b|_)", low):
            if "schnell" in low:
                return key, value, "FLUX.1-schnell"
            if "dev" in low:
                return key, value, "FLUX.1-dev"
            return key, value, "FLUX.1"
        return key, value, value
    return None


def _base_model(lora: LoraFile) -> tuple[str, list[Finding]]:
    guidance = _has_guidance(lora)
    from_keys = "FLUX.1-dev" if guidance else "FLUX.1"
    claim = _metadata_claim(lora.metadata)
    if claim is None:
        return from_keys, []
    key, value, claimed = claim
    if not claimed.startswith("FLUX.1"):
        return from_keys, [
            Finding(
                "warning",
                "base_model_mismatch",
                f"metadata {key} = {value!r} names another base model, but the keys are "
                "FLUX.1 keys: fix the metadata",
                key,
            )
        ]
    if claimed == "FLUX.1-schnell" and guidance:
        return "FLUX.1-dev", [
            Finding(
                "warning",
                "base_model_mismatch",
                f"metadata {key} = {value!r} says schnell, but the LoRA trains guidance_in, "
                "which only FLUX.1-dev has: fix the metadata",
                key,
            )
        ]
    return (claimed if claimed != "FLUX.1" else from_keys), []


def _consistency(lora: LoraFile, result: FileResult) -> None:
    ranks: Counter[int] = Counter()
    alphas: Counter[float] = Counter()
    for module in lora.modules.values():
        result.findings.extend(_module_findings(module))
        if module.rank is not None and module.adapter in ("lora", "loha", "lokr"):
            ranks[module.rank] += 1
        if module.alpha is not None:
            alphas[module.alpha] += 1
    result.ranks = dict(sorted(ranks.items()))
    result.alphas = dict(sorted(alphas.items(), key=lambda kv: _number_text(kv[0])))
    if len(ranks) > 1:
        spread = ", ".join(f"rank {r} x{n}" for r, n in result.ranks.items())
        result.findings.append(
            Finding("warning", "mixed_ranks", f"modules have different ranks: {spread}")
        )


def _read_parsed(path: Path, result: FileResult) -> LoraFile | None:
    """Parse the LoRA; unknown keys become a finding and parsing goes on without them."""
    try:
        return read_lora(path)
    except WrongBaseModelError as exc:
        result.base_model = exc.base_model
        result.findings.append(_finding_from(exc, path))
        return None
    except UnknownKeysError as exc:
        result.findings.append(_finding_from(exc, path))
        if not exc.keys:
            return None
        for key in exc.keys[:_SHOW_KEYS]:
            result.findings.append(
                Finding("error", "unknown_key", f"key {key!r} matches no FLUX.1 LoRA format", key)
            )
        try:
            return read_lora(path, allow_unknown=True)
        except UnsupportedLoraError:
            return None
    except UnsupportedLoraError as exc:
        result.findings.append(_finding_from(exc, path))
        return None


def _check_safetensors(path: Path) -> tuple[FileResult, SafetensorsHeader | None, LoraFile | None]:
    try:
        header = read_header(path)
    except UnreadableFileError as exc:
        return _unreadable_result(path, exc), None, None
    result = FileResult(path, "pass")
    result.bytes = header.file_size
    result.tensors = len(header.tensors)
    result.dtypes = dict(sorted(Counter(t.dtype for t in header.tensors.values()).items()))
    try:
        lora = _read_parsed(path, result)
        if lora is not None:
            result.format = lora.format
            result.blocks = [b for b in lora.blocks if b != OTHER]
            base, notes = _base_model(lora)
            result.base_model = base
            result.findings.extend(notes)
            _consistency(lora, result)
        with SafetensorsReader(path, header) as reader:
            result.findings.extend(_scan_values(reader, header))
    except UnreadableFileError as exc:
        return _unreadable_result(path, exc), None, None
    return result, header, lora


# ---------------------------------------------------------------------------
# Policy rules


def _policy_findings(
    policy: Policy, header: SafetensorsHeader, lora: LoraFile | None
) -> list[Finding]:
    out: list[Finding] = []
    if policy.max_bytes is not None and header.file_size > policy.max_bytes:
        out.append(
            Finding(
                "error",
                "max_size",
                f"file is {header.file_size:,} bytes, over the policy's maximum of "
                f"{policy.max_bytes:,}: slim it (lora-prune slim) or raise max_size",
            )
        )
    if lora is not None:
        present = set(lora.blocks) - {OTHER}
        if policy.allowed_blocks is not None:
            extra = sort_blocks(present - policy.allowed_blocks)
            if extra:
                out.append(
                    Finding(
                        "error",
                        "block_not_allowed",
                        f"blocks {format_block_spec(extra)} are not allowed by the policy "
                        f"(allowed: {format_block_spec(policy.allowed_blocks)}): drop them "
                        f"with lora-prune slim --drop {format_block_spec(extra)}",
                    )
                )
        missing = sort_blocks(policy.required_blocks - present)
        if missing:
            out.append(
                Finding(
                    "error",
                    "block_missing",
                    f"required blocks {format_block_spec(missing)} are missing "
                    f"(the file has {format_block_spec(present) or 'none'}): keep them when "
                    "slimming or change required_blocks",
                )
            )
    for key in policy.required_metadata:
        value = header.metadata.get(key)
        if value is None or not value.strip():
            state = "missing" if value is None else "empty"
            out.append(
                Finding(
                    "error",
                    "metadata_missing",
                    f"required metadata key {key!r} is {state}: add it to the file's "
                    "__metadata__ (your trainer's metadata options set it)",
                    key,
                )
            )
    return out


def _record_findings(record: VerificationRecord, policy: Policy | None) -> list[Finding]:
    """A recorded verification judged against the policy's thresholds."""
    out: list[Finding] = []
    if not record.passed:
        kept = record.kept_share
        worst = (
            f" (worst share of the effect kept {100 * kept:.1f}%)"
            if kept is not None
            else (f" (worst SSIM {record.worst_ssim:.4f})" if record.worst_ssim is not None else "")
        )
        out.append(
            Finding(
                "error",
                "verification_failed",
                f"the recorded verification failed{worst}: keep more blocks and verify again",
                _VERIFICATION_KEY,
            )
        )
    if (
        policy is not None
        and policy.min_ssim is not None
        and (record.min_ssim is None or record.min_ssim < policy.min_ssim)
    ):
        used = "no SSIM floor" if record.min_ssim is None else f"min_ssim {record.min_ssim}"
        out.append(
            Finding(
                "error",
                "verification_too_weak",
                f"the verification used {used}, the policy needs at least "
                f"{policy.min_ssim}: verify again with --min-ssim {policy.min_ssim}",
                _VERIFICATION_KEY,
            )
        )
    if policy is not None and policy.min_kept is not None:
        if record.criterion != CRITERION or record.min_kept is None:
            out.append(
                Finding(
                    "error",
                    "verification_too_weak",
                    "the verification did not judge the share of the LoRA's effect kept, "
                    f"the policy needs min_kept {policy.min_kept}: verify again with "
                    f"lora-prune verify --min-kept {policy.min_kept}",
                    _VERIFICATION_KEY,
                )
            )
        elif record.min_kept < policy.min_kept or (
            record.kept_share is not None and record.kept_share < policy.min_kept
        ):
            found = (
                ""
                if record.kept_share is None
                else (f", worst share kept {100 * record.kept_share:.1f}%")
            )
            out.append(
                Finding(
                    "error",
                    "verification_too_weak",
                    f"the verification used min_kept {record.min_kept}{found}, the policy "
                    f"needs at least {policy.min_kept}: keep more blocks and verify again "
                    f"with --min-kept {policy.min_kept}",
                    _VERIFICATION_KEY,
                )
            )
    return out


class _Hashes:
    """File SHA-256s, computed once each and only when needed."""

    def __init__(self) -> None:
        self._cache: dict[str, str] = {}

    def __call__(self, path: Path) -> str:
        ident = os.path.realpath(path)
        if ident not in self._cache:
            self._cache[ident] = file_sha256(path)
        return self._cache[ident]


def _find_full(
    slim: Path,
    source_sha: str,
    source_name: str | None,
    checked: Sequence[Path],
    hashes: _Hashes,
) -> Path | None:
    """The full file a slim file was cut from, or None when it cannot be found.

    The file with the recorded SHA-256 among the checked files and the slim's
    sibling named by its provenance; failing that, that sibling even though its
    SHA differs: a full file retrained after slimming leaves a stale slim,
    which the caller then reports.
    """
    sibling: Path | None = None
    if source_name and "/" not in source_name and "\\" not in source_name:
        sibling = slim.parent / source_name
    candidates = [sibling] if sibling is not None else []
    candidates += [p for p in checked if p.name == source_name]
    candidates += [p for p in checked if p.name != source_name]
    slim_id = os.path.realpath(slim)
    for candidate in candidates:
        if os.path.realpath(candidate) == slim_id or not _is_regular(candidate):
            continue
        try:
            if hashes(candidate) == source_sha:
                return candidate
        except UnreadableFileError:
            continue
    if sibling is not None and os.path.realpath(sibling) != slim_id and _is_regular(sibling):
        return sibling
    return None


def _subset_findings(slim: Path, slim_header: SafetensorsHeader, full: Path) -> list[Finding]:
    """Every tensor of the slim file must be in the full file, byte for byte."""
    try:
        full_header = read_header(full)
    except UnreadableFileError as exc:
        return [
            Finding(
                "error",
                "full_unreadable",
                f"the full file {str(full)!r} cannot be read: {exc.what}",
            )
        ]
    out: list[Finding] = []
    with SafetensorsReader(slim, slim_header) as a, SafetensorsReader(full, full_header) as b:
        for name, info in slim_header.tensors.items():
            other = full_header.tensors.get(name)
            if other is None or (other.dtype, other.shape) != (info.dtype, info.shape):
                why = "is not in" if other is None else "has another dtype or shape than in"
            elif (
                hashlib.sha256(a.read_bytes(name)).digest()
                != hashlib.sha256(b.read_bytes(name)).digest()
            ):
                why = "has other values than in"
            else:
                continue
            out.append(
                Finding(
                    "error",
                    "not_subset",
                    f"tensor {name!r} {why} the full file {str(full)!r}, so this is not "
                    "a slim of it: slim the full file again",
                    name,
                )
            )
            if len(out) >= _SHOW_KEYS:
                break
    return out


def _verify_slim(
    result: FileResult,
    header: SafetensorsHeader,
    explicit_full: Path | None,
    policy: Policy | None,
    checked: Sequence[Path],
    hashes: _Hashes,
    reverify: Reverify | None,
) -> list[Finding]:
    path = result.path
    meta = header.metadata
    out: list[Finding] = []
    source_sha = meta.get(_SOURCE_SHA_KEY)
    raw = meta.get(_VERIFICATION_KEY)
    record: VerificationRecord | None = None
    # With re-rendering (check --model) the render is the proof; the record's
    # verdict is then not judged, only which file it names.
    judge_record = reverify is None
    if raw is None and judge_record:
        out.append(
            Finding(
                "error",
                "not_verified",
                f"slim file has no {_VERIFICATION_KEY} record: run lora-prune verify "
                "(or slim --auto) to prove it renders like the full file",
                _VERIFICATION_KEY,
            )
        )
    elif raw is not None:
        parsed = VerificationRecord.parse(raw)
        if isinstance(parsed, str):
            out.append(
                Finding(
                    "error",
                    "bad_verification",
                    f"{_VERIFICATION_KEY} {parsed}: run lora-prune verify again",
                    _VERIFICATION_KEY,
                )
            )
        else:
            record = parsed
    if record is not None and judge_record:
        out.extend(_record_findings(record, policy))
    if record is not None and source_sha is not None and source_sha != record.full_sha256:
        out.append(
            Finding(
                "error",
                "source_mismatch",
                f"the verification was made against {record.full_sha256[:12]}..., "
                f"but the file was cut from {source_sha[:12]}...: verify it again",
                _SOURCE_SHA_KEY,
            )
        )

    expected = record.full_sha256 if record is not None else source_sha
    full = explicit_full
    if full is None and expected is not None:
        full = _find_full(path, expected, meta.get(_SOURCE_NAME_KEY), checked, hashes)
    if full is None:
        out.append(
            Finding(
                "warning",
                "full_not_found",
                "the full file it was cut from is not among the checked files: only the "
                "recorded verification was checked (check the full file too, or name it "
                "in a [[slim]] table)",
            )
        )
        if reverify is not None:
            out.append(
                Finding(
                    "error",
                    "reverify_impossible",
                    "cannot re-render without the full file: add it to the checked "
                    "paths or name it in a [[slim]] table",
                )
            )
        return out
    if not _is_regular(full):
        out.append(
            Finding(
                "error",
                "full_missing",
                f"the full file {str(full)!r} named by the policy does not exist: "
                "fix the [[slim]] table",
            )
        )
        return out
    result.full_file = full
    try:
        full_sha = hashes(full)
    except UnreadableFileError as exc:
        out.append(
            Finding(
                "error",
                "full_unreadable",
                f"the full file {str(full)!r} cannot be read: {exc.what}",
            )
        )
        return out
    if record is not None and record.full_sha256 != full_sha:
        out.append(
            Finding(
                "error",
                "verification_mismatch",
                f"the verification was made against a file with SHA-256 "
                f"{record.full_sha256[:12]}..., not {str(full)!r} ({full_sha[:12]}...): "
                "the full file changed or is another one; slim and verify again",
                _VERIFICATION_KEY,
            )
        )
    if (
        source_sha is not None
        and source_sha != full_sha
        and (record is None or record.full_sha256 == full_sha)
    ):
        out.append(
            Finding(
                "error",
                "source_mismatch",
                f"the file was cut from a file with SHA-256 {source_sha[:12]}..., not "
                f"{str(full)!r} ({full_sha[:12]}...): slim the full file again",
                _SOURCE_SHA_KEY,
            )
        )
    if not any(f.code in ("verification_mismatch", "source_mismatch") for f in out):
        # Against another file than the recorded one, a tensor diff only repeats that.
        out.extend(_subset_findings(path, header, full))
    if reverify is not None:
        try:
            outcome = reverify(path, full)
        except (UnreadableFileError, UnsupportedLoraError) as exc:
            out.append(_finding_from(exc, path))
        else:
            if (
                policy is not None
                and policy.min_ssim is not None
                and (outcome.min_ssim is None or outcome.min_ssim < policy.min_ssim)
            ):
                out.append(
                    Finding(
                        "error",
                        "verification_too_weak",
                        f"re-rendering used min_ssim {outcome.min_ssim}, the policy needs "
                        f"at least {policy.min_ssim}: pass --min-ssim {policy.min_ssim}",
                    )
                )
            if (
                policy is not None
                and policy.min_kept is not None
                and (outcome.min_kept < policy.min_kept)
            ):
                out.append(
                    Finding(
                        "error",
                        "verification_too_weak",
                        f"re-rendering used min_kept {outcome.min_kept}, the policy needs "
                        f"at least {policy.min_kept}: pass --min-kept {policy.min_kept}",
                    )
                )
            share = "n/a" if outcome.kept_share is None else f"{100 * outcome.kept_share:.1f}%"
            if outcome.passed:
                out.append(
                    Finding(
                        "info",
                        "reverified",
                        f"re-rendered: worst share of the effect kept {share} >= "
                        f"{100 * outcome.min_kept:g}%, worst SSIM {outcome.worst_ssim:.4f}",
                    )
                )
            else:
                out.append(
                    Finding(
                        "error",
                        "reverify_failed",
                        f"re-rendering keeps at worst {share} of the LoRA's effect "
                        f"(needs {100 * outcome.min_kept:g}% on every image), worst SSIM "
                        f"{outcome.worst_ssim:.4f}: keep more blocks and verify again",
                    )
                )
    if (
        judge_record
        and record is not None
        and record.passed
        and not any(f.level == "error" for f in out)
    ):
        if record.kept_share is not None:
            worst = f", worst share of the effect kept {100 * record.kept_share:.1f}%"
        elif record.worst_ssim is not None:
            worst = f" at worst SSIM {record.worst_ssim:.4f}"
        else:
            worst = ""
        out.append(Finding("info", "verified", f"verified subset of {str(full)!r}{worst}"))
    return out


def _recorded_verification_note(header: SafetensorsHeader) -> list[Finding]:
    """Without a policy rule, a recorded failure is still worth a warning."""
    raw = header.metadata.get(_VERIFICATION_KEY)
    if raw is None:
        return []
    parsed = VerificationRecord.parse(raw)
    if isinstance(parsed, str):
        return [
            Finding(
                "warning", "bad_verification", f"{_VERIFICATION_KEY} {parsed}", _VERIFICATION_KEY
            )
        ]
    if not parsed.passed:
        return [
            Finding(
                "warning",
                "verification_failed",
                "the recorded verification of this slim file failed",
                _VERIFICATION_KEY,
            )
        ]
    return []


# ---------------------------------------------------------------------------
# Driver


def run_check(
    paths: Sequence[str | Path],
    policy: Policy | None = None,
    reverify: Reverify | None = None,
) -> CheckResult:
    """Check every LoRA file under ``paths`` (files or folders, recursively).

    ``.safetensors`` files get every check; pickle checkpoints (by extension,
    or by their bytes for other files in a folder) are reported as unsafe and
    never loaded. A file given explicitly is checked as safetensors whatever
    its name. ``reverify(slim, full)`` re-renders a slim file against its full
    file (``check --model``). A missing path or a policy that names a missing
    slim file raises :class:`UsageError`.
    """
    slim_pairs: dict[str, SlimPair] = {}
    for entry in policy.slim if policy is not None else ():
        if not _is_regular(entry.file):
            raise UsageError(
                "the policy names a slim file that does not exist",
                f"{policy.source if policy and policy.source else 'policy'}: "
                f"[[slim]] file = {str(entry.file)!r}",
                "fix the path or remove the [[slim]] table",
            )
        slim_pairs[os.path.realpath(entry.file)] = entry

    results: list[FileResult] = []
    parsed: list[tuple[FileResult, SafetensorsHeader, LoraFile | None]] = []
    for path, explicit, error in _candidates(paths):
        if error is not None:
            reason = error.strerror or error.__class__.__name__
            finding = Finding(
                "error", "unreadable", f"cannot list folder ({reason}), check its permissions"
            )
            results.append(FileResult(path, "unreadable", [finding]))
            continue
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            results.append(_unsafe_result(path, _pickle_sniff(path) if _is_regular(path) else None))
            continue
        if suffix != SAFETENSORS_SUFFIX and not explicit:
            sniffed = _pickle_sniff(path) if _is_regular(path) else None
            if sniffed is not None:
                results.append(_unsafe_result(path, sniffed))
            continue
        result, header, lora = _check_safetensors(path)
        results.append(result)
        if header is not None:
            parsed.append((result, header, lora))

    hashes = _Hashes()
    checked = [r.path for r, _, _ in parsed]
    for result, header, lora in parsed:
        if policy is not None:
            result.findings.extend(_policy_findings(policy, header, lora))
        pair = slim_pairs.get(os.path.realpath(result.path))
        is_slim = pair is not None or any(
            k in header.metadata for k in (_SOURCE_SHA_KEY, _VERIFICATION_KEY)
        )
        wanted = (
            pair is not None
            or reverify is not None
            or (policy is not None and policy.require_verified)
        )
        if is_slim and wanted:
            try:
                result.findings.extend(
                    _verify_slim(
                        result,
                        header,
                        pair.full if pair else None,
                        policy,
                        checked,
                        hashes,
                        reverify,
                    )
                )
            except UnreadableFileError as exc:
                result.findings.append(_finding_from(exc, result.path))
        elif is_slim:
            result.findings.extend(_recorded_verification_note(header))

    for result in results:
        if result.status == "pass" and result.errors:
            result.status = "fail"
    return CheckResult(results, policy.source if policy is not None else None)


# ---------------------------------------------------------------------------
# Rendering


def _number_text(x: float) -> str:
    return f"{x:g}"


def _display(text: str) -> str:
    """One printable line: control characters and undecodable bytes as escapes."""
    out: list[str] = []
    for ch in text:
        code = ord(ch)
        if 0xD800 <= code <= 0xDFFF:
            # os.fsdecode keeps undecodable bytes as lone surrogates (U+DC80..U+DCFF).
            out.append(f"\\x{code - 0xDC00:02x}" if code >= 0xDC80 else f"\\u{code:04x}")
        elif unicodedata.category(ch) == "Cc":
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


_STATUS_LABEL: dict[str, str] = {
    "pass": "PASS",
    "fail": "FAIL",
    "unreadable": "UNREADABLE",
    "unsafe": "UNSAFE",
}


def _summary(result: CheckResult) -> str:
    labels: dict[Status, str] = {
        "pass": "passed",
        "fail": "failed",
        "unreadable": "unreadable",
        "unsafe": "unsafe",
    }
    parts = [f"{result.count(s)} {label}" for s, label in labels.items()]
    n = len(result.files)
    return f"{n} file{'s' if n != 1 else ''}: {', '.join(parts)}; exit {result.exit_code}"


def _details(f: FileResult) -> str:
    parts: list[str] = []
    if f.format:
        parts.append(f.format)
    if f.base_model:
        parts.append(f.base_model)
    if f.dtypes:
        parts.append(" ".join(f"{d} x{n}" for d, n in f.dtypes.items()))
    if f.bytes is not None:
        parts.append(f"{f.bytes:,} bytes")
    if f.blocks:
        parts.append(f"blocks {format_block_spec(f.blocks)}")
    if f.ranks:
        parts.append("rank " + "/".join(str(r) for r in f.ranks))
    return ", ".join(parts)


def render_text(result: CheckResult) -> str:
    """Human-readable report: one line per file, its findings indented below."""
    lines: list[str] = []
    for f in result.files:
        lines.append(f"{_STATUS_LABEL[f.status]:<10} {_display(str(f.path))}")
        details = _details(f)
        if details:
            lines.append(f"           {_display(details)}")
        for finding in f.findings:
            lines.append(f"  {finding.level:<7} {finding.code}: {_display(finding.message)}")
    if not result.files:
        lines.append("no LoRA files found")
    lines.append(_summary(result))
    return "\n".join(lines) + "\n"


def render_json(result: CheckResult) -> str:
    """One JSON object: exit code, summary counts, and every file with its findings."""
    return json.dumps(result.to_dict(), indent=2, allow_nan=False) + "\n"


_XML_INVALID = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_text(text: str) -> str:
    # XML 1.0 cannot hold most control characters or lone surrogates at all,
    # even escaped; ElementTree would write them and produce an invalid file.
    return _XML_INVALID.sub(lambda m: _display(m.group(0)), text)


def render_junit(result: CheckResult) -> str:
    """JUnit XML: one testsuite, one testcase per file.

    A failed file gets a ``<failure>``, an unreadable or unsafe one an
    ``<error>``; warnings go to the testcase's ``<system-out>``.
    """
    suite = ET.Element(
        "testsuite",
        {
            "name": "lora-prune check",
            "tests": str(len(result.files)),
            "failures": str(result.count("fail")),
            "errors": str(result.count("unreadable") + result.count("unsafe")),
            "skipped": "0",
        },
    )
    for f in result.files:
        case = ET.SubElement(
            suite,
            "testcase",
            {"classname": "lora-prune.check", "name": _xml_text(str(f.path)), "time": "0"},
        )
        if f.status != "pass":
            tag = "failure" if f.status == "fail" else "error"
            errors = f.errors
            first = errors[0] if errors else Finding("error", f.status, f.status)
            element = ET.SubElement(
                case,
                tag,
                {"message": _xml_text(first.message), "type": first.code},
            )
            element.text = _xml_text(
                "\n".join(f"{e.code}: {e.message}" for e in errors) or f.status
            )
        notes = [x for x in f.findings if x.level != "error"]
        details = _details(f)
        if notes or details:
            out = ET.SubElement(case, "system-out")
            text = [details] if details else []
            text += [f"{x.level}: {x.code}: {x.message}" for x in notes]
            out.text = _xml_text("\n".join(text))
    ET.indent(suite)
    body = ET.tostring(suite, encoding="unicode")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + body + "\n"


def github_escape_data(text: str) -> str:
    """Escape a workflow command's message as GitHub's runner expects."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def github_escape_property(text: str) -> str:
    """Escape a workflow command property (``file=``, ``title=``)."""
    return github_escape_data(text).replace(":", "%3A").replace(",", "%2C")


def _github_path(path: Path) -> str:
    # Annotations attach to repository-relative paths with forward slashes.
    if path.is_absolute() and path.is_relative_to(Path.cwd()):
        path = path.relative_to(Path.cwd())
    return path.as_posix()


def render_github(result: CheckResult) -> str:
    """GitHub Actions annotations: ``::error``/``::warning`` per finding, then a summary line."""
    lines: list[str] = []
    for f in result.files:
        prop = github_escape_property(_display(_github_path(f.path)))
        for finding in f.findings:
            if finding.level == "info":
                continue
            title = github_escape_property(f"lora-prune {finding.code}")
            message = github_escape_data(
                f"{_STATUS_LABEL[f.status]} {_display(str(f.path))}: {_display(finding.message)}"
            )
            lines.append(f"::{finding.level} file={prop},title={title}::{message}")
    lines.append(f"lora-prune check: {_summary(result)}")
    return "\n".join(lines) + "\n"


_RENDERERS: dict[str, Callable[[CheckResult], str]] = {
    "text": render_text,
    "json": render_json,
    "junit": render_junit,
    "github": render_github,
}


def render(result: CheckResult, fmt: str) -> str:
    """The result in one of :data:`FORMATS`."""
    try:
        renderer = _RENDERERS[fmt]
    except KeyError:
        raise UsageError(
            f"unknown format {fmt!r}", "--format", f"use {', '.join(FORMATS)}"
        ) from None
    return renderer(result)
