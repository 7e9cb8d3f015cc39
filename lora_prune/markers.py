"""Keys that other tools look for to recognise a whole file's format, and the blocks they sit in.

Some loaders (ComfyUI, Forge) convert a format as a whole file, chosen by a set
of marker keys; a file missing any marker is not converted, and its names then
match nothing, so the loader applies none of it, silently. A slim or resize that
drops a marker's block writes such a file. Each family lists its marker sets
(``Family.markers``; FLUX.1's in :mod:`lora_prune.families.flux1.markers`, read
from the loaders' code, see ``docs/loaders.md``).

Their blocks are *pinned*: ``slim`` and ``resize --keep`` refuse to drop
them, and ``slim --auto`` keeps them in every candidate.
"""

from __future__ import annotations

from collections.abc import Iterable

from .blocks import format_block_spec, sort_blocks
from .errors import UsageError
from .families.base import MarkerSet
from .lora import LoraFile

__all__ = ["MarkerSet", "check_pinned_kept", "pinned_blocks"]


def pinned_blocks(lora: LoraFile) -> dict[str, MarkerSet]:
    """Block -> the marker set it holds a key of, for every marker set the file holds whole."""
    block_of = {t.name: m.block for m in lora.modules.values() for t in m.tensors.values()}
    pinned: dict[str, MarkerSet] = {}
    for markers in lora.family.markers:
        if markers.keys <= block_of.keys():
            for key in sorted(markers.keys):
                pinned.setdefault(block_of[key], markers)
    return pinned


def check_pinned_kept(lora: LoraFile, keep: Iterable[str]) -> None:
    """Refuse a keep set that drops a block whose marker key a loader needs to read the file."""
    pinned = pinned_blocks(lora)
    dropped = sort_blocks(set(pinned) - set(keep))
    if not dropped:
        return
    markers = pinned[dropped[0]]
    spec = format_block_spec(sort_blocks(b for b, m in pinned.items() if m == markers))
    raise UsageError(
        f"dropping {format_block_spec(dropped)} leaves out marker keys of this {markers.format} "
        f"({', '.join(sorted(markers.keys))}); without all of them the file silently loads "
        f"as nothing in {markers.loaders}",
        lora.path,
        f"keep {spec} too (add them to --keep)",
    )
