"""The files slim and resize write load where users load LoRAs (docs/loaders.md).

diffusers: ``pipe.load_lora_weights`` on the tiny pipeline, for the PEFT/diffusers
format; the render must differ from the base and equal the block engine's.
kohya's FLUX.1 converter in diffusers hard-codes the FLUX.1 widths (3072), so it
cannot load tiny-width kohya files: those are checked by key set only.

ComfyUI and Forge: by key set. Each loader's FLUX.1 key map (the module stems it
accepts) and the tensor names its ``load_lora`` reads per stem are written below
from their code, and :func:`loaded_keys` replays ``load_lora`` on a file's keys:
a slim or resized file of every grammar must be read whole (nothing left as
"lora key not loaded"), and where the input already does not load, the output
must not pretend to. The code read, by repository, path and commit:

ComfyUI, ``Comfy-Org/ComfyUI``:
  ``comfy/sd.py`` @ 033046cc4fac82d954c6daedccf1c8128433c4f1 ``load_lora_for_models``
  (``convert_lora``, then one key map for the model and the text encoders);
  ``comfy/lora.py`` @ ec93dcacb96b922f7cb1417b3ba22bccb082df32 ``model_lora_keys_unet``,
  ``model_lora_keys_clip``, ``load_lora``; ``comfy/utils.py`` @
  b3be02d6e766a8d3743dcf99cc967118f3ec8e3e ``flux_to_diffusers``;
  ``comfy/lora_convert.py`` @ 2bffe2f4ce5763dcb83df6a670657b6d5c8f85a5 ``convert_lora``;
  ``comfy/weight_adapter/lora.py`` @ 6f98b150e065f1ffc788558574a887835068bd40
  ``LoRAAdapter.load``. ``comfyanonymous/ComfyUI``: ``comfy/weight_adapter/loha.py`` @
  183b377588102d00131247aec399f8b34e1122b4, ``lokr.py`` @
  e8f3bc5ab766ba0149ac8ba8f67c328f8bb3da7d, ``comfy/text_encoders/t5.py`` @
  04e411c32ec80c5d51e0b9342f34584767c0d17f and ``comfy/clip_model.py`` @
  00728eb20fce05955f89ef1ccf5f6167416e94cf (module names).

Forge, ``lllyasviel/stable-diffusion-webui-forge`` @ dfdcbab685e57677014f05a3309b48cc87383167:
  ``extensions-builtin/sd_forge_lora/networks.py`` ``load_lora_for_models``,
  ``backend/patcher/lora.py``, ``packages_3rdparty/comfyui_lora_collection/lora.py`` and
  ``utils.py`` (an older copy of ComfyUI's, edited), ``backend/nn/flux.py``,
  ``backend/nn/clip.py``, ``backend/nn/t5.py``, ``backend/diffusion_engine/flux.py``.
  Forge is not ComfyUI verbatim: its map lacks ``text_encoders.``, the bare diffusers
  (DiffSynth) names and ``linear1_qkv``, its ``load_lora`` lacks ``.lora_B.default.weight``,
  it converts no XLabs files, and it refuses a whole file with more than 12 unmatched keys.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_prune.families.flux1.blocks import (
    DOUBLE_BLOCKS,
    DOUBLE_IDS,
    SINGLE_BLOCKS,
    SINGLE_IDS,
    TEXT_ENCODER_IDS,
)
from lora_prune.lora import read_lora
from lora_prune.render.engine import BlockEngine
from lora_prune.render.loading import LoadedModel
from lora_prune.render.plain import plain_render as pipe_render
from lora_prune.render.tiny import TINY_MAX_SEQUENCE_LENGTH
from lora_prune.resize import resize_lora
from lora_prune.safetensors_io import TensorEntry, read_header, write_safetensors
from lora_prune.settings import ImageSettings
from lora_prune.slim import slim_lora
from lora_prune.testing import (
    GRAMMARS,
    SynthSpec,
    supported_blocks,
    synth_metadata,
    synth_modules,
    synth_tensors,
    write_synth_lora,
)

torch.set_num_threads(1)

SETTINGS = ImageSettings(
    "a red fox", seed=3, width=32, height=32, steps=2, max_sequence_length=TINY_MAX_SEQUENCE_LENGTH
)
KEEP = {"input", "double.0", "double.3", "single.5", "single.7", "final"}
# The key-set checks keep CLIP and drop T5, and keep the blocks whose keys ComfyUI's
# whole-file conversions look for (BFL control: img_in and single_blocks.0; XLabs:
# double_blocks.18 and single_blocks.37).
KEY_KEEP = {"clip", "input", "double.0", "double.18", "single.0", "single.7", "single.37", "final"}

# --- the loaders' FLUX.1 key maps, written from their code ------------------------
# Linear weights of the FLUX.1 model in BFL names: ComfyUI comfy/ldm/flux/layers.py and
# model.py, Forge backend/nn/flux.py (the same names). Both map every ".weight" of the
# model as "lora_unet_<path with . as _>" and "diffusion_model.<path>".
_DOUBLE_LINEARS = (
    "img_mod.lin",
    "img_attn.qkv",
    "img_attn.proj",
    "img_mlp.0",
    "img_mlp.2",
    "txt_mod.lin",
    "txt_attn.qkv",
    "txt_attn.proj",
    "txt_mlp.0",
    "txt_mlp.2",
)
_SINGLE_LINEARS = ("linear1", "linear2", "modulation.lin")
_OUTSIDE_LINEARS = (
    "img_in",
    "txt_in",
    "time_in.in_layer",
    "time_in.out_layer",
    "vector_in.in_layer",
    "vector_in.out_layer",
    "guidance_in.in_layer",
    "guidance_in.out_layer",
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
)
# The QK norms: ".weight" in today's ComfyUI (flux_to_diffusers maps norm_q to
# query_norm.weight, and convert_lora_bfl_control writes "<norm>.set_weight"), ".scale" in
# Forge's RMSNorm (a non-weight parameter, which its map keeps as the stem itself).
_DOUBLE_NORMS = (
    "img_attn.norm.query_norm",
    "img_attn.norm.key_norm",
    "txt_attn.norm.query_norm",
    "txt_attn.norm.key_norm",
)
_SINGLE_NORMS = ("norm.query_norm", "norm.key_norm")

# flux_to_diffusers: the diffusers weight names it maps onto the model (".weight" dropped),
# in both loaders; model_lora_keys_unet turns each into "transformer.<name>",
# "lycoris_<flat>", "lora_transformer_<flat>" (and, in ComfyUI only, the bare name).
_DIFFUSERS_DOUBLE = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_out.0",
    "norm1.linear",
    "norm1_context.linear",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "attn.norm_q",
    "attn.norm_k",
    "attn.norm_added_q",
    "attn.norm_added_k",
)
_DIFFUSERS_SINGLE = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "proj_mlp",
    "norm.linear",
    "proj_out",
    "attn.norm_q",
    "attn.norm_k",
)
_DIFFUSERS_OUTSIDE = (
    "proj_out",
    "x_embedder",
    "context_embedder",
    "time_text_embed.timestep_embedder.linear_1",
    "time_text_embed.timestep_embedder.linear_2",
    "time_text_embed.text_embedder.linear_1",
    "time_text_embed.text_embedder.linear_2",
    "time_text_embed.guidance_embedder.linear_1",
    "time_text_embed.guidance_embedder.linear_2",
    "norm_out.linear",
)
# Names only ComfyUI's newer flux_to_diffusers has (LyCORIS LoKr MLP names, FLUX.2's fused
# single-block names; its controlnet_x_embedder targets a weight FLUX.1 does not have).
_COMFY_DIFFUSERS_DOUBLE = (
    "ff.linear_in",
    "ff.linear_out",
    "ff_context.linear_in",
    "ff_context.linear_out",
)
_COMFY_DIFFUSERS_SINGLE = ("attn.to_qkv_mlp_proj", "attn.to_out")

# Text encoders of FLUX.1: CLIP-L (clip_l.transformer.text_model..., 12 layers) and T5-XXL
# (t5xxl.transformer.encoder..., 24 blocks), the same module names in both loaders. Only
# their Linears are tabled: the files of our grammars carry LoRAs on nothing else.
_CLIP_LAYERS = 12
_T5_BLOCKS = 24
# comfy/lora.py LORA_CLIP_MAP
_CLIP_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)
_T5_LINEARS = (
    "layer.0.SelfAttention.q",
    "layer.0.SelfAttention.k",
    "layer.0.SelfAttention.v",
    "layer.0.SelfAttention.o",
    "layer.1.DenseReluDense.wi_0",
    "layer.1.DenseReluDense.wi_1",
    "layer.1.DenseReluDense.wo",
)


def _flat(path: str) -> str:
    return path.replace(".", "_")


def _blocks(double: Iterable[str], single: Iterable[str], outside: Iterable[str]) -> list[str]:
    double, single = tuple(double), tuple(single)
    return [
        *(f"double_blocks.{i}.{m}" for i in range(DOUBLE_BLOCKS) for m in double),
        *(f"single_blocks.{i}.{m}" for i in range(SINGLE_BLOCKS) for m in single),
        *outside,
    ]


def _diffusers(double: Iterable[str], single: Iterable[str]) -> list[str]:
    double, single = tuple(double), tuple(single)
    return [
        *(f"transformer_blocks.{i}.{m}" for i in range(DOUBLE_BLOCKS) for m in double),
        *(f"single_transformer_blocks.{i}.{m}" for i in range(SINGLE_BLOCKS) for m in single),
        *_DIFFUSERS_OUTSIDE,
    ]


_LINEAR_PATHS = _blocks(_DOUBLE_LINEARS, _SINGLE_LINEARS, _OUTSIDE_LINEARS)
_NORM_PATHS = _blocks(_DOUBLE_NORMS, _SINGLE_NORMS, ())
_CLIP_PATHS = [
    f"text_model.encoder.layers.{b}.{c}" for b in range(_CLIP_LAYERS) for c in _CLIP_LINEARS
]
_T5_PATHS = [f"encoder.block.{b}.{m}" for b in range(_T5_BLOCKS) for m in _T5_LINEARS]


def comfyui_stems() -> frozenset[str]:
    """Every stem ComfyUI's key map holds for FLUX.1 (model_lora_keys_unet + _clip)."""
    weights = [*_LINEAR_PATHS, *_NORM_PATHS]
    stems = {f"lora_unet_{_flat(p)}" for p in weights} | {f"diffusion_model.{p}" for p in weights}
    for d in _diffusers(
        (*_DIFFUSERS_DOUBLE, *_COMFY_DIFFUSERS_DOUBLE),
        (*_DIFFUSERS_SINGLE, *_COMFY_DIFFUSERS_SINGLE),
    ):
        stems |= {f"transformer.{d}", f"lycoris_{_flat(d)}", f"lora_transformer_{_flat(d)}", d}
    # the attention rows of linear1 (XLabs/USO single-block qkv after convert_uso_lora)
    stems |= {f"diffusion_model.single_blocks.{i}.linear1_qkv" for i in range(SINGLE_BLOCKS)}
    for c in _CLIP_PATHS:
        stems |= {
            f"text_encoders.clip_l.transformer.{c}",
            f"lora_te_{_flat(c)}",
            f"lora_te1_{_flat(c)}",
            f"text_encoder.{c}",
        }
    # T5 beside CLIP-L and no CLIP-G: t5_index gives lora_te2_ (OneTrainer) and lora_te3_;
    # "text_encoders.transformer." is the map "without wrapper prefix" of a non-clip_ encoder.
    for t in _T5_PATHS:
        stems |= {
            f"text_encoders.t5xxl.transformer.{t}",
            f"text_encoders.transformer.{t}",
            f"lora_te2_{_flat(t)}",
            f"lora_te3_{_flat(t)}",
        }
    return frozenset(stems)


def forge_stems() -> frozenset[str]:
    """Every stem Forge's key map holds for FLUX.1 (backend/patcher/lora.py and the ComfyUI copy)."""
    stems = {f"lora_unet_{_flat(p)}" for p in _LINEAR_PATHS}
    stems |= {f"diffusion_model.{p}" for p in _LINEAR_PATHS}
    stems |= {f"diffusion_model.{p}.scale" for p in _NORM_PATHS}
    for d in _diffusers(_DIFFUSERS_DOUBLE, _DIFFUSERS_SINGLE):
        stems |= {f"transformer.{d}", f"lycoris_{_flat(d)}", f"lora_transformer_{_flat(d)}"}
    for c in _CLIP_PATHS:
        stems |= {f"lora_te_{_flat(c)}", f"lora_te1_{_flat(c)}", f"text_encoder.{c}"}
    # the ComfyUI copy maps lora_te3_ and lora_te2_, backend/patcher/lora.py te1/te2/te3
    for t in _T5_PATHS:
        stems |= {f"lora_te{n}_{_flat(t)}" for n in (1, 2, 3)}
    return frozenset(stems)


# --- what load_lora reads per stem ---------------------------------------------------
#: Tensors read alone whenever present (alpha, DoRA scale, full and bias deltas, replacements).
_LONE = (".alpha", ".dora_scale", ".diff", ".diff_b", ".set_weight")
_LOHA = (".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b")
_LOKR = (".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2")
# (up, down) in the order load_lora tries them; the first up present wins.
_FORGE_PAIRS = (
    (".lora_up.weight", ".lora_down.weight"),
    ("_lora.up.weight", "_lora.down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)
_COMFY_PAIRS = (
    *_FORGE_PAIRS[:4],
    (".lora_B", ".lora_A"),  # Mochi
    _FORGE_PAIRS[4],
    (".lora_B.default.weight", ".lora_A.default.weight"),  # raw PEFT ("qwen_default_lora")
)

#: loader key -> the file's key it came from (None: a tensor the conversion made up)
Converted = dict[str, str | None]


def _uso(key: str) -> str:
    # comfy/lora_convert.py convert_uso_lora, in its order of replacements
    for old, new in (
        (".down.weight", ".lora_down.weight"),
        (".up.weight", ".lora_up.weight"),
        (".qkv_lora2.", ".txt_attn.qkv."),
        (".qkv_lora1.", ".img_attn.qkv."),
        (".proj_lora1.", ".img_attn.proj."),
        (".proj_lora2.", ".txt_attn.proj."),
        (".qkv_lora.", ".linear1_qkv."),
        (".proj_lora.", ".linear2."),
        (".processor.", "."),
    ):
        key = key.replace(old, new)
    return "diffusion_model." + key


_CONTROL_MARKERS = {"img_in.lora_A.weight", "single_blocks.0.norm.key_norm.scale"}
_USO_MARKERS = {
    "single_blocks.37.processor.qkv_lora.up.weight",
    "double_blocks.18.processor.qkv_lora2.up.weight",
}


def comfyui_convert(keys: set[str]) -> Converted:
    """comfy/lora_convert.py convert_lora: whole-file conversions, chosen by marker keys.

    Its Wan-Fun and Krea2 branches look for keys no FLUX.1 grammar has.
    """
    if keys >= _CONTROL_MARKERS:
        out: Converted = {
            "diffusion_model."
            + k.replace(".lora_B.bias", ".diff_b").replace("_norm.scale", "_norm.set_weight"): k
            for k in keys
        }
        out["diffusion_model.img_in.reshape_weight"] = None
        return out
    if keys >= _USO_MARKERS:
        return {_uso(k): k for k in keys}
    return {k: k for k in keys}


def forge_convert(keys: set[str]) -> Converted:
    """Forge's load_lora: only the BFL control conversion, from an older ComfyUI."""
    if keys >= _CONTROL_MARKERS:
        return {
            "diffusion_model."
            + k.replace(".lora_B.bias", ".diff_b").replace(
                "_norm.scale", "_norm.scale.set_weight"
            ): k
            for k in keys
        }
    return {k: k for k in keys}


@dataclass(frozen=True)
class Loader:
    """One loader's FLUX.1 key map, the (up, down) names its load_lora tries, its conversions."""

    name: str
    stems: frozenset[str]
    pairs: tuple[tuple[str, str], ...]
    convert: Callable[[set[str]], Converted]
    #: LoRAAdapter.load also reads "<stem>.reshape_weight" (ComfyUI)
    reshape: bool = False
    #: networks.load_lora_for_models applies nothing of a file with more unmatched keys (Forge)
    max_unmatched: int | None = None


COMFYUI = Loader("ComfyUI", comfyui_stems(), _COMFY_PAIRS, comfyui_convert, reshape=True)
FORGE = Loader("Forge", forge_stems(), _FORGE_PAIRS, forge_convert, max_unmatched=12)
LOADERS = (COMFYUI, FORGE)


def loaded_keys(loader: Loader, keys: Iterable[str]) -> set[str]:
    """The file's keys that the loader's ``load_lora`` reads, replayed from its code.

    Raises AssertionError where the loader fails on the file: an up factor without its
    down or a LoHa missing a factor (``load_lora`` raises KeyError), a LoKr without a
    whole w1 or w2 (``calculate_weight`` fails). GLoRA, OFT and norm (w_norm) tensors are
    not replayed: no grammar here writes them.
    """
    file_keys = set(keys)
    names = loader.convert(file_keys)
    present = set(names)
    suffixes = [s for pair in loader.pairs for s in pair]
    suffixes += [*_LONE, *_LOHA, *_LOKR, ".reshape_weight"]
    stems = {k[: -len(s)] for k in present for s in suffixes if k.endswith(s)} & loader.stems
    read: set[str] = set()
    for stem in stems:
        got = {s for s in suffixes if stem + s in present}
        take = {s for s in _LONE if s in got}
        pair = next((p for p in loader.pairs if p[0] in got), None)
        if pair is not None:
            assert pair[1] in got, f"{loader.name}: {stem}{pair[0]} without {pair[1]}"
            take |= set(pair)
            if loader.reshape and ".reshape_weight" in got:
                take.add(".reshape_weight")
        if ".hada_w1_a" in got:
            missing = sorted(set(_LOHA) - got)
            assert not missing, f"{loader.name}: {stem} lacks {missing}"
            take |= set(_LOHA)
        lokr = got & set(_LOKR)
        if lokr & {".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w2_a"}:
            for whole, a, b in (
                (".lokr_w1", ".lokr_w1_a", ".lokr_w1_b"),
                (".lokr_w2", ".lokr_w2_a", ".lokr_w2_b"),
            ):
                assert whole in lokr or {a, b} <= lokr, f"{loader.name}: {stem} has no {whole}"
            take |= lokr
        read |= {stem + s for s in take}
    found = {name for k in read if (name := names[k]) is not None}
    if loader.max_unmatched is not None and len(file_keys - found) > loader.max_unmatched:
        return set()  # "[LORA] LoRA version mismatch": the file is not applied at all
    return found


# What each loader reads of a file of each grammar: all its keys or none. The
# synthetic input is checked as well as its slim and resized outputs, so a "none"
# is a format the loader does not read, never one slim or resize broke.
_ALL, _NONE = "all", "none"
READS: dict[str, tuple[str, str]] = {  # grammar -> (ComfyUI, Forge)
    "kohya": (_ALL, _ALL),
    "lycoris-kohya-loha": (_ALL, _ALL),
    "lycoris-kohya-lokr": (_ALL, _ALL),
    "kohya-diff": (_ALL, _ALL),
    # Forge maps no "text_encoders." keys: with the CLIP/T5 modules over 12 keys unmatched,
    # it applies nothing (test_forge_reads_comfyui_native_files_without_text_encoders).
    "comfyui": (_ALL, _NONE),
    "bfl-control": (_ALL, _ALL),  # converted as a whole: KEY_KEEP keeps its markers
    "diffusers": (_ALL, _ALL),
    "diffusers-default": (_ALL, _NONE),  # Forge's load_lora has no .lora_B.default.weight
    # "base_model.model." is mapped for SD3, PixArt, HunyuanDiT and ACE-Step 1.5 only.
    "peft-bfl": (_NONE, _NONE),
    "onetrainer": (_ALL, _ALL),
    "lycoris": (_ALL, _ALL),
    "xlabs": (_ALL, _NONE),  # ComfyUI's convert_uso_lora (KEY_KEEP keeps its markers)
    # FluxDiT names (blocks.N.attn.a_to_qkv); what ComfyUI calls "DiffSynth lora format"
    # is bare diffusers names (test_comfyui_reads_bare_diffusers_names).
    "diffsynth": (_NONE, _NONE),
    # diffusers names under lora_unet_: unet_to_diffusers maps nothing for FLUX.
    "kohya-malformed": (_NONE, _NONE),
    "diffusers-kohya-suffix": (_ALL, _ALL),
}
assert set(READS) == set(GRAMMARS)


def _keys(path: Path) -> set[str]:
    return set(read_header(path).tensors)


def _slim_and_resize(src: Path, keep: set[str], tmp_path: Path) -> tuple[Path, Path, Path]:
    """``src``, its slim to ``keep`` and that slim resized to rank 2."""
    slim = slim_lora(src, keep, output=tmp_path / "slim.safetensors").output
    # LoHa/LoKr files have no plain module: their "resize" is the copy the loaders read.
    result = resize_lora(slim, tmp_path / "resized.safetensors", rank=2, allow_unchanged=True)
    lora = read_lora(result.output)
    assert set(lora.blocks) == keep & set(read_lora(src).blocks)
    plain = [m for m in lora.modules.values() if m.adapter == "lora"]
    # every plain module is resized, so the resized file's keys are checked at new shapes
    assert len(result.resized) == len(plain)
    assert all(m.tensors["down"].shape[0] == 2 for m in plain)
    return src, slim, result.output


@pytest.mark.parametrize("grammar", GRAMMARS)
def test_comfyui_and_forge_read_slim_and_resized_files_as_they_read_the_input(
    grammar: str, tmp_path: Path
) -> None:
    spec = SynthSpec(grammar=grammar, blocks=supported_blocks(grammar), rank=4, seed=1)
    src = write_synth_lora(tmp_path / "src.safetensors", spec)
    for path in _slim_and_resize(src, KEY_KEEP, tmp_path):
        keys = _keys(path)
        for loader, reads in zip(LOADERS, READS[grammar], strict=True):
            loaded = loaded_keys(loader, keys)
            expected = keys if reads == _ALL else set()
            assert loaded == expected, (loader.name, path.name, sorted(keys ^ loaded)[:4])


def test_forge_reads_comfyui_native_files_without_text_encoders(tmp_path: Path) -> None:
    spec = SynthSpec(grammar="comfyui", blocks=supported_blocks("comfyui"), rank=4, seed=2)
    src = write_synth_lora(tmp_path / "src.safetensors", spec)
    te_keys = {k for m in synth_modules(spec) if m.block in TEXT_ENCODER_IDS for k in m.keys}
    assert FORGE.max_unmatched is not None and len(te_keys) > FORGE.max_unmatched
    for path in _slim_and_resize(src, KEY_KEEP - {"clip"}, tmp_path)[1:]:
        keys = _keys(path)
        assert keys and not keys & te_keys
        assert loaded_keys(FORGE, keys) == keys
        assert loaded_keys(COMFYUI, keys) == keys


def test_comfyui_reads_bare_diffusers_names(tmp_path: Path) -> None:
    """ComfyUI's "DiffSynth lora format" (the diffusers names without "transformer.")."""
    blocks = tuple(b for b in supported_blocks("diffusers") if b not in TEXT_ENCODER_IDS)
    spec = SynthSpec(grammar="diffusers", blocks=blocks, rank=4, seed=3)
    entries = [
        TensorEntry(key.removeprefix("transformer."), dtype, shape, functools.partial(bytes, raw))
        for key, (dtype, shape, raw) in synth_tensors(spec).items()
    ]
    assert all(not e.name.startswith("transformer.") for e in entries)
    src = write_safetensors(tmp_path / "src.safetensors", entries, synth_metadata(spec))
    assert "other" not in read_lora(src).blocks  # our parser reads the bare names
    for path in _slim_and_resize(src, KEY_KEEP, tmp_path):
        keys = _keys(path)
        assert loaded_keys(COMFYUI, keys) == keys, path.name
        assert loaded_keys(FORGE, keys) == set(), path.name


def test_the_replayed_loaders_reject_what_their_code_rejects() -> None:
    stem = "lora_unet_double_blocks_0_img_attn_qkv"
    kohya = {f"{stem}.lora_up.weight", f"{stem}.lora_down.weight", f"{stem}.alpha"}
    for loader in LOADERS:
        assert loaded_keys(loader, kohya) == kohya
        # a renamed stem, a block FLUX.1 does not have, a bare BFL name: not in the map
        for bad in (
            {k.replace("_qkv", "_qkvx") for k in kohya},
            {k.replace("blocks_0_", f"blocks_{DOUBLE_BLOCKS}_") for k in kohya},
            {
                k.replace("lora_unet_double_blocks_0_img_attn_qkv", "double_blocks.0.img_attn.qkv")
                for k in kohya
            },
        ):
            assert loaded_keys(loader, bad) == set(), (loader.name, sorted(bad))
        # an up factor without its down: load_lora raises KeyError
        with pytest.raises(AssertionError, match="without"):
            loaded_keys(loader, kohya - {f"{stem}.lora_down.weight"})
        with pytest.raises(AssertionError, match="lacks"):
            loaded_keys(loader, {f"{stem}.hada_w1_a", f"{stem}.hada_w1_b", f"{stem}.hada_w2_a"})
        # a BFL control file missing one marker key is not converted, so nothing loads
        control = {"img_in.lora_A.weight", "img_in.lora_B.weight", "img_in.lora_B.bias"}
        marker = "single_blocks.0.norm.key_norm.scale"
        assert loaded_keys(loader, control | {marker}) == control | {marker}
        assert loaded_keys(loader, control) == set()
    te = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
    native_te = {f"{te}.lora_up.weight", f"{te}.lora_down.weight"}
    assert loaded_keys(COMFYUI, native_te) == native_te
    assert loaded_keys(FORGE, native_te) == set()
    default = {f"transformer.proj_out.lora_{x}.default.weight" for x in "AB"}
    assert loaded_keys(COMFYUI, default) == default
    assert loaded_keys(FORGE, default) == set()
    # Forge applies nothing of a file with more than 12 unmatched keys
    unmatched = {f"unknown_{i}.lora_up.weight" for i in range(13)}
    assert loaded_keys(FORGE, kohya | set(sorted(unmatched)[:12])) == kohya
    assert loaded_keys(FORGE, kohya | unmatched) == set()
    assert loaded_keys(COMFYUI, kohya | unmatched) == kohya


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
def test_diffusers_loads_slim_and_resized_files_and_renders_like_the_engine(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    spec = SynthSpec(
        grammar="diffusers",
        blocks=("input", *DOUBLE_IDS[:4], *SINGLE_IDS[:8], "final"),
        rank=4,
        alpha=4.0,
        alpha_in="metadata",
        seed=5,
    )
    src = write_synth_lora(tmp_path / "src.safetensors", spec)
    slim = slim_lora(src, KEEP, output=tmp_path / "slim.safetensors").output
    resized = resize_lora(slim, tmp_path / "resized.safetensors", rank=2).output
    pipe = tiny_model.pipe
    plain = pipe_render(pipe, SETTINGS)
    for path in (slim, resized):
        pipe.load_lora_weights(str(path), adapter_name="check")
        try:
            reference = pipe_render(pipe, SETTINGS)
        finally:
            pipe.unload_lora_weights()
        assert np.abs(reference - plain).max() > 0.02, path.name  # the LoRA is applied
        lora = read_lora(path)
        with BlockEngine(tiny_model, lora) as engine:
            (full,) = engine.render([frozenset(engine.blocks)], SETTINGS, output="float")
        assert np.abs(full - reference).max() <= 1e-5, path.name
