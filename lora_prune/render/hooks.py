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
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias

import torch
import torch.nn.functional as F

__all__ = ["Hook", "Piece", "Selection", "Switches", "norm_features", "normaliser", "swap_halves"]


@dataclass
class Piece:
    """The part of one LoRA module that lands on one diffusers module.

    Linear targets: ``scale * up @ down`` (+ ``scale * up_bias``) for low-rank
    factors, ``dense`` (already scaled) for LoHa/LoKr/diff/replacements, ``bias``
    (unscaled, as ComfyUI adds ``diff_b``). Norm targets: ``norm`` is the change of
    the norm's weight, applied to the normalised input. A replacement
    (``set_weight``) is stored as its difference to the model's weight, so
    strength s moves the weight s of the way to the replacement.
    """

    stem: str
    scale: float = 1.0
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    dense: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    norm: torch.Tensor | None = None

    def tensors(self) -> list[str]:
        return [
            n
            for n in ("down", "up", "up_bias", "dense", "bias", "norm")
            if getattr(self, n) is not None
        ]


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
    strength: float = 1.0
    batch: int = 0
    rows: dict[str, int] = field(default_factory=dict)
    mask: torch.Tensor | None = None
    off: torch.Tensor | None = None

    def reset(self) -> None:
        """Every block off, as outside :meth:`BlockEngine.render`."""
        self.selection, self.strength, self.batch = {}, 1.0, 0
        self.mask = self.off


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
        for piece in self.pieces:
            for name in piece.tensors():
                setattr(piece, name, getattr(piece, name).to(device))
        self.device = device

    def delta(self, x: torch.Tensor, strength: float) -> torch.Tensor:
        total: torch.Tensor | None = None
        normed: torch.Tensor | None = None
        for p in self.pieces:
            parts: list[torch.Tensor] = []
            if p.down is not None and p.up is not None:
                h = x.to(p.down.dtype)
                # F.linear twice, then the scale: the op order of PEFT's LoRA layer.
                parts.append(F.linear(F.linear(h, p.down), p.up, p.up_bias) * (p.scale * strength))
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
        delta = self.delta(x.index_select(0, index), switches.strength).to(output.dtype)
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
    # BFL's final adaLN emits (shift, scale), diffusers' norm_out (scale, shift).
    first, second = t.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)
