"""The seam: what the rest of lora-prune asks a model family, as one frozen dataclass.

A family module (``families/flux1``, ...) builds one :class:`Family` from its
tables; commands, statistics, slim, resize, check and the render engine read a
model's facts only through it (``lora.family``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn, Protocol

from ..blocks import BlockLayout
from ..keys import BlockRangeError, ParsedKey, Target

#: A key's reading by one family: None when none of its grammars match; raises
#: :class:`~lora_prune.keys.BlockRangeError` for its shape with an index out of range.
KeyParser = Callable[[str], "ParsedKey | None"]
#: The user-facing error for a file's out-of-range block indices (the errors, their
#: keys, the blocks its other keys have, the file): raises a
#: :class:`~lora_prune.errors.LoraPruneError`, naming the model they fit where one does.
RangeErrorReport = Callable[
    [Sequence[BlockRangeError], Sequence[str], frozenset[str], Path], NoReturn
]


@dataclass(frozen=True)
class Recipe:
    """One trainer's setting that trains only the keep set."""

    #: ``kohya sd-scripts``, ``ai-toolkit`` or ``OneTrainer``
    trainer: str
    #: where the text goes: a command line, a YAML config, a JSON config
    where: str
    #: the setting, ready to paste
    text: str
    #: what the trainer cannot restrict, or does besides; "" when nothing
    note: str
    #: the documents the syntax was checked against
    source: str


@dataclass(frozen=True)
class MarkerSet:
    """The keys a loader needs, all of them, to convert a file of one format (:mod:`lora_prune.markers`)."""

    format: str
    loaders: str
    keys: frozenset[str]


class ModuleLike(Protocol):
    """What a family's recipes read of a LoRA module (:class:`lora_prune.lora.LoraModule`)."""

    @property
    def block(self) -> str: ...

    @property
    def rank(self) -> int | None: ...

    @property
    def target(self) -> Target | None: ...


@dataclass(frozen=True)
class Family:
    """A model family: its blocks and LoRA key grammars (more joins as families do).

    Attributes:
        name: the id used in files and options (``flux1``).
        display: the name messages use (``FLUX.1``).
        blocks: its block ids, groups and block-weight vectors.
        parse_key: every LoRA key grammar of the family (see :data:`KeyParser`).
        resolve_module_path: a model module path (a checkpoint's, a PEFT
            pattern's) to its target, in any of the family's namings.
        transformer_target: the transformer layer a checkpoint path names, or None.
        report_range_errors: see :data:`RangeErrorReport`.
        recipes_for: the trainer settings that retrain only some blocks (kohya,
            ai-toolkit, OneTrainer), given the LoRA's input-layer ranks or None.
        input_ranks: those ranks, from the LoRA's modules.
        markers: the key sets loaders convert a whole file by (their blocks are pinned).
        known_widths: per component (``transformer``, ``clip``, ``t5``), the hidden
            widths of the family's models and their names, to name the model a
            mismatched LoRA was made for.
        explain_missing: why a model may lack a module path a LoRA targets (a
            variant without it), or "".
        base_model: the model a LoRA is for, from its modules and metadata, and
            (metadata key, warning) for each claim the keys contradict (``check``).
        components: each target model a key may name (``Target.model``) -> the
            attribute of the family's diffusers pipeline that holds it.
    """

    name: str
    display: str
    blocks: BlockLayout
    parse_key: KeyParser
    resolve_module_path: Callable[[str], Target | None]
    transformer_target: Callable[[str], Target | None]
    report_range_errors: RangeErrorReport
    recipes_for: Callable[[Iterable[str], Sequence[int] | None], list[Recipe]]
    input_ranks: Callable[[Iterable[ModuleLike]], tuple[int, ...]]
    markers: tuple[MarkerSet, ...] = ()
    known_widths: Mapping[str, Mapping[int, str]] = field(default_factory=dict)
    explain_missing: Callable[[str], str] = lambda _path: ""
    base_model: Callable[
        [Iterable[ModuleLike], Mapping[str, str]], tuple[str, list[tuple[str, str]]]
    ] = lambda _modules, _metadata: ("", [])
    components: Mapping[str, str] = field(default_factory=lambda: {"transformer": "transformer"})


#: The wrappers a full checkpoint puts before its transformer's names (ComfyUI's saved
#: models, diffusers' pipelines); a bare transformer file has none.
CHECKPOINT_WRAPPERS: tuple[str, ...] = (
    "model.diffusion_model.",
    "diffusion_model.",
    "transformer.",
)


def strip_wrapper(names: Iterable[str]) -> tuple[str, list[str]]:
    """The wrapper prefix of a checkpoint's transformer names, and those names without it."""
    names = list(names)
    for prefix in CHECKPOINT_WRAPPERS:
        inner = [n[len(prefix) :] for n in names if n.startswith(prefix)]
        if inner:
            return prefix, inner
    return "", names


def count_blocks(names: Iterable[str], prefix: str) -> int:
    """How many numbered blocks ``prefix<N>.`` there are (N = 0, 1, ... without gaps)."""
    found = set(names)
    n = 0
    while any(k.startswith(f"{prefix}{n}.") for k in found):
        n += 1
    return n
