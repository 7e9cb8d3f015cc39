"""What ``check`` finds: findings per file and the verdict over all files.

Plain data, shared by the checks that fill it in and the output formats
(:mod:`.outputs`) that print it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

from ..errors import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_UNREADABLE,
    CorruptFileError,
    IncompleteFileError,
    LoraPruneError,
    NotSafetensorsError,
    UnknownKeysError,
    UnreadableFileError,
    UnsafeFileError,
    UnsupportedLoraError,
    WrongBaseModelError,
)

__all__ = [
    "CheckResult",
    "FileResult",
    "Finding",
    "Level",
    "Reverify",
    "Status",
    "VerifyOutcome",
    "finding_from",
    "number_text",
]

Level = Literal["error", "warning", "info"]
Status = Literal["pass", "fail", "unreadable", "unsafe"]


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
            "alphas": {number_text(k): v for k, v in self.alphas.items()},
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


def number_text(x: float) -> str:
    """A number as the outputs write it: ``16``, ``0.5``, never ``16.0``."""
    return f"{x:g}"


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


def finding_from(exc: LoraPruneError, path: Path) -> Finding:
    """The error finding for an error raised while checking the file at ``path``."""
    # The path is the result's own; a key named by the error goes into `key`.
    key = exc.where if exc.where is not None and exc.where != str(path) else None
    message = exc.what + (f", {exc.fix}" if exc.fix else "")
    return Finding("error", _error_code(exc), message.replace("\n", " "), key)
