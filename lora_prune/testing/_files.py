"""The values, metadata and files of a synthetic LoRA.

Values are seeded normals, drawn per tensor from a seed derived from the key,
so a tensor's value does not depend on which other modules the file holds. A
block whose strength is 0 gets exactly zero "up" factors, so its weight delta is
exactly zero: :func:`planted_lora` uses that to plant influence in chosen blocks.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ..blocks import block_order
from ..families.flux1.geometry import TINY, FluxGeometry
from ..families.flux1.synth_grammars import (
    SynthModule,
    SynthSpec,
    adapter_of,
    check_spec,
    grammar_row,
)
from ..families.flux1.synth_modules import default_blocks, synth_modules
from ..safetensors_io import TensorEntry, encode_array, write_safetensors


def _factorization(n: int) -> tuple[int, int]:
    """``(m, n // m)`` with m the largest divisor not above sqrt(n), as LyCORIS splits LoKr dims."""
    m = math.isqrt(n)
    while n % m:
        m -= 1
    return m, n // m


def _rng(seed: int, key: str) -> np.random.Generator:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


Maker = Callable[[], npt.NDArray[np.float32]]


def _normal(
    seed: int,
    key: str,
    shape: tuple[int, ...],
    std: float,
    factor: float = 1.0,
    offset: float = 0.0,
) -> Maker:
    def make() -> npt.NDArray[np.float32]:
        if factor == 0.0:
            return np.full(shape, offset, dtype=np.float32)
        values = _rng(seed, key).standard_normal(shape, dtype=np.float32)
        values *= np.float32(std * factor)
        values += np.float32(offset)
        return values

    return make


def _constant(shape: tuple[int, ...], value: float) -> Maker:
    return lambda: np.full(shape, value, dtype=np.float32)


def _module_tensors(
    spec: SynthSpec, module: SynthModule, strength: float
) -> list[tuple[str, str, tuple[int, ...], Maker]]:
    """``(key, dtype, shape, values)`` of each tensor of one module."""
    r, fan_in, fan_out, seed = spec.rank, module.in_features, module.out_features, spec.seed
    alpha_dtype = "F32" if spec.dtype.startswith("F8") else spec.dtype
    down_std, up_std = 1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(r)
    out: list[tuple[str, str, tuple[int, ...], Maker]] = []
    for key in module.keys:
        role = key[len(module.stem) + 1 :]
        shape: tuple[int, ...]
        if role == "alpha":
            assert spec.alpha is not None
            out.append((key, alpha_dtype, (), _constant((), spec.alpha)))
            continue
        if role == "scale":
            # A norm's replacement scale: ones with a little noise, as trained RMSNorm scales.
            shape = (fan_out,)
            out.append((key, spec.dtype, shape, _normal(seed, key, shape, 0.1, offset=1.0)))
            continue
        factor = 1.0
        if role in ("lora_down.weight", "lora_A.weight", "lora_A.default.weight", "down.weight"):
            shape, std = (r, fan_in), down_std
        elif role in ("lora_up.weight", "lora_B.weight", "lora_B.default.weight", "up.weight"):
            shape, std, factor = (fan_out, r), up_std, strength
        elif role == "lora_B.bias":
            shape, std, factor = (fan_out,), up_std, strength
        elif role == "hada_w1_a":
            shape, std, factor = (fan_out, r), up_std, strength
        elif role == "hada_w2_a":
            shape, std = (fan_out, r), up_std
        elif role in ("hada_w1_b", "hada_w2_b"):
            shape, std = (r, fan_in), down_std
        elif role == "lokr_w1":
            (a, _b), (c, _d) = _factorization(fan_out), _factorization(fan_in)
            shape, std = (a, c), 1.0 / math.sqrt(c)
        elif role == "lokr_w2_a":
            shape, std, factor = (_factorization(fan_out)[1], r), up_std, strength
        elif role == "lokr_w2_b":
            d = _factorization(fan_in)[1]
            shape, std = (r, d), 1.0 / math.sqrt(d)
        elif role == "diff":
            shape, std, factor = (fan_out, fan_in), down_std, strength
        elif role == "diff_b":
            shape, std, factor = (fan_out,), down_std, strength
        else:  # pragma: no cover - the suffix tables above produce only these roles
            raise AssertionError(f"no values for role {role!r}")
        out.append((key, spec.dtype, shape, _normal(seed, key, shape, std, factor)))
    return out


# --- files -----------------------------------------------------------------------
def _strength(spec: SynthSpec, block: str) -> float:
    if spec.strength is None:
        return 1.0
    return float(spec.strength.get(block, 0.0))


def _plan(spec: SynthSpec) -> list[tuple[str, str, tuple[int, ...], Maker]]:
    return [
        tensor
        for module in synth_modules(spec)
        for tensor in _module_tensors(spec, module, _strength(spec, module.block))
    ]


def synth_tensors(spec: SynthSpec) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """Every tensor of the synthetic LoRA: key -> (dtype, shape, raw little-endian bytes)."""
    return {
        key: (dtype, shape, encode_array(make(), dtype)) for key, dtype, shape, make in _plan(spec)
    }


def _placeholder_hash(spec: SynthSpec) -> str:
    # Looks like the real thing, but is not the hash of this file: it goes stale, as after edits.
    return hashlib.sha256(f"lora-prune synth {spec.grammar} {spec.seed}".encode()).hexdigest()


def synth_metadata(spec: SynthSpec) -> dict[str, str]:
    """The ``__metadata__`` a producer of the grammar writes, then ``spec.metadata`` on top."""
    check_spec(spec)
    gr = grammar_row(spec.grammar)
    adapter = adapter_of(spec)
    meta: dict[str, str] = {}
    if gr.kohya_metadata:
        fake = _placeholder_hash(spec)
        meta.update(
            {
                "ss_network_module": "networks.lora_flux" if adapter == "lora" else "lycoris.kohya",
                "ss_network_dim": str(spec.rank),
                "ss_base_model_version": "flux1",
                "sshs_model_hash": fake,
                "sshs_legacy_hash": fake[:8],
                "modelspec.sai_model_spec": "1.0.0",
                "modelspec.architecture": (
                    "flux-1-dev/lora" if spec.geometry.guidance else "flux-1-schnell/lora"
                ),
                "modelspec.title": f"synthetic {spec.grammar} LoRA",
                "modelspec.hash_sha256": "0x" + fake,
            }
        )
        if spec.alpha is not None:
            meta["ss_network_alpha"] = _number(spec.alpha)
        if adapter != "lora":
            algo = "full" if adapter == "diff" else adapter
            meta["ss_network_args"] = json.dumps({"algo": algo})
    if gr.family == "diffusers" and gr.prefix == "transformer.":
        meta["format"] = "pt"
    if spec.alpha_in == "metadata" and spec.alpha is not None:
        meta["lora_adapter_metadata"] = json.dumps(_peft_config(spec), indent=2, sort_keys=True)
    if spec.metadata:
        meta.update(spec.metadata)
    return meta


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _peft_config(spec: SynthSpec) -> dict[str, Any]:
    """diffusers' packed PEFT config: each model's LoraConfig fields under its prefix.

    As ``LoraConfig.to_dict()`` writes them, the empty patterns included (diffusers
    0.35 fails on a config without ``rank_pattern``).
    """
    modules = synth_modules(spec)
    config: dict[str, Any] = {}
    for model, prefix in (("transformer", "transformer."), ("clip", "text_encoder.")):
        mine = [m for m in modules if (m.block == "clip") == (model == "clip")]
        if not mine:
            continue
        targets = sorted({_peft_target(m.stem, prefix) for m in mine})
        fields: dict[str, Any] = {
            "r": spec.rank,
            "lora_alpha": spec.alpha,
            "rank_pattern": {},
            "alpha_pattern": {},
            "target_modules": targets,
            "lora_dropout": 0.0,
            "bias": "none",
            "use_dora": False,
            "use_rslora": False,
            "init_lora_weights": True,
            "peft_type": "LORA",
        }
        name = "transformer" if model == "transformer" else "text_encoder"
        config.update({f"{name}.{k}": v for k, v in fields.items()})
    return config


def _peft_target(stem: str, prefix: str) -> str:
    """A module's name as users list it in ``target_modules`` (block index dropped)."""
    path = stem.removeprefix(prefix)
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1 :])
    return path


def _encoder(make: Maker, dtype: str) -> Callable[[], bytes]:
    return lambda: encode_array(make(), dtype)


def write_synth_lora(path: str | Path, spec: SynthSpec) -> Path:
    """Write the synthetic LoRA of ``spec`` to ``path`` (atomically); returns the path.

    Tensors are generated one at a time as the writer streams them, so a
    real-size file never sits in memory whole.
    """
    meta = synth_metadata(spec)
    entries = [
        TensorEntry(key, dtype, shape, _encoder(make, dtype))
        for key, dtype, shape, make in _plan(spec)
    ]
    return write_safetensors(Path(path), entries, meta or None)


def planted_lora(
    path: str | Path,
    planted: Mapping[str, float],
    *,
    grammar: str = "kohya",
    geometry: FluxGeometry = TINY,
    rank: int = 4,
    seed: int = 0,
    dtype: str = "F32",
) -> Path:
    """A LoRA with every default block present but only the ``planted`` ones non-zero.

    ``planted`` maps block -> strength; planted blocks outside the grammar's
    defaults (``input``, ``final``, ``clip``, ``t5``) are added.
    """
    blocks = _union(default_blocks(grammar, geometry), planted)
    spec = SynthSpec(
        grammar=grammar,
        geometry=geometry,
        blocks=blocks,
        rank=rank,
        seed=seed,
        dtype=dtype,
        strength=dict(planted),
    )
    return write_synth_lora(path, spec)


def _union(blocks: Iterable[str], more: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted({*blocks, *more}, key=block_order))
