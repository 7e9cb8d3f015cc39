"""The verified render cache of ``analyze``: every cached image has a record, checked on read.

A sweep trusts its ``images/KEY.png`` files only as far as their record, a
sidecar ``images/KEY.json`` written when the image was: the image's cache key,
its size in bytes, its sha256 and its pixel size. An image without a record,
or one that does not match it (truncated, corrupt, of another size, or another
image's bytes), is damaged: ``analyze`` renders it again, ``analyze --from``
refuses it by name (:class:`DamagedRenderError`, exit 3).

Why a sidecar per image and not one index file: each record is written once,
by the batch that renders its image, so there is no shared file to read,
change and rewrite after every batch (thousands of images would make that
quadratic), no lost update when two analyses of different LoRAs share a
folder (they share the no-LoRA images), and a kill costs at most the image
being written. The record is written before the image, both atomically, so an
image on disk always has its record unless something other than lora-prune
put it there.
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .boundedjson import JsonLimitError, loads_bounded
from .errors import UnreadableFileError
from .fileio import atomic_write_bytes, read_limited
from .pictures import encode_png

RECORD_SCHEMA = 1
#: A record is ~200 bytes; anything much larger is not one of ours.
RECORD_MAX_BYTES = 4096
#: Largest cached image read: a 2048x2048 RGB PNG without compression is 12 MiB.
IMAGE_MAX_BYTES = 256 * 1024 * 1024


class DamagedRenderError(UnreadableFileError):
    """A cached render that has no record or does not match it."""


@dataclass(frozen=True)
class RenderRecord:
    key: str
    bytes: int
    sha256: str
    width: int
    height: int


def record_path(image_path: Path) -> Path:
    return image_path.with_suffix(".json")


def save_render(image: np.ndarray, path: Path, key: str) -> None:
    """Write a rendered image and its record (record first: see the module docstring)."""
    data = encode_png(image)
    height, width = image.shape[:2]
    doc = {
        "schema": RECORD_SCHEMA,
        "key": key,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "width": int(width),
        "height": int(height),
    }
    text = json.dumps(doc, sort_keys=True) + "\n"
    atomic_write_bytes(record_path(path), text.encode(), what="render record")
    atomic_write_bytes(path, data, what="render")


def _read_record(path: Path) -> RenderRecord:
    """The record of ``path``, or ValueError saying what is wrong with it."""
    try:
        raw = read_limited(record_path(path), RECORD_MAX_BYTES)
    except FileNotFoundError as exc:
        raise ValueError("has no record") from exc
    except OSError as exc:
        raise ValueError(f"has an unreadable record ({exc.strerror})") from exc
    try:
        doc = loads_bounded(raw, max_bytes=RECORD_MAX_BYTES)
    except JsonLimitError as exc:
        raise ValueError(f"has a record that {exc.reason}") from exc
    if not isinstance(doc, dict) or doc.get("schema") != RECORD_SCHEMA:
        raise ValueError("has a record of an unknown layout")
    key, digest = doc.get("key"), doc.get("sha256")
    size, width, height = (_positive_int(doc.get(k)) for k in ("bytes", "width", "height"))
    if not (isinstance(key, str) and isinstance(digest, str) and size and width and height):
        raise ValueError("has a record of an unknown layout")
    return RenderRecord(key, size, digest, width, height)


def _positive_int(value: object) -> int | None:
    # bool is an int to Python, not to a record.
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    return None


def _checked_bytes(path: Path, key: str, width: int, height: int) -> bytes:
    """The bytes of a cached image that matches its record, else ValueError with the reason."""
    record = _read_record(path)
    if record.key != key:
        raise ValueError("has the record of another image")
    if (record.width, record.height) != (width, height):
        raise ValueError(f"is {record.width}x{record.height}, the sweep renders {width}x{height}")
    try:
        data = read_limited(path, min(record.bytes, IMAGE_MAX_BYTES))
    except FileNotFoundError as exc:
        raise ValueError("is missing") from exc
    except OSError as exc:
        raise ValueError(f"cannot be read ({exc.strerror})") from exc
    if len(data) != record.bytes:
        raise ValueError(f"has {len(data)} bytes, its record says {record.bytes} (truncated?)")
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise ValueError("does not match the sha256 of its record (changed or corrupt)")
    return data


def check_render(path: Path, key: str, width: int, height: int) -> str | None:
    """Why the cached image at ``path`` cannot be used, or None when it matches its record.

    Reads and hashes the file without decoding it: a file with the recorded
    bytes is the PNG that was written.
    """
    try:
        _checked_bytes(path, key, width, height)
    except ValueError as exc:
        return str(exc)
    return None


def damaged(path: Path, reason: str) -> DamagedRenderError:
    return DamagedRenderError(
        f"cached render {reason}",
        path,
        "run analyze again with the LoRA and --model (not --from) to render it again",
    )


def load_render(path: Path, key: str, width: int, height: int) -> np.ndarray:
    """The pixels of a cached image, checked against its record in the same read of the file.

    Raises :class:`DamagedRenderError` naming the file.
    """
    try:
        data = _checked_bytes(path, key, width, height)
    except ValueError as exc:
        raise damaged(path, str(exc)) from exc
    try:
        with Image.open(io.BytesIO(data)) as im:
            pixels = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # Only a forged record gets here: the bytes are those the record hashed.
        raise damaged(path, f"cannot be decoded ({exc})") from exc
    if pixels.shape != (height, width, 3):
        raise damaged(path, f"is {pixels.shape[1]}x{pixels.shape[0]}, not {width}x{height}")
    return pixels
