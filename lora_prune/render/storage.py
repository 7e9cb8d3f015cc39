"""Keep a single-file FLUX.1 transformer in the precision it was stored in.

FLUX.1 transformers come as bf16/fp16/fp32 safetensors, as fp8 (e4m3fn or
e5m2) safetensors, as ComfyUI's "scaled" fp8 safetensors, or as GGUF files.
Upcasting an fp8 file to the compute dtype doubles its memory (12 GB on disk,
24 GB in RAM), so its Linear weights stay fp8 here and are cast to the compute
dtype one layer at a time, inside that layer's forward (:class:`Fp8Linear`):
the same trade as diffusers' layerwise casting, with two differences that
matter for files that are fp8 already. diffusers' hook casts the whole module
back to the storage dtype after each forward, biases included, so a bf16 bias
of an fp8 file would lose bits; and its default skip patterns ("norm", ...)
would upcast the large adaLN modulation Linears (``norm1.linear``) for
precision that an fp8 file no longer has. Tensors other than Linear weights
(biases, norm scales) are small and are cast to the compute dtype.

Scaled fp8 (ComfyUI's legacy layout, read in ``comfy/utils.py``
``convert_old_quants``, ComfyUI commit 2ba5cc8b): a ``scaled_fp8`` marker
tensor (under the checkpoint's prefix, e.g. ``model.diffusion_model.scaled_fp8``;
its dtype is the weights' fp8 dtype), a ``<layer>.scale_weight`` tensor per
quantised Linear and sometimes ``<layer>.scale_input``. The real weight is
``weight_fp8.float() * scale_weight``; ``scale_input`` only serves fp8
activation matmuls (``torch._scaled_mm``), so a bf16 compute ignores it, as
ComfyUI's dequantising path does. The fp8 codes are kept and the scale is
applied in the per-layer cast, so a scaled file costs the same memory as a
plain fp8 one.

GGUF files (recognised by their ``GGUF`` magic) load through diffusers' GGUF
support, which needs the optional ``gguf`` package (``lora-prune[gguf]``).

The engine's LoRA hooks work unchanged on top: they read ``module.weight``
(here the de-scaled weight in the compute dtype) and add the LoRA delta to the
module's output. A GGUF Linear's ``weight`` is diffusers' ``GGUFParameter``, the
file's uint8 blocks: the engine reads its shape and values through
:func:`weight_shape` and :func:`dense_weight`, and its LoRA pieces take the
compute dtype.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import MissingDependencyError, UnreadableFileError, UsageError
from ..families.flux1.checkpoints import TransformerLayout, read_transformer
from ..families.flux1.keys import transformer_target
from ..safetensors_io import read_header
from .checkpoints import first_line, shipped_transformer_config

__all__ = [
    "GGUF_MAGIC",
    "SCALED_FP8_MARKER",
    "Fp8Linear",
    "TransformerStorage",
    "dense_weight",
    "inspect_transformer_file",
    "keep_fp8_storage",
    "load_gguf_transformer",
    "scale_targets",
    "split_scales",
    "stored_tensor",
    "weight_shape",
]

GGUF_MAGIC = b"GGUF"
SCALED_FP8_MARKER = "scaled_fp8"
_SCALE_WEIGHT = ".scale_weight"
_SCALE_INPUT = ".scale_input"
_FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_LOADABLE = frozenset({*_FP8, "BF16", "F16", "F32"})
_FP8_DTYPES = frozenset(_FP8.values())
_DTYPE_FIX = (
    "use a bf16, fp16, fp32 or fp8 (e4m3fn/e5m2, plain or ComfyUI-scaled) FLUX.1 transformer "
    ".safetensors, or a GGUF one"
)
_GGUF_FIX = "pip install 'lora-prune[gguf]'"


@dataclass(frozen=True)
class TransformerStorage:
    """How a transformer file stores its weights.

    ``format`` is ``"safetensors"`` or ``"gguf"``; ``dtypes`` the safetensors
    dtypes of its tensors (most bytes first, empty for GGUF); ``scaled`` says
    it is ComfyUI scaled fp8.
    """

    format: str
    dtypes: tuple[str, ...] = ()
    scaled: bool = False

    @property
    def fp8(self) -> bool:
        return any(d in _FP8 for d in self.dtypes)


def _is_marker(key: str) -> bool:
    return key == SCALED_FP8_MARKER or key.endswith("." + SCALED_FP8_MARKER)


def _is_scale(key: str) -> bool:
    return key.endswith((_SCALE_WEIGHT, _SCALE_INPUT))


def inspect_transformer_file(path: Path) -> TransformerStorage:
    """Sniff a transformer file: GGUF by its magic bytes, else a validated safetensors header.

    Raises :class:`UsageError` for a safetensors file with a tensor in a dtype
    that cannot be loaded (int8, fp64, fp8 variants other than e4m3fn/e5m2...),
    and the errors of :func:`read_header` for files that are neither.
    """
    try:
        with path.open("rb") as f:
            magic = f.read(len(GGUF_MAGIC))
    except OSError as exc:
        raise UnreadableFileError(
            f"cannot read transformer file ({exc})", path, "check the path"
        ) from exc
    if magic == GGUF_MAGIC:
        return TransformerStorage("gguf")
    header = read_header(path)  # refuses pickle, LFS pointers, HTML pages and truncated files
    sizes: dict[str, int] = {}
    scaled = False
    for name, info in header.tensors.items():
        if _is_marker(name):
            scaled = True
            continue
        scaled = scaled or name.endswith(_SCALE_WEIGHT)
        if info.dtype not in _LOADABLE:
            raise UsageError(
                f"transformer tensor {name!r} is stored as {info.dtype}, which cannot be loaded",
                path,
                _DTYPE_FIX,
            )
        sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
    dtypes = tuple(sorted(sizes, key=lambda d: -sizes[d]))
    return TransformerStorage("safetensors", dtypes, scaled)


def split_scales(keys: list[str], paths: list[str]) -> tuple[list[str], list[str], dict[str, str]]:
    """Separate a scaled-fp8 file's marker and scale tensors from its weights.

    ``keys`` are the file's keys, ``paths`` the same without the checkpoint
    prefix. Returns the weight keys, their paths, and ``{layer path: key}`` of
    the ``scale_weight`` tensors (``scale_input`` and the marker are dropped).
    """
    weight_keys: list[str] = []
    weight_paths: list[str] = []
    scales: dict[str, str] = {}
    for key, path in zip(keys, paths, strict=True):
        if _is_marker(path) or path.endswith(_SCALE_INPUT):
            continue
        if path.endswith(_SCALE_WEIGHT):
            scales[path[: -len(_SCALE_WEIGHT)]] = key
            continue
        weight_keys.append(key)
        weight_paths.append(path)
    return weight_keys, weight_paths, scales


def stored_tensor(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A file's tensor as it is kept in memory: fp8 as stored, anything else in ``dtype``."""
    return tensor if tensor.dtype in _FP8_DTYPES else tensor.to(dtype)


def scale_targets(
    scales: Mapping[str, torch.Tensor], source: str | Path
) -> dict[str, torch.Tensor]:
    """``{diffusers module name: scalar scale}`` from ``{layer path in any naming: scale}``.

    A layer the original code fuses has one scale for all its row parts, so
    every diffusers module it splits into gets that scale.
    """
    out: dict[str, torch.Tensor] = {}
    for layer, scale in scales.items():
        target = transformer_target(layer)
        if target is None:
            raise UsageError(
                f"scale tensor for {layer!r} names no FLUX.1 transformer layer",
                source,
                "use a FLUX.1 transformer checkpoint",
            )
        if scale.numel() != 1:
            raise UsageError(
                f"scale_weight of {layer!r} has {scale.numel()} values; only per-tensor scales "
                "are supported",
                source,
                _DTYPE_FIX,
            )
        for module in target.modules:
            out[module] = scale.detach().reshape(()).to(torch.float32)
    return out


class Fp8Linear(torch.nn.Linear):
    """A Linear whose weight is kept in fp8 and read in the compute dtype.

    ``stored_weight`` holds the file's fp8 codes (1 byte per value);
    ``weight_scale`` the per-tensor scale of a scaled-fp8 file (or 1). Reading
    ``weight`` gives the real weight in ``compute_dtype``, made for the call
    and dropped after it, so forward, LoRA hooks that look at the weight's
    dtype/device, and readers of its values all see the de-scaled weight.
    """

    def __init__(
        self,
        stored: torch.Tensor,
        bias: torch.Tensor | None,
        scale: torch.Tensor | None,
        compute_dtype: torch.dtype,
    ) -> None:
        torch.nn.Module.__init__(self)
        self.out_features, self.in_features = int(stored.shape[0]), int(stored.shape[1])
        self.compute_dtype = compute_dtype
        self.stored_weight = torch.nn.Parameter(stored, requires_grad=False)
        self.register_parameter(
            "bias", None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        )
        self.register_buffer(
            "weight_scale", None if scale is None else scale.to(stored.device, torch.float32)
        )

    @property
    def weight(self) -> torch.Tensor:  # type: ignore[override]  # read-only where nn.Linear has an attribute
        stored = self.stored_weight
        scale = self.weight_scale
        if scale is None:
            return stored.to(self.compute_dtype)  # exact: bf16/fp16/fp32 hold every fp8 value
        assert isinstance(scale, torch.Tensor)
        return (stored.to(torch.float32) * scale).to(self.compute_dtype)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(input.dtype)
        return F.linear(input, self.weight.to(input.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"stored={self.stored_weight.dtype}, compute={self.compute_dtype}, "
            f"scaled={self.weight_scale is not None}"
        )


def keep_fp8_storage(
    model: torch.nn.Module, scales: Mapping[str, torch.Tensor], compute_dtype: torch.dtype
) -> int:
    """Swap every Linear of ``model`` holding an fp8 weight for an :class:`Fp8Linear`.

    ``scales`` maps diffusers module names to scaled-fp8 scales. Other fp8
    tensors (norm scales) are upcast to ``compute_dtype``; a scale on a layer
    whose weight is not fp8 is folded into that weight. Returns the number of
    layers kept in fp8.
    """
    kept = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or isinstance(module, Fp8Linear):
            continue
        scale = scales.get(name)
        weight = module.weight
        if weight.dtype not in _FP8_DTYPES:
            if scale is not None:
                real = weight.detach().to(torch.float32) * scale
                module.weight = torch.nn.Parameter(real.to(weight.dtype), requires_grad=False)
            continue
        bias = None if module.bias is None else module.bias.detach().to(compute_dtype)
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, Fp8Linear(weight.detach(), bias, scale, compute_dtype))
        kept += 1
    for module in model.modules():
        if isinstance(module, Fp8Linear):
            continue
        for pname, param in list(module.named_parameters(recurse=False)):
            if param.dtype in _FP8_DTYPES:
                setattr(
                    module,
                    pname,
                    torch.nn.Parameter(param.detach().to(compute_dtype), requires_grad=False),
                )
    return kept


def weight_shape(weight: torch.Tensor) -> tuple[int, ...]:
    """A weight's shape in values: a GGUF-quantised one's tensor shape is that of its byte blocks."""
    shape = getattr(weight, "quant_shape", None)  # diffusers' GGUFParameter
    return tuple(int(s) for s in (weight.shape if shape is None else shape))


def dense_weight(weight: torch.Tensor) -> torch.Tensor:
    """A weight's values as float32 on the CPU, a GGUF-quantised one dequantised as diffusers does."""
    if hasattr(weight, "quant_type"):
        from diffusers.quantizers.gguf import utils

        gguf_utils: Any = utils  # untyped library
        weight = gguf_utils.dequantize_gguf_tensor(weight)
    return weight.detach().to(device="cpu", dtype=torch.float32)


def _require_gguf(path: Path) -> Any:
    try:
        return importlib.import_module("gguf")
    except ImportError as exc:
        raise MissingDependencyError(
            "loading a GGUF transformer needs the gguf package, which is not installed",
            path,
            _GGUF_FIX,
        ) from exc


def load_gguf_transformer(
    path: Path, base_config: Mapping[str, Any] | None, dtype: torch.dtype
) -> Any:
    """A GGUF FLUX.1 transformer loaded by diffusers' GGUF support, computing in ``dtype``.

    The weights stay quantised (diffusers' ``GGUFLinear`` dequantises per
    call). The config is the base folder's or the shipped FLUX.1-dev/schnell
    one, chosen by whether the file has a guidance embedder; nothing is
    downloaded. diffusers' FLUX single-file converter assumes FLUX.1's real
    width, so only real-width GGUF files load. Raises
    :class:`UsageError` for a file whose block counts differ from the config's.
    """
    gguf = _require_gguf(path)
    import diffusers as _diffusers

    diffusers: Any = _diffusers  # untyped library

    try:
        # GGUF lists shapes innermost first.
        shapes = {
            t.name: [int(d) for d in reversed(t.shape)] for t in gguf.GGUFReader(str(path)).tensors
        }
    except Exception as exc:  # gguf's parser errors at the file boundary
        raise UnreadableFileError(
            f"cannot read GGUF transformer ({type(exc).__name__}: {first_line(exc)})",
            path,
            "check that it is a complete FLUX.1 transformer .gguf",
        ) from exc
    layout = read_transformer(shapes)
    if not isinstance(layout, TransformerLayout):
        raise UsageError(
            layout or "not a FLUX.1 transformer",
            path,
            "use a FLUX.1-dev/schnell GGUF transformer (as made by city96's ComfyUI-GGUF tools)",
        )
    guidance = layout.variant == "dev"
    if base_config is not None:
        config = dict(base_config)
        config["guidance_embeds"] = guidance
    else:
        config = shipped_transformer_config(guidance)
    # diffusers leaves a config's blocks that the file lacks on the meta device
    # and then fails with "Cannot copy out of meta tensor"; say what is wrong.
    depth = (layout.doubles, layout.singles)
    expected = (config.get("num_layers"), config.get("num_single_layers"))
    if depth != expected:
        raise UsageError(
            f"GGUF transformer has {depth[0]} double and {depth[1]} single blocks, its config "
            f"{expected[0]} and {expected[1]}",
            path,
            "use a complete FLUX.1-dev/schnell GGUF transformer of the model folder's variant",
        )
    cls: Any = diffusers.FluxTransformer2DModel
    try:
        with tempfile.TemporaryDirectory() as folder:
            (Path(folder) / "config.json").write_text(json.dumps(config), encoding="utf-8")
            model = cls.from_single_file(
                str(path),
                config=folder,
                quantization_config=diffusers.GGUFQuantizationConfig(compute_dtype=dtype),
                torch_dtype=dtype,
                local_files_only=True,
            )
    except Exception as exc:  # diffusers/gguf errors at the load boundary
        raise UnreadableFileError(
            f"cannot load GGUF transformer ({type(exc).__name__}: {first_line(exc)})",
            path,
            "use a FLUX.1-dev/schnell GGUF transformer (as made by city96's ComfyUI-GGUF tools)",
        ) from exc
    model.eval()
    return model
