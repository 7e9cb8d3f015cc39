"""The TOML policy a repository sets for its LoRA files (see docs/ci.md).

:func:`load_policy` reads the file and :func:`parse_policy` validates it into a
:class:`Policy`; every mistake in it is a one-line :class:`UsageError` naming
the file and key.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..blocks import BlockLayout, parse_block_spec
from ..errors import BlockSpecError, MissingDependencyError, UsageError
from ..families import FAMILIES
from ..units import parse_size

__all__ = ["POLICY_KEYS", "Policy", "SlimPair", "load_policy", "parse_policy"]


@dataclass(frozen=True)
class SlimPair:
    """A ``[[slim]]`` table: a slim file and the full file it was cut from."""

    file: Path
    full: Path


@dataclass(frozen=True)
class Policy:
    """Rules a repository sets for its LoRA files (see docs/ci.md)."""

    max_bytes: int | None = None
    #: block specs of what a file may contain (read against each file's family); None = any
    allowed_blocks: tuple[str, ...] | None = None
    required_blocks: tuple[str, ...] = ()
    required_metadata: tuple[str, ...] = ()
    #: every slim file (one with lora_prune provenance) must carry a passed verification
    require_verified: bool = False
    #: the lowest SSIM threshold a recorded verification may have used
    min_ssim: float | None = None
    #: the lowest share of the LoRA's effect a verification must have demanded and found
    min_kept: float | None = None
    slim: tuple[SlimPair, ...] = ()
    source: Path | None = None

    def allowed_in(self, layout: BlockLayout) -> frozenset[str] | None:
        """The blocks of ``layout`` a file may contain; None = any."""
        return _union(self.allowed_blocks, layout) if self.allowed_blocks is not None else None

    def required_in(self, layout: BlockLayout) -> frozenset[str]:
        """The blocks of ``layout`` a file must contain."""
        return _union(self.required_blocks, layout)


def _union(specs: tuple[str, ...], layout: BlockLayout) -> frozenset[str]:
    out: set[str] = set()
    for spec in specs:
        try:
            out |= parse_block_spec(spec, layout)
        except BlockSpecError:
            continue  # a spec for another family names none of this one's blocks
    return frozenset(out)


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
    """Read a TOML policy file; any mistake in it is a :class:`UsageError`.

    Args:
        path: the policy file (format in docs/ci.md).

    Example::

        policy = load_policy("lora-policy.toml")
        result = run_check([Path("loras")], policy)
    """
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


def _block_specs(value: object, key: str, source: Path | None) -> tuple[str, ...]:
    """The specs of a block key, each readable by at least one supported family."""
    specs = [value] if isinstance(value, str) else value
    if not isinstance(specs, list) or not specs or not all(isinstance(s, str) for s in specs):
        raise _bad(
            key,
            source,
            f"policy key {key!r} must be a block spec or a list of them",
            'write e.g. "double.0-18,single" or ["double.7", "single.10-20"]',
        )
    for spec in specs:
        errors: list[BlockSpecError] = []
        for family in FAMILIES:
            try:
                parse_block_spec(spec, family.blocks)
            except BlockSpecError as exc:
                errors.append(exc)
        if len(errors) == len(FAMILIES):
            raise _bad(key, source, errors[0].what, errors[0].fix or "fix the block spec")
    return tuple(specs)


def _max_bytes(data: Mapping[str, Any], source: Path | None) -> int | None:
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
    return max_bytes


def _metadata_keys(data: Mapping[str, Any], source: Path | None) -> tuple[str, ...]:
    meta_value = data.get("required_metadata", [])
    meta_keys = [meta_value] if isinstance(meta_value, str) else meta_value
    if not isinstance(meta_keys, list) or not all(isinstance(k, str) and k for k in meta_keys):
        raise _bad(
            "required_metadata",
            source,
            "required_metadata must be a list of key names",
            'write e.g. required_metadata = ["modelspec.trigger_phrase"]',
        )
    return tuple(meta_keys)


def _share(
    data: Mapping[str, Any], key: str, source: Path | None, zero_ok: bool, what: str, fix: str
) -> float | None:
    """An optional number in [0, 1] (``zero_ok``) or (0, 1]."""
    value = data.get(key)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not (float(value) >= 0.0 if zero_ok else float(value) > 0.0)
        or not float(value) <= 1.0
    ):
        raise _bad(key, source, what, fix)
    return float(value)


def _slim_pairs(data: Mapping[str, Any], base: Path, source: Path | None) -> tuple[SlimPair, ...]:
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
    return tuple(pairs)


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
    max_bytes = _max_bytes(data, source)
    allowed = (
        _block_specs(data["allowed_blocks"], "allowed_blocks", source)
        if "allowed_blocks" in data
        else None
    )
    required = (
        _block_specs(data["required_blocks"], "required_blocks", source)
        if "required_blocks" in data
        else ()
    )
    meta_keys = _metadata_keys(data, source)
    require_verified = data.get("require_verified", False)
    if not isinstance(require_verified, bool):
        raise _bad(
            "require_verified",
            source,
            "require_verified must be true or false",
            "write require_verified = true",
        )
    min_ssim = _share(
        data,
        "min_ssim",
        source,
        True,
        "min_ssim must be a number from 0 to 1",
        "write e.g. min_ssim = 0.95",
    )
    min_kept = _share(
        data,
        "min_kept",
        source,
        False,
        "min_kept must be a number above 0 and at most 1",
        "write e.g. min_kept = 0.9",
    )
    return Policy(
        max_bytes=max_bytes,
        allowed_blocks=allowed,
        required_blocks=required,
        required_metadata=meta_keys,
        require_verified=require_verified,
        min_ssim=min_ssim,
        min_kept=min_kept,
        slim=_slim_pairs(data, base, source),
        source=source,
    )
