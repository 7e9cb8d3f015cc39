"""Synthetic FLUX.1 LoRA files in every key grammar of the field guide, with numpy only.

The tests, the ``demo`` command and the benchmarks need LoRAs whose every key,
shape and value is known: :func:`synth_tensors` builds one for a
:class:`SynthSpec` (grammar, geometry, blocks, rank, alpha, dtype, per-block
strength) and :func:`write_synth_lora` writes it. Shapes are the real module
shapes of the geometry (``TINY`` for tests, ``FLUX1_DEV`` for real-size
checks); values are seeded normals, drawn per tensor from a seed derived from
the key, so a tensor's value does not depend on which other modules the file
holds. A block whose strength is 0 gets exactly zero "up" factors, so its weight
delta is exactly zero: :func:`planted_lora` uses that to plant influence in
chosen blocks only.

The generator's module tables are written independently of the parser's
(:mod:`lora_prune.keys`), so that the tests compare two readings of the field
guide rather than the parser with itself.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import numpy.typing as npt

from .blocks import BLOCK_IDS, block_order
from .geometry import TINY, FluxGeometry
from .safetensors_io import TensorEntry, decode_array, write_safetensors

__all__ = [
    "ADAPTERS",
    "ALPHA_KEY_GRAMMARS",
    "GRAMMARS",
    "PEFT_METADATA_GRAMMARS",
    "SYNTH_DTYPES",
    "SynthModule",
    "SynthSpec",
    "default_blocks",
    "diffusers_linear_shapes",
    "encode_array",
    "expected_scale",
    "planted_lora",
    "supported_blocks",
    "synth_metadata",
    "synth_modules",
    "synth_tensors",
    "write_synth_lora",
]

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
SYNTH_DTYPES: tuple[str, ...] = ("F32", "F16", "BF16", "F8_E4M3", "F8_E5M2")

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


# --- grammars ----------------------------------------------------------------
@dataclass(frozen=True)
class _Grammar:
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

_GRAMMAR_TABLE: dict[str, _Grammar] = {
    "kohya": _Grammar(
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
    "lycoris-kohya-loha": _Grammar(
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
    "lycoris-kohya-lokr": _Grammar(
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
    "kohya-diff": _Grammar(
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
    "comfyui": _Grammar(
        "bfl",
        "diffusion_model.",
        False,
        *_KOHYA_SUFFIXES,
        clip_prefix="text_encoders.clip_l.transformer.",
        t5_prefix="text_encoders.t5xxl.transformer.",
        alpha_keys=True,
        lycoris=True,
    ),
    "bfl-control": _Grammar(
        "bfl",
        "",
        False,
        *_PEFT_SUFFIXES,
        bias=True,
        default_kinds=_ALL_KINDS,
    ),
    "diffusers": _Grammar(
        "diffusers",
        "transformer.",
        False,
        *_PEFT_SUFFIXES,
        clip_prefix="text_encoder.",
        alpha_keys=True,
        peft_metadata=True,
    ),
    "diffusers-default": _Grammar(
        "diffusers",
        "transformer.",
        False,
        ".lora_A.default.weight",
        ".lora_B.default.weight",
        clip_prefix="text_encoder.",
        peft_metadata=True,
    ),
    "peft-bfl": _Grammar(
        "bfl",
        "base_model.model.",
        False,
        *_PEFT_SUFFIXES,
        default_kinds=_ALL_KINDS,
    ),
    "onetrainer": _Grammar(
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
    "lycoris": _Grammar(
        "diffusers",
        "lycoris_",
        True,
        *_KOHYA_SUFFIXES,
        alpha_keys=True,
        lycoris=True,
        adapter="lokr",
    ),
    "xlabs": _Grammar("xlabs", "", False, ".down.weight", ".up.weight"),
    "diffsynth": _Grammar("diffsynth", "", False, *_PEFT_SUFFIXES),
    "kohya-malformed": _Grammar(
        "diffusers",
        "lora_unet_",
        True,
        *_KOHYA_SUFFIXES,
        trailing="_",
        alpha_keys=True,
    ),
    "diffusers-kohya-suffix": _Grammar(
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

_LYCORIS_SUFFIXES: dict[str, tuple[str, ...]] = {
    "loha": (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b"),
    "lokr": (".lokr_w1", ".lokr_w2_a", ".lokr_w2_b"),
    "diff": (".diff", ".diff_b"),
}


def _grammar(name: str) -> _Grammar:
    try:
        return _GRAMMAR_TABLE[name]
    except KeyError:
        raise ValueError(f"unknown grammar {name!r}; use one of {', '.join(GRAMMARS)}") from None


# --- module tables (layer shapes from the geometry) -----------------------------
@dataclass(frozen=True)
class _Layer:
    block: str
    path: str  # dotted, in the grammar family's naming
    fan_in: int
    fan_out: int
    kind: Kind = "linear"


def _double_linears(g: FluxGeometry, family: Family) -> list[tuple[str, int, int]]:
    h, m = g.hidden, g.mlp
    if family == "bfl":
        out: list[tuple[str, int, int]] = []
        for side in ("img", "txt"):
            out += [
                (f"{side}_mod.lin", h, 6 * h),
                (f"{side}_attn.qkv", h, 3 * h),
                (f"{side}_attn.proj", h, h),
                (f"{side}_mlp.0", h, m),
                (f"{side}_mlp.2", m, h),
            ]
        return out
    if family == "diffusers":
        return [
            ("norm1.linear", h, 6 * h),
            ("norm1_context.linear", h, 6 * h),
            ("attn.to_q", h, h),
            ("attn.to_k", h, h),
            ("attn.to_v", h, h),
            ("attn.to_out.0", h, h),
            ("attn.add_q_proj", h, h),
            ("attn.add_k_proj", h, h),
            ("attn.add_v_proj", h, h),
            ("attn.to_add_out", h, h),
            ("ff.net.0.proj", h, m),
            ("ff.net.2", m, h),
            ("ff_context.net.0.proj", h, m),
            ("ff_context.net.2", m, h),
        ]
    if family == "xlabs":
        return [
            ("processor.qkv_lora1", h, 3 * h),
            ("processor.qkv_lora2", h, 3 * h),
            ("processor.proj_lora1", h, h),
            ("processor.proj_lora2", h, h),
        ]
    out = []
    for side in ("a", "b"):
        out += [
            (f"norm1_{side}.linear", h, 6 * h),
            (f"attn.{side}_to_qkv", h, 3 * h),
            (f"attn.{side}_to_out", h, h),
            (f"ff_{side}.0", h, m),
            (f"ff_{side}.2", m, h),
        ]
    return out


def _single_linears(g: FluxGeometry, family: Family) -> list[tuple[str, int, int]]:
    h, m = g.hidden, g.mlp
    if family == "bfl":
        return [("linear1", h, 3 * h + m), ("linear2", h + m, h), ("modulation.lin", h, 3 * h)]
    if family == "diffusers":
        return [
            ("attn.to_q", h, h),
            ("attn.to_k", h, h),
            ("attn.to_v", h, h),
            ("proj_mlp", h, m),
            ("proj_out", h + m, h),
            ("norm.linear", h, 3 * h),
        ]
    if family == "xlabs":
        # XLabs' single-block qkv LoRA covers the attention rows of linear1 only.
        return [("processor.qkv_lora", h, 3 * h), ("processor.proj_lora", h + m, h)]
    return [("to_qkv_mlp", h, 3 * h + m), ("proj_out", h + m, h), ("norm.linear", h, 3 * h)]


def _global_linears(g: FluxGeometry, family: Family, block: str) -> list[tuple[str, int, int]]:
    h = g.hidden
    if block == "final":
        if family == "bfl":
            return [
                ("final_layer.linear", h, g.out_channels),
                ("final_layer.adaLN_modulation.1", h, 2 * h),
            ]
        return [("proj_out", h, g.out_channels), ("norm_out.linear", h, 2 * h)]
    embedders = [("time", g.time_dim), ("vector", g.pooled_dim)]
    if g.guidance:
        embedders.append(("guidance", g.time_dim))
    if family == "bfl":
        out = [("img_in", g.in_channels, h), ("txt_in", g.context_dim, h)]
        for name, width in embedders:
            out += [(f"{name}_in.in_layer", width, h), (f"{name}_in.out_layer", h, h)]
        return out
    diff_name = {
        "time": "timestep_embedder",
        "vector": "text_embedder",
        "guidance": "guidance_embedder",
    }
    out = [("x_embedder", g.in_channels, h), ("context_embedder", g.context_dim, h)]
    for name, width in embedders:
        base = f"time_text_embed.{diff_name[name]}"
        out += [(f"{base}.linear_1", width, h), (f"{base}.linear_2", h, h)]
    return out


def _block_norms(family: Family, kind: str) -> tuple[str, ...]:
    if family != "bfl":
        return ()
    if kind == "double":
        return tuple(
            f"{side}_attn.norm.{n}_norm" for side in ("img", "txt") for n in ("query", "key")
        )
    return ("norm.query_norm", "norm.key_norm")


def _clip_linears(g: FluxGeometry) -> list[_Layer]:
    c, f = g.clip_hidden, g.clip_ffn
    out: list[_Layer] = []
    for i in range(g.clip_layers):
        base = f"text_model.encoder.layers.{i}"
        out += [_Layer("clip", f"{base}.self_attn.{p}_proj", c, c) for p in ("q", "k", "v", "out")]
        out += [_Layer("clip", f"{base}.mlp.fc1", c, f), _Layer("clip", f"{base}.mlp.fc2", f, c)]
    return out


def _t5_linears(g: FluxGeometry) -> list[_Layer]:
    d, inner, ff = g.t5_d_model, g.t5_inner, g.t5_ff
    out: list[_Layer] = []
    for i in range(g.t5_layers):
        attn = f"encoder.block.{i}.layer.0.SelfAttention"
        dense = f"encoder.block.{i}.layer.1.DenseReluDense"
        out += [_Layer("t5", f"{attn}.{p}", d, inner) for p in ("q", "k", "v")]
        out += [_Layer("t5", f"{attn}.o", inner, d)]
        out += [_Layer("t5", f"{dense}.{p}", d, ff) for p in ("wi_0", "wi_1")]
        out += [_Layer("t5", f"{dense}.wo", ff, d)]
    return out


def _transformer_layers(g: FluxGeometry, family: Family, block: str, norms: bool) -> list[_Layer]:
    if block in ("input", "final"):
        return [_Layer(block, p, i, o) for p, i, o in _global_linears(g, family, block)]
    kind, index = block.split(".")
    if family == "bfl":
        root = f"{kind}_blocks.{index}"
    elif family == "diffusers":
        name = "transformer_blocks" if kind == "double" else "single_transformer_blocks"
        root = f"{name}.{index}"
    elif family == "xlabs":
        root = f"{kind}_blocks.{index}"
    else:
        root = f"{'blocks' if kind == 'double' else 'single_blocks'}.{index}"
    table = _double_linears(g, family) if kind == "double" else _single_linears(g, family)
    layers = [_Layer(block, f"{root}.{p}", i, o) for p, i, o in table]
    if norms:
        layers += [
            _Layer(block, f"{root}.{n}", g.head_dim, g.head_dim, "norm")
            for n in _block_norms(family, kind)
        ]
    return layers


def diffusers_linear_shapes(geometry: FluxGeometry = TINY) -> dict[str, tuple[int, int]]:
    """``(in, out)`` of every Linear of the diffusers FLUX transformer, by module path.

    Covers the blocks and the input/final layers (what a LoRA can target).
    """
    out: dict[str, tuple[int, int]] = {}
    for block in _all_transformer_blocks(geometry):
        for layer in _transformer_layers(geometry, "diffusers", block, norms=False):
            out[layer.path] = (layer.fan_in, layer.fan_out)
    return out


def _all_transformer_blocks(g: FluxGeometry) -> list[str]:
    return [
        "input",
        *(f"double.{i}" for i in range(g.double_blocks)),
        *(f"single.{i}" for i in range(g.single_blocks)),
        "final",
    ]


def supported_blocks(grammar: str, geometry: FluxGeometry = TINY) -> tuple[str, ...]:
    """Every block id a grammar can name, in model order."""
    gr = _grammar(grammar)
    blocks = _all_transformer_blocks(geometry)
    if gr.family in ("xlabs", "diffsynth"):
        blocks = [b for b in blocks if b not in ("input", "final")]
    te = [b for b, p in (("clip", gr.clip_prefix), ("t5", gr.t5_prefix)) if p is not None]
    return tuple(sorted([*te, *blocks], key=block_order))


def default_blocks(grammar: str, geometry: FluxGeometry = TINY) -> tuple[str, ...]:
    """The blocks the grammar's trainer covers by default, in model order."""
    gr = _grammar(grammar)
    return tuple(
        b for b in _all_transformer_blocks(geometry) if b.split(".")[0] in gr.default_kinds
    )


def _resolve_blocks(spec: SynthSpec) -> list[str]:
    gr = _grammar(spec.grammar)
    given = spec.blocks
    chosen = set(default_blocks(spec.grammar, spec.geometry) if given is None else given)
    if spec.text_encoders:
        if gr.clip_prefix is None:
            raise ValueError(f"grammar {spec.grammar!r} has no text encoder keys")
        chosen.update(b for b, p in (("clip", gr.clip_prefix), ("t5", gr.t5_prefix)) if p)
    allowed = set(supported_blocks(spec.grammar, spec.geometry))
    unknown = sorted(b for b in chosen if b not in BLOCK_IDS)
    if unknown:
        raise ValueError(f"unknown block ids {unknown}")
    missing = sorted((b for b in chosen if b not in allowed), key=block_order)
    if missing:
        raise ValueError(f"grammar {spec.grammar!r} cannot name blocks {missing}")
    return sorted(chosen, key=block_order)


def _adapter(spec: SynthSpec) -> Adapter:
    gr = _grammar(spec.grammar)
    adapter = spec.adapter or gr.adapter
    if adapter not in ADAPTERS:
        raise ValueError(f"unknown adapter {adapter!r}; use one of {', '.join(ADAPTERS)}")
    if adapter != "lora" and not gr.lycoris:
        raise ValueError(f"grammar {spec.grammar!r} cannot carry {adapter} tensors")
    return cast(Adapter, adapter)


def _alpha_key(spec: SynthSpec, adapter: str) -> bool:
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
    adapter = _adapter(spec)
    if adapter == "diff" or spec.alpha is None:
        return 1.0
    if spec.alpha_in == "metadata" or _alpha_key(spec, adapter):
        return spec.alpha / spec.rank
    return 1.0


def _check_spec(spec: SynthSpec) -> None:
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


def _stem(gr: _Grammar, layer: _Layer) -> str:
    if layer.block == "clip" or layer.block == "t5":
        prefix = gr.clip_prefix if layer.block == "clip" else gr.t5_prefix
        assert prefix is not None
        flat = prefix.endswith("_")
        return prefix + (layer.path.replace(".", "_") if flat else layer.path)
    path = layer.path.replace(".", "_") if gr.flat else layer.path
    return gr.prefix + path + gr.trailing


def _suffixes(gr: _Grammar, adapter: Adapter, alpha: bool) -> tuple[str, ...]:
    if adapter != "lora":
        out = _LYCORIS_SUFFIXES[adapter]
    else:
        out = (gr.down, gr.up) + ((".lora_B.bias",) if gr.bias else ())
    return out + ((".alpha",) if alpha else ())


def synth_modules(spec: SynthSpec) -> list[SynthModule]:
    """The modules :func:`synth_tensors` writes for ``spec``, in model order."""
    _check_spec(spec)
    gr = _grammar(spec.grammar)
    adapter = _adapter(spec)
    g = spec.geometry
    layers: list[_Layer] = []
    for block in _resolve_blocks(spec):
        if block == "clip":
            layers += _clip_linears(g)
        elif block == "t5":
            layers += _t5_linears(g)
        else:
            layers += _transformer_layers(g, gr.family, block, norms=gr.bias)
    out: list[SynthModule] = []
    alpha = _alpha_key(spec, adapter)
    keys: tuple[str, ...]
    for layer in layers:
        stem = _stem(gr, layer)
        if layer.kind == "norm":
            # Control LoRAs' norm tensors are replacement scales whatever the adapter type.
            keys, name = (stem + ".scale",), "norm"
        else:
            keys, name = tuple(stem + s for s in _suffixes(gr, adapter, alpha)), adapter
        out.append(
            SynthModule(stem, layer.block, layer.fan_in, layer.fan_out, layer.kind, name, keys)
        )
    return out


# --- values --------------------------------------------------------------------
def _factorization(n: int) -> tuple[int, int]:
    """``(m, n // m)`` with m the largest divisor not above sqrt(n), as LyCORIS splits LoKr dims."""
    m = math.isqrt(n)
    while n % m:
        m -= 1
    return m, n // m


def _rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


Maker = Callable[[], npt.NDArray[np.float32]]


def _normal(
    seed: int,
    key: str,
    shape: tuple[int, ...],
    std: float,
    factor: float = 1.0,
    offset: float = 0.0,
) -> Maker:
    def make() -> npt.NDArray[np.float32]:
        if factor == 0.0:
            return np.full(shape, offset, dtype=np.float32)
        values = _rng(seed, key).standard_normal(shape, dtype=np.float32)
        values *= np.float32(std * factor)
        values += np.float32(offset)
        return values

    return make


def _constant(shape: tuple[int, ...], value: float) -> Maker:
    return lambda: np.full(shape, value, dtype=np.float32)


def _module_tensors(
    spec: SynthSpec, module: SynthModule, strength: float
) -> list[tuple[str, str, tuple[int, ...], Maker]]:
    """``(key, dtype, shape, values)`` of each tensor of one module."""
    r, fan_in, fan_out, seed = spec.rank, module.in_features, module.out_features, spec.seed
    alpha_dtype = "F32" if spec.dtype.startswith("F8") else spec.dtype
    down_std, up_std = 1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(r)
    out: list[tuple[str, str, tuple[int, ...], Maker]] = []
    for key in module.keys:
        role = key[len(module.stem) + 1 :]
        shape: tuple[int, ...]
        if role == "alpha":
            assert spec.alpha is not None
            out.append((key, alpha_dtype, (), _constant((), spec.alpha)))
            continue
        if role == "scale":
            # A norm's replacement scale: ones with a little noise, as trained RMSNorm scales.
            shape = (fan_out,)
            out.append((key, spec.dtype, shape, _normal(seed, key, shape, 0.1, offset=1.0)))
            continue
        factor = 1.0
        if role in ("lora_down.weight", "lora_A.weight", "lora_A.default.weight", "down.weight"):
            shape, std = (r, fan_in), down_std
        elif role in ("lora_up.weight", "lora_B.weight", "lora_B.default.weight", "up.weight"):
            shape, std, factor = (fan_out, r), up_std, strength
        elif role == "lora_B.bias":
            shape, std, factor = (fan_out,), up_std, strength
        elif role == "hada_w1_a":
            shape, std, factor = (fan_out, r), up_std, strength
        elif role == "hada_w2_a":
            shape, std = (fan_out, r), up_std
        elif role in ("hada_w1_b", "hada_w2_b"):
            shape, std = (r, fan_in), down_std
        elif role == "lokr_w1":
            (a, _b), (c, _d) = _factorization(fan_out), _factorization(fan_in)
            shape, std = (a, c), 1.0 / math.sqrt(c)
        elif role == "lokr_w2_a":
            shape, std, factor = (_factorization(fan_out)[1], r), up_std, strength
        elif role == "lokr_w2_b":
            d = _factorization(fan_in)[1]
            shape, std = (r, d), 1.0 / math.sqrt(d)
        elif role == "diff":
            shape, std, factor = (fan_out, fan_in), down_std, strength
        elif role == "diff_b":
            shape, std, factor = (fan_out,), down_std, strength
        else:  # pragma: no cover - the suffix tables above produce only these roles
            raise AssertionError(f"no values for role {role!r}")
        out.append((key, spec.dtype, shape, _normal(seed, key, shape, std, factor)))
    return out


# --- dtype encoding --------------------------------------------------------------
@lru_cache(maxsize=2)
def _fp8_codebook(dtype: str) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.uint8]]:
    """Finite values of an FP8 format in ascending order, and their codes.

    Decoding every code with the reader's own table means the encoder and the
    decoder cannot disagree on what a code is worth.
    """
    values = decode_array(bytes(range(256)), dtype, (256,)).astype(np.float64)
    codes = np.arange(256, dtype=np.uint8)
    finite = np.isfinite(values)
    order = np.argsort(values[finite], kind="stable")
    return values[finite][order], codes[finite][order]


def _encode_fp8(x: npt.NDArray[np.float32], dtype: str) -> bytes:
    values, codes = _fp8_codebook(dtype)
    flat = np.clip(x.astype(np.float64).reshape(-1), values[0], values[-1])
    hi = np.clip(np.searchsorted(values, flat), 1, len(values) - 1)
    lo = hi - 1
    d_lo, d_hi = flat - values[lo], values[hi] - flat
    # Round to nearest, ties to the even code (as IEEE and torch's casts do).
    take_lo = (d_lo < d_hi) | ((d_lo == d_hi) & (codes[lo] % 2 == 0))
    return np.where(take_lo, codes[lo], codes[hi]).astype(np.uint8).tobytes()


def encode_array(values: npt.ArrayLike, dtype: str) -> bytes:
    """Little-endian bytes of ``values`` in a safetensors float dtype.

    BF16 rounds float32 to its upper 16 bits (to nearest, ties to even); FP8
    takes the nearest finite code (ties to even), saturating at the largest.
    """
    x = np.asarray(values, dtype=np.float32)
    if dtype == "F32":
        return x.astype("<f4").tobytes()
    if dtype == "F16":
        return x.astype("<f2").tobytes()
    if dtype == "BF16":
        bits = x.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return rounded.astype("<u2").tobytes()
    if dtype in ("F8_E4M3", "F8_E5M2"):
        return _encode_fp8(x, dtype)
    raise ValueError(f"cannot encode dtype {dtype!r}; use one of {', '.join(SYNTH_DTYPES)}")


# --- files -----------------------------------------------------------------------
def _strength(spec: SynthSpec, block: str) -> float:
    if spec.strength is None:
        return 1.0
    return float(spec.strength.get(block, 0.0))


def _plan(spec: SynthSpec) -> list[tuple[str, str, tuple[int, ...], Maker]]:
    return [
        tensor
        for module in synth_modules(spec)
        for tensor in _module_tensors(spec, module, _strength(spec, module.block))
    ]


def synth_tensors(spec: SynthSpec) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of the synthetic LoRA: key -> (dtype, shape, raw little-endian bytes)."""
    return {
        key: (dtype, shape, encode_array(make(), dtype)) for key, dtype, shape, make in _plan(spec)
    }


def _placeholder_hash(spec: SynthSpec) -> str:
    # Looks like the real thing, but is not the hash of this file: it goes stale, as after edits.
    return hashlib.sha256(f"lora-prune synth {spec.grammar} {spec.seed}".encode()).hexdigest()


def synth_metadata(spec: SynthSpec) -> dict[str, str]:
    """The ``__metadata__`` a producer of the grammar writes, then ``spec.metadata`` on top."""
    _check_spec(spec)
    gr = _grammar(spec.grammar)
    adapter = _adapter(spec)
    meta: dict[str, str] = {}
    if gr.kohya_metadata:
        fake = _placeholder_hash(spec)
        meta.update(
            {
                "ss_network_module": "networks.lora_flux" if adapter == "lora" else "lycoris.kohya",
                "ss_network_dim": str(spec.rank),
                "ss_base_model_version": "flux1",
                "sshs_model_hash": fake,
                "sshs_legacy_hash": fake[:8],
                "modelspec.sai_model_spec": "1.0.0",
                "modelspec.architecture": (
                    "flux-1-dev/lora" if spec.geometry.guidance else "flux-1-schnell/lora"
                ),
                "modelspec.title": f"synthetic {spec.grammar} LoRA",
                "modelspec.hash_sha256": "0x" + fake,
            }
        )
        if spec.alpha is not None:
            meta["ss_network_alpha"] = _number(spec.alpha)
        if adapter != "lora":
            algo = "full" if adapter == "diff" else adapter
            meta["ss_network_args"] = json.dumps({"algo": algo})
    if gr.family == "diffusers" and gr.prefix == "transformer.":
        meta["format"] = "pt"
    if spec.alpha_in == "metadata" and spec.alpha is not None:
        meta["lora_adapter_metadata"] = json.dumps(_peft_config(spec), indent=2, sort_keys=True)
    if spec.metadata:
        meta.update(spec.metadata)
    return meta


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _peft_config(spec: SynthSpec) -> dict[str, Any]:
    """diffusers' packed PEFT config: each model's LoraConfig fields under its prefix."""
    modules = synth_modules(spec)
    config: dict[str, Any] = {}
    for model, prefix in (("transformer", "transformer."), ("clip", "text_encoder.")):
        mine = [m for m in modules if (m.block == "clip") == (model == "clip")]
        if not mine:
            continue
        targets = sorted({_peft_target(m.stem, prefix) for m in mine})
        config.update(
            {
                f"{model if model == 'transformer' else 'text_encoder'}.{k}": v
                for k, v in {
                    "r": spec.rank,
                    "lora_alpha": spec.alpha,
                    "target_modules": targets,
                    "lora_dropout": 0.0,
                    "bias": "none",
                    "use_dora": False,
                    "use_rslora": False,
                    "init_lora_weights": True,
                    "peft_type": "LORA",
                }.items()
            }
        )
    return config


def _peft_target(stem: str, prefix: str) -> str:
    """A module's name as users list it in ``target_modules`` (block index dropped)."""
    path = stem.removeprefix(prefix)
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1 :])
    return path


def _encoder(make: Maker, dtype: str) -> Callable[[], bytes]:
    return lambda: encode_array(make(), dtype)


def write_synth_lora(path: str | Path, spec: SynthSpec) -> Path:
    """Write the synthetic LoRA of ``spec`` to ``path`` (atomically); returns the path.

    Tensors are generated one at a time as the writer streams them, so a
    real-size file never sits in memory whole.
    """
    meta = synth_metadata(spec)
    entries = [
        TensorEntry(key, dtype, shape, _encoder(make, dtype))
        for key, dtype, shape, make in _plan(spec)
    ]
    return write_safetensors(Path(path), entries, meta or None)


def planted_lora(
    path: str | Path,
    planted: Mapping[str, float],
    *,
    grammar: str = "kohya",
    geometry: FluxGeometry = TINY,
    rank: int = 4,
    seed: int = 0,
    dtype: str = "F32",
) -> Path:
    """A LoRA with every default block present but only the ``planted`` ones non-zero.

    ``planted`` maps block -> strength; planted blocks outside the grammar's
    defaults (``input``, ``final``, ``clip``, ``t5``) are added.
    """
    blocks = _union(default_blocks(grammar, geometry), planted)
    spec = SynthSpec(
        grammar=grammar,
        geometry=geometry,
        blocks=blocks,
        rank=rank,
        seed=seed,
        dtype=dtype,
        strength=dict(planted),
    )
    return write_synth_lora(path, spec)


def _union(blocks: Iterable[str], more: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({*blocks, *more}, key=block_order))
