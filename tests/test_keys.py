"""Tests of the block map: every grammar's keys resolve to the right stem, block and target.

The expectations come from :mod:`lora_prune.testing`, whose module tables are
written independently of the parser's, and from the numbers of the field guide
(/work/shared/reference/flux-lora-formats.md).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from conftest import SynthFile, TensorFile

from lora_prune.check import run_check
from lora_prune.errors import (
    BlockIndexError,
    UnknownKeysError,
    UnsupportedLoraError,
    WrongBaseModelError,
)
from lora_prune.families.flux1.geometry import FLUX1_DEV, FLUX1_SCHNELL, TINY
from lora_prune.families.flux1.keys import parse_key
from lora_prune.keys import ParsedKey, split_role
from lora_prune.lora import read_lora
from lora_prune.slim import slim_lora
from lora_prune.stats import inspect_lora
from lora_prune.testing import (
    GRAMMARS,
    SynthModule,
    SynthSpec,
    default_blocks,
    diffusers_linear_shapes,
    supported_blocks,
    synth_modules,
)

# The grammar name parse_key gives the keys of each synthetic grammar.
_KEY_GRAMMAR = {
    "kohya": "kohya",
    "lycoris-kohya-loha": "lycoris-kohya",
    "lycoris-kohya-lokr": "lycoris-kohya",
    "kohya-diff": "lycoris-kohya",
    "comfyui": "comfyui",
    "bfl-control": "bfl",
    "diffusers": "diffusers",
    "diffusers-default": "diffusers",
    "peft-bfl": "peft-bfl",
    "onetrainer": "onetrainer",
    "lycoris": "lycoris",
    "xlabs": "xlabs",
    "diffsynth": "diffsynth",
    "kohya-malformed": "kohya-malformed",
    "diffusers-kohya-suffix": "diffusers-kohya-suffix",
}


def _expected_grammar(grammar: str, key: str) -> str:
    """What one key alone can tell: alpha keys and shared text-encoder prefixes are generic."""
    if key.endswith(".alpha") and grammar.startswith(("lycoris-kohya", "kohya-diff")):
        return "kohya"  # a bare .alpha cannot show the module is LyCORIS
    if key.endswith(".alpha") and grammar == "diffusers-kohya-suffix":
        return "diffusers"
    if grammar == "onetrainer" and key.startswith("lora_te"):
        return "kohya"  # OneTrainer names its text encoders as kohya does
    return _KEY_GRAMMAR[grammar]


def _full_spec(grammar: str) -> SynthSpec:
    """Every block the grammar can name, text encoders included."""
    return SynthSpec(grammar=grammar, blocks=supported_blocks(grammar))


def _parse(key: str) -> ParsedKey:
    parsed = parse_key(key)
    assert parsed is not None, key
    return parsed


# --- every grammar -----------------------------------------------------------------
def test_grammar_table_is_complete() -> None:
    assert set(_KEY_GRAMMAR) == set(GRAMMARS)
    assert len(GRAMMARS) == 15


@pytest.mark.parametrize("grammar", GRAMMARS)
def test_every_key_resolves_to_its_stem_block_and_grammar(grammar: str) -> None:
    modules = synth_modules(_full_spec(grammar))
    assert len({m.stem for m in modules}) == len(modules)
    blocks_seen: set[str] = set()
    for module in modules:
        for key in module.keys:
            parsed = _parse(key)
            assert (parsed.stem, parsed.block) == (module.stem, module.block), key
            assert parsed.grammar == _expected_grammar(grammar, key), key
            assert parsed.target is not None
            blocks_seen.add(parsed.block)
    assert blocks_seen == set(supported_blocks(grammar))


@pytest.mark.parametrize("grammar", GRAMMARS)
def test_read_lora_groups_each_stem_into_one_module(grammar: str, synth_file: SynthFile) -> None:
    spec = _full_spec(grammar)
    lora = read_lora(synth_file(spec))
    expected = {m.stem: (m.block, sorted(m.keys)) for m in synth_modules(spec)}
    got = {stem: (m.block, sorted(m.keys)) for stem, m in lora.modules.items()}
    assert got == expected
    assert lora.format == _KEY_GRAMMAR[grammar]
    assert lora.blocks == list(supported_blocks(grammar))
    for key, block in lora.key_blocks.items():
        assert block == lora.modules[_parse(key).stem].block


@pytest.mark.parametrize("grammar", GRAMMARS)
def test_targets_cover_the_module_rows(grammar: str) -> None:
    """A target's diffusers modules, stacked, have exactly the LoRA module's rows and inputs."""
    shapes = diffusers_linear_shapes(TINY)
    for module in synth_modules(_full_spec(grammar)):
        target = _parse(module.keys[0]).target
        assert target is not None
        if module.kind == "norm":
            assert target.kind == "norm"
            continue
        assert target.kind == "linear"
        if target.model != "transformer":
            assert target.modules == (target.name,)
            assert module.stem.endswith(target.name.replace(".", "_")) or module.stem.endswith(
                target.name
            )
            continue
        rows = sum(shapes[m][1] for m in target.modules)
        ins = {shapes[m][0] for m in target.modules}
        assert (rows, ins) == (module.out_features, {module.in_features}), module.stem


def test_default_module_sets_follow_the_trainers() -> None:
    def per_block(grammar: str) -> Counter[str]:
        return Counter(m.block for m in synth_modules(SynthSpec(grammar=grammar)))

    kohya = per_block("kohya")
    assert sum(kohya.values()) == 304
    assert {kohya["double.0"], kohya["single.0"]} == {10, 3}
    assert set(kohya) == set(default_blocks("kohya"))
    diffusers = per_block("diffusers")
    assert sum(diffusers.values()) == 494
    assert (diffusers["double.18"], diffusers["single.37"]) == (14, 6)
    assert (per_block("xlabs")["double.5"], per_block("xlabs")["single.5"]) == (4, 2)
    control = per_block("bfl-control")  # norms and the input/final layers too
    norms = [m for m in synth_modules(SynthSpec(grammar="bfl-control")) if m.kind == "norm"]
    assert len(norms) == 19 * 4 + 38 * 2 and {m.adapter for m in norms} == {"norm"}
    assert (control["double.0"], control["single.0"], control["input"], control["final"]) == (
        14,
        5,
        8,
        2,
    )


# --- real widths ---------------------------------------------------------------------
# Shapes from the field guide's tables for FLUX.1-dev at rank 1.
_DEV_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {
    "kohya": {
        "lora_unet_single_blocks_0_linear1.lora_up.weight": (21504, 1),
        "lora_unet_single_blocks_0_linear1.lora_down.weight": (1, 3072),
        "lora_unet_single_blocks_37_linear2.lora_down.weight": (1, 15360),
        "lora_unet_single_blocks_0_modulation_lin.lora_up.weight": (9216, 1),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight": (1, 3072),
        "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (9216, 1),
        "lora_unet_double_blocks_18_txt_mod_lin.lora_up.weight": (18432, 1),
        "lora_unet_double_blocks_3_img_mlp_0.lora_up.weight": (12288, 1),
        "lora_unet_double_blocks_3_txt_mlp_2.lora_down.weight": (1, 12288),
        "lora_unet_double_blocks_0_img_attn_qkv.alpha": (),
        "lora_unet_img_in.lora_down.weight": (1, 64),
        "lora_unet_txt_in.lora_down.weight": (1, 4096),
        "lora_unet_time_in_in_layer.lora_down.weight": (1, 256),
        "lora_unet_vector_in_in_layer.lora_down.weight": (1, 768),
        "lora_unet_guidance_in_out_layer.lora_down.weight": (1, 3072),
        "lora_unet_final_layer_linear.lora_up.weight": (64, 1),
        "lora_unet_final_layer_adaLN_modulation_1.lora_up.weight": (6144, 1),
    },
    "diffusers": {
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": (1, 3072),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": (3072, 1),
        "transformer.transformer_blocks.0.norm1.linear.lora_B.weight": (18432, 1),
        "transformer.transformer_blocks.0.ff_context.net.2.lora_A.weight": (1, 12288),
        "transformer.single_transformer_blocks.0.proj_out.lora_A.weight": (1, 15360),
        "transformer.single_transformer_blocks.0.proj_mlp.lora_B.weight": (12288, 1),
        "transformer.single_transformer_blocks.0.norm.linear.lora_B.weight": (9216, 1),
        "transformer.x_embedder.lora_A.weight": (1, 64),
        "transformer.context_embedder.lora_A.weight": (1, 4096),
        "transformer.time_text_embed.text_embedder.linear_1.lora_A.weight": (1, 768),
        "transformer.proj_out.lora_B.weight": (64, 1),
        "transformer.norm_out.linear.lora_B.weight": (6144, 1),
    },
    "xlabs": {
        "double_blocks.0.processor.qkv_lora1.down.weight": (1, 3072),
        "double_blocks.0.processor.qkv_lora1.up.weight": (9216, 1),
        "double_blocks.7.processor.proj_lora2.up.weight": (3072, 1),
        "single_blocks.37.processor.qkv_lora.up.weight": (9216, 1),
        "single_blocks.0.processor.proj_lora.down.weight": (1, 15360),
    },
}
# Parameters per unit of rank of the default target sets (field guide, section 6).
_DEV_PARAMS_PER_RANK = {"kohya": 4_786_176, "diffusers": 5_369_856}


@pytest.mark.parametrize("grammar", sorted(_DEV_SHAPES))
def test_flux1_dev_shapes_match_the_field_guide(grammar: str, synth_file: SynthFile) -> None:
    blocks = supported_blocks(grammar, FLUX1_DEV)
    blocks = tuple(b for b in blocks if b not in ("clip", "t5"))
    spec = SynthSpec(grammar=grammar, geometry=FLUX1_DEV, rank=1, blocks=blocks, alpha=1.0)
    lora = read_lora(synth_file(spec))
    shapes = {name: info.shape for name, info in lora.header.tensors.items()}
    for key, shape in _DEV_SHAPES[grammar].items():
        assert shapes[key] == shape, key
    modules = synth_modules(spec)
    assert len(lora.modules) == len(modules)
    for module in modules:
        ranked = [shapes[k] for k in module.keys if shapes[k]]
        assert ranked == [(1, module.in_features), (module.out_features, 1)], module.stem


@pytest.mark.parametrize("grammar", sorted(_DEV_PARAMS_PER_RANK))
def test_flux1_dev_default_sizes_match_the_field_guide(grammar: str) -> None:
    modules = synth_modules(SynthSpec(grammar=grammar, geometry=FLUX1_DEV, rank=1))
    assert sum(m.in_features + m.out_features for m in modules) == _DEV_PARAMS_PER_RANK[grammar]
    tensors = sum(len(m.keys) for m in modules)
    # down, up and .alpha per module (the default alpha is written in both grammars)
    assert tensors == 3 * len(modules) == (912 if grammar == "kohya" else 1482)


def test_schnell_has_no_guidance_embedder() -> None:
    dev = synth_modules(SynthSpec(geometry=FLUX1_DEV, blocks=("input",), rank=1))
    schnell = synth_modules(SynthSpec(geometry=FLUX1_SCHNELL, blocks=("input",), rank=1))
    assert len(dev) == 8 and len(schnell) == 6
    assert not any("guidance" in m.stem for m in schnell)


# --- tricky keys ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "block", "name", "modules"),
    [
        # whole-integer indices
        (
            "lora_unet_double_blocks_1_img_attn_qkv.lora_down.weight",
            "double.1",
            "double_blocks.1.img_attn.qkv",
            (
                "transformer_blocks.1.attn.to_q",
                "transformer_blocks.1.attn.to_k",
                "transformer_blocks.1.attn.to_v",
            ),
        ),
        (
            "lora_unet_double_blocks_10_img_attn_qkv.lora_down.weight",
            "double.10",
            "double_blocks.10.img_attn.qkv",
            (
                "transformer_blocks.10.attn.to_q",
                "transformer_blocks.10.attn.to_k",
                "transformer_blocks.10.attn.to_v",
            ),
        ),
        (
            "lora_unet_single_blocks_1_linear2.lora_up.weight",
            "single.1",
            "single_blocks.1.linear2",
            ("single_transformer_blocks.1.proj_out",),
        ),
        (
            "lora_unet_single_blocks_11_linear1.alpha",
            "single.11",
            "single_blocks.11.linear1",
            (
                "single_transformer_blocks.11.attn.to_q",
                "single_transformer_blocks.11.attn.to_k",
                "single_transformer_blocks.11.attn.to_v",
                "single_transformer_blocks.11.proj_mlp",
            ),
        ),
        # single_transformer_blocks contains transformer_blocks
        (
            "transformer.single_transformer_blocks.12.attn.to_q.lora_A.weight",
            "single.12",
            "single_transformer_blocks.12.attn.to_q",
            ("single_transformer_blocks.12.attn.to_q",),
        ),
        (
            "transformer.transformer_blocks.12.attn.to_q.lora_A.weight",
            "double.12",
            "transformer_blocks.12.attn.to_q",
            ("transformer_blocks.12.attn.to_q",),
        ),
        (
            "lora_transformer_single_transformer_blocks_2_attn_to_k.alpha",
            "single.2",
            "single_transformer_blocks.2.attn.to_k",
            ("single_transformer_blocks.2.attn.to_k",),
        ),
        (
            "lora_transformer_transformer_blocks_2_attn_to_out_0.lora_down.weight",
            "double.2",
            "transformer_blocks.2.attn.to_out.0",
            ("transformer_blocks.2.attn.to_out.0",),
        ),
        # proj_out: the final layer, or a single block's linear2
        ("transformer.proj_out.lora_A.weight", "final", "proj_out", ("proj_out",)),
        (
            "transformer.single_transformer_blocks.3.proj_out.lora_A.weight",
            "single.3",
            "single_transformer_blocks.3.proj_out",
            ("single_transformer_blocks.3.proj_out",),
        ),
        ("lora_unet_proj_out_.lora_up.weight", "final", "proj_out", ("proj_out",)),
        (
            "lora_unet_single_transformer_blocks_30_proj_out_.alpha",
            "single.30",
            "single_transformer_blocks.30.proj_out",
            ("single_transformer_blocks.30.proj_out",),
        ),
        (
            "single_blocks.5.proj_out.lora_B.weight",
            "single.5",
            "single_blocks.5.proj_out",
            ("single_transformer_blocks.5.proj_out",),
        ),
        # input and final layers in both namings
        (
            "lora_unet_time_in_in_layer.lora_down.weight",
            "input",
            "time_in.in_layer",
            ("time_text_embed.timestep_embedder.linear_1",),
        ),
        (
            "lora_transformer_time_text_embed_guidance_embedder_linear_1.alpha",
            "input",
            "time_text_embed.guidance_embedder.linear_1",
            ("time_text_embed.guidance_embedder.linear_1",),
        ),
        (
            "base_model.model.final_layer.linear.lora_A.weight",
            "final",
            "final_layer.linear",
            ("proj_out",),
        ),
        (
            "lora_transformer_norm_out_linear.lora_up.weight",
            "final",
            "norm_out.linear",
            ("norm_out.linear",),
        ),
        # XLabs with ComfyUI's prefix, DiffSynth with PEFT's adapter name
        (
            "diffusion_model.double_blocks.2.processor.proj_lora2.up.weight",
            "double.2",
            "double_blocks.2.txt_attn.proj",
            ("transformer_blocks.2.attn.to_add_out",),
        ),
        (
            "single_blocks.37.processor.qkv_lora.up.weight",
            "single.37",
            "single_blocks.37.linear1.qkv",
            (
                "single_transformer_blocks.37.attn.to_q",
                "single_transformer_blocks.37.attn.to_k",
                "single_transformer_blocks.37.attn.to_v",
            ),
        ),
        (
            "single_blocks.0.to_qkv_mlp.lora_A.default.weight",
            "single.0",
            "single_blocks.0.to_qkv_mlp",
            (
                "single_transformer_blocks.0.attn.to_q",
                "single_transformer_blocks.0.attn.to_k",
                "single_transformer_blocks.0.attn.to_v",
                "single_transformer_blocks.0.proj_mlp",
            ),
        ),
        (
            "blocks.4.norm1_b.linear.lora_B.weight",
            "double.4",
            "double_blocks.4.txt_mod.lin",
            ("transformer_blocks.4.norm1_context.linear",),
        ),
        # text encoders
        (
            "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight",
            "t5",
            "encoder.block.0.layer.0.SelfAttention.q",
            ("encoder.block.0.layer.0.SelfAttention.q",),
        ),
        (
            "lora_te2_encoder_block_13_layer_1_DenseReluDense_wi_0.hada_w1_a",
            "t5",
            "encoder.block.13.layer.1.DenseReluDense.wi_0",
            ("encoder.block.13.layer.1.DenseReluDense.wi_0",),
        ),
        (
            "lora_te1_text_model_encoder_layers_10_self_attn_out_proj.lora_up.weight",
            "clip",
            "text_model.encoder.layers.10.self_attn.out_proj",
            ("text_model.encoder.layers.10.self_attn.out_proj",),
        ),
        (
            "text_encoders.clip_l.transformer.text_model.encoder.layers.1.mlp.fc2.lora_down.weight",
            "clip",
            "text_model.encoder.layers.1.mlp.fc2",
            ("text_model.encoder.layers.1.mlp.fc2",),
        ),
        (
            "text_encoders.t5xxl.transformer.encoder.block.23.layer.1.DenseReluDense.wo.alpha",
            "t5",
            "encoder.block.23.layer.1.DenseReluDense.wo",
            ("encoder.block.23.layer.1.DenseReluDense.wo",),
        ),
        (
            "text_encoder.text_model.encoder.layers.0.self_attn.k_proj.lora_A.weight",
            "clip",
            "text_model.encoder.layers.0.self_attn.k_proj",
            ("text_model.encoder.layers.0.self_attn.k_proj",),
        ),
        # norms of control LoRAs, ComfyUI's set_weight spelling
        (
            "double_blocks.0.img_attn.norm.query_norm.scale",
            "double.0",
            "double_blocks.0.img_attn.norm.query_norm",
            ("transformer_blocks.0.attn.norm_q",),
        ),
        (
            "diffusion_model.single_blocks.9.norm.key_norm.scale.set_weight",
            "single.9",
            "single_blocks.9.norm.key_norm",
            ("single_transformer_blocks.9.attn.norm_k",),
        ),
    ],
)
def test_tricky_keys(key: str, block: str, name: str, modules: tuple[str, ...]) -> None:
    parsed = _parse(key)
    assert parsed.block == block
    assert parsed.target is not None
    assert parsed.target.name == name
    assert parsed.target.modules == modules


@pytest.mark.parametrize(
    ("key", "stem", "role", "grammar"),
    [
        (
            "transformer.transformer_blocks.0.attn.to_q.lora_A.default.weight",
            "transformer.transformer_blocks.0.attn.to_q",
            "down",
            "diffusers",
        ),
        (
            "transformer.transformer_blocks.0.attn.to_q.lora_down.weight",
            "transformer.transformer_blocks.0.attn.to_q",
            "down",
            "diffusers-kohya-suffix",
        ),
        (
            "transformer.transformer_blocks.0.attn.to_q.lora_A.weight.alpha",
            "transformer.transformer_blocks.0.attn.to_q",
            "alpha",
            "diffusers",
        ),
        ("img_in.lora_B.bias", "img_in", "up_bias", "bfl"),
        (
            "diffusion_model.double_blocks.0.img_mod.lin.diff_b",
            "diffusion_model.double_blocks.0.img_mod.lin",
            "diff_b",
            "comfyui",
        ),
        (
            "lora_unet_double_blocks_0_img_mod_lin.lokr_w1",
            "lora_unet_double_blocks_0_img_mod_lin",
            "lokr_w1",
            "lycoris-kohya",
        ),
        (
            "lycoris_transformer_blocks_7_attn_to_v.lokr_w2_a",
            "lycoris_transformer_blocks_7_attn_to_v",
            "lokr_w2_a",
            "lycoris",
        ),
        (
            "base_model.model.transformer_blocks.0.attn.to_q.lora_B.weight",
            "base_model.model.transformer_blocks.0.attn.to_q",
            "up",
            "peft-diffusers",
        ),
        (
            "lora_unet_double_blocks_0_img_attn_proj.dora_scale",
            "lora_unet_double_blocks_0_img_attn_proj",
            "dora_scale",
            "lycoris-kohya",
        ),
    ],
)
def test_roles_and_grammar_names(key: str, stem: str, role: str, grammar: str) -> None:
    parsed = _parse(key)
    assert (parsed.stem, parsed.role, parsed.grammar) == (stem, role, grammar)
    assert split_role(key) == (stem, role)


def test_final_adaln_halves_are_swapped_only_in_bfl_naming() -> None:
    bfl = _parse("lora_unet_final_layer_adaLN_modulation_1.lora_up.weight").target
    diffusers = _parse("transformer.norm_out.linear.lora_B.weight").target
    assert bfl is not None and diffusers is not None
    assert bfl.modules == diffusers.modules == ("norm_out.linear",)
    assert (bfl.swap_halves, diffusers.swap_halves) == (True, False)


@pytest.mark.parametrize(
    "key",
    [
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight",
        "lora_unet_double_blocks_0_img_attn_qkv",  # no role suffix
        "transformer.transformer_blocks.0.attn.to_qkv.lora_A.weight",
        "transformer.single_transformer_blocks.0.attn.to_out.0.lora_A.weight",
        "lora_unet_transformer_blocks_0_attn_to_k.alpha",  # diffusers names need the trailing _
        "diffusion_model.blocks.0.attn.a_to_qkv.lora_A.weight",
        "random_tensor",
    ],
)
def test_unknown_keys_do_not_parse(key: str) -> None:
    assert parse_key(key) is None


# --- other base models and unknown keys, through read_lora -------------------------------
def _kohya_triplet(stem: str, rank: int = 2, width: int = 8) -> dict[str, np.ndarray]:
    return {
        f"{stem}.lora_down.weight": np.ones((rank, width)),
        f"{stem}.lora_up.weight": np.ones((width, rank)),
        f"{stem}.alpha": np.array(rank, dtype=np.float32),
    }


def _peft_pair(stem: str, rank: int = 2, width: int = 8) -> dict[str, np.ndarray]:
    return {
        f"{stem}.lora_A.weight": np.ones((rank, width)),
        f"{stem}.lora_B.weight": np.ones((width, rank)),
    }


_OTHER_MODELS = [
    (
        [
            "lora_unet_down_blocks_0_attentions_0_proj_in",
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        ],
        "SD1.5",
    ),
    (
        [
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q",
            "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
            "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
        ],
        "SDXL",
    ),
    (
        [
            "lora_unet_joint_blocks_0_context_block_attn_qkv",
            "lora_unet_joint_blocks_0_x_block_mlp_fc1",
        ],
        "SD3",
    ),
    (["lora_unet_double_blocks_7_img_attn_qkv", "lora_unet_single_blocks_40_linear1"], "FLUX.2"),
    (
        ["lora_unet_double_blocks_19_img_attn_qkv", "lora_unet_single_blocks_39_linear2"],
        "HunyuanVideo",
    ),
]


def _triplets(stems: list[str]) -> dict[str, np.ndarray]:
    tensors: dict[str, np.ndarray] = {}
    for stem in stems:
        tensors.update(_kohya_triplet(stem))
    return tensors


@pytest.mark.parametrize(("stems", "base_model"), _OTHER_MODELS)
def test_other_base_models_are_named(
    stems: list[str], base_model: str, tensor_file: TensorFile
) -> None:
    path = tensor_file(_triplets(stems))
    with pytest.raises(WrongBaseModelError) as info:
        read_lora(path)
    assert info.value.base_model == base_model
    assert base_model in str(info.value)
    assert str(path) in str(info.value)
    assert info.value.exit_code == 4


@pytest.mark.parametrize(
    ("stems", "base_model"),
    [
        (
            [
                "lora_unet_down_blocks_0_attentions_0_proj_in",
                "lora_unet_mid_block_attentions_0_proj_out",
            ],
            "SD1.5",
        ),
        *(case for case in _OTHER_MODELS if case[1] in ("SD3", "FLUX.2", "HunyuanVideo")),
    ],
)
def test_allow_unknown_does_not_hide_other_base_models(
    stems: list[str], base_model: str, tensor_file: TensorFile
) -> None:
    with pytest.raises(WrongBaseModelError) as info:
        read_lora(tensor_file(_triplets(stems)), allow_unknown=True)
    assert info.value.base_model == base_model


def test_allow_unknown_does_not_hide_sd15_with_text_encoder(tensor_file: TensorFile) -> None:
    stems, base_model = _OTHER_MODELS[0]
    with pytest.raises(WrongBaseModelError) as info:
        read_lora(tensor_file(_triplets(stems)), allow_unknown=True)
    assert info.value.base_model == base_model


def test_flux2_modulation_keys_name_flux2(tensor_file: TensorFile) -> None:
    tensors = {
        **_peft_pair("transformer.transformer_blocks.0.attn.to_q"),
        **_peft_pair("transformer.double_stream_modulation_img.linear"),
        **_peft_pair("transformer.single_stream_modulation.linear"),
    }
    with pytest.raises(WrongBaseModelError) as info:
        read_lora(tensor_file(tensors))
    assert info.value.base_model == "FLUX.2"


def test_double_index_19_alone_names_hunyuan_video(tensor_file: TensorFile) -> None:
    path = tensor_file(_kohya_triplet("lora_unet_double_blocks_19_img_attn_qkv"))
    with pytest.raises(WrongBaseModelError) as info:
        read_lora(path)
    assert info.value.base_model == "HunyuanVideo"
    assert "19" in info.value.what


@pytest.mark.parametrize(
    "stem",
    [
        "lora_unet_double_blocks_25_img_attn_qkv",
        "transformer.single_transformer_blocks.60.proj_out",
    ],
)
def test_block_index_far_out_of_range(stem: str, tensor_file: TensorFile) -> None:
    pair = _kohya_triplet(stem) if stem.startswith("lora_") else _peft_pair(stem)
    with pytest.raises(BlockIndexError) as info:
        read_lora(tensor_file(pair))
    assert isinstance(info.value, UnsupportedLoraError)
    assert "out of range" in info.value.what


def test_unknown_keys_are_refused_then_reported_as_other(
    synth_file: SynthFile, tensor_file: TensorFile
) -> None:
    base = read_lora(synth_file(SynthSpec(blocks=("double.0", "single.0"))))
    with_extra = {
        name: np.zeros(info.shape, dtype=np.float32) for name, info in base.header.tensors.items()
    }
    with_extra.update(_kohya_triplet("lora_unet_foo_bar"))
    path = tensor_file(with_extra, name="extra.safetensors")
    with pytest.raises(UnknownKeysError) as info:
        read_lora(path)
    assert sorted(info.value.keys) == sorted(k for k in with_extra if "foo_bar" in k)
    assert "lora_unet_foo_bar" in str(info.value) and "--allow-unknown" in str(info.value)

    lora = read_lora(path, allow_unknown=True)
    other = lora.modules["lora_unet_foo_bar"]
    assert (other.block, other.target) == ("other", None)
    assert lora.blocks == ["double.0", "single.0", "other"]
    assert lora.key_blocks["lora_unet_foo_bar.alpha"] == "other"
    # 13 modules of 3 tensors counted in the grammar; the unknown module's 3 keys are not.
    assert lora.format == "kohya" and sum(lora.grammars.values()) == 39
    assert len(lora.header.tensors) == 42


def test_empty_file_is_not_a_lora(tensor_file: TensorFile) -> None:
    with pytest.raises(UnknownKeysError):
        read_lora(tensor_file({}))


def test_sdxl_text_encoder_lora_is_not_read_as_flux_clip(tensor_file: TensorFile) -> None:
    tensors = {
        **_kohya_triplet("lora_te1_text_model_encoder_layers_0_self_attn_q_proj"),
        **_kohya_triplet("lora_te2_text_model_encoder_layers_0_self_attn_q_proj"),
    }
    with pytest.raises(WrongBaseModelError) as info:
        read_lora(tensor_file(tensors))
    assert info.value.base_model == "SDXL"


def test_synth_modules_are_typed() -> None:
    module = synth_modules(SynthSpec(blocks=("single.0",)))[0]
    assert isinstance(module, SynthModule)
    assert module.keys == (
        "lora_unet_single_blocks_0_linear1.lora_down.weight",
        "lora_unet_single_blocks_0_linear1.lora_up.weight",
        "lora_unet_single_blocks_0_linear1.alpha",
    )


def test_sd3_in_diffusers_naming_is_named(tensor_file: TensorFile) -> None:
    tensors = {
        **_triplets([f"transformer.transformer_blocks.{i}.attn.to_q" for i in (0, 12, 23)]),
    }
    with pytest.raises(WrongBaseModelError) as info:
        read_lora(tensor_file(tensors))
    assert info.value.base_model == "SD3"


# --- key forms ComfyUI's FLUX.1 loader accepts (issue 10) ----------------------------------
@pytest.mark.parametrize(
    ("key", "stem", "role", "block", "modules", "kind"),
    [
        # ComfyUI's LoRA extractor: every text-encoder weight under text_encoders.*
        (
            "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.diff",
            "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding",
            "diff",
            "clip",
            ("text_model.embeddings.token_embedding",),
            "other",
        ),
        (
            "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding.lora_up.weight",
            "text_encoders.clip_l.transformer.text_model.embeddings.position_embedding",
            "up",
            "clip",
            ("text_model.embeddings.position_embedding",),
            "other",
        ),
        (
            "text_encoders.clip_l.transformer.text_model.encoder.layers.11.layer_norm2.diff_b",
            "text_encoders.clip_l.transformer.text_model.encoder.layers.11.layer_norm2",
            "diff_b",
            "clip",
            ("text_model.encoder.layers.11.layer_norm2",),
            "other",
        ),
        (
            "text_encoders.clip_l.transformer.text_model.final_layer_norm.diff",
            "text_encoders.clip_l.transformer.text_model.final_layer_norm",
            "diff",
            "clip",
            ("text_model.final_layer_norm",),
            "other",
        ),
        (
            "text_encoders.clip_l.transformer.text_projection.diff",
            "text_encoders.clip_l.transformer.text_projection",
            "diff",
            "clip",
            ("text_projection",),
            "other",
        ),
        (
            "text_encoders.t5xxl.transformer.shared.diff",
            "text_encoders.t5xxl.transformer.shared",
            "diff",
            "t5",
            ("shared",),
            "other",
        ),
        (
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention."
            "relative_attention_bias.diff",
            "text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention."
            "relative_attention_bias",
            "diff",
            "t5",
            ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias",),
            "other",
        ),
        (
            "text_encoders.t5xxl.transformer.encoder.block.7.layer.1.layer_norm.diff",
            "text_encoders.t5xxl.transformer.encoder.block.7.layer.1.layer_norm",
            "diff",
            "t5",
            ("encoder.block.7.layer.1.layer_norm",),
            "other",
        ),
        (
            "text_encoders.t5xxl.transformer.encoder.final_layer_norm.diff",
            "text_encoders.t5xxl.transformer.encoder.final_layer_norm",
            "diff",
            "t5",
            ("encoder.final_layer_norm",),
            "other",
        ),
        # T5 on its own: ComfyUI's state dict has no t5xxl. wrapper
        (
            "text_encoders.transformer.encoder.block.3.layer.0.SelfAttention.k.lora_down.weight",
            "text_encoders.transformer.encoder.block.3.layer.0.SelfAttention.k",
            "down",
            "t5",
            ("encoder.block.3.layer.0.SelfAttention.k",),
            "linear",
        ),
        (
            "text_encoders.transformer.shared.diff",
            "text_encoders.transformer.shared",
            "diff",
            "t5",
            ("shared",),
            "other",
        ),
        # ComfyUI's linear1_qkv alias: the attention rows of linear1
        (
            "diffusion_model.single_blocks.5.linear1_qkv.lora_up.weight",
            "diffusion_model.single_blocks.5.linear1_qkv",
            "up",
            "single.5",
            (
                "single_transformer_blocks.5.attn.to_q",
                "single_transformer_blocks.5.attn.to_k",
                "single_transformer_blocks.5.attn.to_v",
            ),
            "linear",
        ),
        (
            "single_blocks.37.linear1_qkv.lora_A.weight",
            "single_blocks.37.linear1_qkv",
            "down",
            "single.37",
            (
                "single_transformer_blocks.37.attn.to_q",
                "single_transformer_blocks.37.attn.to_k",
                "single_transformer_blocks.37.attn.to_v",
            ),
            "linear",
        ),
        # older diffusers suffixes and bare lora_A/lora_B
        (
            "transformer.transformer_blocks.3.attn.to_k_lora.up.weight",
            "transformer.transformer_blocks.3.attn.to_k",
            "up",
            "double.3",
            ("transformer_blocks.3.attn.to_k",),
            "linear",
        ),
        (
            "transformer.single_transformer_blocks.2.proj_out_lora.down.weight",
            "transformer.single_transformer_blocks.2.proj_out",
            "down",
            "single.2",
            ("single_transformer_blocks.2.proj_out",),
            "linear",
        ),
        (
            "transformer.transformer_blocks.0.ff.net.2.lora_A",
            "transformer.transformer_blocks.0.ff.net.2",
            "down",
            "double.0",
            ("transformer_blocks.0.ff.net.2",),
            "linear",
        ),
        (
            "double_blocks.4.img_attn.qkv.lora_B",
            "double_blocks.4.img_attn.qkv",
            "up",
            "double.4",
            (
                "transformer_blocks.4.attn.to_q",
                "transformer_blocks.4.attn.to_k",
                "transformer_blocks.4.attn.to_v",
            ),
            "linear",
        ),
        # XLabs' own "qkv_lora.up.weight" still splits at ".up.weight"
        (
            "single_blocks.1.processor.qkv_lora.up.weight",
            "single_blocks.1.processor.qkv_lora",
            "up",
            "single.1",
            (
                "single_transformer_blocks.1.attn.to_q",
                "single_transformer_blocks.1.attn.to_k",
                "single_transformer_blocks.1.attn.to_v",
            ),
            "linear",
        ),
    ],
)
def test_comfyui_key_forms(
    key: str, stem: str, role: str, block: str, modules: tuple[str, ...], kind: str
) -> None:
    parsed = _parse(key)
    assert (parsed.stem, parsed.role, parsed.block) == (stem, role, block)
    assert parsed.target is not None
    assert parsed.target.modules == modules
    assert parsed.target.kind == kind


@pytest.mark.parametrize(
    "key",
    [
        # a CLIP without its wrapper is no FLUX.1 T5 (and could be SD1.5's CLIP)
        "text_encoders.transformer.text_model.embeddings.token_embedding.diff",
        "text_encoders.t5xxl.transformer.encoder.block.0.layer.2.layer_norm.diff",
        "text_encoders.clip_l.transformer.text_model.embeddings.patch_embedding.diff",
        "double_blocks.0.linear1_qkv.lora_A.weight",
    ],
)
def test_near_comfyui_forms_stay_unknown(key: str) -> None:
    assert parse_key(key) is None


def test_comfyui_extracted_text_encoder_weights_inspect_check_and_slim(
    tensor_file: TensorFile, tmp_path: Path
) -> None:
    clip = "text_encoders.clip_l.transformer.text_model."
    t5 = "text_encoders.t5xxl.transformer."
    tensors: dict[str, np.ndarray] = {
        **_kohya_triplet("diffusion_model.double_blocks.0.img_attn.proj"),
        f"{clip}embeddings.token_embedding.lora_up.weight": np.full((10, 2), 0.5),
        f"{clip}embeddings.token_embedding.lora_down.weight": np.full((2, 8), 0.5),
        f"{clip}encoder.layers.0.layer_norm1.diff": np.full(8, 0.25),
        f"{clip}encoder.layers.0.layer_norm1.diff_b": np.full(8, 0.25),
        f"{t5}shared.diff": np.ones((10, 4)),
        f"{t5}encoder.block.0.layer.0.SelfAttention.relative_attention_bias.diff": np.ones((32, 2)),
    }
    path = tensor_file(tensors)
    lora = read_lora(path)
    assert lora.key_blocks[f"{t5}shared.diff"] == "t5"
    assert set(lora.blocks) == {"double.0", "clip", "t5"}
    report = inspect_lora(lora)
    norms = {b.block: b.norm for b in report.blocks}
    # Block norms add module norms. The embedding's up @ down is 0.5 in each of 10 x 8
    # entries; the layer norm's diff and diff_b are 8 entries of 0.25 each.
    assert norms["clip"] == pytest.approx(float(np.sqrt(80 * 0.5**2)) + 1.0, rel=1e-6)
    assert norms["t5"] == pytest.approx(float(np.sqrt(40.0)) + 8.0, rel=1e-6)
    result = run_check([path])
    assert result.exit_code == 0, [f.message for f in result.files[0].findings]
    slim = slim_lora(lora, drop=["clip"], output=tmp_path / "slim.safetensors")
    assert "clip" in slim.dropped_blocks
    assert set(read_lora(slim.output).blocks) == {"double.0", "t5"}
