"""FLUX.1 synthetic LoRAs (for lora_prune.testing): the spec, the key grammars and their adapter rules.

One row of the grammar table per key grammar of the field guide (prefix,
naming family, factor suffixes, which blocks the trainer covers by default,
where alpha goes). Written independently of :mod:`lora_prune.keys`, so that the
tests compare two readings of the field guide rather than the parser with itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, cast

from ...safetensors_io import ENCODABLE_DTYPES
from .blocks import BLOCK_IDS
from .geometry import TINY, FluxGeometry

GRAMMARS: tuple[str, ...] = (
    "kohya",
    "lycoris-kohya-loha",
    "lycoris-kohya-lokr",
    "kohya-diff",
    "comfyui",
    "bfl-control",
    "diffusers",
    "diffusers-default",
    "peft-bfl",
    "onetrainer",
    "lycoris",
    "xlabs",
    "diffsynth",
    "kohya-malformed",
    "diffusers-kohya-suffix",
)
#: Adapter types the generator writes: kohya/PEFT LoRA, LyCORIS LoHa and LoKr, full diff.
ADAPTERS: tuple[str, ...] = ("lora", "loha", "lokr", "diff")
#: Dtypes the generator writes: every float dtype the encoder knows.
SYNTH_DTYPES: tuple[str, ...] = ENCODABLE_DTYPES

Adapter = Literal["lora", "loha", "lokr", "diff"]
Kind = Literal["linear", "norm"]
Family = Literal["bfl", "diffusers", "xlabs", "diffsynth"]


@dataclass(frozen=True)
class SynthSpec:
    """What synthetic LoRA to make.

    ``blocks`` None means the blocks the grammar's trainer covers by default
    (:func:`default_blocks`); ``text_encoders`` adds ``clip`` (and ``t5`` where
    the grammar names T5 modules). ``strength`` maps block -> factor on its up
    weights; with a mapping, blocks it omits get zero up weights. ``alpha`` is
    written as ``.alpha`` tensors (``alpha_in="keys"``) where the grammar's
    producers write them (:data:`ALPHA_KEY_GRAMMARS`, ignored elsewhere), or as
    diffusers' ``lora_adapter_metadata`` JSON (``alpha_in="metadata"``, only for
    :data:`PEFT_METADATA_GRAMMARS`). ``adapter`` None is the grammar's own
    (LoHa, LoKr or diff for the LyCORIS grammars, LoRA elsewhere).
    """

    grammar: str = "kohya"
    geometry: FluxGeometry = TINY
    blocks: tuple[str, ...] | None = None
    rank: int = 4
    alpha: float | None = 4.0
    dtype: str = "F32"
    strength: Mapping[str, float] | None = None
    text_encoders: bool = False
    seed: int = 0
    metadata: Mapping[str, str] | None = None
    adapter: str | None = None
    alpha_in: Literal["keys", "metadata"] = "keys"


@dataclass(frozen=True)
class SynthModule:
    """One module of a synthetic LoRA: its stem, block, layer shape and tensor keys.

    ``adapter`` is ``lora``, ``loha``, ``lokr``, ``diff``, or ``norm`` for a
    control LoRA's replacement norm scale.
    """

    stem: str
    block: str
    in_features: int
    out_features: int
    kind: Kind
    adapter: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class Grammar:
    family: Family
    prefix: str
    flat: bool  # BFL/diffusers path with "." -> "_"
    down: str
    up: str
    clip_prefix: str | None = None
    t5_prefix: str | None = None
    trailing: str = ""  # the malformed kohya "_" after the stem
    alpha_keys: bool = False
    peft_metadata: bool = False
    lycoris: bool = False  # can carry LoHa/LoKr/diff tensors
    adapter: Adapter = "lora"
    bias: bool = False  # BFL control LoRAs: lora_B.bias and norm .scale tensors
    default_kinds: tuple[str, ...] = ("double", "single")
    kohya_metadata: bool = False


_KOHYA_SUFFIXES = (".lora_down.weight", ".lora_up.weight")
_PEFT_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
_ALL_KINDS = ("input", "double", "single", "final")

_GRAMMAR_TABLE: dict[str, Grammar] = {
    "kohya": Grammar(
        "bfl",
        "lora_unet_",
        True,
        *_KOHYA_SUFFIXES,
        clip_prefix="lora_te1_",
        t5_prefix="lora_te3_",
        alpha_keys=True,
        lycoris=True,
        kohya_metadata=True,
    ),
    "lycoris-kohya-loha": Grammar(
        "bfl",
        "lora_unet_",
        True,
        *_KOHYA_SUFFIXES,
        clip_prefix="lora_te1_",
        t5_prefix="lora_te2_",
        alpha_keys=True,
        lycoris=True,
        adapter="loha",
        kohya_metadata=True,
    ),
    "lycoris-kohya-lokr": Grammar(
        "bfl",
        "lora_unet_",
        True,
        *_KOHYA_SUFFIXES,
        clip_prefix="lora_te1_",
        t5_prefix="lora_te2_",
        alpha_keys=True,
        lycoris=True,
        adapter="lokr",
        kohya_metadata=True,
    ),
    "kohya-diff": Grammar(
        "bfl",
        "lora_unet_",
        True,
        *_KOHYA_SUFFIXES,
        clip_prefix="lora_te1_",
        t5_prefix="lora_te2_",
        alpha_keys=True,
        lycoris=True,
        adapter="diff",
        kohya_metadata=True,
    ),
    "comfyui": Grammar(
        "bfl",
        "diffusion_model.",
        False,
        *_KOHYA_SUFFIXES,
        clip_prefix="text_encoders.clip_l.transformer.",
        t5_prefix="text_encoders.t5xxl.transformer.",
        alpha_keys=True,
        lycoris=True,
    ),
    "bfl-control": Grammar(
        "bfl",
        "",
        False,
        *_PEFT_SUFFIXES,
        bias=True,
        default_kinds=_ALL_KINDS,
    ),
    "diffusers": Grammar(
        "diffusers",
        "transformer.",
        False,
        *_PEFT_SUFFIXES,
        clip_prefix="text_encoder.",
        alpha_keys=True,
        peft_metadata=True,
    ),
    "diffusers-default": Grammar(
        "diffusers",
        "transformer.",
        False,
        ".lora_A.default.weight",
        ".lora_B.default.weight",
        clip_prefix="text_encoder.",
        peft_metadata=True,
    ),
    "peft-bfl": Grammar(
        "bfl",
        "base_model.model.",
        False,
        *_PEFT_SUFFIXES,
        default_kinds=_ALL_KINDS,
    ),
    "onetrainer": Grammar(
        "diffusers",
        "lora_transformer_",
        True,
        *_KOHYA_SUFFIXES,
        clip_prefix="lora_te1_",
        t5_prefix="lora_te2_",
        alpha_keys=True,
        lycoris=True,
        default_kinds=_ALL_KINDS,
    ),
    "lycoris": Grammar(
        "diffusers",
        "lycoris_",
        True,
        *_KOHYA_SUFFIXES,
        alpha_keys=True,
        lycoris=True,
        adapter="lokr",
    ),
    "xlabs": Grammar("xlabs", "", False, ".down.weight", ".up.weight"),
    "diffsynth": Grammar("diffsynth", "", False, *_PEFT_SUFFIXES),
    "kohya-malformed": Grammar(
        "diffusers",
        "lora_unet_",
        True,
        *_KOHYA_SUFFIXES,
        trailing="_",
        alpha_keys=True,
    ),
    "diffusers-kohya-suffix": Grammar(
        "diffusers",
        "transformer.",
        False,
        *_KOHYA_SUFFIXES,
        clip_prefix="text_encoder.",
        alpha_keys=True,
    ),
}
assert tuple(_GRAMMAR_TABLE) == GRAMMARS

#: Grammars whose producers write ``.alpha`` tensors (the spec's alpha goes there).
ALPHA_KEY_GRAMMARS: frozenset[str] = frozenset(
    name for name, g in _GRAMMAR_TABLE.items() if g.alpha_keys
)
#: Grammars that can carry alpha as diffusers' ``lora_adapter_metadata`` JSON.
PEFT_METADATA_GRAMMARS: frozenset[str] = frozenset(
    name for name, g in _GRAMMAR_TABLE.items() if g.peft_metadata
)

LYCORIS_SUFFIXES: dict[str, tuple[str, ...]] = {
    "loha": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"),
    "lokr": (".lokr_w1", ".lokr_w2_a", ".lokr_w2_b"),
    "diff": (".diff", ".diff_b"),
}


def grammar_row(name: str) -> Grammar:
    try:
        return _GRAMMAR_TABLE[name]
    except KeyError:
        raise ValueError(f"unknown grammar {name!r}; use one of {', '.join(GRAMMARS)}") from None


def adapter_of(spec: SynthSpec) -> Adapter:
    gr = grammar_row(spec.grammar)
    adapter = spec.adapter or gr.adapter
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; use one of {', '.join(ADAPTERS)}")
    if adapter != "lora" and not gr.lycoris:
        raise ValueError(f"grammar {spec.grammar!r} cannot carry {adapter} tensors")
    return cast(Adapter, adapter)


def alpha_key(spec: SynthSpec, adapter: str) -> bool:
    return (
        spec.alpha is not None
        and spec.alpha_in == "keys"
        and spec.grammar in ALPHA_KEY_GRAMMARS
        and adapter != "diff"
    )


def expected_scale(spec: SynthSpec) -> float:
    """The factor the spec's low-rank modules carry: alpha / rank, or 1 without alpha.

    Full ``diff`` modules are never scaled.
    """
    adapter = adapter_of(spec)
    if adapter == "diff" or spec.alpha is None:
        return 1.0
    if spec.alpha_in == "metadata" or alpha_key(spec, adapter):
        return spec.alpha / spec.rank
    return 1.0


def check_spec(spec: SynthSpec) -> None:
    if spec.rank < 1:
        raise ValueError(f"rank must be >= 1, got {spec.rank}")
    if spec.dtype not in SYNTH_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(SYNTH_DTYPES)}, got {spec.dtype!r}")
    if spec.alpha_in not in ("keys", "metadata"):
        raise ValueError(f"alpha_in must be 'keys' or 'metadata', got {spec.alpha_in!r}")
    if spec.alpha_in == "metadata" and spec.grammar not in PEFT_METADATA_GRAMMARS:
        raise ValueError(f"grammar {spec.grammar!r} does not carry alpha in metadata")
    if spec.strength is not None:
        bad = sorted(b for b in spec.strength if b not in BLOCK_IDS)
        if bad:
            raise ValueError(f"strength names unknown block ids {bad}")
