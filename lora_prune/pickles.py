"""Recognising pickle checkpoints (``.pt``, ``.ckpt``, ...) without ever unpickling them.

``check`` reports them as unsafe and the render loader refuses them; both ask
here, by name (:data:`PICKLE_SUFFIXES`) or by the first bytes (:func:`sniff_pickle`).
"""

from __future__ import annotations

import zipfile
from pathlib import Path

from .errors import NotSafetensorsError, UnsafeFileError
from .safetensors_io import sniff_head

__all__ = ["PICKLE_SUFFIXES", "is_pickle_name", "sniff_pickle"]

#: Extensions of pickle-based checkpoints: loaders unpickle them by the name alone.
PICKLE_SUFFIXES: frozenset[str] = frozenset({".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"})
_SNIFF_BYTES = 16


def is_pickle_name(path: Path) -> bool:
    """True for a file whose extension says it is a pickle checkpoint."""
    return path.suffix.lower() in PICKLE_SUFFIXES


def sniff_pickle(path: Path) -> str | None:
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
