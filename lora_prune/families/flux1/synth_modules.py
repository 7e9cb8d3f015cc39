"""FLUX.1 synthetic LoRAs (for lora_prune.testing): real layer shapes of a geometry, named per grammar."""

from __future__ import annotations

from dataclasses import dataclass

from ...blocks import block_order
from .blocks import BLOCK_IDS
from .geometry import TINY, FluxGeometry
from .synth_grammars import (
    LYCORIS_SUFFIXES,
    Adapter,
    Family,
    Grammar,
    Kind,
    SynthModule,
    SynthSpec,
    adapter_of,
    alpha_key,
    check_spec,
    grammar_row,
)


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
    gr = grammar_row(grammar)
    blocks = _all_transformer_blocks(geometry)
    if gr.family in ("xlabs", "diffsynth"):
        blocks = [b for b in blocks if b not in ("input", "final")]
    te = [b for b, p in (("clip", gr.clip_prefix), ("t5", gr.t5_prefix)) if p is not None]
    return tuple(sorted([*te, *blocks], key=block_order))


def default_blocks(grammar: str, geometry: FluxGeometry = TINY) -> tuple[str, ...]:
    """The blocks the grammar's trainer covers by default, in model order."""
    gr = grammar_row(grammar)
    return tuple(
        b for b in _all_transformer_blocks(geometry) if b.split(".")[0] in gr.default_kinds
    )


def _resolve_blocks(spec: SynthSpec) -> list[str]:
    gr = grammar_row(spec.grammar)
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


def _stem(gr: Grammar, layer: _Layer) -> str:
    if layer.block == "clip" or layer.block == "t5":
        prefix = gr.clip_prefix if layer.block == "clip" else gr.t5_prefix
        assert prefix is not None
        flat = prefix.endswith("_")
        return prefix + (layer.path.replace(".", "_") if flat else layer.path)
    path = layer.path.replace(".", "_") if gr.flat else layer.path
    return gr.prefix + path + gr.trailing


def _suffixes(gr: Grammar, adapter: Adapter, alpha: bool) -> tuple[str, ...]:
    if adapter != "lora":
        out = LYCORIS_SUFFIXES[adapter]
    else:
        out = (gr.down, gr.up) + ((".lora_B.bias",) if gr.bias else ())
    return out + ((".alpha",) if alpha else ())


def synth_modules(spec: SynthSpec) -> list[SynthModule]:
    """The modules :func:`synth_tensors` writes for ``spec``, in model order."""
    check_spec(spec)
    gr = grammar_row(spec.grammar)
    adapter = adapter_of(spec)
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
    alpha = alpha_key(spec, adapter)
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
