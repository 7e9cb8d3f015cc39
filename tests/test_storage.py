"""Single-file transformers kept in their stored precision: fp8, ComfyUI scaled fp8, GGUF."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lora_prune.errors import EXIT_MISSING_DEPENDENCY, MissingDependencyError, UsageError
from lora_prune.lora import read_lora
from lora_prune.render.engine import BlockEngine
from lora_prune.render.loading import LoadedModel, ModelSpec, load_pipeline
from lora_prune.render.storage import Fp8Linear, inspect_transformer_file
from lora_prune.render.tiny import TINY_MAX_SEQUENCE_LENGTH, build_tiny_pipeline
from lora_prune.settings import ImageSettings
from lora_prune.testing import SynthSpec, supported_blocks, write_synth_lora

torch.set_num_threads(1)

SETTINGS = ImageSettings(
    "a red fox in the snow",
    seed=7,
    width=32,
    height=32,
    steps=2,
    max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
)


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    """The tiny transformer's weights in diffusers naming (fp32)."""
    sd = build_tiny_pipeline(0, torch.float32).transformer.state_dict()
    return {k: v.detach().clone() for k, v in sd.items()}


def _fp8(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # As ComfyUI's fp8 files: matrices in fp8, biases and norm scales in bf16.
    return {
        k: (v.to(dtype) if v.dim() == 2 else v.to(torch.bfloat16)).contiguous()
        for k, v in sd.items()
    }


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _render(loaded: LoadedModel, lora: Path) -> list[np.ndarray]:
    with BlockEngine(loaded, read_lora(lora)) as engine:
        return engine.render(
            [frozenset(), frozenset(engine.blocks)], SETTINGS, batch_size=2, output="float"
        )


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_fp8_file_stays_fp8_and_renders_as_its_upcast(
    state: dict[str, torch.Tensor], tmp_path: Path, fp8: torch.dtype
) -> None:
    stored = _fp8(state, fp8)
    fp8_path = tmp_path / "tiny-fp8.safetensors"
    save_file(stored, fp8_path)
    # The reference: the very same fp8 values, upcast to bf16 on disk.
    upcast_path = tmp_path / "tiny-upcast.safetensors"
    save_file({k: v.to(torch.bfloat16) for k, v in stored.items()}, upcast_path)
    assert inspect_transformer_file(fp8_path).fp8
    assert not inspect_transformer_file(upcast_path).fp8

    kept = load_pipeline(ModelSpec("tiny", transformer_file=fp8_path, device="cpu", dtype="bf16"))
    upcast = load_pipeline(
        ModelSpec("tiny", transformer_file=upcast_path, device="cpu", dtype="bf16")
    )
    transformer = kept.pipe.transformer
    linears = [m for m in transformer.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Fp8Linear) for m in linears)
    assert all(m.stored_weight.dtype == fp8 for m in linears if isinstance(m, Fp8Linear))
    matrix = sum(m.stored_weight.numel() for m in linears if isinstance(m, Fp8Linear))
    rest = sum(p.numel() for p in transformer.parameters()) - matrix
    assert _param_bytes(transformer) == matrix + 2 * rest  # 1 byte per fp8 weight value
    assert _param_bytes(upcast.pipe.transformer) == 2 * (matrix + rest)
    # What readers of the weight (the engine's hooks) see: the real values in bf16.
    to_q = transformer.transformer_blocks[0].attn.to_q
    assert to_q.weight.dtype == torch.bfloat16
    assert torch.equal(to_q.weight, stored["transformer_blocks.0.attn.to_q.weight"].bfloat16())

    spec = SynthSpec(grammar="kohya", blocks=supported_blocks("kohya"), rank=4, alpha=2.0, seed=3)
    lora = write_synth_lora(tmp_path / "kohya.safetensors", spec)
    none, full = _render(kept, lora)
    ref_none, ref_full = _render(upcast, lora)
    assert np.abs(full - none).max() > 0.05  # the LoRA does change the image
    assert np.abs(none - ref_none).max() <= 1 / 255
    assert np.abs(full - ref_full).max() <= 1 / 255


def test_scaled_fp8_file_is_descaled(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    prefix = "model.diffusion_model."
    tensors: dict[str, torch.Tensor] = {}
    scales: dict[str, float] = {}
    for i, (key, value) in enumerate(sorted(state.items())):
        if value.dim() != 2:
            tensors[prefix + key] = value.to(torch.bfloat16)
            continue
        layer = key[: -len(".weight")]
        scale = 0.01 * (1 + i % 5)  # differs per layer, so a scale on the wrong layer shows
        scales[layer] = scale
        tensors[prefix + key] = (value / scale).to(torch.float8_e4m3fn)
        tensors[f"{prefix}{layer}.scale_weight"] = torch.tensor(scale)
        tensors[f"{prefix}{layer}.scale_input"] = torch.tensor(1.0)
    # One fused BFL layer: its single scale covers all three diffusers modules it splits into.
    d = "transformer_blocks.0.attn."
    qkv = [state[f"{d}{n}.weight"] for n in ("to_q", "to_k", "to_v")]
    for n in ("to_q", "to_k", "to_v"):
        for param in ("weight", "bias"):
            tensors.pop(f"{prefix}{d}{n}.{param}")
        tensors.pop(f"{prefix}{d}{n}.scale_weight")
        tensors.pop(f"{prefix}{d}{n}.scale_input")
        scales.pop(f"{d}{n}")
    fused = torch.cat(qkv)
    tensors[f"{prefix}double_blocks.0.img_attn.qkv.weight"] = (fused / 0.02).to(torch.float8_e4m3fn)
    tensors[f"{prefix}double_blocks.0.img_attn.qkv.bias"] = torch.cat(
        [state[f"{d}{n}.bias"] for n in ("to_q", "to_k", "to_v")]
    ).bfloat16()
    tensors[f"{prefix}double_blocks.0.img_attn.qkv.scale_weight"] = torch.tensor(0.02)
    tensors[f"{prefix}scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    path = tmp_path / "tiny-fp8-scaled.safetensors"
    save_file(tensors, path)
    assert inspect_transformer_file(path).scaled

    loaded = load_pipeline(ModelSpec("tiny", transformer_file=path, device="cpu", dtype="fp32"))
    transformer = loaded.pipe.transformer
    x = torch.randn(3, 5, transformer.transformer_blocks[0].attn.to_q.in_features)
    checked = 0
    for layer, scale in [*scales.items(), (f"{d}to_k", 0.02)]:
        module = transformer.get_submodule(layer)
        assert isinstance(module, Fp8Linear)
        assert module.stored_weight.dtype == torch.float8_e4m3fn
        if module.in_features != x.shape[-1]:
            continue
        if layer == f"{d}to_k":
            rows = slice(qkv[0].shape[0], qkv[0].shape[0] + qkv[1].shape[0])
            codes = tensors[f"{prefix}double_blocks.0.img_attn.qkv.weight"][rows]
            bias = tensors[f"{prefix}double_blocks.0.img_attn.qkv.bias"][rows].float()
        else:
            codes = tensors[f"{prefix}{layer}.weight"]
            bias = tensors[f"{prefix}{layer}.bias"].float()
        manual = F.linear(x, codes.to(torch.float32) * scale, bias)
        with torch.no_grad():
            got = module(x)
        torch.testing.assert_close(got, manual, rtol=0, atol=1e-6)
        # De-scaled means the original weight within e4m3's rounding (3 mantissa bits).
        original = state[f"{layer}.weight"]
        error = (module.weight - original).abs()
        assert bool((error <= original.abs() / 16 + scale * 2**-9).all())
        checked += 1
    assert checked >= 10


def _gguf_bytes() -> bytes:
    # The GGUF magic, version 3, zero tensors, zero metadata entries.
    return b"GGUF" + (3).to_bytes(4, "little") + bytes(16)


def test_gguf_is_recognised_by_content_and_needs_the_extra(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    named_safetensors = tmp_path / "flux1-dev-Q8_0.safetensors"
    named_safetensors.write_bytes(_gguf_bytes())
    assert inspect_transformer_file(named_safetensors).format == "gguf"
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(MissingDependencyError) as err:
        load_pipeline(ModelSpec("tiny", transformer_file=named_safetensors, device="cpu"))
    assert err.value.exit_code == EXIT_MISSING_DEPENDENCY == 5
    assert str(err.value) == (
        "loading a GGUF transformer needs the gguf package, which is not installed, "
        f"{named_safetensors}, pip install 'lora-prune[gguf]'"
    )


def test_safetensors_named_gguf_is_still_safetensors(
    state: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    path = tmp_path / "flux1-dev-Q8_0.gguf"
    save_file({k: v.contiguous() for k, v in state.items()}, path)
    storage = inspect_transformer_file(path)
    assert (storage.format, storage.dtypes, storage.scaled) == ("safetensors", ("F32",), False)


def test_unloadable_dtype_is_one_line(state: dict[str, torch.Tensor], tmp_path: Path) -> None:
    tensors: dict[str, Any] = {k: v.contiguous() for k, v in state.items()}
    tensors["proj_out.weight"] = torch.zeros_like(state["proj_out.weight"], dtype=torch.int8)
    path = tmp_path / "int8.safetensors"
    save_file(tensors, path)
    with pytest.raises(UsageError) as err:
        load_pipeline(ModelSpec("tiny", transformer_file=path, device="cpu"))
    assert str(err.value).startswith(
        f"transformer tensor 'proj_out.weight' is stored as I8, which cannot be loaded, {path}, "
        "use a bf16, fp16, fp32 or fp8"
    )
    assert "\n" not in str(err.value)
