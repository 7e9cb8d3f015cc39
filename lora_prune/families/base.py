"""The seam: what the rest of lora-prune asks a model family, as one frozen dataclass.

A family module (``families/flux1``, ...) builds one :class:`Family` from its
tables; commands, statistics, slim, resize, check and the render engine read a
model's facts only through it (``lora.family``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

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
    """

    name: str
    display: str
    blocks: BlockLayout
    parse_key: KeyParser
    resolve_module_path: Callable[[str], Target | None]
    transformer_target: Callable[[str], Target | None]
    report_range_errors: RangeErrorReport
