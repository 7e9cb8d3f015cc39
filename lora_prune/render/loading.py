"""Load the FLUX.1 pipeline a user names: ``tiny``, a local diffusers folder or a hub id.

A FLUX.1 transformer can also come as one checkpoint file (``transformer_file``,
read by :mod:`.transformerfile`); the rest of the pipeline (VAE, text encoders,
tokenizers, scheduler) then comes from ``model``.

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
from pathlib import Path
from typing import Any

import diffusers as _diffusers
import torch

from ..errors import UnreadableFileError, UsageError
from ..memoryplan import choose_plan
from ..settings import ModelSpec
from .checkpoints import first_line, shipped_transformer_config
from .device import TINY_IDENTITY, TINY_SEED
from .device import _mps_available as _mps_available
from .device import resolve_device_dtype as resolve_device_dtype
from .singlefile import single_file_pipeline
from .tiny import TINY_MODEL_ID, build_tiny_pipeline
from .transformerfile import (
    check_transformer_file,
    convert_transformer_checkpoint,
    load_transformer_file,
)

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

_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_PIPELINE_CLASS_RE = re.compile(r"Flux(?!2)\w*Pipeline")
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
# Pipelines


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
            f"cannot read model_index.json ({first_line(exc)})", index, "download the model again"
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
        detail = f"{type(exc).__name__}: {first_line(exc)}"
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
                f"cannot parse transformer config ({first_line(exc)})",
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
        pipe, identity = single_file_pipeline(spec, dtype)
        pipe.set_progress_bar_config(disable=True)
        apply_memory_plan(pipe, spec.memory, device)
        return LoadedModel(pipe=pipe, model_id=identity, device=device, dtype=dtype)
    if spec.transformer_file is not None:
        # Refuse a bad file before spending minutes loading the rest.
        check_transformer_file(Path(spec.transformer_file).expanduser())

    base = _resolve_base(spec, dtype)
    identity = base.identity
    transformer = None
    if spec.transformer_file is not None:
        path = Path(spec.transformer_file).expanduser()
        transformer, digest = load_transformer_file(path, base.transformer_config, dtype)
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
