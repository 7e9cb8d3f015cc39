"""Tests of the render engine on the tiny offline FLUX.1 pipeline.

References are computed by other code paths: diffusers' own PEFT loader, a
merge of the deltas into a deep copy of the transformer written here from the
field guide's formulas, and one-by-one renders for the batched ones.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flux_oracle import dense_delta, kohya_targets
from PIL import Image
from safetensors.numpy import load_file, save_file

from lora_prune.errors import (
    ModelMismatchError,
    UnsupportedAdapterError,
    UsageError,
    WrongBaseModelError,
)
from lora_prune.families.flux1.blocks import DOUBLE_IDS, SINGLE_IDS
from lora_prune.families.flux1.geometry import FLUX1_DEV
from lora_prune.lora import read_lora
from lora_prune.render import hooks
from lora_prune.render.combination import render_combination
from lora_prune.render.engine import BlockEngine
from lora_prune.render.loading import LoadedModel
from lora_prune.render.plain import plain_render as pipe_render
from lora_prune.render.tiny import TINY_MAX_SEQUENCE_LENGTH, build_tiny_pipeline
from lora_prune.settings import ImageSettings
from lora_prune.testing import SynthSpec, supported_blocks, write_synth_lora

torch.set_num_threads(1)

SIZE = 32
STEPS = 2
PROMPT = "a red fox in the snow"
SETTINGS = ImageSettings(
    PROMPT,
    seed=7,
    width=SIZE,
    height=SIZE,
    steps=STEPS,
    max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
)
TRANSFORMER_BLOCKS = ("input", *DOUBLE_IDS, *SINGLE_IDS, "final")


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("loras")


def _pipe_render(pipe: Any, settings: ImageSettings = SETTINGS) -> np.ndarray:
    return pipe_render(pipe, settings)


def _hook_count(pipe: Any) -> int:
    return sum(
        len(m._forward_hooks)
        for component in (pipe.transformer, pipe.text_encoder, pipe.text_encoder_2)
        for m in component.modules()
    )


@pytest.fixture(scope="module")
def kohya_path(files: Path) -> Path:
    # alpha 2 over rank 4: scale 0.5, so a missing or doubled alpha shows.
    spec = SynthSpec(grammar="kohya", blocks=TRANSFORMER_BLOCKS, rank=4, alpha=2.0, seed=3)
    return write_synth_lora(files / "kohya.safetensors", spec)


@pytest.fixture()
def kohya_engine(tiny_model: LoadedModel, kohya_path: Path) -> Iterator[BlockEngine]:
    with BlockEngine(tiny_model, read_lora(kohya_path)) as engine:
        yield engine


# --- against diffusers --------------------------------------------------------
def test_all_blocks_equal_diffusers_peft_and_none_equals_plain(
    tiny_model: LoadedModel, files: Path
) -> None:
    pipe = tiny_model.pipe
    spec = SynthSpec(
        grammar="diffusers",
        blocks=supported_blocks("diffusers"),
        rank=4,
        alpha=2.0,
        alpha_in="metadata",
        seed=1,
    )
    path = write_synth_lora(files / "diffusers.safetensors", spec)
    plain = _pipe_render(pipe)
    pipe.load_lora_weights(str(path), adapter_name="ref")
    try:
        reference = _pipe_render(pipe)
    finally:
        pipe.unload_lora_weights()
    assert np.abs(reference - plain).max() > 0.05  # the LoRA does change the image

    lora = read_lora(path)
    with BlockEngine(tiny_model, lora) as engine:
        assert engine.attached == len(lora.modules)
        assert engine.blocks == ["clip", *TRANSFORMER_BLOCKS]
        none, full = engine.render(
            [frozenset(), frozenset(engine.blocks)], SETTINGS, batch_size=1, output="float"
        )
    assert np.abs(full - reference).max() <= 1e-5
    assert np.array_equal(none, plain)


# --- against a merged reference -------------------------------------------------
def _merged_pipeline(pipe: Any, path: Path, blocks: frozenset[str]) -> Any:
    """A pipeline whose transformer is a deep copy with ``blocks``' deltas merged in."""
    tensors = load_file(str(path))
    transformer = copy.deepcopy(pipe.transformer)
    stems = {k.split(".")[0] for k in tensors}
    with torch.no_grad():
        for stem in stems:
            block, modules = kohya_targets(stem)
            if block not in blocks:
                continue
            down = tensors[f"{stem}.lora_down.weight"].astype(np.float64)
            up = tensors[f"{stem}.lora_up.weight"].astype(np.float64)
            scale = float(tensors[f"{stem}.alpha"]) / down.shape[0]
            delta = scale * (up @ down)
            if stem.endswith("adaLN_modulation_1"):
                # BFL's (shift, scale) rows are diffusers' (scale, shift)
                shift, scl = np.split(delta, 2, axis=0)
                delta = np.concatenate([scl, shift], axis=0)
            row = 0
            for name in modules:
                weight = transformer.get_submodule(name).weight
                rows = weight.shape[0]
                weight += torch.from_numpy(delta[row : row + rows]).to(weight.dtype)
                row += rows
            assert row == delta.shape[0]
    return type(pipe)(**{**pipe.components, "transformer": transformer})


def test_kohya_fused_and_global_modules_equal_a_merged_reference(
    tiny_model: LoadedModel, kohya_path: Path, kohya_engine: BlockEngine
) -> None:
    variants = [
        frozenset({"input"}),
        frozenset({"double.3"}),
        frozenset({"single.5"}),
        frozenset({"final"}),
        frozenset(TRANSFORMER_BLOCKS),
    ]
    images = kohya_engine.render(variants, SETTINGS, output="float")
    plain = _pipe_render(tiny_model.pipe)
    for variant, image in zip(variants, images, strict=True):
        reference = _pipe_render(_merged_pipeline(tiny_model.pipe, kohya_path, variant))
        assert np.abs(reference - plain).max() > 1e-3, variant  # the block does something
        assert np.abs(image - reference).max() <= 1e-4, variant


# --- batches --------------------------------------------------------------------
def test_one_hot_batch_equals_one_by_one(kohya_engine: BlockEngine) -> None:
    blocks = kohya_engine.blocks
    assert len(blocks) == 59
    variants = [frozenset(), frozenset(blocks), *(frozenset({b}) for b in blocks)]
    done: list[int] = []
    batched = kohya_engine.render(variants, SETTINGS, batch_size=61, progress=done.append)
    assert done == [61]
    singles = kohya_engine.render(variants, SETTINGS, batch_size=1)
    for variant, a, b in zip(variants, batched, singles, strict=True):
        assert a.dtype == np.uint8 and a.shape == (SIZE, SIZE, 3)
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1, sorted(variant)
    base = singles[0]
    changed = [not np.array_equal(img, base) for img in singles[2:]]
    assert all(changed)  # every block, also input/final and 2-D modulation layers, acts per image


def test_batches_split_and_report_progress(kohya_engine: BlockEngine) -> None:
    variants = [
        frozenset({"double.0"}),
        frozenset(),
        frozenset({"final"}),
        frozenset({"input"}),
        frozenset(),
    ]
    done: list[int] = []
    images = kohya_engine.render(variants, SETTINGS, batch_size=2, progress=done.append)
    assert done == [2, 4, 5]
    assert len(images) == 5
    assert np.abs(images[1].astype(int) - images[4].astype(int)).max() <= 1
    assert not np.array_equal(images[0], images[1])


# --- strength ---------------------------------------------------------------------
def test_strength_zero_is_no_lora(kohya_engine: BlockEngine) -> None:
    zero = ImageSettings(**{**SETTINGS.__dict__, "strength": 0.0})
    off, full = kohya_engine.render(
        [frozenset(), frozenset(kohya_engine.blocks)], zero, batch_size=1, output="float"
    )
    assert np.array_equal(off, full)


def test_strength_scales_the_delta_linearly(kohya_engine: BlockEngine, kohya_path: Path) -> None:
    transformer = kohya_engine.pipe.transformer
    gen = torch.Generator().manual_seed(0)
    cases = {
        # a 3-D token input and a 2-D modulation input
        "single_transformer_blocks.5.attn.to_k": torch.randn(2, 6, 32, generator=gen),
        "transformer_blocks.3.norm1.linear": torch.randn(3, 32, generator=gen),
    }
    tensors = load_file(str(kohya_path))
    stems = {
        "single_transformer_blocks.5.attn.to_k": (
            "lora_unet_single_blocks_5_linear1",
            slice(32, 64),
        ),
        "transformer_blocks.3.norm1.linear": (
            "lora_unet_double_blocks_3_img_mod_lin",
            slice(0, 192),
        ),
    }
    for name, x in cases.items():
        module = transformer.get_submodule(name)
        with torch.no_grad():
            base = module(x)
            deltas = {}
            for s in (1.0, 0.5, -2.0):
                with kohya_engine.activated(frozenset({"single.5", "double.3"}), strength=s):
                    deltas[s] = module(x) - base
            assert torch.equal(module(x), base)  # off again outside the block
        stem, rows = stems[name]
        up = torch.from_numpy(tensors[f"{stem}.lora_up.weight"][rows])
        down = torch.from_numpy(tensors[f"{stem}.lora_down.weight"])
        expected = x @ (0.5 * up @ down).T
        torch.testing.assert_close(deltas[1.0], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(deltas[0.5], 0.5 * deltas[1.0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(deltas[-2.0], -2.0 * deltas[1.0], atol=1e-6, rtol=1e-5)


# --- other adapter types ------------------------------------------------------------
@pytest.mark.parametrize("grammar", ["lycoris-kohya-loha", "lycoris-kohya-lokr", "kohya-diff"])
def test_materialised_adapters_apply_their_delta(
    tiny_model: LoadedModel, files: Path, grammar: str
) -> None:
    spec = SynthSpec(grammar=grammar, blocks=("double.2",), rank=4, alpha=2.0, seed=5)
    path = write_synth_lora(files / f"{grammar}.safetensors", spec)
    t = load_file(str(path))
    stem = "lora_unet_double_blocks_2_img_attn_proj"
    bias = np.zeros(32, dtype=np.float32)
    if grammar == "lycoris-kohya-loha":
        rank = t[f"{stem}.hada_w1_b"].shape[0]
        dw = (t[f"{stem}.hada_w1_a"] @ t[f"{stem}.hada_w1_b"]) * (
            t[f"{stem}.hada_w2_a"] @ t[f"{stem}.hada_w2_b"]
        )
        dw = dw * float(t[f"{stem}.alpha"]) / rank
    elif grammar == "lycoris-kohya-lokr":
        rank = t[f"{stem}.lokr_w2_b"].shape[0]
        dw = np.kron(t[f"{stem}.lokr_w1"], t[f"{stem}.lokr_w2_a"] @ t[f"{stem}.lokr_w2_b"])
        dw = dw * float(t[f"{stem}.alpha"]) / rank
    else:
        dw, bias = t[f"{stem}.diff"], t[f"{stem}.diff_b"]  # full deltas: never scaled by alpha
    module = tiny_model.pipe.transformer.get_submodule("transformer_blocks.2.attn.to_out.0")
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    with BlockEngine(tiny_model, read_lora(path)) as engine, torch.no_grad():
        base = module(x)
        with engine.activated(frozenset({"double.2"})):
            delta = module(x) - base
        with engine.activated(frozenset({"double.2"}), strength=0.5):
            half = module(x) - base
    expected = x @ torch.from_numpy(dw.astype(np.float32)).T + torch.from_numpy(bias)
    assert float(expected.abs().max()) > 0.01
    torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(half, 0.5 * expected, atol=1e-5, rtol=1e-4)


def _target_deltas(
    engine: BlockEngine, transformer: torch.nn.Module, t: dict[str, np.ndarray]
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module, engine delta, oracle delta) for every target of every kohya stem in ``t``."""
    gen = torch.Generator().manual_seed(11)
    out: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    for stem in sorted({k.split(".")[0] for k in t}):
        block, names = kohya_targets(stem)
        dw = dense_delta(t, stem)
        if stem.endswith("adaLN_modulation_1"):
            shift, scl = dw.chunk(2, dim=0)  # BFL (shift, scale) -> diffusers (scale, shift)
            dw = torch.cat([scl, shift], dim=0)
        row = 0
        for name in names:
            module = transformer.get_submodule(name)
            assert isinstance(module, torch.nn.Linear)
            rows = module.out_features
            x = torch.randn(2, 3, module.in_features, generator=gen)
            with torch.no_grad():
                base = module(x)
                with engine.activated(frozenset({block})):
                    delta = module(x) - base
            expected = x.double() @ dw[row : row + rows].T
            out.append((name, delta, expected.float()))
            row += rows
        assert row == dw.shape[0], stem
    return out


@pytest.mark.parametrize("grammar", ["lycoris-kohya-loha", "lycoris-kohya-lokr"])
def test_factored_adapters_equal_their_dense_expansion_on_every_target(
    tiny_model: LoadedModel, files: Path, grammar: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(hooks, "LOHA_CHUNK", 100)  # LoHa deltas built 3 rows at a time
    # fused qkv (8 x 12 kron rows: the q/k/v split at 32 cuts kron row blocks), fused linear1,
    # the final adaLN's swapped halves, 2-D modulation and embedding layers
    blocks = ("input", "double.0", "single.0", "final")
    spec = SynthSpec(grammar=grammar, blocks=blocks, rank=4, alpha=2.0, seed=6)
    path = write_synth_lora(files / f"every-{grammar}.safetensors", spec)
    t = load_file(str(path))
    with BlockEngine(tiny_model, read_lora(path)) as engine:
        deltas = _target_deltas(engine, tiny_model.pipe.transformer, t)
        stored = sum(a.nbytes for k, a in t.items() if not k.endswith(".alpha"))
        # fp32 model, fp32 file: the factors once each, fused modules' input factors shared
        assert stored <= engine.attached_bytes <= 2 * stored
    names = {name for name, _, _ in deltas}
    assert {"transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.proj_mlp"} <= names
    assert "norm_out.linear" in names
    for name, delta, expected in deltas:
        assert float(expected.abs().max()) > 1e-3, name
        torch.testing.assert_close(delta, expected, atol=1e-5, rtol=1e-4, msg=name)


def test_lokr_row_splits_off_the_kron_grid_and_low_rank_w1(
    tiny_model: LoadedModel, files: Path
) -> None:
    """Hand-made LoKr whose fused row splits fall inside rows of w1, w1 as a low-rank pair."""
    rng = np.random.default_rng(4)

    def f32(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    linear1, qkv, ada = (
        "lora_unet_single_blocks_3_linear1",
        "lora_unet_double_blocks_1_txt_attn_qkv",
        "lora_unet_final_layer_adaLN_modulation_1",
    )
    t = {
        # 224 = 4 x 56: the q/k/v/mlp splits at 32, 64, 96 fall inside w1's rows of 56
        f"{linear1}.lokr_w1_a": f32(4, 2),
        f"{linear1}.lokr_w1_b": f32(2, 4),
        f"{linear1}.lokr_w2": f32(56, 8),
        f"{linear1}.alpha": np.array(3.0, dtype=np.float32),
        # 96 = 3 x 32 with whole factors: no alpha scaling (no low-rank factor)
        f"{qkv}.lokr_w1": f32(3, 2),
        f"{qkv}.lokr_w2": f32(32, 16),
        f"{qkv}.alpha": np.array(5.0, dtype=np.float32),
        # 64 = 1 x 64: the swapped halves lie inside w1's single row
        f"{ada}.lokr_w1": f32(1, 2),
        f"{ada}.lokr_w2_a": f32(64, 3),
        f"{ada}.lokr_w2_b": f32(3, 16),
    }
    path = files / "lokr-hand.safetensors"
    save_file(t, str(path))
    with BlockEngine(tiny_model, read_lora(path)) as engine:
        deltas = _target_deltas(engine, tiny_model.pipe.transformer, t)
    assert len(deltas) == 4 + 3 + 1
    for name, delta, expected in deltas:
        assert float(expected.abs().max()) > 1e-3, name
        torch.testing.assert_close(delta, expected, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("grammar", ["lycoris-kohya-loha", "lycoris-kohya-lokr"])
def test_factored_adapters_batch_equals_one_by_one(
    tiny_model: LoadedModel, files: Path, grammar: str
) -> None:
    blocks = ("input", "double.0", "single.0", "single.1", "final")
    spec = SynthSpec(grammar=grammar, blocks=blocks, rank=4, alpha=4.0, seed=8)
    path = write_synth_lora(files / f"batch-{grammar}.safetensors", spec)
    with BlockEngine(tiny_model, read_lora(path)) as engine:
        variants = [frozenset(), frozenset(blocks), *(frozenset({b}) for b in blocks)]
        batched = engine.render(variants, SETTINGS, batch_size=len(variants), output="float")
        singles = engine.render(variants, SETTINGS, batch_size=1, output="float")
    for variant, a, b in zip(variants, batched, singles, strict=True):
        assert np.abs(a - b).max() <= 1e-5, sorted(variant)
    assert all(np.abs(img - singles[0]).max() > 1e-3 for img in singles[1:])


def test_control_lora_bias_and_norm_replacement(tiny_model: LoadedModel, files: Path) -> None:
    spec = SynthSpec(grammar="bfl-control", blocks=("input", "double.1"), rank=4, seed=9)
    path = write_synth_lora(files / "control.safetensors", spec)
    t = load_file(str(path))
    transformer = tiny_model.pipe.transformer
    gen = torch.Generator().manual_seed(2)
    x_img = torch.randn(2, 4, 64, generator=gen)
    x_q = torch.randn(2, 3, 6, 16, generator=gen)
    norm_q = transformer.transformer_blocks[1].attn.norm_q
    replaced = copy.deepcopy(norm_q)
    with torch.no_grad():
        replaced.weight.copy_(torch.from_numpy(t["double_blocks.1.img_attn.norm.query_norm.scale"]))
    with BlockEngine(tiny_model, read_lora(path)) as engine, torch.no_grad():
        base = transformer.x_embedder(x_img)
        with engine.activated(frozenset({"input", "double.1"})):
            img_delta = transformer.x_embedder(x_img) - base
            normed = norm_q(x_q)
        with engine.activated(frozenset({"input", "double.1"}), strength=-1.5):
            img_scaled = transformer.x_embedder(x_img) - base
            normed_scaled = norm_q(x_q)
    a, b = (torch.from_numpy(t[f"img_in.lora_{r}.weight"]) for r in "AB")
    expected = x_img @ (b @ a).T + torch.from_numpy(t["img_in.lora_B.bias"])  # no alpha: scale 1
    torch.testing.assert_close(img_delta, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(img_scaled, -1.5 * expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(normed, replaced(x_q), atol=1e-6, rtol=1e-5)
    # strength s moves the weight s of the way to the replacement
    with torch.no_grad():
        replaced.weight.copy_(norm_q.weight - 1.5 * (replaced.weight - norm_q.weight))
    torch.testing.assert_close(normed_scaled, replaced(x_q), atol=1e-5, rtol=1e-5)


# --- text encoders --------------------------------------------------------------------
def test_text_encoder_blocks_toggle_per_image(tiny_model: LoadedModel, files: Path) -> None:
    spec = SynthSpec(grammar="kohya", blocks=("clip", "t5"), rank=4, alpha=4.0, seed=4)
    path = write_synth_lora(files / "te.safetensors", spec)
    lora = read_lora(path)
    plain = _pipe_render(tiny_model.pipe)
    with BlockEngine(tiny_model, lora) as engine:
        assert engine.blocks == ["clip", "t5"]
        assert engine.attached == len(lora.modules) == 2 * 6 + 2 * 7
        none, clip, t5, both, absent = engine.render(
            [
                frozenset(),
                frozenset({"clip"}),
                frozenset({"t5"}),
                frozenset({"clip", "t5"}),
                frozenset({"double.0"}),
            ],
            SETTINGS,
            output="float",
        )
    assert np.abs(none - plain).max() <= 1e-5
    assert np.array_equal(absent, none)  # a block the LoRA lacks changes nothing
    for image in (clip, t5, both):
        assert np.abs(image - none).max() > 0.01
    assert np.abs(both - clip).max() > 0.01 and np.abs(both - t5).max() > 0.01


# --- errors --------------------------------------------------------------------------
def test_mismatched_widths_name_the_base_model(tiny_model: LoadedModel, files: Path) -> None:
    spec = SynthSpec(grammar="kohya", geometry=FLUX1_DEV, blocks=("input", "double.0"), rank=1)
    path = write_synth_lora(files / "dev.safetensors", spec)
    with pytest.raises(ModelMismatchError) as info:
        BlockEngine(tiny_model, read_lora(path))
    message = str(info.value)
    assert "this LoRA is for FLUX.1 (hidden 3072) but the model has hidden 32" in message
    assert "lora_unet_double_blocks_0_img_attn_proj" in message or "more" in message
    assert "\n" not in message
    assert _hook_count(tiny_model.pipe) == 0
    assert info.value.exit_code == 4


def test_module_without_target_is_not_dropped(tiny_model: LoadedModel, files: Path) -> None:
    spec = SynthSpec(grammar="kohya", blocks=("double.0",), rank=2)
    path = write_synth_lora(files / "plus.safetensors", spec)
    tensors = load_file(str(path))
    tensors["lora_unet_mystery_layer.lora_down.weight"] = np.ones((2, 32), dtype=np.float32)
    tensors["lora_unet_mystery_layer.lora_up.weight"] = np.ones((32, 2), dtype=np.float32)
    save_file(tensors, str(files / "plus2.safetensors"))
    lora = read_lora(files / "plus2.safetensors", allow_unknown=True)
    with pytest.raises(ModelMismatchError, match="lora_unet_mystery_layer"):
        BlockEngine(tiny_model, lora)


def test_sdxl_lora_is_refused_by_the_reader(files: Path) -> None:
    path = files / "sdxl.safetensors"
    stem = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q"
    save_file(
        {
            f"{stem}.lora_down.weight": np.zeros((4, 640), dtype=np.float32),
            f"{stem}.lora_up.weight": np.zeros((640, 4), dtype=np.float32),
        },
        str(path),
    )
    with pytest.raises(WrongBaseModelError) as info:
        read_lora(path)
    assert info.value.base_model == "SDXL"


@pytest.mark.parametrize("suffix", [".dora_scale", ".lora_magnitude_vector"])
def test_dora_is_unsupported(tiny_model: LoadedModel, files: Path, suffix: str) -> None:
    grammar = "kohya" if suffix == ".dora_scale" else "diffusers"
    path = write_synth_lora(
        files / f"dora-{grammar}.safetensors", SynthSpec(grammar=grammar, blocks=("double.1",))
    )
    tensors = load_file(str(path))
    down_key = next(k for k in tensors if k.endswith((".lora_down.weight", ".lora_A.weight")))
    stem = down_key.rsplit(".", 2)[0]
    tensors[stem + suffix] = np.ones((1, 32), dtype=np.float32)
    save_file(tensors, str(files / f"dora2-{grammar}.safetensors"))
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        BlockEngine(tiny_model, read_lora(files / f"dora2-{grammar}.safetensors"))
    assert _hook_count(tiny_model.pipe) == 0


def test_text_encoder_weights_that_are_no_linear_are_refused_by_name(
    tiny_model: LoadedModel, files: Path
) -> None:
    path = write_synth_lora(
        files / "te-other.safetensors", SynthSpec(grammar="comfyui", blocks=("double.1",))
    )
    tensors = load_file(str(path))
    key = "text_encoders.clip_l.transformer.text_model.final_layer_norm.diff"
    tensors[key] = np.ones(32, dtype=np.float32)
    save_file(tensors, str(files / "te-other2.safetensors"))
    lora = read_lora(files / "te-other2.safetensors")
    assert lora.key_blocks[key] == "clip"
    with pytest.raises(UnsupportedAdapterError, match="final_layer_norm is no Linear layer"):
        BlockEngine(tiny_model, lora)
    assert _hook_count(tiny_model.pipe) == 0


# --- lifetime -------------------------------------------------------------------------
def test_hooks_only_weights_untouched_and_close_detaches(
    tiny_model: LoadedModel, kohya_path: Path
) -> None:
    pipe = tiny_model.pipe
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    engine = BlockEngine(tiny_model, read_lora(kohya_path))
    # fused linear1 lands on 4 modules: more hooks than LoRA modules
    assert _hook_count(pipe) > engine.attached == 19 * 10 + 38 * 3 + 8 + 2
    with pytest.raises(UsageError, match="another render engine"):
        BlockEngine(tiny_model, read_lora(kohya_path))
    engine.render([frozenset(engine.blocks)], SETTINGS)
    after = pipe.transformer.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    engine.close()
    engine.close()  # idempotent
    assert _hook_count(pipe) == 0
    with pytest.raises(UsageError, match="closed"):
        engine.render([frozenset()], SETTINGS)
    with BlockEngine(tiny_model, read_lora(kohya_path)):  # a new engine may attach again
        assert _hook_count(pipe) > 0
    assert _hook_count(pipe) == 0


def test_bad_settings_and_block_ids_are_usage_errors(kohya_engine: BlockEngine) -> None:
    with pytest.raises(UsageError, match="multiple of 16"):
        kohya_engine.render([frozenset()], ImageSettings(PROMPT, width=40, height=32, steps=1))
    with pytest.raises(UsageError, match=r"unknown block id 'double\.99'"):
        kohya_engine.render([frozenset({"double.99"})], SETTINGS)
    with pytest.raises(UsageError, match="batch size"):
        kohya_engine.render([frozenset()], SETTINGS, batch_size=0)
    assert kohya_engine.render([], SETTINGS) == []


# --- manual mode ---------------------------------------------------------------------
def test_render_combination(kohya_engine: BlockEngine) -> None:
    chosen = frozenset({"double.3", "single.5"})
    result = render_combination(kohya_engine, chosen, SETTINGS)
    assert result.blocks == chosen
    base, full = kohya_engine.render([frozenset(), frozenset(kohya_engine.blocks)], SETTINGS)
    assert np.abs(result.base.astype(int) - base).max() <= 1
    assert np.abs(result.full.astype(int) - full).max() <= 1
    d_base = result.chosen.astype(float) - result.base
    assert math.isclose(result.mse_vs_base, float(np.mean(d_base * d_base)))
    assert result.mse_vs_base > 0 and result.mse_vs_full > 0
    assert 0 < result.ssim_vs_full < 1
    assert isinstance(result.picture, Image.Image)
    # base | full | chosen | heatmap, 32 px renders upscaled to 256 px tiles
    assert result.picture.width >= 4 * 256
    same = render_combination(kohya_engine, frozenset(kohya_engine.blocks), SETTINGS)
    assert same.mse_vs_full == 0.0 and same.ssim_vs_full == 1.0


def test_bf16_pipeline_gets_bf16_deltas(kohya_path: Path) -> None:
    pipe = build_tiny_pipeline(0, torch.bfloat16)
    loaded = LoadedModel(pipe, "tiny:seed0", torch.device("cpu"), torch.bfloat16)
    with BlockEngine(loaded, read_lora(kohya_path)) as engine:
        dtypes = {
            getattr(p, n).dtype
            for h in engine._hooks.values()
            for p in h.pieces
            for n in p.tensors()
        }
        assert dtypes == {torch.bfloat16}
        none, full = engine.render([frozenset(), frozenset(engine.blocks)], SETTINGS, batch_size=1)
    assert np.array_equal(none, (_pipe_render(pipe) * 255).round().astype(np.uint8))
    assert not np.array_equal(none, full)
