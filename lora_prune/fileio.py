"""Atomic outputs: every file lora-prune writes goes through :func:`atomic_output`.

A temp file beside the destination is written, flushed and fsynced, optionally
checked, then renamed over the destination, and the folder is fsynced: an
interrupted or failed write never leaves a half-written output or replaces a
good one.

Temp files are named by :func:`temp_name` (the owner's host and pid inside),
and the first temp created in a folder by a process sweeps that folder of the
temps of dead processes (:func:`sweep_stale_temps`): a SIGKILL leaves a temp
behind, and the next writing command in the same folder removes it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import secrets
import socket
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from .errors import OutputError, SameFileError, UnreadableFileError

#: The tag every temp file name carries after the destination's name.
TEMP_TAG = "lora-prune"
_TOKEN_CHARS = 12
# A destination name longer than this (in bytes) is shortened in its temp's
# name: the temp must fit the 255-byte name limit of common filesystems.
_NAME_BYTES = 160


def _host_tag() -> str:
    # A pid means nothing on another machine (a shared network folder) or in a
    # container with another hostname: temps are swept only by their own host.
    return hashlib.sha256(socket.gethostname().encode("utf-8", "surrogateescape")).hexdigest()[:8]


HOST_TAG = _host_tag()


def temp_name(dest_name: str, pid: int, token: str, host: str = HOST_TAG) -> str:
    """The name of a temp file for ``dest_name``: ``.NAME.lora-prune-HOST-PID-TOKEN.tmp``."""
    if len(os.fsencode(dest_name)) > _NAME_BYTES:
        dest_name = dest_name[: _NAME_BYTES // 4]
    return f".{dest_name}.{TEMP_TAG}-{host}-{pid}-{token}.tmp"


def _is_hex(text: str, length: int) -> bool:
    return len(text) == length and all(c in "0123456789abcdef" for c in text)


def temp_owner(name: str) -> tuple[str, int] | None:
    """The (host tag, pid) of a name :func:`temp_name` made, else None.

    Plain string operations on a fixed layout (no regex, linear in the name):
    anything that is not exactly our pattern is not ours and is never touched.
    """
    marker = f".{TEMP_TAG}-"
    if not (name.startswith(".") and name.endswith(".tmp")):
        return None
    head, sep, tail = name[1:-4].rpartition(marker)
    if not sep or not head:
        return None
    parts = tail.split("-")
    if len(parts) != 3:
        return None
    host, pid_text, token = parts
    if not (_is_hex(host, len(HOST_TAG)) and _is_hex(token, _TOKEN_CHARS)):
        return None
    # isdecimal alone accepts other scripts' digits; a pid is at most 10 ASCII digits.
    if not (0 < len(pid_text) <= 10 and pid_text.isascii() and pid_text.isdecimal()):
        return None
    pid = int(pid_text)
    return (host, pid) if pid > 0 else None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` may be alive on this host (when unsure: yes)."""
    if os.name != "posix":
        # Windows' os.kill terminates the process: never probe there.
        return True
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OverflowError, OSError):
        # PermissionError (an OSError): another user's live process. Anything else: unsure, keep.
        return True
    return True


_swept: set[str] = set()


def sweep_stale_temps(folder: Path) -> list[Path]:
    """Remove the temp files in ``folder`` left by dead processes of this host.

    Only names of our pattern (:func:`temp_owner`) that are regular files are
    candidates; a temp of a live process, of another host or of unknown owner is
    left alone. Failures to list or remove are ignored: the sweep is a courtesy
    and must never fail the write that triggers it. Returns what was removed.
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        owner = temp_owner(entry.name)
        if owner is None or owner[0] != HOST_TAG or pid_alive(owner[1]):
            continue
        with contextlib.suppress(OSError):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)
                removed.append(Path(entry.path))
    return removed


def _sweep_once(folder: Path) -> None:
    key = os.path.abspath(folder)
    if key not in _swept:
        _swept.add(key)
        sweep_stale_temps(folder)


def temp_paths(dest: Path) -> Iterator[Path]:
    """Fresh temp-file names beside ``dest``, to be tried in turn with :func:`open_new`.

    The name (:func:`temp_name`) starts with a dot, carries this host's tag and
    this process's pid and ends in ``.tmp``, so that a leftover is recognisable
    and removable once its owner is dead; the first call per folder sweeps such
    leftovers. Shared by every atomic writer of the package (outputs must be
    renamed within one folder to be atomic).
    """
    _sweep_once(dest.parent)
    for _ in range(100):
        yield dest.with_name(
            temp_name(dest.name, os.getpid(), secrets.token_hex(_TOKEN_CHARS // 2))
        )
    raise FileExistsError(errno.EEXIST, "could not create a unique temp file", str(dest))


def open_new(path: Path) -> int | None:
    """A write fd on a new, empty file at ``path``; None when ``path`` exists."""
    # os.open with 0o666 lets the umask decide the final permissions, as for any
    # new file; mkstemp would leave the output readable by its owner only.
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    try:
        return os.open(path, flags, 0o666)
    except FileExistsError:
        return None


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
        # ``tmp`` names each candidate before it is created: a Ctrl-C or TERM
        # right after the open must find the name to remove. Holding the signals
        # back instead would not do: the kernel hands a process-wide TERM to any
        # thread that does not block it (BLAS pools, torch), and Python runs the
        # handler in the main thread at once. A candidate that already existed
        # carries this pid and a random token: only a stale temp of ours.
        fd: int | None = None
        for tmp in temp_paths(dest_path):
            fd = open_new(tmp)
            if fd is not None:
                break
        # temp_paths raises when every name is taken: the loop ends on a new file.
        assert fd is not None and tmp is not None
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


def write_json(dest: str | Path, doc: object) -> None:
    """Write ``doc`` as indented JSON (key order kept), atomically."""
    atomic_write_bytes(dest, (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode())


def read_limited(path: Path, limit: int) -> bytes:
    """The bytes of ``path``, or ValueError when it holds more than ``limit`` (hostile files)."""
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"is over {limit} bytes")
    return data


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
