"""What a LoRA key says, for every model family: its module stem, role and target.

A tensor key is a module stem plus a role suffix (``.lora_down.weight`` -> down,
``.alpha``, ``.hada_w1_a``, ...): :func:`split_role` reads the suffix, the same for
every model. Which module a stem names is its family's grammar
(:mod:`lora_prune.families`): the family resolves it to a :class:`Target`, the
block id and the diffusers modules whose output rows it covers, and returns
:class:`ParsedKey`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from .blocks import OTHER

TargetModel = Literal["transformer", "clip", "t5"]
#: ``other``: a text-encoder weight that is no Linear or norm the engine patches (embeddings,
#: layer norms, unused projections): read, counted and slimmed, never rendered.
ParamKind = Literal["linear", "norm", "other"]


@dataclass(frozen=True)
class Target:
    """What a LoRA module changes in the model.

    ``modules`` are diffusers module paths (relative to the transformer or the
    text encoder) whose outputs, concatenated in this order, are the module's
    output rows: one path for a plain Linear, several for a layer the original
    code fuses and diffusers splits. ``swap_halves`` marks a modulation whose two
    halves the original code and diffusers order the other way round.
    """

    model: TargetModel
    name: str
    modules: tuple[str, ...]
    kind: ParamKind = "linear"
    swap_halves: bool = False


@dataclass(frozen=True)
class ParsedKey:
    key: str
    stem: str
    role: str
    grammar: str
    block: str
    target: Target | None


# --- roles -----------------------------------------------------------------
# Longest suffixes first: ".lora_A.default.weight" must win over ".weight" forms.
_ROLE_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.default.weight", "down"),
    (".lora_B.default.weight", "up"),
    (".lora_B.default.bias", "up_bias"),
    (".lora_magnitude_vector.default.weight", "dora_scale"),
    (".lora_magnitude_vector.default", "dora_scale"),
    (".lora_magnitude_vector.weight", "dora_scale"),
    (".lora_magnitude_vector", "dora_scale"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".lora_A.weight.alpha", "alpha"),
    (".lora_down.weight.alpha", "alpha"),
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_B.bias", "up_bias"),
    (".lora_down.weight", "down"),
    (".lora_up.weight", "up"),
    (".lora_mid.weight", "mid"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    # Old diffusers attention processors: "<module>_lora.up.weight" (no dot before _lora).
    # XLabs' "processor.qkv_lora.up.weight" ends alike; parse_key tries both splits.
    ("_lora.down.weight", "down"),
    ("_lora.up.weight", "up"),
    (".down.weight", "down"),
    (".up.weight", "up"),
    (".alpha", "alpha"),
    (".dora_scale", "dora_scale"),
    (".magnitude", "dora_scale"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"),
    (".hada_t2", "hada_t2"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w2", "lokr_w2"),
    (".lokr_t2", "lokr_t2"),
    (".diff_b", "diff_b"),
    (".diff", "diff"),
    (".w_norm", "w_norm"),
    (".b_norm", "b_norm"),
    (".set_weight", "set_weight"),
    (".reshape_weight", "reshape_weight"),
    (".oft_blocks", "oft_blocks"),
    (".oft_diag", "oft_blocks"),
    (".rescale", "rescale"),
    # Mochi-style bare PEFT names, which ComfyUI also reads.
    (".lora_A", "down"),
    (".lora_B", "up"),
    (".a1.weight", "glora_a1"),
    (".a2.weight", "glora_a2"),
    (".b1.weight", "glora_b1"),
    (".b2.weight", "glora_b2"),
    (".scale", "set_weight"),
)


def role_splits(key: str) -> list[tuple[str, str]]:
    """Every ``(stem, role)`` reading of a key, the longest suffix first."""
    return [
        (key[: -len(suffix)], role)
        for suffix, role in _ROLE_SUFFIXES
        if key.endswith(suffix) and len(key) > len(suffix)
    ]


def split_role(key: str) -> tuple[str, str] | None:
    """``(stem, role)`` of a tensor key, or None when no known suffix ends it."""
    splits = role_splits(key)
    return splits[0] if splits else None


class BlockRangeError(ValueError):
    """A key of a family's shape whose block index is beyond the family's block counts.

    Internal to the parsers: :mod:`lora_prune.lora` turns it into the user-facing
    error once it has seen all keys (the family may name the model it fits).
    """

    def __init__(self, kind: str, index: int) -> None:
        self.kind = kind
        self.index = index
        super().__init__(f"{kind} block index {index}")


#: Digits of a block index read from a key; more is out of range for any model and is
#: never converted (int() of 4,301 digits raises ValueError, and costs quadratic time).
INDEX_MAX_DIGITS = 6
_OUT_OF_RANGE = 10**INDEX_MAX_DIGITS


def key_index(text: str) -> int:
    """A key's block index; an overlong one reads as out of range for any model."""
    digits = text.lstrip("0")
    return int(text) if len(digits) <= INDEX_MAX_DIGITS else _OUT_OF_RANGE


def other_key(key: str) -> ParsedKey:
    """A key that matched nothing, reported as block ``other``."""
    split = split_role(key)
    stem, role = split if split is not None else (key, "unknown")
    return ParsedKey(key, stem, role, "unknown", OTHER, None)
