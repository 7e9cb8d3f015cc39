"""ComfyUI discovery, memory plans, doctor and the shipped component configs."""

from __future__ import annotations

import functools
import importlib
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any

import pytest
from clitools import run_cli

from lora_prune.comfy import _parse_simple_yaml, find_models, identify, parse_extra_model_paths
from lora_prune.errors import UsageError
from lora_prune.memoryplan import WORKING_BYTES, choose_plan, plan_peak_bytes
from lora_prune.safetensors_io import TensorEntry, write_safetensors
from lora_prune.settings import ModelSpec
from lora_prune.testing import planted_lora

GIB = 2**30


def write(path: Path, shapes: dict[str, tuple[int, ...]], dtype: str = "BF16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    entries = [
        TensorEntry(name, dtype, shape, functools.partial(bytes, 2 * math.prod(shape)))
        for name, shape in shapes.items()
    ]
    return write_safetensors(path, entries, None)


def transformer_keys(txt: int = 8, pooled: int = 4, dev: bool = True) -> dict[str, tuple[int, ...]]:
    keys: dict[str, tuple[int, ...]] = {
        "double_blocks.0.img_attn.qkv.weight": (12, 4),
        "single_blocks.0.linear1.weight": (28, 4),
        "img_in.weight": (4, 64),
        "txt_in.weight": (4, txt),
        "vector_in.in_layer.weight": (4, pooled),
    }
    if dev:
        keys["guidance_in.in_layer.weight"] = (4, 4)
    return keys


def clip_keys(width: int) -> dict[str, tuple[int, ...]]:
    return {
        "text_model.embeddings.token_embedding.weight": (10, width),
        "text_model.encoder.layers.0.mlp.fc1.weight": (2 * width, width),
        "text_model.encoder.layers.1.mlp.fc1.weight": (2 * width, width),
    }


def t5_keys(width: int) -> dict[str, tuple[int, ...]]:
    return {
        "shared.weight": (10, width),
        "encoder.block.0.layer.0.SelfAttention.q.weight": (width, width),
    }


VAE_KEYS: dict[str, tuple[int, ...]] = {
    "encoder.conv_in.weight": (4, 3, 3, 3),
    "decoder.conv_in.weight": (4, 16, 3, 3),
    "decoder.mid.block_1.conv1.weight": (4, 4, 3, 3),
}


@pytest.fixture
def comfy(tmp_path: Path) -> Path:
    root = tmp_path / "ComfyUI"
    models = root / "models"
    write(models / "diffusion_models" / "flux1-dev.safetensors", transformer_keys())
    write(models / "unet" / "flux1-schnell.safetensors", transformer_keys(dev=False))
    # The decoy: named like CLIP-L, but a width-6 CLIP that fits nothing.
    write(models / "clip" / "clip_l.safetensors", clip_keys(6))
    write(models / "clip" / "encoder_a.safetensors", clip_keys(4))
    write(models / "clip" / "notes.safetensors", {"something.weight": (2, 2)})
    write(models / "vae" / "ae.safetensors", VAE_KEYS)
    # T5 lives in a second folder, reached only through extra_model_paths.yaml.
    write(tmp_path / "shared" / "te" / "t5xxl_fp16.safetensors", t5_keys(8))
    (root / "extra_model_paths.yaml").write_text(
        f"# a comment\nshared:\n    base_path: {tmp_path / 'shared'}\n"
        "    is_default: true\n    text_encoders: |\n        te\n        missing\n",
        encoding="utf-8",
    )
    for rel in ("comfy/sd1_tokenizer/vocab.json", "comfy/sd1_tokenizer/merges.txt"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("{}", encoding="utf-8")
    t5_tok = root / "comfy/text_encoders/t5_tokenizer/tokenizer.json"
    t5_tok.parent.mkdir(parents=True)
    t5_tok.write_text("{}", encoding="utf-8")
    return root


def test_discovery_picks_files_by_contents(comfy: Path) -> None:
    found = find_models(comfy)
    chosen = {k: c.path.name for k, c in found.chosen.items()}
    assert chosen == {
        "transformer": "flux1-dev.safetensors",
        "clip": "encoder_a.safetensors",
        "t5": "t5xxl_fp16.safetensors",
        "vae": "ae.safetensors",
    }
    assert found.chosen["transformer"].variant == "dev"
    assert "guidance_in present" in found.chosen["transformer"].reason
    assert "preferred over 1 other" in found.chosen["transformer"].reason
    assert "width 4" in found.chosen["clip"].reason
    assert found.chosen["vae"].naming == "ldm"
    others = {c.path.name: why for c, why in found.others}
    assert others["clip_l.safetensors"] == "width 6 does not fit the transformer's pooled input 4"
    assert others["flux1-schnell.safetensors"] == "another transformer file was preferred"
    assert [p.name for p, _ in found.skipped] == ["notes.safetensors"]
    assert found.tokenizers is not None
    assert found.tokenizers.t5.name == "tokenizer.json"
    assert found.chosen["transformer"].nbytes == 2 * (48 + 112 + 256 + 32 + 16 + 16)


def test_models_folder_works_too_and_overrides_win(comfy: Path, tmp_path: Path) -> None:
    other = write(tmp_path / "elsewhere" / "mine.safetensors", clip_keys(4))
    found = find_models(comfy / "models", {"clip": other})
    assert found.chosen["clip"].path == other
    assert found.chosen["clip"].reason.startswith("given by --clip; CLIP text encoder")


def test_override_of_the_wrong_kind_is_one_error(comfy: Path) -> None:
    with pytest.raises(UsageError) as err:
        find_models(comfy, {"vae": comfy / "models" / "clip" / "encoder_a.safetensors"})
    assert "--vae is not a vae file (it is a clip file)" in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_component_names_what_to_provide(comfy: Path) -> None:
    (comfy / "models" / "vae" / "ae.safetensors").unlink()
    with pytest.raises(UsageError) as err:
        find_models(comfy)
    message = str(err.value)
    assert message.startswith("no usable vae file found (searched ")
    assert "ae.safetensors" in message and "--vae FILE" in message


def test_doctor_without_a_folder_or_files_asks_for_comfy() -> None:
    result = run_cli("doctor")
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        "error: no transformer file given and no ComfyUI folder to search, --transformer, "
        "pass --comfy ~/ComfyUI (its files are found by their contents) or --transformer FILE"
    )


def test_a_lora_where_the_transformer_belongs_is_named_with_why(comfy: Path) -> None:
    transformers = comfy / "models" / "diffusion_models"
    (comfy / "models" / "unet" / "flux1-schnell.safetensors").unlink()
    (transformers / "flux1-dev.safetensors").unlink()
    planted_lora(transformers / "flux1-dev.safetensors", {"double.3": 1.0})
    with pytest.raises(UsageError) as err:
        find_models(comfy)
    message = str(err.value)
    assert message.startswith("no usable transformer file found (searched ")
    assert "; not used: flux1-dev.safetensors: a LoRA, not a model)" in message


def test_missing_tokenizer_names_the_file(comfy: Path) -> None:
    (comfy / "comfy/sd1_tokenizer/merges.txt").unlink()
    found = find_models(comfy)
    assert found.tokenizers is None
    assert found.tokenizer_problem == (
        f"missing the CLIP tokenizer file {comfy / 'comfy/sd1_tokenizer/merges.txt'}"
    )


def test_identify_says_why_a_file_is_none_of_the_parts(tmp_path: Path) -> None:
    lora = write(
        tmp_path / "l.safetensors",
        {"lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight": (4, 2)},
    )
    assert identify(lora) == "a LoRA, not a model"
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"<html>")
    result = identify(junk)
    assert isinstance(result, str) and result.startswith("unreadable: ")


def test_extra_model_paths_both_parsers_agree(comfy: Path, tmp_path: Path) -> None:
    yaml_file = comfy / "extra_model_paths.yaml"
    parsed = parse_extra_model_paths(yaml_file)
    assert parsed == {
        "text_encoders": [tmp_path / "shared" / "te", tmp_path / "shared" / "missing"]
    }
    simple = _parse_simple_yaml(yaml_file.read_text(encoding="utf-8"))
    assert simple == {
        "shared": {
            "base_path": str(tmp_path / "shared"),
            "is_default": "true",
            "text_encoders": "te\nmissing\n",
        }
    }


def test_auto_rule_is_a_pure_function_of_free_memory() -> None:
    sizes = {"transformer": 24 * GIB, "clip": GIB // 4, "t5": 10 * GIB, "vae": GIB // 4}
    assert choose_plan(None, sizes).plan == "full"
    assert choose_plan(None, sizes).reason == "no GPU: cpu"
    assert choose_plan(80 * GIB, sizes).plan == "full"
    assert choose_plan(30 * GIB, sizes).plan == "offload"
    assert choose_plan(23 * GIB, sizes).plan == "group-offload"
    assert choose_plan(4 * GIB, sizes).plan == "sequential"
    assert plan_peak_bytes("offload", sizes) == 24 * GIB + WORKING_BYTES
    assert plan_peak_bytes("group-offload", sizes) == 10 * GIB + WORKING_BYTES


def test_memory_option_is_validated_and_offload_is_its_alias() -> None:
    assert ModelSpec("m", offload=True).memory == "offload"
    assert ModelSpec("m").memory == "auto"
    with pytest.raises(UsageError, match="unknown memory plan 'half'"):
        ModelSpec("m", memory="half")
    with pytest.raises(UsageError, match="--offload contradicts --memory full"):
        ModelSpec("m", offload=True, memory="full")
    assert ModelSpec("m", comfy=Path("x")).uses_single_files
    result = run_cli("render", "x", "--model", "tiny", "--memory", "lots")
    assert result.exit_code == 2


def test_doctor_prints_files_plan_and_estimates(comfy: Path) -> None:
    result = run_cli("doctor", "--comfy", comfy)
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    t_line = next(x for x in lines if x.startswith("transformer "))
    assert "flux1-dev.safetensors (BF16, 960 B; 960 B in fp32)" not in t_line  # fp32 doubles it
    assert "(BF16, 960 B; 1.9 KB in fp32): FLUX.1-dev transformer" in t_line
    assert any(x.startswith("clip        ") and "encoder_a" in x for x in lines)
    assert any(x.startswith("not used    ") and "clip_l.safetensors: width 6" in x for x in lines)
    assert "gpu         no GPU: cpu" in lines
    assert "plan        --memory auto -> full (no GPU: cpu)" in lines
    # A tiny folder's peak is the fixed working margin, and the line says so.
    assert any(
        x.startswith("peak        ~3.0 GiB (estimate: the weights the plan keeps on the card")
        and "a fixed 3.0 GiB for activations" in x
        for x in lines
    )
    assert any(x.startswith("time        not estimated on a CPU") for x in lines)


def test_doctor_missing_component_is_one_error_line(comfy: Path) -> None:
    (comfy / "models" / "vae" / "ae.safetensors").unlink()
    result = run_cli("doctor", "--comfy", comfy)
    assert result.exit_code == 2
    errors = [x for x in result.output.splitlines() if x.startswith("error: ")]
    assert len(errors) == 1 and "no usable vae file found" in errors[0]


def _config(name: str) -> dict[str, Any]:
    text = (resources.files("lora_prune") / "configs" / name).read_text(encoding="utf-8")
    config: dict[str, Any] = json.loads(text)
    return config


def test_shipped_configs_load_into_the_library_classes() -> None:
    diffusers: Any = importlib.import_module("diffusers")
    transformers: Any = importlib.import_module("transformers")

    vae = diffusers.AutoencoderKL.from_config(_config("flux1-vae.json")).config
    assert list(vae.block_out_channels) == [128, 256, 512, 512]
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 0.3611, 0.1159)
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    sched = diffusers.FlowMatchEulerDiscreteScheduler.from_config(_config("flux1-scheduler.json"))
    assert (sched.config.shift, sched.config.max_shift, sched.config.use_dynamic_shifting) == (
        3.0,
        1.15,
        True,
    )
    clip = transformers.CLIPTextConfig(**_config("clip-l-text.json"))
    assert (clip.hidden_size, clip.num_hidden_layers, clip.num_attention_heads) == (768, 12, 12)
    assert (clip.intermediate_size, clip.vocab_size, clip.hidden_act) == (3072, 49408, "quick_gelu")
    t5 = transformers.T5Config(**_config("t5-xxl-encoder.json"))
    assert (t5.d_model, t5.d_ff, t5.d_kv, t5.num_layers, t5.num_heads) == (4096, 10240, 64, 24, 64)
    assert (t5.vocab_size, t5.is_gated_act, t5.relative_attention_num_buckets) == (32128, True, 32)
    flux = diffusers.FluxTransformer2DModel.load_config(
        str(resources.files("lora_prune") / "configs" / "flux1-dev-transformer.json")
    )
    assert (
        flux["joint_attention_dim"] == t5.d_model
        and flux["pooled_projection_dim"] == clip.hidden_size
    )


def test_doctor_counts_an_fp8_transformer_at_one_byte_a_weight(comfy: Path) -> None:
    from lora_prune.comfy import diagnose

    fp8 = comfy / "models" / "diffusion_models" / "flux1-dev-fp8.safetensors"
    entries = [
        TensorEntry(name, "F8_E4M3", shape, functools.partial(bytes, math.prod(shape)))
        for name, shape in transformer_keys().items()
    ]
    write_safetensors(fp8, entries, None)
    (comfy / "models" / "diffusion_models" / "flux1-dev.safetensors").unlink()
    (comfy / "models" / "unet" / "flux1-schnell.safetensors").unlink()
    found = diagnose(comfy, {}, dtype="bf16")
    transformer = found.models.chosen["transformer"]
    assert transformer.path == fp8
    # Kept in fp8 when loaded (render/storage.py): one byte a value, not bf16's two.
    assert found.compute_bytes["transformer"] == transformer.numel
    assert found.compute_bytes["vae"] == 2 * found.models.chosen["vae"].numel


def test_a_gguf_transformer_is_found_by_its_tensors(comfy: Path) -> None:
    import gguf
    import numpy as np

    from lora_prune.comfy import diagnose

    for old in ("diffusion_models/flux1-dev.safetensors", "unet/flux1-schnell.safetensors"):
        (comfy / "models" / old).unlink()
    # Named like a LoRA: only its tensors say it is a FLUX.1-dev transformer.
    path = comfy / "models" / "unet" / "my-lora.gguf"
    writer = gguf.GGUFWriter(str(path), "flux")
    for name, shape in transformer_keys().items():
        writer.add_tensor(name, np.zeros(shape, dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    found = diagnose(comfy, {}, dtype="bf16")
    chosen = found.models.chosen["transformer"]
    assert chosen.path == path
    assert chosen.naming == "gguf" and chosen.variant == "dev"
    assert chosen.reason.startswith("FLUX.1-dev transformer, GGUF (quantised)")
    assert chosen.widths == {"txt": 8, "pooled": 4, "latent": 16}
    # Kept quantised when loaded: counted at the file's size.
    assert found.compute_bytes["transformer"] == path.stat().st_size
