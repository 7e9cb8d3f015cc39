"""Keys that other tools look for to recognise a whole file's format, and the blocks they sit in.

ComfyUI and Forge convert two FLUX.1 formats as a whole file, chosen by a set
of marker keys; a file missing any marker is not converted, and its bare BFL
names then match nothing, so the loader applies none of it, silently. A slim
or resize that drops a marker's block writes such a file. The marker sets,
read from the loaders' code (see ``docs/loaders.md`` and the replay in
``tests/test_loaders.py``):

- BFL control LoRAs (FLUX.1 Canny/Depth): ``img_in.lora_A.weight`` and
  ``single_blocks.0.norm.key_norm.scale`` (ComfyUI ``comfy/lora_convert.py``
  ``convert_lora``, Comfy-Org/ComfyUI 2bffe2f4; Forge ``load_lora`` in
  ``packages_3rdparty/comfyui_lora_collection/lora.py``,
  lllyasviel/stable-diffusion-webui-forge dfdcbab6);
- XLabs/USO processor LoRAs, which ComfyUI converts (``convert_uso_lora``, same file):
  ``double_blocks.18.processor.qkv_lora2.up.weight`` and
  ``single_blocks.37.processor.qkv_lora.up.weight``.

Their blocks are *pinned*: ``slim`` and ``resize --keep`` refuse to drop
them, and ``slim --auto`` keeps them in every candidate.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .blocks import format_block_spec, sort_blocks
from .errors import UsageError
from .lora import LoraFile

__all__ = ["MARKER_SETS", "MarkerSet", "check_pinned_kept", "pinned_blocks"]


@dataclass(frozen=True)
class MarkerSet:
    """The keys a loader needs, all of them, to convert a file of one format."""

    format: str
    loaders: str
    keys: frozenset[str]


MARKER_SETS: tuple[MarkerSet, ...] = (
    MarkerSet(
        "BFL control LoRA",
        "ComfyUI and Forge",
        frozenset({"img_in.lora_A.weight", "single_blocks.0.norm.key_norm.scale"}),
    ),
    MarkerSet(
        "XLabs/USO processor LoRA",
        "ComfyUI",
        frozenset(
            {
                "double_blocks.18.processor.qkv_lora2.up.weight",
                "single_blocks.37.processor.qkv_lora.up.weight",
            }
        ),
    ),
)


def pinned_blocks(lora: LoraFile) -> dict[str, MarkerSet]:
    """Block -> the marker set it holds a key of, for every marker set the file holds whole."""
    block_of = {t.name: m.block for m in lora.modules.values() for t in m.tensors.values()}
    pinned: dict[str, MarkerSet] = {}
    for markers in MARKER_SETS:
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
