"""Load the FLUX.1 pipeline a user names: ``tiny``, a local diffusers folder or a hub id.

A FLUX.1 transformer can also come as one ``.safetensors`` file in BFL/ComfyUI
naming (``double_blocks.N.img_attn.qkv.weight``...), the form most people have
on disk; the rest of the pipeline (VAE, text encoders, tokenizers, scheduler)
then comes from ``model``.

Single files are converted here rather than by diffusers' ``from_single_file``:
its FLUX converter hard-codes FLUX.1's width (3072) when splitting the fused
single-block ``linear1``, so it cannot load the tiny model, and it needs the
transformer config as a diffusers folder or a hub download. Our conversion
takes the module map from :mod:`lora_prune.keys` (the one home of BFL <->
diffusers names) and the row split sizes from the model itself, so it works
at any width; the config is the base folder's transformer config or, when the
folder has none, the shipped FLUX.1-dev/schnell config chosen by whether the
checkpoint has ``guidance_in`` weights.

Only safetensors are ever read: pickle checkpoints (``.ckpt``, ``.pt``,
``.bin``) are refused, and diffusers is told ``use_safetensors=True``. A
pipeline made entirely of ComfyUI single files is assembled in :mod:`.singlefile`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import diffusers as _diffusers
import torch

from ..errors import LoraPruneError, UnreadableFileError, UnsafeFileError, UsageError
from ..keys import is_guidance_path, transformer_target
from ..memoryplan import choose_plan
from ..pickles import is_pickle_name
from ..safetensors_io import file_sha256
from ..settings import ModelSpec
from .device import TINY_IDENTITY, TINY_SEED
from .device import _mps_available as _mps_available
from .device import resolve_device_dtype as resolve_device_dtype
from .storage import (
    TransformerStorage,
    inspect_transformer_file,
    keep_fp8_storage,
    load_gguf_transformer,
    scale_targets,
    split_scales,
    stored_tensor,
)
from .tiny import TINY_MODEL_ID, build_tiny_pipeline

# Partly typed library (untyped constructors and classmethods): used as Any.
diffusers: Any = _diffusers

__all__ = [
    "LoadedModel",
    "ModelSpec",
    "apply_memory_plan",
    "component_bytes",
    "convert_transformer_checkpoint",
    "load_pipeline",
    "resolve_device_dtype",
    "shipped_transformer_config",
]

# Full ComfyUI/A1111 checkpoints nest the transformer under one of these; the
# other prefixes (VAE, text encoders) are not ours to load.
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_PIPELINE_CLASS_RE = re.compile(r"Flux(?!2)\w*Pipeline")
_ALIGNMENT = 64  # bytes; what torch's CPU allocator guarantees
_FOLDER_FIX = (
    "give a FLUX.1 diffusers folder (model_index.json, transformer/, vae/, text_encoder/, "
    "text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/), a Hugging Face model id, or 'tiny'"
)


@dataclass
class LoadedModel:
    """A ready pipeline and the identity renders of it can be cached under.

    ``model_id`` changes whenever the weights that would render may change:
    ``tiny:seed0``; a folder's resolved path plus a hash of its transformer
    config; a hub id; each plus ``+transformer:<sha256>`` of a single file.
    Device and dtype are not part of it (they are fields of their own).
    """

    pipe: Any  # diffusers.FluxPipeline (untyped library)
    model_id: str
    device: torch.device
    dtype: torch.dtype


# ---------------------------------------------------------------------------
# Device and dtype


# ---------------------------------------------------------------------------
# Transformer checkpoints


def shipped_config(name: str) -> dict[str, Any]:
    """A FLUX.1 component config shipped in ``lora_prune/configs`` (a fresh copy)."""
    text = (resources.files("lora_prune") / "configs" / name).read_text(encoding="utf-8")
    config: dict[str, Any] = json.loads(text)
    return config


def shipped_transformer_config(guidance: bool) -> dict[str, Any]:
    """FLUX.1-dev's (``guidance=True``) or FLUX.1-schnell's transformer config."""
    return shipped_config(
        "flux1-dev-transformer.json" if guidance else "flux1-schnell-transformer.json"
    )


def _strip_prefix(keys: list[str]) -> tuple[str, list[str]]:
    """The wrapper prefix of a full checkpoint's transformer keys and those keys."""
    for prefix in _CHECKPOINT_PREFIXES:
        inner = [k for k in keys if k.startswith(prefix)]
        if inner:
            return prefix, inner
    return "", keys


def convert_transformer_checkpoint(
    tensors: Mapping[str, torch.Tensor], rows: Mapping[str, int], source: str | Path
) -> dict[str, torch.Tensor]:
    """Rename a FLUX.1 transformer state dict (BFL or diffusers naming) to diffusers'.

    ``rows`` maps every diffusers parameter name of the target model to its
    number of rows; fused BFL tensors (``qkv``, ``linear1``) are split by them,
    so any width converts. ``tensors`` keys carry no wrapper prefix. Raises
    :class:`UsageError` naming ``source`` for keys that are not FLUX.1
    transformer weights.
    """
    out: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        path, _, param = key.rpartition(".")
        target = transformer_target(path) if param in ("weight", "bias", "scale") and path else None
        if target is None:
            raise UsageError(
                f"not a FLUX.1 transformer checkpoint (unexpected key {key!r})",
                source,
                "pass a FLUX.1-dev/schnell transformer .safetensors (BFL, ComfyUI or diffusers naming)",
            )
        name = "weight" if param == "scale" else param  # BFL RMSNorm scale
        value = tensor
        if target.swap_halves:
            # BFL's final adaLN emits (shift, scale); diffusers' (scale, shift).
            shift, scale = value.chunk(2, dim=0)
            value = torch.cat([scale, shift], dim=0)
        names = [f"{m}.{name}" for m in target.modules]
        missing = [n for n in names if n not in rows]
        if missing:
            raise UsageError(
                f"checkpoint key {key!r} has no counterpart {missing[0]!r} in the model",
                source,
                "use a transformer checkpoint of the same FLUX.1 variant as the model folder",
            )
        sizes = [rows[n] for n in names]
        if sum(sizes) != value.shape[0]:
            raise UsageError(
                f"checkpoint tensor {key!r} has {value.shape[0]} rows, the model expects {sum(sizes)}",
                source,
                "use a transformer checkpoint of the same FLUX.1 variant as the model folder",
            )
        for n, part in zip(names, torch.split(value, sizes, dim=0), strict=True):
            if n in out:
                raise UsageError(
                    f"checkpoint sets {n!r} twice (key {key!r})",
                    source,
                    "use a checkpoint in one naming only",
                )
            out[n] = part
    return out


def _check_transformer_file(path: Path) -> TransformerStorage:
    if is_pickle_name(path):
        raise UnsafeFileError(
            f"{path.suffix} checkpoints hold pickle code; refusing to load it",
            path,
            "lora-prune never unpickles files: use the .safetensors version of this transformer",
        )
    if not path.exists():
        raise UsageError("transformer file not found", path, "check the path")
    # Refuses pickle, LFS pointers, HTML pages, truncated files and unloadable dtypes.
    return inspect_transformer_file(path)


def _load_transformer_file(
    path: Path, base_config: Mapping[str, Any] | None, dtype: torch.dtype
) -> tuple[Any, str]:
    """The transformer of a single file, on the CPU in ``dtype``, and the file's sha256."""
    from safetensors import safe_open

    if _check_transformer_file(path).format == "gguf":
        return load_gguf_transformer(path, base_config, dtype), file_sha256(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            prefix, keys = _strip_prefix(list(f.keys()))
            paths = [k[len(prefix) :] for k in keys]
            keys, paths, scale_keys = split_scales(keys, paths)
            scales = {layer: f.get_tensor(k) for layer, k in scale_keys.items()}
            guidance = any(is_guidance_path(p) for p in paths)
            if base_config is not None:
                config = dict(base_config)
                config["guidance_embeds"] = guidance  # a dev file may replace a schnell one
            else:
                config = shipped_transformer_config(guidance)
            # Built without memory, then the checkpoint's tensors are assigned in:
            # a real FLUX.1 transformer must not exist twice in RAM.
            with torch.device("meta"):
                model = diffusers.FluxTransformer2DModel.from_config(config)
            rows = {n: p.shape[0] for n, p in model.state_dict().items()}
            shapes = {n: tuple(p.shape) for n, p in model.state_dict().items()}
            # Cast one tensor at a time so that a file in another dtype is never
            # held twice in memory; fp8 stays fp8 (storage.keep_fp8_storage).
            tensors = {
                p: stored_tensor(f.get_tensor(k), dtype) for k, p in zip(keys, paths, strict=True)
            }
    except LoraPruneError:
        raise
    except Exception as exc:  # safetensors/torch errors at the file boundary
        raise UnreadableFileError(
            f"cannot read transformer checkpoint ({type(exc).__name__}: {_first_line(exc)})",
            path,
            "check that it is a complete FLUX.1 transformer .safetensors",
        ) from exc
    converted = convert_transformer_checkpoint(tensors, rows, path)
    missing = sorted(set(shapes) - set(converted))
    if missing:
        raise UsageError(
            f"transformer checkpoint lacks {len(missing)} weights (first: {missing[0]!r})",
            path,
            "use a complete FLUX.1 transformer checkpoint of the model folder's variant",
        )
    for name, tensor in converted.items():
        if tuple(tensor.shape) != shapes[name]:
            raise UsageError(
                f"transformer checkpoint weight {name!r} has shape {list(tensor.shape)}, "
                f"the model expects {list(shapes[name])}",
                path,
                "use a transformer checkpoint of the same FLUX.1 variant as the model folder",
            )
        if not tensor.is_contiguous() or tensor.data_ptr() % _ALIGNMENT:
            # safetensors hands out tensors at the file's byte offsets; kernels take
            # other code paths on unaligned data and the image changes in the last
            # bit, so the same weights would render differently by file layout.
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        converted[name] = tensor
    model.load_state_dict(converted, strict=True, assign=True)
    keep_fp8_storage(model, scale_targets(scales, path), dtype)
    model.eval()
    return model, file_sha256(path)


# ---------------------------------------------------------------------------
# Pipelines


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _folder_config(folder: Path) -> Path:
    index = folder / "model_index.json"
    if not index.is_file():
        raise UsageError(
            "not a diffusers pipeline folder (no model_index.json)", folder, _FOLDER_FIX
        )
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError, AttributeError) as exc:
        raise UnreadableFileError(
            f"cannot read model_index.json ({_first_line(exc)})", index, "download the model again"
        ) from exc
    if not isinstance(class_name, str) or not _PIPELINE_CLASS_RE.fullmatch(class_name):
        raise UsageError(
            f"not a FLUX.1 pipeline (model_index.json names {class_name!r})", folder, _FOLDER_FIX
        )
    return index


@contextlib.contextmanager
def _progress_bars(show: bool) -> Iterator[None]:
    """Turn diffusers' and transformers' loading bars off unless asked, then restore them."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    libraries = (diffusers_logging, transformers_logging)
    before = [lib.is_progress_bar_enabled() for lib in libraries]
    for lib in libraries:
        if show:
            lib.enable_progress_bar()
        else:
            lib.disable_progress_bar()
    try:
        yield
    finally:
        for lib, was in zip(libraries, before, strict=True):
            if was:
                lib.enable_progress_bar()
            else:
                lib.disable_progress_bar()


def _from_pretrained(source: str, dtype: torch.dtype, local: bool, **components: Any) -> Any:
    try:
        with warnings.catch_warnings():
            # Newer diffusers renamed torch_dtype to dtype; older releases know only torch_dtype.
            warnings.filterwarnings("ignore", message=".*torch_dtype.*", category=FutureWarning)
            return diffusers.FluxPipeline.from_pretrained(
                source,
                torch_dtype=dtype,
                local_files_only=local,
                use_safetensors=True,
                **components,
            )
    except Exception as exc:  # diffusers/transformers/hub errors at the load boundary
        detail = f"{type(exc).__name__}: {_first_line(exc)}"
        if local:
            raise UnreadableFileError(
                f"cannot load the diffusers pipeline ({detail})", source, _FOLDER_FIX
            ) from exc
        raise UsageError(
            f"no such local folder, and the model could not be loaded from the Hugging Face Hub "
            f"({detail})",
            source,
            "download it (huggingface-cli download) and pass the local diffusers folder",
        ) from exc


@dataclass(frozen=True)
class _Base:
    """Where the non-transformer components come from."""

    identity: str
    transformer_config: Mapping[str, Any] | None
    pipe: Any = None  # built already (tiny), else loaded from ``source``
    source: str = ""
    local: bool = True


def _resolve_base(spec: ModelSpec, dtype: torch.dtype) -> _Base:
    if spec.model == TINY_MODEL_ID:
        pipe = build_tiny_pipeline(TINY_SEED, dtype)
        return _Base(TINY_IDENTITY, dict(pipe.transformer.config), pipe=pipe)
    folder = Path(spec.model).expanduser()
    if folder.exists():
        if not folder.is_dir():
            fix = (
                "pass a single-file transformer as the transformer file and a diffusers folder "
                "as the model"
                if folder.suffix == ".safetensors"
                else _FOLDER_FIX
            )
            raise UsageError("model is a file, not a diffusers folder", folder, fix)
        folder = folder.resolve()
        _folder_config(folder)
        config_file = folder / "transformer" / "config.json"
        if not config_file.is_file():
            # A folder without transformer/ is fine when a single file supplies it.
            return _Base(str(folder), None, source=str(folder))
        raw = config_file.read_bytes()
        try:
            config = json.loads(raw)
        except ValueError as exc:
            raise UnreadableFileError(
                f"cannot parse transformer config ({_first_line(exc)})",
                config_file,
                "download the model again",
            ) from exc
        # Only the config is hashed: hashing 24 GB of weights on every load is too
        # slow, so weights replaced in place under the same config keep the same id.
        identity = f"{folder}@transformer-config:{hashlib.sha256(raw).hexdigest()[:16]}"
        return _Base(identity, config, source=str(folder))
    if _HUB_ID_RE.fullmatch(spec.model) and not spec.model.startswith("."):
        return _Base(spec.model, None, source=spec.model, local=False)
    raise UsageError("model folder not found", spec.model, _FOLDER_FIX)


def load_pipeline(spec: ModelSpec, *, show_progress: bool = False) -> LoadedModel:
    """Load (or build) the pipeline ``spec`` names and place it on its device.

    ``show_progress`` lets diffusers/transformers draw their loading bars on
    stderr (off by default: the library does not print).
    """
    with _progress_bars(show_progress):
        return _load_pipeline(spec)


def _load_pipeline(spec: ModelSpec) -> LoadedModel:
    device, dtype = resolve_device_dtype(spec.device, spec.dtype)
    if spec.memory not in ("auto", "full") and device.type == "cpu":
        raise UsageError(
            f"CPU offload needs a GPU (--memory {spec.memory})",
            f"device {device}",
            "use --memory auto or full, or a cuda device",
        )
    if spec.uses_single_files:
        # Imported here: the single-file assembly builds on this module's loaders.
        from .singlefile import single_file_pipeline

        pipe, identity = single_file_pipeline(spec, dtype)
        pipe.set_progress_bar_config(disable=True)
        apply_memory_plan(pipe, spec.memory, device)
        return LoadedModel(pipe=pipe, model_id=identity, device=device, dtype=dtype)
    if spec.transformer_file is not None:
        # Refuse a bad file before spending minutes loading the rest.
        _check_transformer_file(Path(spec.transformer_file).expanduser())

    base = _resolve_base(spec, dtype)
    identity = base.identity
    transformer = None
    if spec.transformer_file is not None:
        path = Path(spec.transformer_file).expanduser()
        transformer, digest = _load_transformer_file(path, base.transformer_config, dtype)
        identity += f"+transformer:{digest}"
    pipe = base.pipe
    if pipe is None:
        components = {} if transformer is None else {"transformer": transformer}
        pipe = _from_pretrained(base.source, dtype, base.local, **components)
    elif transformer is not None:
        # register_modules, not attribute assignment, keeps the pipeline's config in sync.
        pipe.register_modules(transformer=transformer)

    pipe.set_progress_bar_config(disable=True)  # the library never prints
    apply_memory_plan(pipe, spec.memory, device)
    return LoadedModel(pipe=pipe, model_id=identity, device=device, dtype=dtype)


# ---------------------------------------------------------------------------
# Memory plans


def component_bytes(pipe: Any) -> dict[str, int]:
    """Bytes of each model component's parameters and buffers, as loaded."""
    names = {
        "transformer": "transformer",
        "clip": "text_encoder",
        "t5": "text_encoder_2",
        "vae": "vae",
    }
    out: dict[str, int] = {}
    for kind, attr in names.items():
        module = getattr(pipe, attr, None)
        if module is not None:
            tensors = [*module.parameters(), *module.buffers()]
            out[kind] = sum(t.numel() * t.element_size() for t in tensors)
    return out


def apply_memory_plan(pipe: Any, memory: str, device: torch.device) -> str:
    """Place ``pipe`` on ``device`` by ``memory`` (``auto`` resolved here); returns the plan used."""
    plan = memory
    if memory == "auto":
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
        plan = choose_plan(free, component_bytes(pipe)).plan
    if plan == "full":
        pipe.to(device)
    elif plan == "offload":
        pipe.enable_model_cpu_offload(device=device)
    elif plan == "group-offload":
        # One transformer block at a time, prefetched on a side stream (CUDA only).
        pipe.enable_group_offload(
            onload_device=device,
            offload_type="block_level",
            num_blocks_per_group=1,
            use_stream=device.type == "cuda",
        )
    else:
        pipe.enable_sequential_cpu_offload(device=device)
    return plan


# ---------------------------------------------------------------------------
# Every component from single files (ComfyUI layout)
