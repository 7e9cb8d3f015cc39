"""FLUX.1 block ids, their model order, and the block specs users type.

A block id is one of ``clip``, ``t5``, ``input``, ``double.0``..``double.18``,
``single.0``..``single.37``, ``final`` (and ``other`` for keys reported but not
understood). :func:`parse_block_spec` reads everything people already use to
name blocks: id lists with ranges and groups, the 57/58/61/19-value block
weight vectors of the ComfyUI/Forge/A1111 ecosystems, and kohya's
``train_double_block_indices`` syntax.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import BlockSpecError

__all__ = [
    "BLOCK_IDS",
    "DOUBLE_BLOCKS",
    "DOUBLE_IDS",
    "GROUPS",
    "OTHER",
    "SINGLE_BLOCKS",
    "SINGLE_IDS",
    "TEXT_ENCODER_IDS",
    "block_kind",
    "block_order",
    "block_vector",
    "format_block_spec",
    "implied_blocks",
    "parse_block_spec",
    "short_label",
    "sort_blocks",
]

DOUBLE_BLOCKS = 19
SINGLE_BLOCKS = 38
OTHER = "other"

DOUBLE_IDS: tuple[str, ...] = tuple(f"double.{i}" for i in range(DOUBLE_BLOCKS))
SINGLE_IDS: tuple[str, ...] = tuple(f"single.{i}" for i in range(SINGLE_BLOCKS))
TEXT_ENCODER_IDS: tuple[str, ...] = ("clip", "t5")
#: Every block id in model order (the order of the 61-value layout).
BLOCK_IDS: tuple[str, ...] = (*TEXT_ENCODER_IDS, "input", *DOUBLE_IDS, *SINGLE_IDS, "final")
_ORDER = {b: i for i, b in enumerate((*BLOCK_IDS, OTHER))}

GROUPS: dict[str, tuple[str, ...]] = {
    "double": DOUBLE_IDS,
    "single": SINGLE_IDS,
    "te": TEXT_ENCODER_IDS,
    "all": BLOCK_IDS,
}

# The block-weight vector layouts in use, keyed by their length.
# 58: Inspire pack / the original workflow put one "base" value first; it covers
# the non-block layers, i.e. our input and final blocks.
_VECTOR_LAYOUTS: dict[int, tuple[tuple[str, ...], ...]] = {
    57: tuple((b,) for b in (*DOUBLE_IDS, *SINGLE_IDS)),
    58: (("input", "final"), *((b,) for b in (*DOUBLE_IDS, *SINGLE_IDS))),
    61: tuple((b,) for b in BLOCK_IDS),
    # Forge: value i drives double block i and single blocks 2i and 2i+1.
    19: tuple((f"double.{i}", f"single.{2 * i}", f"single.{2 * i + 1}") for i in range(19)),
}

_ID_RE = re.compile(r"^(double|single)\.(\d+)(?:-(\d+))?$")
_KOHYA_RE = re.compile(r"(train_double_block_indices|train_single_block_indices)\s*=\s*")
_NUMBER_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")


def block_order(block: str) -> int:
    """Sort key that puts blocks in model order (``other`` last)."""
    return _ORDER.get(block, len(_ORDER))


def sort_blocks(blocks: Iterable[str]) -> list[str]:
    """The given block ids in model order."""
    return sorted(set(blocks), key=block_order)


def block_kind(block: str) -> str:
    """``double``, ``single``, ``te``, ``input``, ``final`` or ``other``."""
    if block.startswith("double."):
        return "double"
    if block.startswith("single."):
        return "single"
    if block in TEXT_ENCODER_IDS:
        return "te"
    return block if block in ("input", "final") else OTHER


def short_label(block: str) -> str:
    """A compact label for charts: ``d7``, ``s20``, ``in``, ``fin``."""
    if block.startswith("double."):
        return "d" + block.split(".")[1]
    if block.startswith("single."):
        return "s" + block.split(".")[1]
    return {"input": "in", "final": "fin"}.get(block, block)


def _range_ids(kind: str, lo: int, hi: int, spec: str) -> list[str]:
    count = DOUBLE_BLOCKS if kind == "double" else SINGLE_BLOCKS
    if lo > hi:
        raise BlockSpecError(
            f"empty range {kind}.{lo}-{hi}", f"block spec {spec!r}", "write the lower index first"
        )
    if hi >= count:
        raise BlockSpecError(
            f"{kind} block index {hi} is out of range 0..{count - 1}",
            f"block spec {spec!r}",
            f"FLUX.1 has {count} {kind} blocks",
        )
    return [f"{kind}.{i}" for i in range(lo, hi + 1)]


def _parse_indices(text: str, count: int, spec: str) -> list[int]:
    text = text.strip().strip(",").strip()
    if text.lower() == "all":
        return list(range(count))
    if text.lower() in ("", "none"):
        return []
    out: list[int] = []
    for part in text.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise BlockSpecError(
                f"cannot read block index {part!r}", f"block spec {spec!r}", "use e.g. 0,1,8-12,18"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi >= count or lo > hi:
            raise BlockSpecError(
                f"block index range {part} is outside 0..{count - 1}",
                f"block spec {spec!r}",
                "fix the index",
            )
        out.extend(range(lo, hi + 1))
    return out


def _parse_kohya(spec: str) -> frozenset[str]:
    parts = _KOHYA_RE.split(spec)
    # split() with one group gives [prefix, name, value, name, value, ...]
    if parts[0].strip(" ,;"):
        raise BlockSpecError(
            f"unexpected text {parts[0].strip()!r}",
            f"block spec {spec!r}",
            "write train_double_block_indices=... and/or train_single_block_indices=...",
        )
    given: dict[str, list[int]] = {}
    for name, value in zip(parts[1::2], parts[2::2], strict=True):
        value = value.strip().rstrip(";").strip()
        kind = "double" if "double" in name else "single"
        count = DOUBLE_BLOCKS if kind == "double" else SINGLE_BLOCKS
        given[kind] = _parse_indices(value, count, spec)
    keep: set[str] = {"clip", "t5", "input", "final"}
    # As in kohya's trainer, a kind that is not named is trained (kept) whole.
    for kind, ids in (("double", DOUBLE_IDS), ("single", SINGLE_IDS)):
        if kind in given:
            keep.update(f"{kind}.{i}" for i in given[kind])
        else:
            keep.update(ids)
    return frozenset(keep)


def _parse_vector(values: list[str], spec: str) -> frozenset[str]:
    layout = _VECTOR_LAYOUTS.get(len(values))
    if layout is None:
        raise BlockSpecError(
            f"a block-weight vector of {len(values)} values has no known layout",
            f"block spec {spec!r}",
            "use 57 (double+single), 58 (base+double+single), 61 (clip,t5,input,double,single,final) "
            "or 19 values",
        )
    addressed: set[str] = set()
    keep: set[str] = set()
    for value, blocks in zip(values, layout, strict=True):
        if float(value) not in (0.0, 1.0):
            # A weight between would be a strength, which slim does not apply: keeping
            # the block in full without a word would not be what the vector says.
            raise BlockSpecError(
                f"block weight {value} is neither 0 nor 1",
                f"block spec {spec!r}",
                "write 0 (drop) or 1 (keep) for each block: lora-prune keeps or drops whole "
                "blocks, it does not scale them",
            )
        addressed.update(blocks)
        if float(value) == 1.0:
            keep.update(blocks)
    # Blocks a layout does not address (e.g. input/final in the 57-value one) are kept:
    # a vector only ever says which of its blocks to switch off.
    keep.update(b for b in BLOCK_IDS if b not in addressed)
    return frozenset(keep)


def _tokens(text: str) -> list[str]:
    return [t.strip() for t in re.split(r"[,\s]+", text) if t.strip()]


def _is_vector(tokens: list[str]) -> bool:
    return len(tokens) > 1 and all(_NUMBER_RE.match(t) for t in tokens)


def implied_blocks(spec: str) -> frozenset[str]:
    """The blocks ``spec`` keeps without naming each, whose absence from a LoRA is no news.

    Every block for a block-weight vector or kohya's indices (they address every
    block of their layout, and keep the rest), the members of the groups it names
    (``double``, ``single``, ``te``, ``all``); none of the ids and ranges it names one
    by one. The spec is assumed valid (:func:`parse_block_spec` it first).
    """
    text = spec.strip()
    tokens = _tokens(text)
    if _KOHYA_RE.search(text) or _is_vector(tokens):
        return frozenset(BLOCK_IDS)
    return frozenset(b for t in tokens if t.lower() in GROUPS for b in GROUPS[t.lower()])


def parse_block_spec(spec: str) -> frozenset[str]:
    """Parse a block spec into a set of block ids.

    Accepted: ``double.0-5,double.7,single.10-20,input``; the groups ``double``,
    ``single``, ``te`` (``clip`` + ``t5``) and ``all``; a block-weight vector of
    57, 58, 61 or 19 comma-separated weights, each 0 (drop) or 1 (keep), blocks
    the layout does not name being kept (the 57-value one names no ``input`` and
    ``final``, none names the text encoders but 61); kohya's ``train_double_block_indices=0,1,8-12``
    (optionally with ``train_single_block_indices=...``).

    Args:
        spec: the spec text, as given to ``--keep``/``--drop``/``--blocks``.

    Raises :class:`~lora_prune.errors.BlockSpecError` on a spec it cannot read.

    Example::

        parse_block_spec("double.0-2,final")
        # frozenset({'double.0', 'double.1', 'double.2', 'final'})
    """
    text = spec.strip()
    if not text:
        raise BlockSpecError("empty block spec", "--keep/--drop", "name at least one block")
    if _KOHYA_RE.search(text):
        return _parse_kohya(text)
    tokens = _tokens(text)
    if not tokens:  # only separators, e.g. ",,"
        raise BlockSpecError("empty block spec", f"block spec {spec!r}", "name at least one block")
    if _is_vector(tokens):
        return _parse_vector(tokens, spec)
    out: set[str] = set()
    for token in tokens:
        low = token.lower()
        if low in GROUPS:
            out.update(GROUPS[low])
            continue
        if low in ("clip", "t5", "input", "final"):
            out.add(low)
            continue
        m = _ID_RE.match(low)
        if m:
            lo = int(m.group(2))
            hi = int(m.group(3)) if m.group(3) is not None else lo
            out.update(_range_ids(m.group(1), lo, hi, spec))
            continue
        raise BlockSpecError(
            f"unknown block {token!r}",
            f"block spec {spec!r}",
            "use ids like double.0-5,single.10,input,final,clip,t5 or the groups double, single, te, all",
        )
    return frozenset(out)


def format_block_spec(blocks: Iterable[str]) -> str:
    """The shortest spec for a set of blocks, with ranges: ``input,double.0-5,single.7``.

    Args:
        blocks: block ids, in any order; :func:`parse_block_spec` reads the result back.

    Example::

        format_block_spec({"double.2", "double.0", "double.1", "final"})  # 'double.0-2,final'
    """
    ordered = sort_blocks(blocks)
    parts: list[str] = []
    run: list[int] = []
    run_kind = ""

    def flush() -> None:
        if run:
            parts.append(
                f"{run_kind}.{run[0]}" if len(run) == 1 else f"{run_kind}.{run[0]}-{run[-1]}"
            )
            run.clear()

    for block in ordered:
        kind = block_kind(block)
        if kind in ("double", "single"):
            index = int(block.split(".")[1])
            if kind == run_kind and run and index == run[-1] + 1:
                run.append(index)
                continue
            flush()
            run_kind = kind
            run.append(index)
        else:
            flush()
            parts.append(block)
    flush()
    return ",".join(parts)


def block_vector(blocks: Iterable[str], length: int = 61) -> str:
    """Emit a 0/1 block-weight vector in one of the known layouts (57, 58, 61, 19)."""
    layout = _VECTOR_LAYOUTS.get(length)
    if layout is None:
        raise BlockSpecError(
            f"no block-weight layout of {length} values", "--vector", "use 57, 58, 61 or 19"
        )
    chosen = set(blocks)
    return ",".join("1" if any(b in chosen for b in group) else "0" for group in layout)
