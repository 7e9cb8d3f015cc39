"""A FLUX.1 pipeline loaded from ComfyUI single files renders as the pipeline they came from.

Each component of a small pipeline (the tiny transformer and VAE, text
encoders of the widths the transformer expects) is written as ComfyUI keeps
it (BFL-named transformer in models/unet, CLIP-L and T5 state dicts in
models/clip, the VAE in models/vae, the tokenizers in ComfyUI's source tree);
``--comfy`` finds and loads them back, and the images match.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import diffusers as _diffusers
import numpy as np
import pytest
import torch
import transformers as _transformers
from clitools import run_cli
from safetensors.torch import save_file
from test_render_loading import to_bfl

from lora_prune.render.loading import load_pipeline
from lora_prune.render.plain import plain_render
from lora_prune.render.tiny import TINY_MAX_SEQUENCE_LENGTH, build_tiny_pipeline
from lora_prune.settings import ImageSettings, ModelSpec
from lora_prune.testing import planted_lora

# Both libraries are only partly typed: used as Any, as in lora_prune/render/tiny.py.
diffusers: Any = _diffusers
transformers: Any = _transformers

torch.set_num_threads(1)

SETTINGS = ImageSettings(
    "a red fox", seed=0, width=64, height=64, steps=2,
    max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
)  # fmt: skip


def _encoders(tiny: Any) -> tuple[Any, Any]:
    """Text encoders of the tiny widths, configured as the shipped CLIP-L/T5-XXL files are."""
    width = int(tiny.transformer.config.joint_attention_dim)
    torch.manual_seed(0)
    clip = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=len(tiny.tokenizer), hidden_size=width, intermediate_size=2 * width,
            num_hidden_layers=2, num_attention_heads=1, max_position_embeddings=77,
            projection_dim=768, hidden_act="quick_gelu", bos_token_id=0, eos_token_id=2,
            pad_token_id=1,
        )
    )  # fmt: skip
    t5 = transformers.T5EncoderModel(
        transformers.T5Config(
            vocab_size=len(tiny.tokenizer_2), d_model=width, d_kv=8, d_ff=2 * width,
            num_layers=2, num_heads=4, relative_attention_num_buckets=8,
            relative_attention_max_distance=128, feed_forward_proj="gated-gelu",
            dropout_rate=0.0, pad_token_id=0, eos_token_id=1, is_encoder_decoder=False,
            layer_norm_epsilon=1e-6,
        )
    )  # fmt: skip
    return clip.eval(), t5.eval()


def _contiguous(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().clone() for k, v in sd.items()}


@pytest.fixture(scope="module")
def comfy_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    tiny = build_tiny_pipeline()
    clip, t5 = _encoders(tiny)
    original = diffusers.FluxPipeline(
        scheduler=tiny.scheduler, vae=tiny.vae, text_encoder=clip, tokenizer=tiny.tokenizer,
        text_encoder_2=t5, tokenizer_2=tiny.tokenizer_2, transformer=tiny.transformer,
    )  # fmt: skip
    original.set_progress_bar_config(disable=True)
    root = tmp_path_factory.mktemp("ComfyUI")
    models = root / "models"
    for sub in ("unet", "clip", "vae"):
        (models / sub).mkdir(parents=True)
    save_file(
        _contiguous(to_bfl(tiny.transformer.state_dict())), models / "unet" / "flux.safetensors"
    )
    # ComfyUI's clip_l.safetensors names its weights text_model.* (as transformers 4 did).
    clip_sd = {
        k if k.startswith("text_model.") else f"text_model.{k}": v
        for k, v in clip.state_dict().items()
    }
    save_file(_contiguous(clip_sd), models / "clip" / "clip_l.safetensors")
    t5_sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    save_file(_contiguous(t5_sd), models / "clip" / "t5xxl.safetensors")
    save_file(_contiguous(tiny.vae.state_dict()), models / "vae" / "ae.safetensors")
    # ComfyUI ships CLIP's tokenizer as vocab.json + merges.txt (the tiny one has no merges).
    sd1 = root / "comfy" / "sd1_tokenizer"
    sd1.mkdir(parents=True)
    (sd1 / "vocab.json").write_text(json.dumps(tiny.tokenizer.get_vocab()), encoding="utf-8")
    (sd1 / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    tiny.tokenizer_2.save_pretrained(root / "comfy" / "text_encoders" / "t5_tokenizer")
    return root, original


def test_comfy_single_files_render_like_the_pipeline_they_came_from(
    comfy_root: tuple[Path, Any],
) -> None:
    root, original = comfy_root
    loaded = load_pipeline(ModelSpec(model="comfy", comfy=root, device="cpu", dtype="fp32"))
    assert loaded.model_id.startswith("single-files:")
    pipe = loaded.pipe
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        want = getattr(original, name).state_dict()
        got = getattr(pipe, name).state_dict()
        assert set(got) == set(want), name
        for key, value in want.items():
            assert torch.equal(got[key], value), (name, key)
    expected = plain_render(original, SETTINGS)
    image = plain_render(pipe, SETTINGS)
    assert float(np.abs(image - expected).max()) < 1e-5
    assert float(np.abs(expected - 0.5).max()) > 0.05  # a picture, not a constant


def test_render_and_analyze_run_from_a_comfy_folder(
    comfy_root: tuple[Path, Any], tmp_path: Path
) -> None:
    root, _ = comfy_root
    lora = planted_lora(tmp_path / "planted.safetensors", {"double.3": 1.0, "single.7": 1.0})
    common = ["--comfy", str(root), "--prompt", "a fox", "--size", "32", "--steps", "2"]
    out = tmp_path / "combo.png"
    render = run_cli("render", lora, *common, "--blocks", "double.3", "-o", out)
    assert render.exit_code == 0, render.output
    assert out.stat().st_size > 0
    analyze = run_cli("analyze", lora, *common, "--out", tmp_path / "a")
    assert analyze.exit_code == 0, analyze.output
    ranking = json.loads((tmp_path / "a" / "ranking.json").read_text(encoding="utf-8"))
    top = {r["block"] for r in ranking["rows"] if r["mode"] == "solo"}
    assert {"double.3", "single.7"} <= top
    solo = sorted(
        (r for r in ranking["rows"] if r["mode"] == "solo"), key=lambda r: -float(r["mse"])
    )
    assert {r["block"] for r in solo[:2]} == {"double.3", "single.7"}


def test_an_fp8_t5_file_stays_fp8_and_encodes_like_its_values(
    comfy_root: tuple[Path, Any], tmp_path: Path
) -> None:
    from lora_prune.render.singlefile import _load_t5
    from lora_prune.render.storage import Fp8Linear

    _, original = comfy_root
    t5 = original.text_encoder_2
    fp8 = {
        k: v.detach().to(torch.float8_e4m3fn).contiguous()
        for k, v in t5.state_dict().items()
        if k != "encoder.embed_tokens.weight"
    }
    path = tmp_path / "t5xxl_fp8_e4m3fn.safetensors"
    save_file(fp8, path)
    loaded = _load_t5(path, torch.float32)
    linears = [m for m in loaded.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Fp8Linear) for m in linears)
    assert all(m.stored_weight.dtype == torch.float8_e4m3fn for m in linears)
    # The reference: the same model with every value rounded to e4m3 and back.
    rounded = _encoders(build_tiny_pipeline())[1]
    rounded.load_state_dict({k: v.to(torch.float32) for k, v in fp8.items()}, strict=False)
    ids = torch.tensor([[14, 31, 112, 111, 19, 1, 0, 0]])
    with torch.no_grad():
        want = rounded(input_ids=ids).last_hidden_state
        got = loaded(input_ids=ids).last_hidden_state
    assert float((got - want).abs().max()) < 1e-5


def test_a_scaled_fp8_t5_file_is_descaled_and_stays_fp8(
    comfy_root: tuple[Path, Any], tmp_path: Path
) -> None:
    from lora_prune.render.singlefile import _load_t5
    from lora_prune.render.storage import Fp8Linear

    _, original = comfy_root
    state = {k: v for k, v in original.text_encoder_2.state_dict().items()}
    state.pop("encoder.embed_tokens.weight")
    # ComfyUI's t5xxl_fp8_e4m3fn_scaled: codes = weight / scale, one scale per Linear
    # (the embeddings, relative attention bias included, are not scaled).
    linear = {
        f"{n}.weight"
        for n, m in original.text_encoder_2.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    scaled: dict[str, torch.Tensor] = {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    real: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        layer = key.removesuffix(".weight")
        if key in linear:
            scale = value.abs().max() / 448.0
            codes = (value / scale).to(torch.float8_e4m3fn)
            scaled[key] = codes.contiguous()
            scaled[f"{layer}.scale_weight"] = scale.reshape(1).to(torch.float32)
            real[key] = codes.to(torch.float32) * scale
        else:
            scaled[key] = value.detach().contiguous()
            real[key] = value.detach()
    path = tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(scaled, path)
    loaded = _load_t5(path, torch.float32)
    linears = [m for m in loaded.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Fp8Linear) for m in linears)
    reference = _encoders(build_tiny_pipeline())[1]
    reference.load_state_dict(real, strict=False)
    ids = torch.tensor([[14, 31, 112, 111, 19, 1, 0, 0]])
    with torch.no_grad():
        want = reference(input_ids=ids).last_hidden_state
        got = loaded(input_ids=ids).last_hidden_state
    assert float((got - want).abs().max()) < 1e-5
