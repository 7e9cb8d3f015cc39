"""Sizes as people write them (``"50MB"``, ``"1.5 GiB"``, ``"1200"``) and as we print them.

A leaf (it imports only :mod:`lora_prune.errors`), so that the settings and the
check policy, which both read sizes, need nothing else for it.
"""

from __future__ import annotations

import re

from .errors import UsageError

__all__ = ["human_bytes", "parse_size"]

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


def human_bytes(n: float) -> str:
    """Decimal units, as file managers and model hubs show sizes: ``152.3 MB``."""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
