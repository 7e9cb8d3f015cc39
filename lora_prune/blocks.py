"""Block ids, their model order, and the block specs users type, for any model family.

A block id is a named block (``clip``, ``t5``, ``input``, ``guidance``, ``final``)
or an indexed one, ``KIND.N`` (``double.7``, ``single.20``, ``block.12``); ``other``
holds keys reported but not understood. Which ids a model has, its groups and
the block-weight vectors its users type are its family's :class:`BlockLayout`
(:mod:`lora_prune.families`); ordering, labels and spec text are the same for all.

:func:`parse_block_spec` reads everything people already use to name blocks: id
lists with ranges and groups, the block-weight vectors of a family's ecosystem
and, where a family has them, kohya's ``train_double_block_indices`` syntax.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cached_property

from .errors import BlockSpecError

__all__ = [
    "OTHER",
    "TEXT_ENCODER_IDS",
    "BlockLayout",
    "BlockSpec",
    "block_kind",
    "block_order",
    "block_vector",
    "format_block_spec",
    "implied_blocks",
    "parse_block_spec",
    "resolve_blocks",
    "short_label",
    "sort_blocks",
]

OTHER = "other"
#: The text-encoder block ids of every family's vocabulary (a family has some or none).
TEXT_ENCODER_IDS: tuple[str, ...] = ("clip", "t5")
#: Named blocks, in model order around the indexed kinds (which come between input/guidance and final).
_LEADING = (*TEXT_ENCODER_IDS, "input", "guidance")
_TRAILING = ("final",)
#: Indexed block kinds in model order: a family uses the ones its transformer has.
INDEXED_KINDS: tuple[str, ...] = ("double", "single", "block")
_RANK = {
    **{name: i for i, name in enumerate(_LEADING)},
    **{kind: len(_LEADING) + i for i, kind in enumerate(INDEXED_KINDS)},
    "final": len(_LEADING) + len(INDEXED_KINDS),
    OTHER: len(_LEADING) + len(INDEXED_KINDS) + 1,
}
_LABEL_PREFIX = {"double": "d", "single": "s", "block": "b"}
#: Block indices are below this (a key's index has at most 6 digits, a family far fewer blocks).
_PER_KIND = 1_000_000

_ID_RE = re.compile(r"^([a-z]+)\.(\d+)(?:-(\d+))?$")
_KOHYA_RE = re.compile(r"(train_double_block_indices|train_single_block_indices)\s*=\s*")
_NUMBER_RE = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$")
_INDEX_RE = re.compile(r"(\d+)(?:-(\d+))?")


@dataclass(frozen=True)
class BlockLayout:
    """The blocks of one model family, as its family module declares them.

    Attributes:
        family: the family's display name, for messages (``"FLUX.1"``).
        ids: every block id in model order.
        vectors: block-weight vector layouts by length: each value drives the
            blocks of its tuple (the family's ecosystem conventions).
        vector_help: how to write a vector, for the error on an unknown length.
        kohya_indices: whether kohya's ``train_double_block_indices`` /
            ``train_single_block_indices`` syntax names this family's blocks.
    """

    family: str
    ids: tuple[str, ...]
    vectors: Mapping[int, tuple[tuple[str, ...], ...]] = field(default_factory=dict)
    vector_help: str = ""
    kohya_indices: bool = False

    # Derived once per layout (the spec parser asks per token); cached_property writes the
    # instance dict directly, which a frozen dataclass allows.
    @cached_property
    def counts(self) -> dict[str, int]:
        """Blocks per indexed kind (``{"double": 19, "single": 38}``)."""
        out: dict[str, int] = {}
        for b in self.ids:
            kind = block_kind(b)
            if kind in INDEXED_KINDS:
                out[kind] = out.get(kind, 0) + 1
        return out

    @cached_property
    def text_encoders(self) -> tuple[str, ...]:
        return tuple(b for b in self.ids if b in TEXT_ENCODER_IDS)

    @cached_property
    def groups(self) -> dict[str, tuple[str, ...]]:
        """``double``/``single``/``block`` (each indexed kind), ``te`` where present, ``all``."""
        out = {kind: tuple(b for b in self.ids if block_kind(b) == kind) for kind in self.counts}
        if self.text_encoders:
            out["te"] = self.text_encoders
        out["all"] = self.ids
        return out

    @cached_property
    def named(self) -> tuple[str, ...]:
        """The ids that are not indexed (``clip``, ``input``, ``final``, ...)."""
        return tuple(b for b in self.ids if block_kind(b) not in INDEXED_KINDS)


def block_kind(block: str) -> str:
    """An indexed block's kind (``double``, ``single``, ``block``), ``te``, or the named id."""
    kind, dot, index = block.partition(".")
    if dot and kind in INDEXED_KINDS and index.isdigit():
        return kind
    if block in TEXT_ENCODER_IDS:
        return "te"
    return block if block in (*_LEADING, *_TRAILING) else OTHER


def block_order(block: str) -> int:
    """Sort key that puts blocks in model order (``other`` last), for every family.

    An int (the kind's place times a million, plus the index), so that the report
    can sort a table column by it.
    """
    kind = block_kind(block)
    if kind in INDEXED_KINDS:
        return _RANK[kind] * _PER_KIND + int(block.partition(".")[2])
    return (_RANK[block] if block in _RANK else _RANK[OTHER]) * _PER_KIND


def sort_blocks(blocks: Iterable[str]) -> list[str]:
    """The given block ids in model order."""
    return sorted(set(blocks), key=block_order)


def short_label(block: str) -> str:
    """A compact label for charts: ``d7``, ``s20``, ``b12``, ``in``, ``fin``."""
    kind = block_kind(block)
    if kind in _LABEL_PREFIX:
        return _LABEL_PREFIX[kind] + block.partition(".")[2]
    return {"input": "in", "final": "fin", "guidance": "gd"}.get(block, block)


def _where(spec: str) -> str:
    return f"block spec {spec!r}"


def _range_ids(layout: BlockLayout, kind: str, lo: int, hi: int, spec: str) -> list[str]:
    count = layout.counts.get(kind)
    if count is None:
        raise BlockSpecError(
            f"{layout.family} has no {kind} blocks",
            _where(spec),
            f"its blocks are {format_block_spec(layout.ids)}",
        )
    if lo > hi:
        raise BlockSpecError(
            f"empty range {kind}.{lo}-{hi}", _where(spec), "write the lower index first"
        )
    if hi >= count:
        raise BlockSpecError(
            f"{kind} block index {hi} is out of range 0..{count - 1}",
            _where(spec),
            f"{layout.family} has {count} {kind} blocks",
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
        m = _INDEX_RE.fullmatch(part)
        if not m:
            raise BlockSpecError(
                f"cannot read block index {part!r}", _where(spec), "use e.g. 0,1,8-12,18"
            )
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi >= count or lo > hi:
            raise BlockSpecError(
                f"block index range {part} is outside 0..{count - 1}", _where(spec), "fix the index"
            )
        out.extend(range(lo, hi + 1))
    return out


def _parse_kohya(layout: BlockLayout, spec: str) -> frozenset[str]:
    if not layout.kohya_indices:
        raise BlockSpecError(
            f"kohya's block indices do not name {layout.family}'s blocks",
            _where(spec),
            f"name the blocks, e.g. {format_block_spec(layout.ids[:3])}",
        )
    parts = _KOHYA_RE.split(spec)
    # split() with one group gives [prefix, name, value, name, value, ...]
    if parts[0].strip(" ,;"):
        raise BlockSpecError(
            f"unexpected text {parts[0].strip()!r}",
            _where(spec),
            "write train_double_block_indices=... and/or train_single_block_indices=...",
        )
    counts = layout.counts
    given: dict[str, list[int]] = {}
    for name, value in zip(parts[1::2], parts[2::2], strict=True):
        value = value.strip().rstrip(";").strip()
        kind = "double" if "double" in name else "single"
        given[kind] = _parse_indices(value, counts.get(kind, 0), spec)
    keep: set[str] = set(layout.named)
    # As in kohya's trainer, a kind that is not named is trained (kept) whole.
    for kind, ids in layout.groups.items():
        if kind not in counts:
            continue
        if kind in given:
            keep.update(f"{kind}.{i}" for i in given[kind])
        else:
            keep.update(ids)
    return frozenset(keep)


def _parse_vector(layout: BlockLayout, values: list[str], spec: str) -> frozenset[str]:
    vector = layout.vectors.get(len(values))
    if vector is None:
        raise BlockSpecError(
            f"a block-weight vector of {len(values)} values has no known layout for {layout.family}",
            _where(spec),
            layout.vector_help or "name the blocks instead",
        )
    addressed: set[str] = set()
    keep: set[str] = set()
    for value, blocks in zip(values, vector, strict=True):
        if float(value) not in (0.0, 1.0):
            # A weight between would be a strength, which slim does not apply: keeping
            # the block in full without a word would not be what the vector says.
            raise BlockSpecError(
                f"block weight {value} is neither 0 nor 1",
                _where(spec),
                "write 0 (drop) or 1 (keep) for each block: lora-prune keeps or drops whole "
                "blocks, it does not scale them",
            )
        addressed.update(blocks)
        if float(value) == 1.0:
            keep.update(blocks)
    # Blocks a layout does not address (e.g. input/final in FLUX.1's 57-value one) are
    # kept: a vector only ever says which of its blocks to switch off.
    keep.update(b for b in layout.ids if b not in addressed)
    return frozenset(keep)


def _tokens(text: str) -> list[str]:
    return [t.strip() for t in re.split(r"[,\s]+", text) if t.strip()]


def _is_vector(tokens: list[str]) -> bool:
    return len(tokens) > 1 and all(_NUMBER_RE.match(t) for t in tokens)


def implied_blocks(spec: str, layout: BlockLayout) -> frozenset[str]:
    """The blocks ``spec`` keeps without naming each, whose absence from a LoRA is no news.

    Every block for a block-weight vector or kohya's indices (they address every
    block of their layout, and keep the rest), the members of the groups it names
    (``double``, ``single``, ``te``, ``all``); none of the ids and ranges it names one
    by one. The spec is assumed valid (:func:`parse_block_spec` it first).
    """
    text = spec.strip()
    tokens = _tokens(text)
    if _KOHYA_RE.search(text) or _is_vector(tokens):
        return frozenset(layout.ids)
    groups = layout.groups
    return frozenset(b for t in tokens if t.lower() in groups for b in groups[t.lower()])


def parse_block_spec(spec: str, layout: BlockLayout) -> frozenset[str]:
    """Parse a block spec into a set of ``layout``'s block ids.

    Accepted: ``double.0-5,double.7,single.10-20,input``; the groups of the
    layout (each indexed kind, ``te`` = the text encoders, ``all``); a block-weight
    vector of one of the layout's lengths (for FLUX.1 57, 58, 61 or 19 values),
    each 0 (drop) or 1 (keep), blocks the vector does not name being kept; and,
    where the family has them, kohya's ``train_double_block_indices=0,1,8-12``
    (optionally with ``train_single_block_indices=...``).

    Args:
        spec: the spec text, as given to ``--keep``/``--drop``/``--blocks``.
        layout: the blocks of the LoRA's family (``lora.family.blocks``).

    Raises :class:`~lora_prune.errors.BlockSpecError` on a spec it cannot read.

    Example::

        parse_block_spec("double.0-2,final", lora.family.blocks)
        # frozenset({'double.0', 'double.1', 'double.2', 'final'})
    """
    text = spec.strip()
    if not text:
        raise BlockSpecError("empty block spec", "--keep/--drop", "name at least one block")
    if _KOHYA_RE.search(text):
        return _parse_kohya(layout, text)
    tokens = _tokens(text)
    if not tokens:  # only separators, e.g. ",,"
        raise BlockSpecError("empty block spec", _where(spec), "name at least one block")
    if _is_vector(tokens):
        return _parse_vector(layout, tokens, spec)
    groups = layout.groups
    out: set[str] = set()
    for token in tokens:
        low = token.lower()
        if low in groups:
            out.update(groups[low])
            continue
        if low in layout.named:
            out.add(low)
            continue
        m = _ID_RE.match(low)
        if m and m.group(1) in INDEXED_KINDS:
            lo = int(m.group(2))
            hi = int(m.group(3)) if m.group(3) is not None else lo
            out.update(_range_ids(layout, m.group(1), lo, hi, spec))
            continue
        kinds = ", ".join(groups)
        raise BlockSpecError(
            f"unknown block {token!r}",
            _where(spec),
            f"{layout.family}'s blocks are {format_block_spec(layout.ids)}; or the groups {kinds}",
        )
    return frozenset(out)


def format_block_spec(blocks: Iterable[str]) -> str:
    """The shortest spec for a set of blocks, with ranges: ``input,double.0-5,single.7``.

    Args:
        blocks: block ids, in any order; :func:`parse_block_spec` reads the result back.

    Example::

        format_block_spec({"double.2", "double.0", "double.1", "final"})  # 'double.0-2,final'
    """
    parts: list[str] = []
    run: list[int] = []
    run_kind = ""

    def flush() -> None:
        if run:
            parts.append(
                f"{run_kind}.{run[0]}" if len(run) == 1 else f"{run_kind}.{run[0]}-{run[-1]}"
            )
            run.clear()

    for block in sort_blocks(blocks):
        kind = block_kind(block)
        if kind in INDEXED_KINDS:
            index = int(block.partition(".")[2])
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


def block_vector(blocks: Iterable[str], length: int, layout: BlockLayout) -> str:
    """A 0/1 block-weight vector in one of ``layout``'s vector layouts."""
    vector = layout.vectors.get(length)
    if vector is None:
        known = ", ".join(str(n) for n in layout.vectors) or "none"
        raise BlockSpecError(
            f"{layout.family} has no block-weight layout of {length} values",
            "--vector",
            f"use one of: {known}",
        )
    chosen = set(blocks)
    return ",".join("1" if any(b in chosen for b in group) else "0" for group in vector)


@dataclass(frozen=True)
class BlockSpec:
    """A block spec as the user typed it, read once the LoRA's family is known.

    The command line parses ``--keep``/``--drop``/``--blocks`` before any file is
    read; the library resolves the text against ``lora.family.blocks``. ``option``
    names where it was given, for the error.
    """

    text: str
    option: str = "--keep"

    def __post_init__(self) -> None:
        if not _tokens(self.text) and not _KOHYA_RE.search(self.text):
            raise BlockSpecError("empty block spec", self.option, "name at least one block")

    def resolve(self, layout: BlockLayout) -> frozenset[str]:
        """The block ids the spec names in ``layout``."""
        try:
            return parse_block_spec(self.text, layout)
        except BlockSpecError as exc:
            raise BlockSpecError(exc.what, f"{self.option} {self.text!r}", exc.fix) from exc

    def implied(self, layout: BlockLayout) -> frozenset[str]:
        """:func:`implied_blocks` of the spec."""
        return implied_blocks(self.text, layout)


def resolve_blocks(
    blocks: Iterable[str] | BlockSpec | None, layout: BlockLayout
) -> frozenset[str] | None:
    """Block ids as a set: a :class:`BlockSpec` read against ``layout``, ids as given."""
    if blocks is None:
        return None
    if isinstance(blocks, BlockSpec):
        return blocks.resolve(layout)
    return frozenset(blocks)
