"""The forward hooks the render engine puts on diffusers modules, and what they share.

A :class:`Hook` holds the LoRA pieces that land on one diffusers module and adds
their delta to the module's output for the samples whose blocks are on. The
engine (:mod:`lora_prune.render.engine`) plans, reads and attaches the pieces;
:class:`Switches` is how it tells the hooks, call by call, what is on.

Two ways of switching. Eager hooks branch in Python: a block that is off in the
whole batch costs nothing, one on for some samples runs its matmuls for those
samples only. Masked hooks (a compiled transformer, ``BlockEngine(compile=True)``)
never branch on the selection: they always compute the delta and multiply it by
a per-sample scale read from one tensor, so switching blocks changes tensor
values, not the traced code, and ``torch.compile`` does not recompile.

Rank caps. An engine built ``truncatable`` holds each plain LoRA module in its
SVD basis (:func:`lora_prune.resize.rotated_factors`), so the first k
components are the rank-k file ``resize`` would write. A 0/1 mask over the
rank components, per sample (``Switches.rank_masks``), then renders several
ranks of one module in one batch: ``up @ (mask * (down @ x))``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
import torch.nn.functional as F

from ..settings import DEFAULT_STRENGTH

__all__ = [
    "LOHA_CHUNK",
    "Hook",
    "Kron",
    "Piece",
    "Selection",
    "Switches",
    "loha_linear",
    "norm_features",
    "normaliser",
    "swap_halves",
]


@dataclass
class Piece:
    """The part of one LoRA module that lands on one diffusers module.

    Linear targets: ``scale * up @ down`` (+ ``scale * up_bias``) for low-rank
    factors, ``dense`` (already scaled) for diff/replacements, ``bias``
    (unscaled, as ComfyUI adds ``diff_b``). Norm targets: ``norm`` is the change of
    the norm's weight, applied to the normalised input. A replacement
    (``set_weight``) is stored as its difference to the model's weight, so
    strength s moves the weight s of the way to the replacement.

    LoHa and LoKr stay factored, so a piece holds about what the file stores
    (a dense delta of FLUX.1's largest single-block layer is 66 M values): ``hada``
    (w1a, w1b, w2a, w2b, rows already cut to this target) is expanded to
    ``scale * (w1a @ w1b) * (w2a @ w2b)`` only inside the forward, a few rows
    at a time; ``lokr`` is applied through the Kronecker identity, see :class:`Kron`.
    """

    stem: str
    scale: float = 1.0
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    norm: torch.Tensor | None = None
    hada: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    lokr: Kron | None = None

    def tensors(self) -> list[str]:
        """The names of the plain tensor fields that are set (not ``hada``/``lokr``)."""
        return [
            n
            for n in ("down", "up", "up_bias", "dense", "bias", "norm")
            if getattr(self, n) is not None
        ]

    def held(self) -> list[torch.Tensor]:
        """Every tensor the piece holds, factors included (shared ones may repeat)."""
        held = [getattr(self, n) for n in self.tensors()]
        if self.hada is not None:
            held.extend(self.hada)
        if self.lokr is not None:
            held.extend(self.lokr.factors())
        return held

    def moved(self, move: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Replace every held tensor by ``move(tensor)`` (a device change)."""
        for name in self.tensors():
            setattr(self, name, move(getattr(self, name)))
        if self.hada is not None:
            w1a, w1b, w2a, w2b = (move(t) for t in self.hada)
            self.hada = (w1a, w1b, w2a, w2b)
        if self.lokr is not None:
            self.lokr.moved(move)


#: Most elements of a LoHa delta built at once in a forward (16 MiB in float32).
LOHA_CHUNK = 1 << 22


def loha_linear(
    x: torch.Tensor,
    factors: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    scale: float,
) -> torch.Tensor:
    """``x @ (scale * (w1a @ w1b) * (w2a @ w2b)).T``, the delta built a block of rows at a time.

    The full delta of FLUX.1's largest single-block layer is 252 MiB in float32; building it
    in row blocks of at most :data:`LOHA_CHUNK` elements, used and freed at once,
    keeps the forward's extra memory bounded whatever the layer's size.
    """
    w1a, w1b, w2a, w2b = factors
    rows, cols = int(w1a.shape[0]), int(w1b.shape[1])
    step = max(1, LOHA_CHUNK // max(cols, 1))
    parts = []
    for lo in range(0, rows, step):
        hi = min(rows, lo + step)
        delta = (w1a[lo:hi] @ w1b) * (w2a[lo:hi] @ w2b)
        parts.append(F.linear(x, delta))
    out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
    return out * scale


@dataclass
class Kron:
    """A LoKr delta ``kron(w1, w2)`` applied without forming it, restricted to some rows.

    For ``w1`` ``[a, b]`` and ``w2`` ``[c, d]`` the delta is ``[a*c, b*d]`` with
    ``W[i*c + k, j*d + l] = w1[i, j] * w2[k, l]``, so ``W @ x`` is
    ``w1 @ X @ w2.T`` with ``X = x.reshape(b, d)``, flattened row-major: two
    small matmuls instead of one of ``a*c*b*d`` weights. Either factor may be a
    low-rank pair (``w1 = w1 @ w1_b``), kept factored. A fused module's row
    slice is no Kronecker product of slices, but rows ``lo:hi`` of ``W`` only
    need rows ``lo // c .. (hi - 1) // c`` of ``w1``: ``ranges`` lists the
    row ranges of ``W`` (in the LoRA's row order) this target takes, in
    order, so a row split and the final layer's swapped halves cost no dense
    delta either. The factors are shared by every target of one module.
    """

    w1: torch.Tensor
    w2: torch.Tensor
    ranges: tuple[tuple[int, int], ...]
    w1_b: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None

    def factors(self) -> list[torch.Tensor]:
        return [t for t in (self.w1, self.w1_b, self.w2, self.w2_b) if t is not None]

    def moved(self, move: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.w1, self.w2 = move(self.w1), move(self.w2)
        self.w1_b = None if self.w1_b is None else move(self.w1_b)
        self.w2_b = None if self.w2_b is None else move(self.w2_b)

    def apply(self, x: torch.Tensor, scale: float) -> torch.Tensor:
        """``x @ W[rows].T * scale`` for ``x`` of shape ``[..., b*d]``."""
        c = int(self.w2.shape[0])
        b = int(self.w1.shape[1] if self.w1_b is None else self.w1_b.shape[1])
        d = int(self.w2.shape[1] if self.w2_b is None else self.w2_b.shape[1])
        lead = x.shape[:-1]
        xs = x.reshape(-1, b, d)
        # X @ w2.T first: [n, b, c], shared by every row range.
        z = xs @ self.w2_b.T @ self.w2.T if self.w2_b is not None else xs @ self.w2.T
        if self.w1_b is not None:
            z = self.w1_b @ z  # [n, rank1, c]
        parts = []
        for lo, hi in self.ranges:
            first, last = lo // c, (hi - 1) // c + 1
            y = self.w1[first:last] @ z  # [n, last - first, c]
            parts.append(y.reshape(y.shape[0], -1)[:, lo - first * c : hi - first * c])
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)
        return out.reshape(*lead, -1) * scale


Selection: TypeAlias = "torch.Tensor | None"  # sample indices, or None = every sample of the batch


@dataclass
class Switches:
    """What the running pipeline call has switched on: the engine sets it, its hooks read it.

    Eager hooks read ``selection`` (each active block to the samples it is on
    for) and ``strength``; ``batch`` is the batch size they must see (0 = not
    checked, outside a batch). Masked hooks read row ``rows[block]`` of ``mask``,
    a ``blocks x batch`` tensor of per-sample scales (strength folded in, 0 =
    off); ``off`` is the all-zero ``blocks x 1`` mask used outside a render.
    """

    selection: dict[str, Selection] = field(default_factory=dict)
    strength: float = DEFAULT_STRENGTH
    batch: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    mask: torch.Tensor | None = None
    off: torch.Tensor | None = None
    #: module stem -> ``batch x rank`` 0/1 mask of its rank components (absent: full rank)
    rank_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    #: the masks outside a render: compiled hooks always find one per truncatable stem
    rank_off: dict[str, torch.Tensor] = field(default_factory=dict)

    def reset(self) -> None:
        """Every block off, as outside :meth:`BlockEngine.render`."""
        self.selection, self.strength, self.batch = {}, 1.0, 0
        self.mask = self.off
        self.rank_masks = self.rank_off


class Hook:
    """The forward hook of one diffusers module: adds its pieces' delta for active samples."""

    def __init__(
        self,
        switches: Switches,
        block: str,
        kind: str,
        normalise: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> None:
        self.switches = switches
        self.block = block
        self.kind = kind
        self.normalise = normalise
        self.pieces: list[Piece] = []
        self.device: torch.device | None = None
        self.masked = False  # set by the engine on the hooks of a compiled transformer

    def _to_device(self, device: torch.device) -> None:
        # Model CPU offload moves modules at call time; the LoRA tensors follow the input.
        # One copy per tensor: a fused module's shared factors stay shared after the move.
        # (The original is kept in the map so that its id cannot be reused meanwhile.)
        copies: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

        def move(t: torch.Tensor) -> torch.Tensor:
            if id(t) not in copies:
                copies[id(t)] = (t, t.to(device))
            return copies[id(t)][1]

        for piece in self.pieces:
            piece.moved(move)
        self.device = device

    def delta(self, x: torch.Tensor, strength: float, index: Selection = None) -> torch.Tensor:
        """The pieces' delta for ``x``, the batch's samples ``index`` (None: all of them)."""
        total: torch.Tensor | None = None
        normed: torch.Tensor | None = None
        for p in self.pieces:
            parts: list[torch.Tensor] = []
            if p.down is not None and p.up is not None:
                # F.linear twice, then the scale: the op order of PEFT's LoRA layer.
                h = F.linear(x.to(p.down.dtype), p.down)
                ranks = self.switches.rank_masks.get(p.stem)
                if ranks is not None:
                    if index is not None:
                        ranks = ranks.index_select(0, index)
                    # (samples, rank) -> (samples, 1, ..., rank) for token and modulation inputs.
                    shape = (ranks.shape[0], *([1] * (h.dim() - 2)), ranks.shape[1])
                    h = h * ranks.reshape(shape).to(h.dtype)
                parts.append(F.linear(h, p.up, p.up_bias) * (p.scale * strength))
            if p.hada is not None:
                h = x.to(p.hada[0].dtype)
                parts.append(loha_linear(h, p.hada, p.scale * strength))
            if p.lokr is not None:
                parts.append(p.lokr.apply(x.to(p.lokr.w1.dtype), p.scale * strength))
            if p.dense is not None:
                parts.append(F.linear(x.to(p.dense.dtype), p.dense) * strength)
            if p.norm is not None:
                if normed is None:
                    assert self.normalise is not None
                    normed = self.normalise(x)
                parts.append(normed.to(p.norm.dtype) * p.norm * strength)
            if p.bias is not None:
                parts.append(p.bias * strength)
            for part in parts:
                total = part if total is None else total + part
        assert total is not None
        return total

    def _masked(self, x: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        mask = self.switches.mask
        assert mask is not None
        scale = mask[self.switches.rows[self.block]]
        delta = self.delta(x, 1.0)
        # (batch,) -> (batch, 1, ...): the same for 2-D modulation and 3-D token outputs.
        scale = scale.reshape(-1, *([1] * (delta.dim() - 1))).to(delta.dtype)
        return output + (delta * scale).to(output.dtype)

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        if not isinstance(output, torch.Tensor):
            return None
        x = args[0]
        if self.device != x.device:
            self._to_device(x.device)
        if self.masked:
            return self._masked(x, output)
        switches = self.switches
        selection = switches.selection
        if self.block not in selection:
            return None
        index = selection[self.block]
        if index is None:
            return output + self.delta(x, switches.strength).to(output.dtype)
        if output.shape[0] != switches.batch or x.shape[0] != switches.batch:
            raise RuntimeError(
                f"hook on a {self.block} module saw batch {output.shape[0]}, expected {switches.batch}"
            )
        delta = self.delta(x.index_select(0, index), switches.strength, index).to(output.dtype)
        # index_add on the batch dim works for 2-D modulation inputs and 3-D token inputs alike.
        return output.index_add(0, index, delta.expand(index.shape[0], *output.shape[1:]))


def normaliser(norm: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The weightless normalisation of a norm layer, or None for a type we do not know."""
    if isinstance(norm, torch.nn.RMSNorm):
        shape = list(norm.normalized_shape)
        eps = norm.eps
        return lambda x: F.rms_norm(x, shape, None, eps)
    if isinstance(norm, torch.nn.LayerNorm):
        shape = list(norm.normalized_shape)
        eps_ln = norm.eps
        return lambda x: F.layer_norm(x, shape, None, None, eps_ln)
    eps_attr = getattr(norm, "eps", None)
    if type(norm).__name__ == "RMSNorm" and isinstance(eps_attr, float):
        eps_d = eps_attr  # diffusers' own RMSNorm

        def rms(x: torch.Tensor) -> torch.Tensor:
            variance = x.to(torch.float32).pow(2).mean(-1, keepdim=True)
            return x * torch.rsqrt(variance + eps_d)

        return rms
    return None


def norm_features(norm: torch.nn.Module) -> int | None:
    """The features a norm layer normalises (its weight's length), or None."""
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor):
        return int(weight.shape[0])
    shape = getattr(norm, "normalized_shape", None)
    if isinstance(shape, tuple) and len(shape) == 1:
        return int(shape[0])
    return None


def swap_halves(t: torch.Tensor) -> torch.Tensor:
    # The original code's final modulation emits (shift, scale), diffusers' (scale, shift).
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
