"""The adapter math rules: which roles make which adapter, factor shapes, the scale.

The one home of what LoRA, LoHa, LoKr and full-delta modules *are*, from the
tensor roles :mod:`lora_prune.keys` reads off key names: the role sets, the
adapter type of a module, its rank and ``alpha / rank`` scale, and the shape
rules its factors must satisfy (:func:`factor_problem`, :func:`factor_pairs`,
:func:`missing_factor`) before anyone reads a tensor. ``stats``, ``check`` and
the render engine (:func:`delta_io`, :func:`bias_rows`) all ask here, so a
hostile shape is refused the same way everywhere. Torch-free, header-only.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Protocol

from .safetensors_io import TensorInfo

__all__ = [
    "ALPHA_LIMIT",
    "APPLIED_ROLES",
    "FULL_ROLES",
    "LOHA_ROLES",
    "LOKR_ROLES",
    "LOW_RANK_ADAPTERS",
    "UNRENDERABLE_ROLES",
    "UNSUPPORTED_ROLES",
    "AdapterModule",
    "adapter_of",
    "alpha_problem",
    "bias_rows",
    "delta_io",
    "factor_pairs",
    "factor_problem",
    "missing_factor",
    "rank_of",
    "scale_of",
]

#: Roles of the low-rank families; they classify a module's adapter type.
LOHA_ROLES = frozenset({"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"})
LOKR_ROLES = frozenset(
    {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}
)
#: Full-size deltas (ComfyUI's diff/norm keys) and replacements (set_weight).
FULL_ROLES = frozenset({"diff", "diff_b", "w_norm", "b_norm", "set_weight"})
#: Adapters lora-prune reads but cannot apply (OFT/BOFT, GLoRA).
UNSUPPORTED_ROLES = frozenset(
    {"oft_blocks", "rescale", "glora_a1", "glora_a2", "glora_b1", "glora_b2"}
)
#: Adapter types that have a rank (and so an ``alpha / rank`` scale).
LOW_RANK_ADAPTERS = frozenset({"lora", "loha", "lokr"})
#: Roles whose tensors form a delta on a Linear layer and that a renderer applies.
APPLIED_ROLES = (
    frozenset({"down", "up", "up_bias", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"})
    | (LOKR_ROLES - {"lokr_t2"})
    | FULL_ROLES
)
#: Roles a renderer cannot apply on FLUX.1's Linear layers, with the adapter they mean.
UNRENDERABLE_ROLES: Mapping[str, str] = {
    "dora_scale": "DoRA (dora_scale)",
    "reshape_weight": "weight reshaping (reshape_weight)",
    "oft_blocks": "OFT/BOFT",
    "rescale": "OFT/BOFT",
    "glora_a1": "GLoRA",
    "glora_a2": "GLoRA",
    "glora_b1": "GLoRA",
    "glora_b2": "GLoRA",
    "mid": "Tucker LoCon (lora_mid) on a Linear layer",
    "hada_t1": "Tucker LoHa (hada_t1/hada_t2)",
    "hada_t2": "Tucker LoHa (hada_t1/hada_t2)",
    "lokr_t2": "Tucker LoKr (lokr_t2)",
}


class AdapterModule(Protocol):
    """What the rules need of a module: its tensors by role and its alpha."""

    @property
    def tensors(self) -> Mapping[str, TensorInfo]: ...

    @property
    def alpha(self) -> float | None: ...


def adapter_of(roles: Collection[str]) -> str:
    """``lora``, ``loha``, ``lokr``, ``full`` (diff/norm deltas), ``unsupported`` or ``empty``."""
    present = set(roles)
    if present & UNSUPPORTED_ROLES:
        return "unsupported"
    if present & LOHA_ROLES:
        return "loha"
    if present & LOKR_ROLES:
        return "lokr"
    if present & {"down", "up"}:
        return "lora"
    if present & FULL_ROLES:
        return "full"
    if "up_bias" in present:
        return "lora"
    return "empty"


def rank_of(tensors: Mapping[str, TensorInfo]) -> int | None:
    """The rank that alpha divides: lora down rows, LoHa w1b rows, LoKr factor rank."""
    # A scalar factor has no rank; factor_problem() reports it.
    for role in ("down", "hada_w1_b", "lokr_w2_b", "lokr_w1_b"):
        if role in tensors:
            shape = tensors[role].shape
            return shape[0] if shape else None
    return None


def scale_of(module: AdapterModule) -> float:
    """alpha / rank, or 1 where there is no alpha (ComfyUI's and kohya's rule).

    LoKr scales by alpha/rank only when one of its factors is low rank.
    """
    rank = rank_of(module.tensors)
    if module.alpha is None or not rank:
        return 1.0
    if adapter_of(module.tensors) == "lokr" and not (
        {"lokr_w1_b", "lokr_w2_b"} & set(module.tensors)
    ):
        return 1.0
    return module.alpha / rank


#: Largest |alpha| accepted. Real alphas are at most a few thousand; beyond this,
#: alpha / rank squared overflows float64 in the norms (1e300 did).
ALPHA_LIMIT = 1e6


def _matrix(info: TensorInfo, trailing: str = "none") -> str | None:
    """Why ``info`` is no usable factor matrix, or None.

    A factor is 2-D. ``trailing="ones"`` also takes the conv-shaped [out, r, 1, 1]
    kohya writes for Linear layers; ``"any"`` lets a down factor fold a kernel into
    its columns (its width then decides whether it fits a layer).
    """
    shape = info.shape
    if len(shape) < 2:
        return f"tensor {info.name!r} has shape {list(shape)}, a factor needs 2 dimensions"
    if 0 in shape:
        return f"tensor {info.name!r} has shape {list(shape)}, an empty factor"
    kernel = any(d != 1 for d in shape[2:])
    if (len(shape) > 2 and trailing == "none") or (trailing == "ones" and kernel):
        return (
            f"tensor {info.name!r} has shape {list(shape)}, a convolution kernel; "
            "FLUX.1 has only linear layers"
        )
    return None


def _cols(info: TensorInfo) -> tuple[int, ...]:
    return info.shape[1:]


def factor_problem(module: AdapterModule) -> str | None:
    """Why the module's factors cannot be multiplied, or None when they can.

    The one shape rule for low-rank factors: statistics, ``check`` and the render
    engine all ask it before they read a tensor, so a hostile shape (empty, scalar,
    4-D, mismatched) is refused the same way everywhere and no product is formed
    whose size the file does not bound.
    """
    t = module.tensors
    adapter = adapter_of(t)
    if adapter == "lora" and "down" in t and "up" in t:
        up, down = t["up"], t["down"]
        problem = _matrix(up, "ones") or _matrix(down, "any")
        if problem:
            return problem
        inner = down
        if "mid" in t:
            mid = t["mid"]
            problem = _matrix(mid, "ones")
            if problem:
                return problem
            if mid.shape[1] != down.shape[0]:
                return f"mid {list(mid.shape)} does not fit down {list(down.shape)}"
            inner = mid
        if up.shape[1] != inner.shape[0]:
            return f"up {list(up.shape)} and down {list(inner.shape)} share no rank"
    elif adapter == "loha":
        roles = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
        missing = [r for r in roles if r not in t]
        if missing:
            return f"LoHa factors {', '.join(missing)} are missing"
        w1a, w1b, w2a, w2b = (t[r] for r in roles)
        problem = _matrix(w1a) or _matrix(w2a) or _matrix(w1b, "any") or _matrix(w2b, "any")
        if problem:
            return problem
        if w1a.shape[1] != w1b.shape[0] or w2a.shape[1] != w2b.shape[0]:
            return "LoHa factors share no rank"
        if w1a.shape[0] != w2a.shape[0] or _cols(w1b) != _cols(w2b):
            return (
                f"LoHa products {w1a.shape[0]}x{list(_cols(w1b))} and "
                f"{w2a.shape[0]}x{list(_cols(w2b))} differ in shape"
            )
    elif adapter == "lokr":
        for side in ("lokr_w1", "lokr_w2"):
            if side in t:
                problem = _matrix(t[side])
                if problem:
                    return problem
                continue
            a, b = t.get(f"{side}_a"), t.get(f"{side}_b")
            if a is None or b is None:
                return f"LoKr factor {side} is missing"
            problem = _matrix(a) or _matrix(b)
            if problem:
                return problem
            if a.shape[1] != b.shape[0]:
                return f"LoKr factors {side}_a and {side}_b share no rank"
    return None


def alpha_problem(module: AdapterModule) -> str | None:
    """Why the module's alpha is out of the range lora-prune computes with, or None.

    NaN and negative alphas are ``check``'s ``bad_alpha`` findings and give NaN
    norms elsewhere, as before; only magnitudes past :data:`ALPHA_LIMIT` are refused.
    """
    alpha = module.alpha
    if alpha is not None and not math.isnan(alpha) and abs(alpha) > ALPHA_LIMIT:
        return f"alpha {alpha!r} is beyond {ALPHA_LIMIT:g}"
    return None


def missing_factor(module: AdapterModule) -> tuple[str, str] | None:
    """(present, missing) for a LoRA module with only one of its down/up factors, else None.

    :func:`factor_problem` leaves such a module alone (its delta is just unknown,
    statistics count it as 0); ``check`` reports it and a renderer refuses it.
    """
    t = module.tensors
    if ("down" in t) == ("up" in t):
        return None
    return ("down", "up") if "down" in t else ("up", "down")


def factor_pairs(module: AdapterModule) -> list[tuple[str, str]]:
    """(left, right) roles of the module whose product chains, left.shape[1] == right.shape[0].

    As in dW = up @ (mid @) down; a Tucker LoCon's ``mid`` sits between up and down.
    Only pairs whose both tensors exist are listed.
    """
    t = module.tensors
    chain = [("up", "mid"), ("mid", "down")] if "mid" in t else [("up", "down")]
    chain += [
        ("hada_w1_a", "hada_w1_b"),
        ("hada_w2_a", "hada_w2_b"),
        ("lokr_w1_a", "lokr_w1_b"),
        ("lokr_w2_a", "lokr_w2_b"),
    ]
    return [(a, b) for a, b in chain if a in t and b in t]


def _lokr_io(tensors: Mapping[str, TensorInfo], side: str) -> tuple[int, int]:
    if side in tensors:
        shape = tensors[side].shape
        return shape[1], shape[0]
    return tensors[f"{side}_b"].shape[1], tensors[f"{side}_a"].shape[0]


def delta_io(module: AdapterModule) -> tuple[int, int] | None:
    """(in, out) features of the module's weight delta, from the header shapes alone.

    For a module :func:`factor_problem` and :func:`missing_factor` pass: the
    target layer must then have exactly these in/out features. None for a
    bias-only module. -1 stands for a full delta that is not a matrix, which
    fits no Linear layer whatever its width.
    """
    t = module.tensors
    adapter = adapter_of(t)
    if adapter == "loha":
        return math.prod(t["hada_w1_b"].shape[1:]), t["hada_w1_a"].shape[0]
    if adapter == "lokr":
        (in1, out1), (in2, out2) = _lokr_io(t, "lokr_w1"), _lokr_io(t, "lokr_w2")
        return in1 * in2, out1 * out2
    if "down" in t and "up" in t:
        return math.prod(t["down"].shape[1:]), t["up"].shape[0]
    for role in ("diff", "w_norm", "set_weight"):
        if role in t:
            shape = t[role].shape
            return (shape[1], shape[0]) if len(shape) == 2 else (-1, shape[0] if shape else -1)
    return None


def bias_rows(module: AdapterModule) -> int | None:
    """Rows of the module's bias delta (the layer's out features), -1 if not a vector, or None."""
    for role in ("up_bias", "diff_b", "b_norm"):
        if role in module.tensors:
            shape = module.tensors[role].shape
            return shape[0] if len(shape) == 1 else -1
    return None
