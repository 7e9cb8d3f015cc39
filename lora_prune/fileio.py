"""Atomic outputs: every file lora-prune writes goes through :func:`atomic_output`.

A temp file beside the destination is written, flushed and fsynced, optionally
checked, then renamed over the destination, and the folder is fsynced: an
interrupted or failed write never leaves a half-written output or replaces a
good one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import OutputError, SameFileError, UnreadableFileError


def create_temp(dest: Path) -> tuple[Path, int]:
    """Create a new, empty temp file beside ``dest``; returns its path and a write fd.

    The name starts with a dot and ends in ``.tmp`` so that a leftover is
    recognisable. Shared by every atomic writer of the package (outputs must be
    renamed within one folder to be atomic).
    """
    # os.open with 0o666 lets the umask decide the final permissions, as for any
    # new file; mkstemp would leave the output readable by its owner only.
    for _ in range(100):
        tmp = dest.with_name(f".{dest.name}.{secrets.token_hex(6)}.tmp")
        try:
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
            fd = os.open(tmp, flags, 0o666)
        except FileExistsError:
            continue
        return tmp, fd
    raise FileExistsError(errno.EEXIST, "could not create a unique temp file", str(dest))


def fsync_dir(folder: Path) -> None:
    """Make a rename into ``folder`` durable, where the platform allows it."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        # Some filesystems refuse fsync on folders; the rename is done, and
        # durability of the directory entry is all that is lost.
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_output(
    dest: str | Path, check: Callable[[Path], None] | None = None, *, what: str = "output"
) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``dest`` when the block ends without error.

    ``check(temp_path)`` runs after the data is on disk and before the rename; if
    it (or the block) raises, the temp file is removed and ``dest`` is left as it
    was. Filesystem failures raise :class:`OutputError` naming ``dest``.
    """
    dest_path = Path(dest)
    tmp: Path | None = None
    try:
        tmp, fd = create_temp(dest_path)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if check is not None:
            check(tmp)
        os.replace(tmp, dest_path)
        tmp = None
    except OSError as exc:
        reason = exc.strerror or exc.__class__.__name__
        raise OutputError(
            f"cannot write {what} ({reason})",
            dest_path,
            "check that the folder exists, is writable and has free space",
        ) from exc
    finally:
        if tmp is not None:
            # The original error matters more than a temp file we could not remove.
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
    fsync_dir(dest_path.parent)


def atomic_write_bytes(dest: str | Path, data: bytes, *, what: str = "output") -> None:
    with atomic_output(dest, what=what) as f:
        f.write(data)


def not_a_folder(path: Path) -> None:
    """Refuse a folder given where a file is needed: the same error (exit 3) for every command."""
    if path.is_dir():
        raise UnreadableFileError("is a folder, not a file", path, "give the file itself")


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):  # hard links and symlinks
            return True
    except OSError:
        pass
    return a.resolve() == b.resolve()


def refuse_overwrite(
    inputs: Iterable[Path | None],
    outputs: Iterable[Path | None] = (),
    folders: Iterable[Path | None] = (),
) -> None:
    """Raise :class:`SameFileError` when writing ``outputs`` or into ``folders`` could hit an input.

    The one rule of every writing command, ``--force`` or not: no output file is
    an input (also through a symlink, a hard link or ``..``), and no output
    folder is an input or holds one (at any depth). Call it with everything the
    command reads and writes before anything is written.
    """
    files = [p for p in inputs if p is not None and p.is_file()]
    for out in outputs:
        if out is None:
            continue
        for src in files:
            if _same_file(src, out):
                raise SameFileError(
                    "the output would replace the input", out, "choose another output with -o"
                )
    for folder in folders:
        if folder is None:
            continue
        root = folder.resolve()
        for src in files:
            real = src.resolve()
            if real == root or real.is_relative_to(root):
                raise SameFileError(
                    "the output folder holds an input", folder, "choose another --out folder"
                )
