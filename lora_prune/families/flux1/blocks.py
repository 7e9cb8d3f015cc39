"""FLUX.1's blocks: 19 double and 38 single blocks between the input layers and the
final layer, the CLIP-L and T5-XXL text encoders, and the block-weight vectors of
the ComfyUI/Forge/A1111 ecosystems."""

from __future__ import annotations

from ...blocks import BlockLayout

DOUBLE_BLOCKS = 19
SINGLE_BLOCKS = 38

DOUBLE_IDS: tuple[str, ...] = tuple(f"double.{i}" for i in range(DOUBLE_BLOCKS))
SINGLE_IDS: tuple[str, ...] = tuple(f"single.{i}" for i in range(SINGLE_BLOCKS))
TEXT_ENCODER_IDS: tuple[str, ...] = ("clip", "t5")
#: Every block id in model order (the order of the 61-value layout).
BLOCK_IDS: tuple[str, ...] = (*TEXT_ENCODER_IDS, "input", *DOUBLE_IDS, *SINGLE_IDS, "final")

# The block-weight vector layouts in use, keyed by their length.
# 58: Inspire pack / the original workflow put one "base" value first; it covers
# the non-block layers, i.e. our input and final blocks.
_VECTORS: dict[int, tuple[tuple[str, ...], ...]] = {
    57: tuple((b,) for b in (*DOUBLE_IDS, *SINGLE_IDS)),
    58: (("input", "final"), *((b,) for b in (*DOUBLE_IDS, *SINGLE_IDS))),
    61: tuple((b,) for b in BLOCK_IDS),
    # Forge: value i drives double block i and single blocks 2i and 2i+1.
    19: tuple((f"double.{i}", f"single.{2 * i}", f"single.{2 * i + 1}") for i in range(19)),
}

LAYOUT = BlockLayout(
    family="FLUX.1",
    ids=BLOCK_IDS,
    vectors=_VECTORS,
    vector_help="use 57 (double+single), 58 (base+double+single), "
    "61 (clip,t5,input,double,single,final) or 19 values",
    kohya_indices=True,
)
