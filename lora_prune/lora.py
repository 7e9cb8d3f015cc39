"""A parsed LoRA file: its model family, its modules grouped by stem and attributed to blocks.

:func:`read_lora` is the entry point every command uses: it validates the
safetensors file (:mod:`lora_prune.safetensors_io`), finds the family whose key
grammars read it (:mod:`lora_prune.families`), groups the tensors of one module
stem, reads the tiny alpha scalars and the PEFT adapter metadata, and refuses
files of no supported family with an error naming what they are.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from .adapters import adapter_of, rank_of, scale_of
from .blocks import OTHER, sort_blocks
from .boundedjson import JsonLimitError, loads_bounded
from .errors import (
    CorruptFileError,
    UnknownKeysError,
    UnsupportedLoraError,
    WrongBaseModelError,
)
from .families import FAMILIES, Family, guess_base_model
from .keys import BlockRangeError, ParsedKey, Target, other_key
from .safetensors_io import SafetensorsHeader, SafetensorsReader, TensorInfo, read_header

#: key grammar -> the generic grammar its modules' bare ".alpha" keys read as
_REFINED_GRAMMARS = {"lycoris-kohya": "kohya", "diffusers-kohya-suffix": "diffusers"}
#: How many unknown keys an error message lists.
_SHOW_KEYS = 5


@dataclass
class LoraModule:
    """All tensors of one module stem: one adapter on one model layer."""

    stem: str
    block: str
    grammar: str
    target: Target | None
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    #: alpha from the ``.alpha`` tensor or the PEFT metadata; None = no alpha (scale 1)
    alpha: float | None = None

    @property
    def adapter(self) -> str:
        """``lora``, ``loha``, ``lokr``, ``full`` (diff/norm deltas), ``unsupported`` or ``empty``."""
        return adapter_of(self.tensors)

    @property
    def rank(self) -> int | None:
        """The rank that alpha divides: lora down rows, LoHa w1b rows, LoKr factor rank."""
        return rank_of(self.tensors)

    @property
    def scale(self) -> float:
        """alpha / rank, or 1 where there is no alpha (see :func:`lora_prune.adapters.scale_of`)."""
        return scale_of(self)

    @property
    def keys(self) -> list[str]:
        return [t.name for t in self.tensors.values()]

    @property
    def params(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


@dataclass
class ParsedHeader:
    """A header's keys read by one family: modules by stem, each key's block, the grammars."""

    family: Family
    modules: dict[str, LoraModule]
    #: key -> block id, for every tensor of the file
    key_blocks: dict[str, str]
    #: grammar name -> number of keys in it
    grammars: Counter[str]


@dataclass
class LoraFile:
    """A LoRA file, read and attributed to its family's blocks. Tensor data stays on disk."""

    path: Path
    header: SafetensorsHeader
    family: Family
    modules: dict[str, LoraModule]
    #: key -> block id, for every tensor of the file
    key_blocks: dict[str, str]
    #: grammar name -> number of keys in it
    grammars: Counter[str]
    peft_config: dict[str, object] | None = None

    @property
    def format(self) -> str:
        """The dominant key grammar (e.g. ``kohya``, ``diffusers``)."""
        return self.grammars.most_common(1)[0][0] if self.grammars else "empty"

    @property
    def metadata(self) -> dict[str, str]:
        return self.header.metadata

    @property
    def blocks(self) -> list[str]:
        """Block ids present, in model order."""
        return sort_blocks(m.block for m in self.modules.values())

    def modules_of(self, block: str) -> list[LoraModule]:
        return [m for m in self.modules.values() if m.block == block]

    @property
    def total_params(self) -> int:
        return sum(t.numel for t in self.header.tensors.values())

    @property
    def total_bytes(self) -> int:
        """Bytes of tensor data (the file adds only its header)."""
        return sum(t.nbytes for t in self.header.tensors.values())


def _peft_config(metadata: dict[str, str], path: Path) -> dict[str, object] | None:
    raw = metadata.get("lora_adapter_metadata")
    if raw is None:
        return None
    try:
        config = loads_bounded(raw)
    except JsonLimitError as exc:
        raise CorruptFileError(
            f"metadata 'lora_adapter_metadata' {exc.reason}", path, "re-save the LoRA"
        ) from exc
    return config if isinstance(config, dict) else None


#: Longest rank_pattern/alpha_pattern key matched; PEFT keys are module names (< 100 chars).
PATTERN_MAX_CHARS = 256
_META = frozenset(".^$*+?{}[]()|\\")
_DIGITS = frozenset("0123456789")
_WORD = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


class PatternError(ValueError):
    """A PEFT pattern key that lora-prune will not run; the message says why."""


@dataclass(frozen=True)
class _Atom:
    chars: frozenset[str] | None  # None: any character ("."); else the set, or its complement
    negated: bool = False
    optional: bool = False
    repeat: bool = False  # "*": zero or more (optional is then true too)

    def accepts(self, c: str) -> bool:
        return self.chars is None or ((c in self.chars) != self.negated)


@dataclass(frozen=True)
class PeftPattern:
    """A compiled PEFT rank/alpha pattern key: a regex in a subset run without backtracking.

    PEFT matches a key ``k`` against a module name ``n`` with
    ``re.match(rf"(.*\\.)?({k})$", n)``: the pattern must match the whole name or
    the part after one of its dots. The subset: literal characters, ``.``,
    ``\\d``/``\\w``/escaped characters, ``[...]`` classes, the quantifiers ``*``,
    ``+``, ``?``, and ``^``/``$`` at the ends. Groups, alternation and counted
    repeats raise :class:`PatternError` (their keys are refused, never run).
    Matching simulates the pattern's automaton over the name once: time is
    len(name) x len(pattern), whatever the pattern.
    """

    text: str
    atoms: tuple[_Atom, ...]
    anchored: bool

    def matches(self, name: str) -> bool:
        n = len(self.atoms)
        starts = {0} | {i + 1 for i, c in enumerate(name) if c == "."}
        if self.anchored:
            starts = {0}
        states = self._closure({0}) if 0 in starts else set()
        for pos, c in enumerate(name):
            step: set[int] = set()
            for i in states:
                if i < n and self.atoms[i].accepts(c):
                    step.add(i if self.atoms[i].repeat else i + 1)
            if pos + 1 in starts:
                step.add(0)
            states = self._closure(step)
        return n in states

    def _closure(self, states: set[int]) -> set[int]:
        out = set(states)
        todo = list(states)
        while todo:
            i = todo.pop()
            if i < len(self.atoms) and self.atoms[i].optional and i + 1 not in out:
                out.add(i + 1)
                todo.append(i + 1)
        return out


def _class(text: str, i: int) -> tuple[_Atom, int]:
    """The ``[...]`` class starting at ``text[i] == "["``, and the index after it."""
    i += 1
    negated = i < len(text) and text[i] == "^"
    i += negated
    chars: set[str] = set()
    first = True
    while i < len(text) and (text[i] != "]" or first):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            i += 1
            c = text[i]
            if c.isalnum():
                raise PatternError("a class escape")
        if i + 2 < len(text) and text[i + 1] == "-" and text[i + 2] != "]":
            lo, hi = c, text[i + 2]
            if ord(hi) - ord(lo) > 256 or hi < lo:
                raise PatternError("a wide character range")
            chars.update(chr(x) for x in range(ord(lo), ord(hi) + 1))
            i += 3
        else:
            chars.add(c)
            i += 1
        first = False
    if i >= len(text):
        raise PatternError("an unclosed [")
    return _Atom(frozenset(chars), negated), i + 1


def compile_peft_pattern(text: str) -> PeftPattern:
    """Compile a rank_pattern/alpha_pattern key, or raise :class:`PatternError`."""
    if len(text) > PATTERN_MAX_CHARS:
        raise PatternError(f"{len(text)} characters (at most {PATTERN_MAX_CHARS})")
    anchored = text.startswith("^")
    body = text[1:] if anchored else text
    if body.endswith("$") and not body.endswith("\\$"):
        body = body[:-1]
    atoms: list[_Atom] = []
    i = 0
    while i < len(body):
        c = body[i]
        if c in "*+?":
            if not atoms or atoms[-1].optional:
                raise PatternError(f"a quantifier {c!r} without a plain character before it")
            last = atoms[-1]
            if c == "*":
                atoms[-1] = _Atom(last.chars, last.negated, optional=True, repeat=True)
            elif c == "+":
                atoms.append(_Atom(last.chars, last.negated, optional=True, repeat=True))
            else:
                atoms[-1] = _Atom(last.chars, last.negated, optional=True)
            i += 1
        elif c == ".":
            atoms.append(_Atom(None))
            i += 1
        elif c == "[":
            atom, i = _class(body, i)
            atoms.append(atom)
        elif c == "\\":
            if i + 1 >= len(body):
                raise PatternError("a trailing backslash")
            e = body[i + 1]
            if e == "d":
                atoms.append(_Atom(_DIGITS))
            elif e == "w":
                atoms.append(_Atom(_WORD))
            elif e.isalnum():
                raise PatternError(f"the escape \\{e}")
            else:
                atoms.append(_Atom(frozenset(e)))
            i += 2
        elif c in _META:
            raise PatternError(f"{c!r} (groups, alternation, anchors or counted repeats)")
        else:
            atoms.append(_Atom(frozenset(c)))
            i += 1
    return PeftPattern(text, tuple(atoms), anchored)


def _peft_pattern(text: str, where: str | Path) -> PeftPattern:
    """:func:`compile_peft_pattern`, with a refusal as the tool's own error."""
    try:
        return compile_peft_pattern(text)
    except PatternError as exc:
        shown = text if len(text) <= 60 else text[:57] + "..."
        raise UnsupportedLoraError(
            f"lora_adapter_metadata pattern {shown!r} uses {exc}, which lora-prune does not run",
            where,
            "write the pattern as a module name or a simple regex (., *, +, ?, [..]), "
            "or remove it from the metadata",
        ) from exc


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    x = float(value)
    return x if math.isfinite(x) else None


def _peft_alpha(config: dict[str, object], module: LoraModule, path: Path) -> float | None:
    """alpha for a PEFT module from diffusers' packed adapter config, or None.

    PEFT scales by lora_alpha / r where r is the configured (pattern-specific)
    rank; we express that as an alpha over the module's actual rank. Like PEFT's
    ``get_pattern_key``, the first pattern key (in file order) that matches wins.
    """
    model = module.target.model if module.target else "transformer"
    prefix = {"transformer": "transformer.", "clip": "text_encoder.", "t5": "text_encoder_2."}[
        model
    ]

    def get(name: str) -> object:
        return config.get(prefix + name, config.get(name))

    r, lora_alpha = _number(get("r")), _number(get("lora_alpha"))
    name = module.target.name if module.target else module.stem
    for pattern_key in ("rank_pattern", "alpha_pattern"):
        pattern = get(pattern_key)
        if not isinstance(pattern, dict):
            continue
        for pat, value in pattern.items():
            if _peft_pattern(pat, path).matches(name):
                if _number(value) is not None:
                    if pattern_key == "rank_pattern":
                        r = _number(value)
                    else:
                        lora_alpha = _number(value)
                break
    if r is None or lora_alpha is None or r <= 0:
        return None
    rank = module.rank
    if not rank:
        return None
    scale = lora_alpha / (math.sqrt(r) if get("use_rslora") is True else r)
    return scale * rank


def _supported() -> str:
    return " or ".join(f.display for f in FAMILIES)


def _check_other_base_model(unknown: list[str], path: Path) -> None:
    base = guess_base_model(unknown)
    if base is not None:
        raise WrongBaseModelError(
            f"this LoRA is for {base}, which lora-prune does not support "
            f"({len(unknown)} keys such as {unknown[0]!r})",
            path,
            f"use a LoRA for {_supported()}",
            base,
        )


@dataclass
class _Reading:
    parsed: list[ParsedKey]
    unknown: list[str]
    range_errors: list[BlockRangeError]
    range_keys: list[str]

    @property
    def transformer_keys(self) -> int:
        return sum(pk.target is not None and pk.target.model == "transformer" for pk in self.parsed)


def _read_keys(family: Family, header: SafetensorsHeader) -> _Reading:
    reading = _Reading([], [], [], [])
    for key in header.tensors:
        try:
            pk = family.parse_key(key)
        except BlockRangeError as exc:
            reading.range_errors.append(exc)
            reading.range_keys.append(key)
            continue
        if pk is None:
            reading.unknown.append(key)
        else:
            reading.parsed.append(pk)
    return reading


def parse_lora_header(
    header: SafetensorsHeader, *, allow_unknown: bool = False, family: Family | None = None
) -> ParsedHeader:
    """Group the header's keys into modules without reading tensor data.

    ``family`` None reads the keys with every family's grammars and takes the
    one that places the most transformer keys (the first of a tie).
    """
    path = header.path
    readings = [(f, _read_keys(f, header)) for f in ((family,) if family else FAMILIES)]
    best = max(range(len(readings)), key=lambda i: (readings[i][1].transformer_keys, -i))
    family, reading = readings[best]
    parsed, unknown = reading.parsed, reading.unknown
    if reading.range_errors:
        blocks = frozenset(pk.block for pk in parsed)
        family.report_range_errors(reading.range_errors, reading.range_keys, blocks, path)
    if unknown:
        # Text-encoder keys alone do not make a LoRA of a family: SD1.5 and SDXL share FLUX.1's
        # CLIP-L, so another model is named then even with allow_unknown.
        if not allow_unknown or reading.transformer_keys == 0:
            _check_other_base_model(unknown, path)
        if not allow_unknown:
            shown = ", ".join(unknown[:_SHOW_KEYS])
            more = f" and {len(unknown) - _SHOW_KEYS} more" if len(unknown) > _SHOW_KEYS else ""
            raise UnknownKeysError(
                f"{len(unknown)} keys match no {family.display} LoRA format: {shown}{more}",
                path,
                "pass --allow-unknown to report them as block 'other'",
                unknown,
            )
        parsed.extend(other_key(k) for k in unknown)
    if not parsed:
        raise UnknownKeysError("the file holds no tensors", path, "this is not a LoRA", [])

    modules: dict[str, LoraModule] = {}
    key_blocks: dict[str, str] = {}
    grammars: Counter[str] = Counter()
    for pk in parsed:
        module = modules.get(pk.stem)
        if module is None:
            module = modules[pk.stem] = LoraModule(pk.stem, pk.block, pk.grammar, pk.target)
        elif _REFINED_GRAMMARS.get(pk.grammar) == module.grammar:
            # A bare ".alpha" reads as the generic grammar; the module's other keys tell more.
            module.grammar = pk.grammar
        role = pk.role
        if role in module.tensors:
            # e.g. both ".alpha" and ".lora_A.weight.alpha": keep both, distinctly named.
            role = f"{role}#{sum(r.startswith(role) for r in module.tensors)}"
        module.tensors[role] = header.tensors[pk.key]
        key_blocks[pk.key] = pk.block
    for module in modules.values():
        if module.block != OTHER:
            grammars[module.grammar] += len(module.tensors)
    return ParsedHeader(family, modules, key_blocks, grammars)


def read_lora(
    path: str | Path, *, allow_unknown: bool = False, family: Family | None = None
) -> LoraFile:
    """Read a LoRA file and attribute it to its family's blocks.

    Reads the header and the alpha scalars only; tensor data is read on demand
    by the statistics and the writers. Raises errors of :mod:`lora_prune.errors`.

    Args:
        path: a ``.safetensors`` LoRA in any key grammar of the field guide
            (kohya, diffusers/PEFT, ComfyUI, XLabs, LyCORIS, ...).
        allow_unknown: attribute keys no grammar names to block ``other``
            instead of raising :class:`~lora_prune.errors.UnknownKeysError`.
        family: read with this family's grammars only (e.g. a slim file as its
            source's family); None finds the family (see :func:`parse_lora_header`).

    Example::

        lora = read_lora("my_lora.safetensors")
        print(lora.format, lora.blocks[:3], lora.total_bytes)
    """
    header = read_header(path)
    read = parse_lora_header(header, allow_unknown=allow_unknown, family=family)
    peft = _peft_config(header.metadata, header.path)
    with SafetensorsReader(header.path, header) as reader:
        for module in read.modules.values():
            info = module.tensors.get("alpha")
            if info is not None:
                value = reader.read_array(info.name)
                if value.size != 1:
                    raise CorruptFileError(
                        f"alpha has {value.size} values, expected one",
                        info.name,
                        "re-save the LoRA",
                    )
                module.alpha = float(value.reshape(-1)[0])
            elif peft is not None:
                module.alpha = _peft_alpha(peft, module, header.path)
    return LoraFile(
        header.path, header, read.family, read.modules, read.key_blocks, read.grammars, peft
    )
