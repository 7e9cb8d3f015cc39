"""A FLUX.1 transformer from one checkpoint file (``--transformer`` or a ComfyUI single file).

A FLUX.1 transformer can come as one ``.safetensors`` file in BFL/ComfyUI
naming, the form most people have on disk, in diffusers naming, as fp8 or
scaled fp8 (kept so by :mod:`.storage`) or as GGUF (loaded by :mod:`.storage`
through diffusers).

Single files are converted here rather than by diffusers' ``from_single_file``:
its FLUX converter hard-codes FLUX.1's real width when splitting the fused
single-block projection, so it cannot load the tiny model, and it needs the
transformer config as a diffusers folder or a hub download. Our conversion
takes the module map from the family's key grammar (the one home of BFL <->
diffusers names, :mod:`lora_prune.families.flux1.keys`) and the row split sizes
from the model itself, so it works at any width; the config is the base
folder's transformer config or, when the folder has none, the shipped
FLUX.1-dev/schnell config chosen by whether the checkpoint has a guidance embedder. Pickle checkpoints (``.ckpt``, ``.pt``,
``.bin``) are refused.

:mod:`.loading` puts such a transformer into a diffusers pipeline, :mod:`.singlefile`
into one assembled from single files.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import diffusers as _diffusers
import torch

from ..errors import LoraPruneError, UnreadableFileError, UnsafeFileError, UsageError
from ..families.flux1.keys import is_guidance_path, transformer_target
from ..pickles import is_pickle_name
from ..safetensors_io import file_sha256
from .checkpoints import first_line, shipped_transformer_config, strip_prefix
from .storage import (
    TransformerStorage,
    inspect_transformer_file,
    keep_fp8_storage,
    load_gguf_transformer,
    scale_targets,
    split_scales,
    stored_tensor,
)

# Partly typed library (untyped constructors and classmethods): used as Any.
diffusers: Any = _diffusers

__all__ = ["check_transformer_file", "convert_transformer_checkpoint", "load_transformer_file"]

_ALIGNMENT = 64  # bytes; what torch's CPU allocator guarantees


def convert_transformer_checkpoint(
    tensors: Mapping[str, torch.Tensor], rows: Mapping[str, int], source: str | Path
) -> dict[str, torch.Tensor]:
    """Rename a FLUX.1 transformer state dict (BFL or diffusers naming) to diffusers'.

    ``rows`` maps every diffusers parameter name of the target model to its
    number of rows; fused BFL tensors are split by them,
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


def check_transformer_file(path: Path) -> TransformerStorage:
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


def load_transformer_file(
    path: Path, base_config: Mapping[str, Any] | None, dtype: torch.dtype
) -> tuple[Any, str]:
    """The transformer of a single file, on the CPU in ``dtype``, and the file's sha256."""
    from safetensors import safe_open

    if check_transformer_file(path).format == "gguf":
        return load_gguf_transformer(path, base_config, dtype), file_sha256(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            prefix, keys = strip_prefix(list(f.keys()))
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
            f"cannot read transformer checkpoint ({type(exc).__name__}: {first_line(exc)})",
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
