"""The tiny offline FLUX.1 pipeline and loading pipelines from folders and single files."""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from lora_prune.errors import (
    MissingDependencyError,
    UnreadableFileError,
    UnsafeFileError,
    UsageError,
)
from lora_prune.lora import read_lora
from lora_prune.render import loading, tiny
from lora_prune.render.deps import require_render
from lora_prune.render.loading import (
    LoadedModel,
    ModelSpec,
    convert_transformer_checkpoint,
    load_pipeline,
    resolve_device_dtype,
    shipped_transformer_config,
)
from lora_prune.render.session import open_session
from lora_prune.render.tiny import (
    TINY_MAX_SEQUENCE_LENGTH,
    TINY_RESOLUTION,
    TINY_STEPS,
    build_tiny_pipeline,
)

torch.set_num_threads(1)

PROMPT = "a red fox in the snow"


def render(pipe: Any, prompt: str = PROMPT, seed: int = 0) -> np.ndarray:
    out = pipe(
        prompt,
        height=TINY_RESOLUTION,
        width=TINY_RESOLUTION,
        num_inference_steps=TINY_STEPS,
        guidance_scale=3.5,
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    image: np.ndarray = out.images[0]
    return image


@pytest.fixture(scope="module")
def pipe() -> Any:
    return build_tiny_pipeline(0)


@pytest.fixture(scope="module")
def image(pipe: Any) -> np.ndarray:
    return render(pipe)


@pytest.fixture(scope="module")
def saved_folder(pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-diffusers")
    pipe.save_pretrained(folder)
    return folder


# --- a BFL-naming writer, independent of the converter under test ------------
def to_bfl(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers FluxTransformer2DModel state dict -> BFL flux1-dev.safetensors naming."""
    sd = dict(sd)
    out: dict[str, torch.Tensor] = {}

    def take(bfl: str, *names: str) -> None:
        for param in ("weight", "bias"):
            parts = [sd.pop(f"{n}.{param}") for n in names]
            out[f"{bfl}.{param}"] = torch.cat(parts) if len(parts) > 1 else parts[0]

    take("img_in", "x_embedder")
    take("txt_in", "context_embedder")
    for bfl, diff in (("time_in", "timestep"), ("vector_in", "text"), ("guidance_in", "guidance")):
        if f"time_text_embed.{diff}_embedder.linear_1.weight" in sd:
            take(f"{bfl}.in_layer", f"time_text_embed.{diff}_embedder.linear_1")
            take(f"{bfl}.out_layer", f"time_text_embed.{diff}_embedder.linear_2")
    take("final_layer.linear", "proj_out")
    for param in ("weight", "bias"):
        scale, shift = sd.pop(f"norm_out.linear.{param}").chunk(2)
        out[f"final_layer.adaLN_modulation.1.{param}"] = torch.cat([shift, scale])
    i = 0
    while f"transformer_blocks.{i}.norm1.linear.weight" in sd:
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        take(b + "img_mod.lin", d + "norm1.linear")
        take(b + "txt_mod.lin", d + "norm1_context.linear")
        take(b + "img_attn.qkv", d + "attn.to_q", d + "attn.to_k", d + "attn.to_v")
        take(
            b + "txt_attn.qkv", d + "attn.add_q_proj", d + "attn.add_k_proj", d + "attn.add_v_proj"
        )
        take(b + "img_attn.proj", d + "attn.to_out.0")
        take(b + "txt_attn.proj", d + "attn.to_add_out")
        take(b + "img_mlp.0", d + "ff.net.0.proj")
        take(b + "img_mlp.2", d + "ff.net.2")
        take(b + "txt_mlp.0", d + "ff_context.net.0.proj")
        take(b + "txt_mlp.2", d + "ff_context.net.2")
        for bfl, diff in (
            ("img_attn.norm.query_norm", "attn.norm_q"),
            ("img_attn.norm.key_norm", "attn.norm_k"),
            ("txt_attn.norm.query_norm", "attn.norm_added_q"),
            ("txt_attn.norm.key_norm", "attn.norm_added_k"),
        ):
            out[f"{b}{bfl}.scale"] = sd.pop(f"{d}{diff}.weight")
        i += 1
    i = 0
    while f"single_transformer_blocks.{i}.norm.linear.weight" in sd:
        s, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        take(b + "linear1", s + "attn.to_q", s + "attn.to_k", s + "attn.to_v", s + "proj_mlp")
        take(b + "linear2", s + "proj_out")
        take(b + "modulation.lin", s + "norm.linear")
        out[b + "norm.query_norm.scale"] = sd.pop(s + "attn.norm_q.weight")
        out[b + "norm.key_norm.scale"] = sd.pop(s + "attn.norm_k.weight")
        i += 1
    assert not sd, f"unmapped diffusers keys: {sorted(sd)[:5]}"
    return out


@pytest.fixture(scope="module")
def bfl_file(pipe: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("single") / "tiny-flux1-dev.safetensors"
    save_file({k: v.contiguous() for k, v in to_bfl(pipe.transformer.state_dict()).items()}, path)
    return path


# --- the tiny pipeline ---------------------------------------------------------
def test_tiny_pipeline_has_flux1_dev_structure(pipe: Any) -> None:
    cfg = pipe.transformer.config
    assert (cfg.patch_size, cfg.in_channels) == (1, 64)
    assert (cfg.num_layers, cfg.num_single_layers) == (19, 38)
    assert (cfg.attention_head_dim, cfg.num_attention_heads) == (16, 2)
    assert (cfg.joint_attention_dim, cfg.pooled_projection_dim) == (32, 32)
    assert cfg.guidance_embeds is True
    assert tuple(cfg.axes_dims_rope) == (4, 6, 6)
    assert len(pipe.transformer.transformer_blocks) == 19
    assert len(pipe.transformer.single_transformer_blocks) == 38

    vae = pipe.vae.config
    assert tuple(vae.block_out_channels) == (8, 16, 32, 32)
    assert vae.latent_channels == 16
    assert (vae.use_quant_conv, vae.use_post_quant_conv) == (False, False)
    assert (vae.scaling_factor, vae.shift_factor) == (0.3611, 0.1159)
    assert pipe.vae_scale_factor == 8

    sched = pipe.scheduler.config
    assert (sched.shift, sched.use_dynamic_shifting) == (3.0, True)
    assert (sched.base_shift, sched.max_shift) == (0.5, 1.15)
    assert (sched.base_image_seq_len, sched.max_image_seq_len) == (256, 4096)

    assert pipe.text_encoder.config.hidden_size == 32
    assert pipe.text_encoder.config.num_hidden_layers == 2
    # CLIP pools at the first eos: model and tokenizer must agree on its id.
    assert pipe.text_encoder.config.eos_token_id == pipe.tokenizer.eos_token_id
    t5 = pipe.text_encoder_2.config
    assert (t5.d_model, t5.d_kv, t5.num_heads, t5.num_layers) == (32, 8, 4, 2)
    assert t5.is_gated_act and t5.dense_act_fn == "gelu_new"


def test_tiny_pipeline_is_deterministic_and_leaves_global_rng_alone(pipe: Any) -> None:
    state = torch.random.get_rng_state()
    again = build_tiny_pipeline(0)
    assert torch.equal(state, torch.random.get_rng_state())
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        a, b = getattr(pipe, name).state_dict(), getattr(again, name).state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    other = build_tiny_pipeline(1).transformer.state_dict()
    key = "single_transformer_blocks.37.proj_out.weight"
    assert not torch.equal(other[key], pipe.transformer.state_dict()[key])


def test_tiny_weights_have_no_dead_layers(pipe: Any) -> None:
    for name, param in pipe.transformer.named_parameters():
        assert float(param.abs().max()) > 0, name
        if param.numel() > 1:
            assert float(param.std()) > 0.01, name


def test_tiny_pipeline_in_bf16_is_the_fp32_model_rounded(pipe: Any) -> None:
    half = build_tiny_pipeline(0, torch.bfloat16)
    w16 = half.transformer.state_dict()["transformer_blocks.3.attn.to_q.weight"]
    w32 = pipe.transformer.state_dict()["transformer_blocks.3.attn.to_q.weight"]
    assert w16.dtype == torch.bfloat16
    assert torch.equal(w16, w32.to(torch.bfloat16))


def test_tokenizers_tell_prompts_apart(pipe: Any) -> None:
    clip_a = pipe.tokenizer("a cat").input_ids
    clip_b = pipe.tokenizer("a cab").input_ids
    assert clip_a != clip_b
    assert clip_a[0] == pipe.tokenizer.bos_token_id and clip_a[-1] == pipe.tokenizer.eos_token_id
    ids = pipe.tokenizer_2("Hello, World 42!").input_ids
    assert pipe.tokenizer_2.unk_token_id not in ids
    assert ids[-1] == pipe.tokenizer_2.eos_token_id
    assert ids != pipe.tokenizer_2("hello, world 42!").input_ids  # T5 keeps case


def test_tiny_render_is_structured_and_reproducible(pipe: Any, image: np.ndarray) -> None:
    assert image.shape == (TINY_RESOLUTION, TINY_RESOLUTION, 3)
    assert image.dtype == np.float32
    assert float(image.std()) > 0.1  # not flat
    assert float(np.abs(np.diff(image, axis=0)).mean()) > 0.02  # spatial structure, not one colour
    assert np.array_equal(render(pipe), image)


def test_tiny_render_depends_on_prompt_and_seed(pipe: Any, image: np.ndarray) -> None:
    other_prompt = render(pipe, prompt="a blue whale in the sea")
    other_seed = render(pipe, seed=1)
    assert float(np.abs(other_prompt - image).mean()) > 0.01
    assert float(np.abs(other_seed - image).mean()) > 0.05


@pytest.mark.parametrize(
    "module",
    [
        "x_embedder",
        "transformer_blocks.0",
        "transformer_blocks.9",
        "transformer_blocks.18",
        "single_transformer_blocks.0",
        "single_transformer_blocks.19",
        "single_transformer_blocks.37",
        "norm_out",
    ],
)
def test_every_part_of_the_transformer_changes_the_image(
    pipe: Any, image: np.ndarray, module: str
) -> None:
    block = pipe.transformer.get_submodule(module)
    saved = {k: v.clone() for k, v in block.state_dict().items()}
    try:
        with torch.no_grad():
            for param in block.parameters():
                param.mul_(0.5)
        changed = render(pipe)
    finally:
        block.load_state_dict(saved)
    assert float(np.abs(changed - image).mean()) > 1e-3
    assert np.array_equal(render(pipe), image)  # restored


# --- loading -------------------------------------------------------------------
def test_load_tiny_by_name(image: np.ndarray) -> None:
    loaded = load_pipeline(ModelSpec(model="tiny", device="cpu"))
    assert loaded.model_id == "tiny:seed0"
    assert (loaded.device, loaded.dtype) == (torch.device("cpu"), torch.float32)
    assert np.array_equal(render(loaded.pipe), image)


def test_saved_folder_loads_to_the_same_image(saved_folder: Path, image: np.ndarray) -> None:
    loaded = load_pipeline(ModelSpec(model=str(saved_folder), device="cpu", dtype="fp32"))
    config = (saved_folder / "transformer" / "config.json").read_bytes()
    config_hash = hashlib.sha256(config).hexdigest()[:16]
    assert loaded.model_id == f"{saved_folder.resolve()}@transformer-config:{config_hash}"
    assert np.array_equal(render(loaded.pipe), image)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_bfl_single_file_transformer_loads_to_the_same_image(
    saved_folder: Path, bfl_file: Path, image: np.ndarray, tmp_path: Path, prefix: str
) -> None:
    path = bfl_file
    if prefix:
        # A full ComfyUI checkpoint: transformer under a prefix, VAE keys beside it.
        from safetensors.torch import load_file

        tensors = {prefix + k: v for k, v in load_file(bfl_file).items()}
        tensors["first_stage_model.decoder.conv_in.weight"] = torch.zeros(2, 2)
        path = tmp_path / "full-checkpoint.safetensors"
        save_file(tensors, path)
    loaded = load_pipeline(ModelSpec(model=str(saved_folder), transformer_file=path, device="cpu"))
    assert loaded.model_id.endswith("+transformer:" + hashlib.sha256(path.read_bytes()).hexdigest())
    assert loaded.model_id.startswith(str(saved_folder.resolve()))
    assert np.array_equal(render(loaded.pipe), image)


def test_diffusers_named_single_file_onto_tiny(
    pipe: Any, image: np.ndarray, tmp_path: Path
) -> None:
    path = tmp_path / "diffusion_pytorch_model.safetensors"
    save_file({k: v.contiguous() for k, v in pipe.transformer.state_dict().items()}, path)
    loaded = load_pipeline(ModelSpec(model="tiny", transformer_file=path))
    assert loaded.model_id.startswith("tiny:seed0+transformer:")
    assert loaded.pipe.transformer is not pipe.transformer
    assert np.array_equal(render(loaded.pipe), image)


def test_converter_matches_diffusers_own_at_flux1_dev_width() -> None:
    import diffusers
    from diffusers.loaders import single_file_utils

    # Untyped library functions: called through Any.
    flux_cls: Any = diffusers.FluxTransformer2DModel
    theirs_convert: Any = single_file_utils.convert_flux_transformer_checkpoint_to_diffusers
    with torch.device("meta"):
        model = flux_cls.from_config(shipped_transformer_config(True))
    meta = model.state_dict()
    # Real row counts, one column, distinct values: enough to tell any mix-up apart.
    offset = 0
    fake: dict[str, torch.Tensor] = {}
    for key, t in to_bfl(meta).items():
        fake[key] = torch.arange(offset, offset + t.shape[0], dtype=torch.float64).reshape(-1, 1)
        offset += t.shape[0]
    ours = convert_transformer_checkpoint(fake, {k: v.shape[0] for k, v in meta.items()}, "fake")
    theirs = theirs_convert(dict(fake))
    assert ours.keys() == theirs.keys() == meta.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key


def test_shipped_configs_are_flux1_dev_and_schnell() -> None:
    dev, schnell = shipped_transformer_config(True), shipped_transformer_config(False)
    assert dev["guidance_embeds"] is True and schnell["guidance_embeds"] is False
    assert {k: v for k, v in dev.items() if k != "guidance_embeds"} == {
        k: v for k, v in schnell.items() if k != "guidance_embeds"
    }
    assert dev["_class_name"] == "FluxTransformer2DModel"
    assert (dev["num_layers"], dev["num_single_layers"]) == (19, 38)
    assert (dev["attention_head_dim"], dev["num_attention_heads"]) == (128, 24)
    assert (dev["joint_attention_dim"], dev["pooled_projection_dim"]) == (4096, 768)
    assert (dev["in_channels"], dev["patch_size"], dev["axes_dims_rope"]) == (64, 1, [16, 56, 56])


def test_folder_without_transformer_uses_shipped_config(
    saved_folder: Path, bfl_file: Path, tmp_path: Path
) -> None:
    # Only the shipped FLUX.1 widths are left to build from; a tiny file does not fit them.
    folder = tmp_path / "no-transformer"
    folder.mkdir()
    (folder / "model_index.json").write_text((saved_folder / "model_index.json").read_text())
    with pytest.raises(UsageError, match=r"rows, the model expects \d+") as err:
        load_pipeline(ModelSpec(model=str(folder), transformer_file=bfl_file))
    assert str(bfl_file) in str(err.value)


# --- errors --------------------------------------------------------------------
def test_missing_folder_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "FLUX.1-dev"
    with pytest.raises(UsageError, match="model folder not found") as err:
        load_pipeline(ModelSpec(model=str(missing)))
    assert str(missing) in str(err.value)
    assert "\n" not in str(err.value)


def test_folder_that_is_not_a_pipeline(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"no model_index\.json"):
        load_pipeline(ModelSpec(model=str(tmp_path)))
    (tmp_path / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline"})
    )
    with pytest.raises(UsageError, match="StableDiffusionXLPipeline"):
        load_pipeline(ModelSpec(model=str(tmp_path)))


def test_damaged_folder_is_an_unreadable_file_error(saved_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "damaged"
    shutil.copytree(saved_folder, folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UnreadableFileError, match="cannot load the diffusers pipeline") as err:
        load_pipeline(ModelSpec(model=str(folder)))
    assert str(folder) in str(err.value) and "\n" not in str(err.value)


def test_hub_failure_says_to_pass_a_local_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def offline(source: str, **kwargs: Any) -> Any:
        calls.append({"source": source, **kwargs})
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(loading.diffusers.FluxPipeline, "from_pretrained", offline)
    with pytest.raises(UsageError, match="could not be loaded from the Hugging Face Hub") as err:
        load_pipeline(ModelSpec(model="black-forest-labs/FLUX.1-dev"))
    assert "black-forest-labs/FLUX.1-dev" in str(err.value)
    assert "local diffusers folder" in str(err.value)
    assert calls[0]["source"] == "black-forest-labs/FLUX.1-dev"
    assert calls[0]["local_files_only"] is False and calls[0]["use_safetensors"] is True


def test_single_file_given_as_model(bfl_file: Path) -> None:
    with pytest.raises(UsageError, match="is a file, not a diffusers folder") as err:
        load_pipeline(ModelSpec(model=str(bfl_file)))
    assert "transformer file" in str(err.value)


@pytest.mark.parametrize("name", ["flux1-dev.ckpt", "flux1-dev.pt", "flux1-dev.bin"])
def test_pickle_checkpoints_are_refused_unread(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeFileError, match="pickle"):
        load_pipeline(ModelSpec(model="tiny", transformer_file=path))


def test_pickle_content_behind_a_safetensors_name_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "flux1-dev.safetensors"
    path.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    with pytest.raises(UnsafeFileError):
        load_pipeline(ModelSpec(model="tiny", transformer_file=path))


def test_missing_transformer_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="transformer file not found"):
        load_pipeline(ModelSpec(model="tiny", transformer_file=tmp_path / "nope.safetensors"))


def test_not_a_transformer_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "sdxl.safetensors"
    save_file({"down_blocks.0.resnets.0.conv1.weight": torch.zeros(4, 4)}, path)
    with pytest.raises(UsageError, match=r"not a FLUX\.1 transformer checkpoint"):
        load_pipeline(ModelSpec(model="tiny", transformer_file=path))


def test_incomplete_transformer_checkpoint(bfl_file: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    tensors = load_file(bfl_file)
    del tensors["single_blocks.37.linear2.weight"]
    path = tmp_path / "partial.safetensors"
    save_file(tensors, path)
    with pytest.raises(
        UsageError, match=r"lacks 1 weights.*single_transformer_blocks\.37\.proj_out"
    ):
        load_pipeline(ModelSpec(model="tiny", transformer_file=path))


# --- device, dtype, dependencies ------------------------------------------------
@pytest.fixture
def cpu_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loading, "_mps_available", lambda: False)
    yield


def test_auto_device_on_a_cpu_machine_is_cpu_fp32(cpu_only: None) -> None:
    assert resolve_device_dtype(None, None) == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype("cpu", "bf16") == (torch.device("cpu"), torch.bfloat16)
    assert resolve_device_dtype(None, "FP16") == (torch.device("cpu"), torch.float16)


def test_bad_device_and_dtype_are_usage_errors(cpu_only: None) -> None:
    with pytest.raises(UsageError, match="CUDA is not available"):
        resolve_device_dtype("cuda", None)
    with pytest.raises(UsageError, match="unknown device"):
        resolve_device_dtype("gpu0", None)
    with pytest.raises(UsageError, match="unknown dtype 'fp8'"):
        resolve_device_dtype("cpu", "fp8")
    with pytest.raises(UsageError, match="offload needs a GPU"):
        load_pipeline(ModelSpec(model="tiny", device="cpu", offload=True))


def test_require_render_names_the_missing_module(monkeypatch: pytest.MonkeyPatch) -> None:
    require_render()  # installed here
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(MissingDependencyError) as err:
        require_render()
    message = str(err.value)
    assert "diffusers" in message and "pip install 'lora-prune[render]'" in message
    assert "torch" in message and "\n" not in message
    assert err.value.exit_code == 5


def test_a_package_that_refuses_to_import_is_not_called_missing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.import_module

    def refusing(name: str, package: str | None = None) -> object:
        if name == "diffusers":
            # What diffusers 0.35 raises beside an older peft.
            raise ImportError("peft>=0.17.0 is required for a normal functioning of this module,\n"
                              " but found peft==0.15.0.")  # fmt: skip
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", refusing)
    with pytest.raises(MissingDependencyError) as err:
        require_render()
    message = str(err.value)
    assert "not installed" not in message and "\n" not in message
    assert "diffusers, which is installed but failed to import (peft>=0.17.0 is required" in message
    assert "found peft==0.15.0.)" in message and "pip check" in message
    assert err.value.exit_code == 5


def test_render_package_reexports_lazily() -> None:
    import lora_prune.render as render_pkg

    assert render_pkg.build_tiny_pipeline is build_tiny_pipeline
    assert render_pkg.load_pipeline is load_pipeline
    assert render_pkg.TINY_MODEL_ID == tiny.TINY_MODEL_ID == "tiny"
    with pytest.raises(AttributeError):
        _ = render_pkg.no_such_name


def test_a_cpu_session_renders_with_the_models_threads_and_gives_them_back(
    tiny_model: LoadedModel, planted: Path
) -> None:
    lora = read_lora(planted)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        # The tiny model's default: one thread (small matrices, and a busy machine).
        with open_session(ModelSpec(model="tiny"), lora, loaded=tiny_model):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with open_session(ModelSpec(model="tiny", threads=3), lora, loaded=tiny_model):
            assert torch.get_num_threads() == 3
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    with pytest.raises(UsageError, match=r"--threads 0 is not in 1\.\.1024"):
        ModelSpec(model="tiny", threads=0)
