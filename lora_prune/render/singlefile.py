"""A FLUX.1 pipeline assembled from single files, as ComfyUI keeps them.

``--comfy DIR`` (or ``--transformer/--clip/--t5/--vae FILE``) names one file per
component; :mod:`lora_prune.comfy` finds and identifies them. Here each is
loaded with the config shipped in ``lora_prune/configs`` (widths and depths read
from the file's shapes), fp8 and scaled-fp8 weights kept in fp8
(:mod:`.storage`), and the tokenizers read from ComfyUI's source tree or a
diffusers folder; nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import importlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import diffusers as _diffusers
import torch

from ..comfy import ComfyModels, find_models
from ..errors import UnreadableFileError, UsageError
from ..families.base import count_blocks
from ..families.flux1.checkpoints import TransformerLayout, read_transformer
from ..safetensors_io import SafetensorsHeader, file_sha256, read_header
from ..settings import ModelSpec
from .checkpoints import first_line, shipped_config, shipped_transformer_config
from .storage import keep_fp8_storage, split_scales, stored_tensor
from .tiny import TINY_TRANSFORMER_CONFIG
from .transformerfile import load_transformer_file

# Partly typed library (untyped constructors and classmethods): used as Any.
diffusers: Any = _diffusers

__all__ = ["single_file_pipeline"]


def _transformer_config(header: SafetensorsHeader) -> dict[str, Any]:
    """The transformer config with the widths and depths this file has."""
    layout = read_transformer(header.shapes)
    if not isinstance(layout, TransformerLayout) or layout.head is None:
        raise UsageError(
            "not a FLUX.1 transformer checkpoint (no input embedders or attention norms)",
            header.path,
            "pass a FLUX.1-dev/schnell transformer .safetensors",
        )
    config = layout.diffusers_config(shipped_transformer_config(layout.variant == "dev"))
    tiny_head = int(cast(int, TINY_TRANSFORMER_CONFIG["attention_head_dim"]))
    if layout.head == tiny_head:
        # lora-prune's own tiny model saved as a single file: its rotary split is its own.
        axes = [int(a) for a in cast(Sequence[int], TINY_TRANSFORMER_CONFIG["axes_dims_rope"])]
        config["axes_dims_rope"] = axes
    elif layout.head % 32:
        raise UsageError(
            f"attention head width {layout.head} is not a multiple of 32",
            header.path,
            "pass a FLUX.1 transformer (head width 128)",
        )
    return config


def _read_tensors(
    path: Path, dtype: torch.dtype, *, keep_fp8: bool = False
) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    cast = (lambda t: stored_tensor(t, dtype)) if keep_fp8 else (lambda t: t.to(dtype))
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            # One tensor at a time to the compute dtype: fp8 files are never held twice.
            return {k: cast(f.get_tensor(k)) for k in f.keys()}  # noqa: SIM118 (safe_open)
    except Exception as exc:  # safetensors/torch errors at the file boundary
        raise UnreadableFileError(
            f"cannot read ({type(exc).__name__}: {first_line(exc)})", path, "download it again"
        ) from exc


def _load_into(
    model: Any, tensors: dict[str, torch.Tensor], path: Path, what: str, *, assign: bool = False
) -> Any:
    expected = model.state_dict()
    wanted = {k: v for k, v in tensors.items() if k in expected}
    buffers = {"text_model.embeddings.position_ids", "embeddings.position_ids"}
    missing = sorted(set(expected) - set(wanted) - buffers)
    if missing:
        raise UsageError(
            f"{what} file lacks {len(missing)} weights (first: {missing[0]!r})",
            path,
            f"give a complete {what} file",
        )
    for name, tensor in wanted.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise UsageError(
                f"{what} weight {name!r} has shape {list(tensor.shape)}, expected {list(expected[name].shape)}",
                path,
                f"give a {what} file of FLUX.1's kind",
            )
    # assign=True keeps the file's tensors themselves (fp8 stays fp8) instead of
    # copying them into the model's compute-dtype parameters.
    model.load_state_dict(wanted, strict=False, assign=assign)
    return model.eval()


def _load_clip(path: Path, dtype: torch.dtype) -> Any:
    transformers: Any = importlib.import_module("transformers")

    header = read_header(path)
    t = header.shapes
    emb = t["text_model.embeddings.token_embedding.weight"]
    config = shipped_config("clip-l-text.json")
    config.pop("architectures", None)
    config.update(
        vocab_size=emb[0],
        hidden_size=emb[1],
        num_attention_heads=12 if emb[1] == 768 else max(1, emb[1] // 64),
        num_hidden_layers=count_blocks(list(t), "text_model.encoder.layers."),
        intermediate_size=t["text_model.encoder.layers.0.mlp.fc1.weight"][0],
        max_position_embeddings=t["text_model.embeddings.position_embedding.weight"][0],
    )
    model = transformers.CLIPTextModel(transformers.CLIPTextConfig(**config)).to(dtype)
    tensors = _read_tensors(path, dtype)
    # ComfyUI's files name the weights text_model.* (transformers 4's names);
    # transformers 5's CLIPTextModel has no such prefix.
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        tensors = {k.removeprefix("text_model."): v for k, v in tensors.items()}
    return _load_into(model, tensors, path, "CLIP-L")


def _load_t5(path: Path, dtype: torch.dtype) -> Any:
    transformers: Any = importlib.import_module("transformers")

    header = read_header(path)
    t = header.shapes
    shared = t.get("shared.weight") or t["encoder.embed_tokens.weight"]
    bias = t["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    config = shipped_config("t5-xxl-encoder.json")
    config.pop("architectures", None)
    config.update(
        vocab_size=shared[0],
        d_model=shared[1],
        num_heads=bias[1],
        relative_attention_num_buckets=bias[0],
        d_kv=t["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // bias[1],
        d_ff=t["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0],
        num_layers=count_blocks(list(t), "encoder.block."),
    )
    model = transformers.T5EncoderModel(transformers.T5Config(**config)).to(dtype)
    # An fp8 T5-XXL (t5xxl_fp8_e4m3fn, also ComfyUI's _scaled) keeps its Linear
    # weights in fp8 (~4.9 GB instead of ~9.5 GB in bf16), computing in ``dtype``.
    tensors = _read_tensors(path, dtype, keep_fp8=True)
    names = list(tensors)
    weights, _, scale_keys = split_scales(names, names)
    scales = {layer: tensors[key].to(torch.float32) for layer, key in scale_keys.items()}
    bad = next((layer for layer, s in scales.items() if s.numel() != 1), None)
    if bad is not None:
        raise UsageError(
            f"scaled-fp8 T5 layer {bad!r} has a scale of {scales[bad].numel()} values",
            path,
            "use a T5-XXL file with one scale per layer (ComfyUI's t5xxl_fp8_e4m3fn_scaled)",
        )
    tensors = {k: tensors[k] for k in weights}
    # The embedding is stored once, under either name; the model ties both.
    embedding = tensors.get("shared.weight", tensors.get("encoder.embed_tokens.weight"))
    if embedding is None:
        raise UsageError("T5 file has no token embedding", path, "give a complete T5-XXL file")
    tensors["shared.weight"] = tensors["encoder.embed_tokens.weight"] = embedding
    model = _load_into(model, tensors, path, "T5-XXL", assign=True)
    keep_fp8_storage(model, {k: v.reshape(()) for k, v in scales.items()}, dtype)
    return model


def _load_vae(path: Path, dtype: torch.dtype) -> Any:
    from diffusers.loaders import single_file_utils

    convert: Any = single_file_utils.convert_ldm_vae_checkpoint
    header = read_header(path)
    t = header.shapes
    ldm = not any(k.startswith("decoder.mid_block.") for k in t)
    level = "encoder.down.{}.block." if ldm else "encoder.down_blocks.{}.resnets."
    levels = count_blocks(list(t), "encoder.down." if ldm else "encoder.down_blocks.")
    channels = [t[level.format(i) + "0.conv1.weight"][0] for i in range(levels)]
    config = shipped_config("flux1-vae.json")
    config.update(
        latent_channels=t["decoder.conv_in.weight"][1],
        block_out_channels=channels,
        # GroupNorm's group count is not in the weights: FLUX's 32, or fewer where
        # the channels need it (lora-prune's tiny VAE has 8).
        norm_num_groups=math.gcd(32, *channels),
        layers_per_block=count_blocks(list(t), level.format(0)),
        down_block_types=config["down_block_types"][:1] * levels,
        up_block_types=config["up_block_types"][:1] * levels,
    )
    model = diffusers.AutoencoderKL.from_config(config).to(dtype)
    tensors = _read_tensors(path, dtype)
    if ldm:
        tensors = convert(tensors, config)
    return _load_into(model, tensors, path, "VAE")


def _tokenizer_objects(found: ComfyModels, where: str) -> tuple[Any, Any]:
    transformers: Any = importlib.import_module("transformers")

    tok = found.tokenizers
    if tok is None:
        raise UsageError(
            found.tokenizer_problem,
            where,
            "use a ComfyUI install (its comfy/sd1_tokenizer and comfy/text_encoders/t5_tokenizer) "
            "or give --model a diffusers FLUX.1 folder with tokenizer/ and tokenizer_2/",
        )
    # from_pretrained on the folder reads vocab.json/merges.txt (CLIP) and
    # tokenizer.json or spiece.model (T5) in transformers 4 and 5 alike (5's
    # constructors ignore vocab_file=). Bare files give no length limit, and
    # FluxPipeline pads CLIP to it: CLIP-L's 77 positions, T5 FLUX's 512.
    clip = transformers.CLIPTokenizer.from_pretrained(
        str(tok.clip_vocab.parent), local_files_only=True, model_max_length=77
    )
    t5 = transformers.T5TokenizerFast.from_pretrained(
        str(tok.t5.parent), local_files_only=True, model_max_length=512, extra_ids=0
    )
    return clip, t5


def single_file_pipeline(spec: ModelSpec, dtype: torch.dtype) -> tuple[Any, str]:
    """A FluxPipeline of single files (found in ``spec.comfy``, or given) and its identity."""
    folder = Path(spec.model).expanduser()
    found = find_models(
        spec.comfy,
        {
            "transformer": spec.transformer_file,
            "clip": spec.clip_file,
            "t5": spec.t5_file,
            "vae": spec.vae_file,
        },
        tokenizer_folder=folder if folder.is_dir() else None,
    )
    tokenizer, tokenizer_2 = _tokenizer_objects(found, str(spec.comfy or spec.model))
    parts = found.chosen
    t_path = parts["transformer"].path
    # A GGUF file carries no safetensors header: its config is the shipped
    # FLUX.1 one for its variant (load_gguf_transformer checks the block counts).
    config = (
        None if parts["transformer"].naming == "gguf" else _transformer_config(read_header(t_path))
    )
    transformer, digest = load_transformer_file(t_path, config, dtype)
    pipe = diffusers.FluxPipeline(
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler.from_config(
            shipped_config("flux1-scheduler.json")
        ),
        vae=_load_vae(parts["vae"].path, dtype),
        text_encoder=_load_clip(parts["clip"].path, dtype),
        tokenizer=tokenizer,
        text_encoder_2=_load_t5(parts["t5"].path, dtype),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    # Every weight file and tokenizer is hashed: any of them changes the images.
    hashed = [parts[k].path for k in ("clip", "t5", "vae")]
    assert found.tokenizers is not None  # checked by _tokenizer_objects
    hashed += [found.tokenizers.clip_vocab, found.tokenizers.clip_merges, found.tokenizers.t5]
    combined = hashlib.sha256(" ".join([digest, *(file_sha256(p) for p in hashed)]).encode())
    return pipe, f"single-files:{combined.hexdigest()[:32]}"
