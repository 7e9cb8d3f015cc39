"""Image and statistics metrics for comparing block renders.

Everything here works on 8-bit RGB renders (numpy ``uint8`` arrays, ``H x W x 3``)
and reports differences in the units users already know from the ComfyUI
workflows: squared 8-bit levels, 0..65025. Also the small statistics the
analysis report needs (mean/std over seeds, Spearman rank correlation between a
weight-space preview and rendered influence), written with numpy alone so the
core package does not depend on scipy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# skimage's default SSIM window; smaller renders get the largest odd window that fits.
_SSIM_WIN = 7
_SSIM_MIN_WIN = 3


def _check_pair(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.ndim != 3:
        raise ValueError(f"expected H x W x C images, got shape {a.shape}")


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean over all pixels and channels of ``(a - b)**2`` in 8-bit units (0..65025)."""
    _check_pair(a, b)
    # float64 so uint8 inputs neither wrap around nor lose precision on large images.
    d = a.astype(np.float64) - b.astype(np.float64)
    return float(np.mean(d * d))


def diff_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-pixel squared difference averaged over channels, ``float32 H x W``.

    Same units as :func:`mse`, so ``diff_map(a, b).mean()`` equals ``mse(a, b)``
    and heatmaps of different blocks can share one colour scale.
    """
    _check_pair(a, b)
    d = a.astype(np.float64) - b.astype(np.float64)
    return np.asarray(np.mean(d * d, axis=-1), dtype=np.float32)


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Structural similarity over the colour channels (``data_range=255``).

    Identical images give exactly 1.0. Images smaller than skimage's 7-pixel
    window use the largest odd window that fits (at least 3 pixels).
    """
    _check_pair(a, b)
    if np.array_equal(a, b):
        # skimage's float arithmetic can land a hair below 1; callers compare to 1.0.
        return 1.0
    side = min(a.shape[0], a.shape[1])
    if side < _SSIM_MIN_WIN:
        raise ValueError(f"images of {a.shape[0]}x{a.shape[1]} px are too small for SSIM")
    win = min(_SSIM_WIN, side if side % 2 == 1 else side - 1)
    # Imported here: skimage pulls in scipy.ndimage (~0.2 s), which inspect, slim and
    # check, sharing the CLI's imports, never need.
    from skimage.metrics import structural_similarity

    # skimage leaves the function unannotated; a typed handle keeps strict mypy quiet.
    compare: Callable[..., Any] = structural_similarity
    value = compare(a, b, channel_axis=-1, data_range=255, win_size=win)
    return float(value)


@dataclass(frozen=True)
class Stat:
    """Mean and population standard deviation of ``n`` values."""

    mean: float
    std: float
    n: int


def mean_std(values: Sequence[float]) -> Stat:
    """Mean and population std (``ddof=0``) of ``values``; one value gives std 0."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError("mean_std needs a non-empty sequence of numbers")
    return Stat(mean=float(arr.mean()), std=float(arr.std(ddof=0)), n=int(arr.size))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n; tied values share the mean of the ranks they span."""
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Start index of each run of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], values.size]
    run_rank = (starts + ends - 1) / 2.0 + 1.0
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman rank correlation with average ranks for ties.

    ``None`` when there are fewer than two points or either input is constant,
    where the correlation is undefined.
    """
    xa = np.asarray(x, dtype=np.float64)
    ya = np.asarray(y, dtype=np.float64)
    if xa.ndim != 1 or xa.shape != ya.shape:
        raise ValueError(
            f"spearman needs two sequences of equal length, got {xa.shape} and {ya.shape}"
        )
    if not (np.all(np.isfinite(xa)) and np.all(np.isfinite(ya))):
        raise ValueError("spearman needs finite values")
    if xa.size < 2:
        return None
    rx = _average_ranks(xa)
    ry = _average_ranks(ya)
    dx = rx - rx.mean()
    dy = ry - ry.mean()
    denom = float(np.sqrt(np.sum(dx * dx) * np.sum(dy * dy)))
    if denom == 0.0:
        return None
    # Clip away float round-off so a perfect correlation reads exactly +-1 at worst.
    return float(np.clip(np.sum(dx * dy) / denom, -1.0, 1.0))
