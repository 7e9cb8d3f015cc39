"""Device, dtype and the cache identity of renders, without importing diffusers.

``analyze`` computes its cache keys from what is here before it knows whether
anything must render: a rerun whose images are all cached then never imports
diffusers or builds a pipeline (see :mod:`lora_prune.render.lazy`). Torch is
imported: the best device is what torch finds.
"""

from __future__ import annotations

import importlib.metadata

import torch

from .._version import __version__
from ..errors import UsageError
from ..settings import TINY_MODEL_ID, ModelSpec

#: The seed the tiny model's weights are drawn with, and the identity its renders are cached under.
TINY_SEED = 0
TINY_IDENTITY = f"tiny:seed{TINY_SEED}"

_DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _mps_supports_bf16() -> bool:
    # No capability query exists for MPS; bf16 needs macOS 14, so try it.
    try:
        torch.ones(1, dtype=torch.bfloat16, device="mps")
    except (RuntimeError, TypeError):
        return False
    return True


def resolve_device_dtype(device: str | None, dtype: str | None) -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype to render with; None means pick the best available."""
    if device is None:
        if torch.cuda.is_available():
            dev = torch.device("cuda")
        elif _mps_available():
            dev = torch.device("mps")
        else:
            dev = torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as exc:
            raise UsageError(
                f"unknown device {device!r}", "device", "use cpu, cuda, cuda:N or mps"
            ) from exc
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UsageError(
                "CUDA is not available to this torch",
                f"device {device}",
                "install a CUDA build of torch or use device cpu",
            )
        if dev.type == "mps" and not _mps_available():
            raise UsageError("MPS is not available", f"device {device}", "use device cpu")
        if dev.type not in ("cpu", "cuda", "mps"):
            raise UsageError(
                f"unsupported device type {dev.type!r}",
                f"device {device}",
                "use cpu, cuda, cuda:N or mps",
            )

    if dtype is None:
        if dev.type == "cuda":
            return dev, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if dev.type == "mps":
            return dev, torch.bfloat16 if _mps_supports_bf16() else torch.float16
        return dev, torch.float32
    key = dtype.lower()
    if key not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}", "dtype", "use fp32, bf16 or fp16")
    chosen = _DTYPES[key]
    if chosen == torch.bfloat16 and dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU has no bfloat16 support", f"dtype {dtype}", "use dtype fp16")
    return dev, chosen


def render_versions(device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """What renders depend on besides the model: part of every cache key."""
    return {
        "lora_prune": __version__,
        "torch": torch.__version__,
        # The installed distribution's version, which is diffusers.__version__, without importing it.
        "diffusers": importlib.metadata.version("diffusers"),
        "device": device.type,
        "dtype": str(dtype).removeprefix("torch."),
    }


def predicted_identity(spec: ModelSpec) -> tuple[str, dict[str, str]] | None:
    """The (model id, versions) a session on ``spec`` will have, when known without loading.

    Known for the tiny model; None for folders, hub ids and transformer files,
    whose identity is found while loading.
    """
    if spec.model != TINY_MODEL_ID or spec.transformer_file is not None or spec.uses_single_files:
        return None
    device, dtype = resolve_device_dtype(spec.device, spec.dtype)
    return TINY_IDENTITY, render_versions(device, dtype)
