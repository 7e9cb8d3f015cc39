"""FLUX.1 (dev, schnell): the first family on the seam, and every fact lora-prune knows of it."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from ...errors import BlockIndexError, WrongBaseModelError
from ...keys import INDEX_MAX_DIGITS, BlockRangeError
from ..base import Family
from .blocks import DOUBLE_BLOCKS, LAYOUT, SINGLE_BLOCKS
from .geometry import FLUX1_DEV, TINY
from .keys import parse_key, resolve_module_path, transformer_target
from .markers import MARKER_SETS
from .recipes import input_ranks, recipes_for
from .variants import base_model


def report_range_errors(
    errors: Sequence[BlockRangeError], keys: Sequence[str], blocks: frozenset[str], path: Path
) -> NoReturn:
    """FLUX-shaped keys beyond 19 double / 38 single blocks: the model they fit, where one does."""
    max_double = max((e.index for e in errors if e.kind == "double"), default=-1)
    max_single = max((e.index for e in errors if e.kind == "single"), default=-1)
    has_single = any(b.startswith("single.") for b in blocks)
    first = errors[0]
    diffusers_named = all("transformer_blocks" in k for k in keys)
    if max_double >= 20 and not has_single and max_single < 0 and diffusers_named:
        # SD3's joint blocks use the same diffusers names as FLUX's double blocks (24 or 38 of them).
        raise WrongBaseModelError(
            f"double block index {max_double} is beyond FLUX.1's {DOUBLE_BLOCKS} and there are no "
            "single blocks; SD3 has 24-38 joint blocks with these names, so this LoRA is likely for SD3",
            path,
            "use a FLUX.1 LoRA",
            "SD3",
        )
    if max_single >= SINGLE_BLOCKS and max_single < 48 and max_double < DOUBLE_BLOCKS:
        raise WrongBaseModelError(
            f"single block index {max_single} is beyond FLUX.1's {SINGLE_BLOCKS}; "
            "FLUX.2 has 48 single blocks, so this LoRA is likely for FLUX.2",
            path,
            "use a FLUX.1 LoRA",
            "FLUX.2",
        )
    if max_double >= DOUBLE_BLOCKS and max_double < 20 and max_single < 40:
        raise WrongBaseModelError(
            f"double block index {max_double} is beyond FLUX.1's {DOUBLE_BLOCKS}; "
            "HunyuanVideo has 20 double blocks, so this LoRA is likely for HunyuanVideo",
            path,
            "use a FLUX.1 LoRA",
            "HunyuanVideo",
        )
    limit = DOUBLE_BLOCKS if first.kind == "double" else SINGLE_BLOCKS
    raise BlockIndexError(
        f"{first.kind} block index "
        f"{first.index if first.index < 10**INDEX_MAX_DIGITS else f'of over {INDEX_MAX_DIGITS} digits'}"
        f" is out of range 0..{limit - 1}",
        path,
        "this is not a FLUX.1 LoRA, or its keys are damaged",
    )


def explain_missing(path: str) -> str:
    """schnell has no guidance embedder: a LoRA that trains it is for dev."""
    if "guidance_embedder" in path:
        return "a FLUX.1-schnell model has no guidance embedder: this LoRA is for FLUX.1-dev"
    return ""


KNOWN_WIDTHS = {
    "transformer": {FLUX1_DEV.hidden: "FLUX.1", TINY.hidden: "the tiny test model"},
    "clip": {FLUX1_DEV.clip_hidden: "CLIP-L", TINY.clip_hidden: "the tiny test CLIP"},
    "t5": {FLUX1_DEV.t5_d_model: "T5-XXL", TINY.t5_d_model: "the tiny test T5"},
}


FLUX1 = Family(
    name="flux1",
    display="FLUX.1",
    blocks=LAYOUT,
    parse_key=parse_key,
    resolve_module_path=resolve_module_path,
    transformer_target=transformer_target,
    report_range_errors=report_range_errors,
    recipes_for=lambda blocks, ranks: recipes_for(blocks, input_ranks=ranks),
    input_ranks=input_ranks,
    markers=MARKER_SETS,
    known_widths=KNOWN_WIDTHS,
    explain_missing=explain_missing,
    base_model=base_model,
    components={"transformer": "transformer", "clip": "text_encoder", "t5": "text_encoder_2"},
)
