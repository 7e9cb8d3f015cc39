"""Finding the files ``check`` looks at, and the results for files it will not open.

Folders are walked in a stable order (version-control folders skipped), each
file once however it is reached; pickle checkpoints become ``unsafe`` results
without being loaded (:mod:`lora_prune.pickles`).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

from ..errors import UnreadableFileError, UnsafeFileError, UsageError
from .model import FileResult, Finding, Status, finding_from

__all__ = ["candidates", "file_size", "is_regular", "unreadable_result", "unsafe_result"]

#: Version-control folders are never LoRA payloads and can be huge.
_SKIP_DIRS = frozenset({".git", ".hg", ".svn"})
_NEVER_LOADED = "lora-prune never unpickles files: publish the .safetensors version instead"


def is_regular(path: Path) -> bool:
    """True for an existing regular file (links followed)."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def file_size(path: Path) -> int | None:
    """The file's size in bytes, or None when it cannot be stat'ed."""
    try:
        return os.stat(path).st_size
    except OSError:
        return None


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


Candidate = tuple[Path, bool, OSError | None]


def candidates(paths: Sequence[str | Path]) -> list[Candidate]:
    """(file, explicitly given, listing error) in a stable order, each file once."""
    out: list[Candidate] = []
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


def unsafe_result(path: Path, sniffed: str | None) -> FileResult:
    """The ``unsafe`` result of a pickle checkpoint; ``sniffed`` says what its bytes showed."""
    suffix = path.suffix.lower()
    if sniffed is not None:
        what = f"{sniffed}: refusing to load it"
    else:
        what = f"{suffix} checkpoint, which loaders unpickle by its extension: refusing to load it"
    finding = Finding("error", "unsafe", f"{what}, {_NEVER_LOADED}")
    return FileResult(path, "unsafe", [finding], bytes=file_size(path))


def unreadable_result(path: Path, exc: UnreadableFileError) -> FileResult:
    """The result of a file the reader refused."""
    status: Status = "unsafe" if isinstance(exc, UnsafeFileError) else "unreadable"
    return FileResult(path, status, [finding_from(exc, path)], bytes=file_size(path))
