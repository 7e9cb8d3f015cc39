"""Tests for lora_prune.metrics: MSE/SSIM/diff maps in 8-bit units and the small statistics."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
import pytest
from skimage.metrics import structural_similarity as _skimage_ssim

from lora_prune.metrics import Stat, diff_map, mean_std, mse, spearman, ssim

# skimage is unannotated; a typed handle keeps strict mypy quiet.
structural_similarity: Callable[..., Any] = _skimage_ssim


def _image(seed: int, h: int = 32, w: int = 32) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _smooth(h: int = 32, w: int = 32) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack(
        [xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), (xx + yy) % 256], -1
    ).astype(np.uint8)


def _noisy(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(img + rng.normal(0.0, sigma, img.shape), 0, 255).astype(np.uint8)


# --- mse ---------------------------------------------------------------------


def test_mse_black_vs_white_is_full_scale() -> None:
    black = np.zeros((8, 8, 3), np.uint8)
    white = np.full((8, 8, 3), 255, np.uint8)
    # uint8 subtraction would wrap; the result must be the exact 8-bit maximum.
    assert mse(black, white) == 65025.0
    assert mse(white, black) == 65025.0


def test_mse_one_channel_off_by_ten() -> None:
    a = np.full((4, 4, 3), 100, np.uint8)
    b = a.copy()
    b[2, 1, 1] = 110
    assert mse(a, b) == 100.0 / 48.0
    assert mse(a, a) == 0.0


def test_mse_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="shape"):
        mse(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5, 3), np.uint8))


# --- diff_map ----------------------------------------------------------------


def test_diff_map_units_and_mean_equal_mse() -> None:
    a = _image(1)
    b = _image(2)
    d = diff_map(a, b)
    assert d.dtype == np.float32
    assert d.shape == (32, 32)
    assert float(d.mean(dtype=np.float64)) == pytest.approx(mse(a, b), rel=1e-6)


def test_diff_map_pixel_value() -> None:
    a = np.zeros((2, 2, 3), np.uint8)
    b = a.copy()
    b[1, 0] = (3, 0, 6)
    d = diff_map(a, b)
    assert d[1, 0] == pytest.approx(15.0)  # (9 + 0 + 36) / 3
    assert d[0, 0] == 0.0 and d[0, 1] == 0.0 and d[1, 1] == 0.0


# --- ssim --------------------------------------------------------------------


def test_ssim_identical_is_exactly_one() -> None:
    img = _image(3)
    assert ssim(img, img.copy()) == 1.0


def test_ssim_decreases_with_noise() -> None:
    img = _smooth(48, 48)
    values = [ssim(img, _noisy(img, s)) for s in (3.0, 15.0, 60.0)]
    assert values[0] < 1.0
    assert values[0] > values[1] > values[2]
    assert values[2] < 0.5


def test_ssim_matches_skimage_on_regular_images() -> None:
    a = _smooth(40, 40)
    b = _noisy(a, 10.0)
    expected = structural_similarity(a, b, channel_axis=-1, data_range=255)
    assert ssim(a, b) == pytest.approx(float(expected), abs=1e-12)


@pytest.mark.parametrize(("side", "win"), [(16, 7), (8, 7), (6, 5), (5, 5), (4, 3), (3, 3)])
def test_ssim_small_images_use_largest_odd_window(side: int, win: int) -> None:
    a = _smooth(side, side)
    b = _noisy(a, 20.0, seed=side)
    expected = structural_similarity(a, b, channel_axis=-1, data_range=255, win_size=win)
    value = ssim(a, b)
    assert value == pytest.approx(float(expected), abs=1e-12)
    assert -1.0 <= value < 1.0


def test_ssim_non_square_small_image() -> None:
    a = _smooth(5, 12)
    b = _noisy(a, 20.0)
    expected = structural_similarity(a, b, channel_axis=-1, data_range=255, win_size=5)
    assert ssim(a, b) == pytest.approx(float(expected), abs=1e-12)


def test_ssim_rejects_too_small_and_mismatched() -> None:
    with pytest.raises(ValueError, match="too small"):
        ssim(_image(1, 2, 2), _image(2, 2, 2))
    with pytest.raises(ValueError, match="shape"):
        ssim(_image(1, 8, 8), _image(2, 8, 9))


# --- mean_std ----------------------------------------------------------------


def test_mean_std_population() -> None:
    stat = mean_std([1.0, 2.0, 3.0, 4.0])
    assert stat == Stat(mean=2.5, std=math.sqrt(1.25), n=4)


def test_mean_std_single_value_and_empty() -> None:
    assert mean_std([7.5]) == Stat(mean=7.5, std=0.0, n=1)
    with pytest.raises(ValueError):
        mean_std([])


# --- spearman ----------------------------------------------------------------


def test_spearman_hand_computed_with_ties() -> None:
    # x ranks with ties averaged: [1, 2.5, 2.5, 4]; y ranks [1, 2, 3, 4].
    # sum dx*dy = 4.5, sum dx^2 = 4.5, sum dy^2 = 5 -> 4.5 / sqrt(22.5)
    r = spearman([1.0, 2.0, 2.0, 3.0], [10.0, 20.0, 30.0, 40.0])
    assert r == pytest.approx(4.5 / math.sqrt(22.5), abs=1e-15)


def test_spearman_monotone_and_reversed() -> None:
    x = [0.1, 5.0, 2.0, 40.0, 3.0]
    assert spearman(x, [v**3 for v in x]) == 1.0
    assert spearman(x, [-v for v in x]) == -1.0


def test_spearman_matches_pandas_with_ties() -> None:
    rng = np.random.default_rng(7)
    x = rng.integers(0, 6, size=40).astype(float)
    y = x + rng.integers(0, 4, size=40)
    expected = pd.Series(x).corr(pd.Series(y), method="spearman")  # average ranks too
    assert spearman(list(x), list(y)) == pytest.approx(float(expected), abs=1e-12)


def test_spearman_undefined_cases() -> None:
    assert spearman([], []) is None
    assert spearman([1.0], [2.0]) is None
    assert spearman([3.0, 3.0, 3.0], [1.0, 2.0, 3.0]) is None
    assert spearman([1.0, 2.0, 3.0], [5.0, 5.0, 5.0]) is None


def test_spearman_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        spearman([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        spearman([1.0, float("nan")], [1.0, 2.0])
