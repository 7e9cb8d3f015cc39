"""FLUX.1's block map: every key of every FLUX.1 LoRA grammar to (stem, role, block, target).

:func:`parse_key` splits a tensor key into the module stem (all tensors of one
stem travel together) and its role (:func:`lora_prune.keys.role_splits`) and
resolves the module path in any grammar of the field guide (kohya, LyCORIS,
ComfyUI, bare BFL, diffusers/PEFT, PEFT-wrapped BFL, OneTrainer, ``lycoris_``,
XLabs, DiffSynth, malformed kohya) to a :class:`~lora_prune.keys.Target`: its
block id and the diffusers modules whose output rows it covers, which is what
the render engine needs to attach it.

Why one module of over 600 lines: it is one table of grammars, each a few
small matchers onto the same :class:`Target`; the grammars overlap (a bare BFL
path appears inside PEFT-wrapped and OneTrainer keys), so their order and their
tie-breaks are read together, and split modules would only import each other.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from ...adapters import LOHA_ROLES, LOKR_ROLES
from ...keys import (
    BlockRangeError,
    ParamKind,
    ParsedKey,
    Target,
    key_index,
    role_splits,
)
from .blocks import DOUBLE_BLOCKS, SINGLE_BLOCKS

#: Module paths of FLUX.1-dev's guidance embedder (BFL and diffusers naming);
#: schnell has none, so a LoRA or checkpoint with them is for dev.
GUIDANCE_PREFIXES: tuple[str, ...] = ("guidance_in.", "time_text_embed.guidance_embedder.")


def is_guidance_path(path: str) -> bool:
    """True for a module or parameter path of the guidance embedder, in either naming."""
    return path.startswith(GUIDANCE_PREFIXES)


# --- module tables ---------------------------------------------------------
# BFL component (relative to double_blocks.N) -> (diffusers modules, kind).
_BFL_DOUBLE: dict[str, tuple[tuple[str, ...], ParamKind]] = {
    "img_mod.lin": (("norm1.linear",), "linear"),
    "img_attn.qkv": (("attn.to_q", "attn.to_k", "attn.to_v"), "linear"),
    "img_attn.proj": (("attn.to_out.0",), "linear"),
    "img_mlp.0": (("ff.net.0.proj",), "linear"),
    "img_mlp.2": (("ff.net.2",), "linear"),
    "txt_mod.lin": (("norm1_context.linear",), "linear"),
    "txt_attn.qkv": (("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"), "linear"),
    "txt_attn.proj": (("attn.to_add_out",), "linear"),
    "txt_mlp.0": (("ff_context.net.0.proj",), "linear"),
    "txt_mlp.2": (("ff_context.net.2",), "linear"),
    "img_attn.norm.query_norm": (("attn.norm_q",), "norm"),
    "img_attn.norm.key_norm": (("attn.norm_k",), "norm"),
    "txt_attn.norm.query_norm": (("attn.norm_added_q",), "norm"),
    "txt_attn.norm.key_norm": (("attn.norm_added_k",), "norm"),
}
_BFL_SINGLE: dict[str, tuple[tuple[str, ...], ParamKind]] = {
    "linear1": (("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear"),
    "linear2": (("proj_out",), "linear"),
    "modulation.lin": (("norm.linear",), "linear"),
    "norm.query_norm": (("attn.norm_q",), "norm"),
    "norm.key_norm": (("attn.norm_k",), "norm"),
}
_BFL_GLOBAL: dict[str, tuple[str, str]] = {
    "img_in": ("input", "x_embedder"),
    "txt_in": ("input", "context_embedder"),
    "time_in.in_layer": ("input", "time_text_embed.timestep_embedder.linear_1"),
    "time_in.out_layer": ("input", "time_text_embed.timestep_embedder.linear_2"),
    "vector_in.in_layer": ("input", "time_text_embed.text_embedder.linear_1"),
    "vector_in.out_layer": ("input", "time_text_embed.text_embedder.linear_2"),
    "guidance_in.in_layer": ("input", "time_text_embed.guidance_embedder.linear_1"),
    "guidance_in.out_layer": ("input", "time_text_embed.guidance_embedder.linear_2"),
    "final_layer.linear": ("final", "proj_out"),
    "final_layer.adaLN_modulation.1": ("final", "norm_out.linear"),
}
_DIFF_DOUBLE: dict[str, ParamKind] = {
    "norm1.linear": "linear",
    "norm1_context.linear": "linear",
    "attn.to_q": "linear",
    "attn.to_k": "linear",
    "attn.to_v": "linear",
    "attn.to_out.0": "linear",
    "attn.add_q_proj": "linear",
    "attn.add_k_proj": "linear",
    "attn.add_v_proj": "linear",
    "attn.to_add_out": "linear",
    "ff.net.0.proj": "linear",
    "ff.net.2": "linear",
    "ff_context.net.0.proj": "linear",
    "ff_context.net.2": "linear",
    "attn.norm_q": "norm",
    "attn.norm_k": "norm",
    "attn.norm_added_q": "norm",
    "attn.norm_added_k": "norm",
}
_DIFF_SINGLE: dict[str, ParamKind] = {
    "attn.to_q": "linear",
    "attn.to_k": "linear",
    "attn.to_v": "linear",
    "proj_mlp": "linear",
    "proj_out": "linear",
    "norm.linear": "linear",
    "attn.norm_q": "norm",
    "attn.norm_k": "norm",
}
# diffusers name of an input/final module -> its block id.
_DIFF_GLOBAL: dict[str, str] = {module: block for block, module in _BFL_GLOBAL.values()}
# XLabs processor LoRAs (relative to double_blocks.N.processor / single_blocks.N.processor).
_XLABS_DOUBLE = {
    "qkv_lora1": "img_attn.qkv",
    "qkv_lora2": "txt_attn.qkv",
    "proj_lora1": "img_attn.proj",
    "proj_lora2": "txt_attn.proj",
}
# DiffSynth FluxDiT names -> BFL component (doubles) or diffusers path (singles' split forms).
_DIFFSYNTH_DOUBLE = {
    "norm1_a.linear": "img_mod.lin",
    "norm1_b.linear": "txt_mod.lin",
    "attn.a_to_qkv": "img_attn.qkv",
    "attn.b_to_qkv": "txt_attn.qkv",
    "attn.a_to_out": "img_attn.proj",
    "attn.b_to_out": "txt_attn.proj",
    "ff_a.0": "img_mlp.0",
    "ff_a.2": "img_mlp.2",
    "ff_b.0": "txt_mlp.0",
    "ff_b.2": "txt_mlp.2",
    "attn.norm_q_a": "img_attn.norm.query_norm",
    "attn.norm_k_a": "img_attn.norm.key_norm",
    "attn.norm_q_b": "txt_attn.norm.query_norm",
    "attn.norm_k_b": "txt_attn.norm.key_norm",
}
_DIFFSYNTH_SINGLE: dict[str, tuple[tuple[str, ...], ParamKind]] = {
    "to_qkv_mlp": _BFL_SINGLE["linear1"],
    "proj_out": _BFL_SINGLE["linear2"],
    "norm.linear": _BFL_SINGLE["modulation.lin"],
    "a_to_q": (("attn.to_q",), "linear"),
    "a_to_k": (("attn.to_k",), "linear"),
    "a_to_v": (("attn.to_v",), "linear"),
    "proj_in_besides_attn": (("proj_mlp",), "linear"),
    "norm_q_a": _BFL_SINGLE["norm.query_norm"],
    "norm_k_a": _BFL_SINGLE["norm.key_norm"],
}


def _flat(table: Iterable[str]) -> dict[str, str]:
    return {name.replace(".", "_"): name for name in table}


_BFL_DOUBLE_FLAT = _flat(_BFL_DOUBLE)
_BFL_SINGLE_FLAT = _flat(_BFL_SINGLE)
_BFL_GLOBAL_FLAT = _flat(_BFL_GLOBAL)
_DIFF_DOUBLE_FLAT = _flat(_DIFF_DOUBLE)
_DIFF_SINGLE_FLAT = _flat(_DIFF_SINGLE)
_DIFF_GLOBAL_FLAT = _flat(_DIFF_GLOBAL)


def _check_index(kind: str, index: int) -> None:
    limit = DOUBLE_BLOCKS if kind == "double" else SINGLE_BLOCKS
    if index >= limit:
        raise BlockRangeError(kind, index)


def _double(index: int, bfl_component: str) -> Target:
    _check_index("double", index)
    modules, kind = _BFL_DOUBLE[bfl_component]
    return Target(
        "transformer",
        f"double_blocks.{index}.{bfl_component}",
        tuple(f"transformer_blocks.{index}.{m}" for m in modules),
        kind,
    )


def _single(index: int, name: str, modules: tuple[str, ...], kind: ParamKind) -> Target:
    _check_index("single", index)
    return Target(
        "transformer",
        f"single_blocks.{index}.{name}",
        tuple(f"single_transformer_blocks.{index}.{m}" for m in modules),
        kind,
    )


def _bfl_global(name: str) -> Target:
    _block, module = _BFL_GLOBAL[name]
    return Target(
        "transformer", name, (module,), "linear", swap_halves=name.endswith("adaLN_modulation.1")
    )


def _diff_double(index: int, component: str) -> Target:
    _check_index("double", index)
    path = f"transformer_blocks.{index}.{component}"
    return Target("transformer", path, (path,), _DIFF_DOUBLE[component])


def _diff_single(index: int, component: str) -> Target:
    _check_index("single", index)
    path = f"single_transformer_blocks.{index}.{component}"
    return Target("transformer", path, (path,), _DIFF_SINGLE[component])


def _diff_global(name: str) -> Target:
    return Target("transformer", name, (name,), "linear")


def _block_of_target(target: Target) -> str:
    """The block id a target belongs to."""
    if target.model != "transformer":
        return target.model
    m = re.match(r"^(?:double_blocks|transformer_blocks)\.(\d+)\.", target.name)
    if m:
        return f"double.{m.group(1)}"
    m = re.match(r"^(?:single_blocks|single_transformer_blocks)\.(\d+)\.", target.name)
    if m:
        return f"single.{m.group(1)}"
    if target.name in _BFL_GLOBAL:
        return _BFL_GLOBAL[target.name][0]
    return _DIFF_GLOBAL[target.name]


# --- path resolvers (one per naming, dotted or flattened) --------------------
def _resolve_bfl(path: str, sep: str) -> Target | None:
    table_d, table_s, table_g = (
        (_BFL_DOUBLE, _BFL_SINGLE, _BFL_GLOBAL)
        if sep == "."
        else (_BFL_DOUBLE_FLAT, _BFL_SINGLE_FLAT, _BFL_GLOBAL_FLAT)
    )
    if sep == ".":
        path = path.removesuffix(".scale")  # ComfyUI's "...query_norm.scale.set_weight"
    m = re.fullmatch(rf"double_blocks{re.escape(sep)}(\d+){re.escape(sep)}(.+)", path)
    if m and m.group(2) in table_d:
        comp = m.group(2) if sep == "." else _BFL_DOUBLE_FLAT[m.group(2)]
        return _double(key_index(m.group(1)), comp)
    m = re.fullmatch(rf"single_blocks{re.escape(sep)}(\d+){re.escape(sep)}(.+)", path)
    if m and m.group(2) in table_s:
        comp = m.group(2) if sep == "." else _BFL_SINGLE_FLAT[m.group(2)]
        modules, kind = _BFL_SINGLE[comp]
        return _single(key_index(m.group(1)), comp, modules, kind)
    if path in table_g:
        return _bfl_global(path if sep == "." else _BFL_GLOBAL_FLAT[path])
    return None


def _resolve_diffusers(path: str, sep: str) -> Target | None:
    table_d, table_s, table_g = (
        (_DIFF_DOUBLE, _DIFF_SINGLE, _DIFF_GLOBAL)
        if sep == "."
        else (_DIFF_DOUBLE_FLAT, _DIFF_SINGLE_FLAT, _DIFF_GLOBAL_FLAT)
    )
    # "single_transformer_blocks" contains "transformer_blocks": match singles first.
    m = re.fullmatch(rf"single_transformer_blocks{re.escape(sep)}(\d+){re.escape(sep)}(.+)", path)
    if m:
        if m.group(2) not in table_s:
            return None
        comp = m.group(2) if sep == "." else _DIFF_SINGLE_FLAT[m.group(2)]
        return _diff_single(key_index(m.group(1)), comp)
    m = re.fullmatch(rf"transformer_blocks{re.escape(sep)}(\d+){re.escape(sep)}(.+)", path)
    if m:
        if m.group(2) not in table_d:
            return None
        comp = m.group(2) if sep == "." else _DIFF_DOUBLE_FLAT[m.group(2)]
        return _diff_double(key_index(m.group(1)), comp)
    if path in table_g:
        return _diff_global(path if sep == "." else _DIFF_GLOBAL_FLAT[path])
    return None


def _resolve_xlabs(path: str) -> Target | None:
    m = re.fullmatch(r"double_blocks\.(\d+)\.processor\.(\w+)", path)
    if m and m.group(2) in _XLABS_DOUBLE:
        return _double(key_index(m.group(1)), _XLABS_DOUBLE[m.group(2)])
    m = re.fullmatch(r"single_blocks\.(\d+)\.linear1_qkv", path)
    if m:
        # ComfyUI's alias for the attention rows (the first 3 x hidden) of linear1.
        return _single(
            key_index(m.group(1)), "linear1.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), "linear"
        )
    m = re.fullmatch(r"single_blocks\.(\d+)\.processor\.(qkv_lora|proj_lora)", path)
    if m:
        index = key_index(m.group(1))
        if m.group(2) == "proj_lora":
            modules, kind = _BFL_SINGLE["linear2"]
            return _single(index, "linear2", modules, kind)
        # XLabs' single-block qkv LoRA covers only the attention rows of linear1.
        return _single(index, "linear1.qkv", ("attn.to_q", "attn.to_k", "attn.to_v"), "linear")
    return None


def _resolve_diffsynth(path: str) -> Target | None:
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", path)
    if m and m.group(2) in _DIFFSYNTH_DOUBLE:
        return _double(key_index(m.group(1)), _DIFFSYNTH_DOUBLE[m.group(2)])
    m = re.fullmatch(r"single_blocks\.(\d+)\.(.+)", path)
    if m and m.group(2) in _DIFFSYNTH_SINGLE:
        modules, kind = _DIFFSYNTH_SINGLE[m.group(2)]
        return _single(key_index(m.group(1)), m.group(2), modules, kind)
    return None


_CLIP_RE = re.compile(
    r"text_model\.encoder\.layers\.(\d+)\.(self_attn\.(?:q|k|v|out)_proj|mlp\.fc[12])"
)
_CLIP_FLAT_RE = re.compile(
    r"text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])"
)
_T5_RE = re.compile(
    r"encoder\.block\.(\d+)\.(layer\.0\.SelfAttention\.[qkvo]|layer\.1\.DenseReluDense\.(?:wi_0|wi_1|wi|wo))"
)
_T5_FLAT_RE = re.compile(
    r"encoder_block_(\d+)_(layer_0_SelfAttention_[qkvo]|layer_1_DenseReluDense_(?:wi_0|wi_1|wi|wo))"
)


# Text-encoder weights that are no Linear layer. ComfyUI accepts a LoRA key for every
# weight of its text encoders under "text_encoders." and its LoRA extractor writes them
# (.diff for 1-D ones, .diff_b for biases, lora_up/lora_down for 2-D embeddings).
_CLIP_OTHER_RE = re.compile(
    r"text_model\.(?:embeddings\.(?:token|position)_embedding|final_layer_norm"
    r"|encoder\.layers\.\d{1,6}\.layer_norm[12])|text_projection"
)
_T5_OTHER_RE = re.compile(
    r"shared|encoder\.final_layer_norm|encoder\.block\.\d{1,6}\.layer\.(?:0\.layer_norm"
    r"|0\.SelfAttention\.relative_attention_bias|1\.layer_norm)"
)


def _resolve_text_other(path: str) -> Target | None:
    if _CLIP_OTHER_RE.fullmatch(path):
        return Target("clip", path, (path,), "other")
    if _T5_OTHER_RE.fullmatch(path):
        return Target("t5", path, (path,), "other")
    return None


def _resolve_text(path: str, sep: str) -> Target | None:
    if sep == ".":
        m = _CLIP_RE.fullmatch(path)
        if m:
            return Target("clip", path, (path,))
        m = _T5_RE.fullmatch(path)
        if m:
            return Target("t5", path, (path,))
        return None
    m = _CLIP_FLAT_RE.fullmatch(path)
    if m:
        name = f"text_model.encoder.layers.{m.group(1)}." + m.group(2).replace(
            "self_attn_", "self_attn."
        ).replace("mlp_", "mlp.")
        return Target("clip", name, (name,))
    m = _T5_FLAT_RE.fullmatch(path)
    if m:
        rest = m.group(2)
        rest = rest.replace("layer_0_SelfAttention_", "layer.0.SelfAttention.")
        rest = rest.replace("layer_1_DenseReluDense_", "layer.1.DenseReluDense.")
        name = f"encoder.block.{m.group(1)}.{rest}"
        return Target("t5", name, (name,))
    return None


# (prefix, grammar name, resolvers tried in order). Longest prefixes first.
_Resolver = tuple[str, str]  # (kind, sep)
_PREFIXES: tuple[tuple[str, str, tuple[_Resolver, ...]], ...] = (
    ("text_encoders.clip_l.transformer.", "comfyui", (("clip", "."), ("text_other", "."))),
    ("text_encoders.t5xxl.transformer.", "comfyui", (("t5", "."), ("text_other", "."))),
    # A T5 loaded on its own has no "t5xxl." wrapper in ComfyUI's state dict.
    ("text_encoders.transformer.", "comfyui", (("t5", "."), ("t5_other", "."))),
    ("base_model.model.", "peft-bfl", (("bfl", "."), ("diffusers", "."))),
    ("diffusion_model.", "comfyui", (("bfl", "."), ("xlabs", "."))),
    ("transformer.", "diffusers", (("diffusers", "."),)),
    ("text_encoder_2.", "diffusers", (("t5", "."),)),
    ("text_encoder.", "diffusers", (("clip", "."),)),
    ("lora_transformer_", "onetrainer", (("diffusers", "_"),)),
    ("lycoris_", "lycoris", (("diffusers", "_"),)),
    ("lora_unet_", "kohya", (("bfl", "_"), ("diffusers_trailing", "_"))),
    # FLUX.1 has one CLIP (CLIP-L: te1) and T5 (te3 in kohya, te2 in LyCORIS/OneTrainer);
    # a CLIP path under lora_te2_/text_encoder_2. is SDXL's or SD3's CLIP-G.
    ("lora_te1_", "kohya", (("clip", "_"),)),
    ("lora_te2_", "kohya", (("t5", "_"),)),
    ("lora_te3_", "kohya", (("t5", "_"),)),
    ("lora_te_", "kohya", (("clip", "_"),)),
    ("", "bfl", (("bfl", "."), ("xlabs", "."), ("diffsynth", "."), ("diffusers", "."))),
)
_GRAMMAR_BY_RESOLVER = {
    "xlabs": "xlabs",
    "diffsynth": "diffsynth",
    "diffusers_trailing": "kohya-malformed",
}


def _resolve(kind: str, path: str, sep: str) -> Target | None:
    if kind == "bfl":
        return _resolve_bfl(path, sep)
    if kind == "diffusers":
        return _resolve_diffusers(path, sep)
    if kind == "diffusers_trailing":
        # Malformed kohya: diffusers names under lora_unet_ with a trailing "_".
        return _resolve_diffusers(path[:-1], sep) if path.endswith("_") else None
    if kind == "xlabs":
        return _resolve_xlabs(path)
    if kind == "diffsynth":
        return _resolve_diffsynth(path)
    if kind in ("text_other", "t5_other"):
        target = _resolve_text_other(path)
        if target is None or (kind == "t5_other" and target.model != "t5"):
            return None
        return target
    target = _resolve_text(path, sep)
    return target if target is not None and target.model == kind else None


def _resolve_stem(stem: str) -> tuple[str, str, Target] | None:
    """(prefix grammar, resolver kind, target) of a module stem, or None."""
    for prefix, grammar, resolvers in _PREFIXES:
        if not stem.startswith(prefix):
            continue
        path = stem[len(prefix) :]
        for kind, sep in resolvers:
            target = _resolve(kind, path, sep)
            if target is not None:
                return grammar, kind, target
        # A matching prefix owns the stem: do not let the bare grammar guess at it.
        if prefix:
            return None
    return None


def resolve_module_path(path: str) -> Target | None:
    """The target of a module path in any naming (e.g. a checkpoint's weight prefix).

    Raises :class:`BlockRangeError` like :func:`parse_key`.
    """
    found = _resolve_stem(path)
    return found[2] if found else None


def transformer_target(path: str) -> Target | None:
    """The transformer layer a checkpoint's module path names, or None (out of range too)."""
    try:
        target = resolve_module_path(path)
    except BlockRangeError:
        return None
    return target if target is not None and target.model == "transformer" else None


def parse_key(key: str) -> ParsedKey | None:
    """Resolve one tensor key, or return None when no FLUX.1 grammar matches.

    Raises :class:`BlockRangeError` for a FLUX-shaped key whose block index is
    outside FLUX.1's 19 double / 38 single blocks.
    """
    resolved = next(
        (
            (stem, role, found)
            for stem, role in role_splits(key)
            if (found := _resolve_stem(stem)) is not None
        ),
        None,
    )
    if resolved is None:
        return None
    stem, role, (grammar, kind, target) = resolved
    name = _GRAMMAR_BY_RESOLVER.get(kind, grammar)
    if grammar == "diffusers" and (".lora_down." in key or ".lora_up." in key):
        name = "diffusers-kohya-suffix"
    if grammar == "kohya" and role in LOHA_ROLES | LOKR_ROLES | {"diff", "diff_b", "dora_scale"}:
        name = "lycoris-kohya"
    if grammar == "peft-bfl" and kind == "diffusers":
        name = "peft-diffusers"
    return ParsedKey(key, stem, role, name, _block_of_target(target), target)
