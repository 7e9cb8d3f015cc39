"""Tests for lora_prune.pictures: colour maps, heatmap scaling, tiles, sheets, chart, PNG output."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lora_prune.errors import OutputError, UsageError
from lora_prune.metrics import diff_map
from lora_prune.pictures import (
    COLORMAPS,
    _nice_step,
    colorize,
    colour_scale,
    contact_sheet,
    global_vmax,
    heatmap_overlay,
    label_tile,
    save_png,
    side_by_side,
)


def _gradient(h: int = 64, w: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([xx * 4 % 256, yy * 4 % 256, (xx + yy) * 2 % 256], -1).astype(np.uint8)


def _blue_dominant(px: np.ndarray) -> bool:
    return bool(px[2] > px[0] and px[2] > px[1])


def _red_dominant(px: np.ndarray) -> bool:
    return bool(px[0] > px[1] and px[0] > px[2])


# --- colour maps -------------------------------------------------------------


def test_colormaps_are_lookup_tables() -> None:
    assert {"jet", "inferno", "gray"} <= set(COLORMAPS)
    for table in COLORMAPS.values():
        assert table.shape == (256, 3)
        assert table.dtype == np.uint8
    jet = COLORMAPS["jet"]
    assert _blue_dominant(jet[0]) and _red_dominant(jet[255])
    assert list(COLORMAPS["gray"][0]) == [0, 0, 0]
    assert list(COLORMAPS["gray"][255]) == [255, 255, 255]
    inferno = COLORMAPS["inferno"].astype(int)
    assert inferno[0].sum() < 30 and inferno[255].sum() > 600  # dark -> bright


def test_colorize_endpoints_and_clipping() -> None:
    diff = np.array([[0.0, 50.0, 100.0, 400.0]], np.float32)
    out = colorize(diff, vmax=100.0)
    assert out.shape == (1, 4, 3) and out.dtype == np.uint8
    assert _blue_dominant(out[0, 0])
    assert _red_dominant(out[0, 2])
    assert np.array_equal(out[0, 3], out[0, 2])  # above vmax clips to the red end
    assert np.array_equal(out[0, 1], COLORMAPS["jet"][128])


def test_colorize_nonpositive_vmax_is_all_low_end() -> None:
    diff = np.array([[0.0, 5.0], [1000.0, 3.0]], np.float32)
    for vmax in (0.0, -1.0):
        out = colorize(diff, vmax)
        assert np.array_equal(out, np.broadcast_to(COLORMAPS["jet"][0], (2, 2, 3)))


def test_colorize_unknown_cmap_is_usage_error() -> None:
    with pytest.raises(UsageError, match="viridis"):
        colorize(np.zeros((2, 2), np.float32), 1.0, cmap="viridis")


def _grey(img: np.ndarray) -> np.ndarray:
    luma = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    return np.repeat((0.75 * luma)[..., None], 3, axis=-1)


def test_heatmap_overlay_colours_only_what_changed() -> None:
    img = _gradient(8, 8)
    diff = np.zeros((8, 8), np.float32)
    diff[:, 4:] = 10.0  # the right half changed by vmax, the left half not at all
    diff[0, 0] = 2.5  # a quarter of vmax: half the weight (the square root)
    grey = _grey(img)
    shown = heatmap_overlay(img, diff, 10.0, opacity=0.6).astype(np.float64)
    colours = colorize(diff, 10.0).astype(np.float64)
    # Unchanged pixels: the render in grey, untinted by the map's low end.
    assert np.array_equal(shown[1:, :4], np.rint(grey[1:, :4]))
    assert np.allclose(shown[:, 4:], np.rint(0.4 * grey[:, 4:] + 0.6 * colours[:, 4:]), atol=0.5)
    assert np.allclose(shown[0, 0], np.rint(0.7 * grey[0, 0] + 0.3 * colours[0, 0]), atol=0.5)
    # opacity 1 paints a full change in the map's colour; opacity 0 and vmax 0 show grey only.
    full = heatmap_overlay(img, diff, 10.0, opacity=1.0)
    assert np.array_equal(full[:, 4:], colorize(diff, 10.0)[:, 4:])
    assert np.array_equal(heatmap_overlay(img, diff, 10.0, opacity=0.0), np.rint(grey))
    assert np.array_equal(heatmap_overlay(img, diff, 0.0), np.rint(grey))
    with pytest.raises(ValueError):
        heatmap_overlay(img, np.zeros((4, 4), np.float32), 1.0)


def test_colour_scale_has_round_ticks_and_the_maps_ends() -> None:
    strip = colour_scale("jet", 1664.0, label="heatmap", width=600)
    arr = np.asarray(strip)
    low, high = COLORMAPS["jet"][0], COLORMAPS["jet"][255]
    bar_rows = [r for r in range(arr.shape[0]) if (arr[r, 6] == low).all()]
    assert len(bar_rows) >= 10  # the ramp runs from the map's low end (left) ...
    assert all((arr[r, 600 - 7] == high).all() for r in bar_rows)  # ... to its high end
    assert _nice_step(1664.0, 4) == 500.0 and _nice_step(0.18, 4) == 0.05
    assert _nice_step(100.0, 4) == 25.0


# --- scaling -----------------------------------------------------------------


def test_global_scale_keeps_weak_map_blue_per_image_does_not() -> None:
    rng = np.random.default_rng(0)
    img = _gradient(32, 32)
    strong = rng.uniform(0, 10000, (32, 32)).astype(np.float32)
    weak = rng.uniform(0, 100, (32, 32)).astype(np.float32)
    vmax = global_vmax([strong, weak])
    assert vmax > 5000

    hot = np.unravel_index(np.argmax(weak), weak.shape)
    shared = colorize(weak, vmax)
    own = colorize(weak, float(weak.max()))
    assert _blue_dominant(shared[hot])
    assert _red_dominant(own[hot])
    assert not np.array_equal(
        heatmap_overlay(img, weak, vmax), heatmap_overlay(img, weak, float(weak.max()))
    )


def test_global_vmax_equals_numpy_percentile_on_render_diffs() -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    maps = []
    for k in range(5):
        other = np.clip(base + rng.normal(0, 5 + 10 * k, base.shape), 0, 255).astype(np.uint8)
        maps.append(diff_map(base, other))
    pooled = np.concatenate([m.ravel().astype(np.float64) for m in maps])
    for p in (50.0, 99.5, 100.0):
        # float32 maps hold s/3 to ~1e-7 relative; global_vmax returns the exact s/3.
        expected = float(np.percentile(pooled, p))
        assert global_vmax(iter(maps), p) == pytest.approx(expected, rel=1e-6)


def test_global_vmax_ignores_a_single_hot_pixel() -> None:
    maps = [np.full((32, 32), 4.0, np.float32) for _ in range(3)]
    maps[1][5, 5] = 60000.0
    assert global_vmax(maps) == pytest.approx(4.0)


def test_global_vmax_falls_back_to_max_and_zero() -> None:
    sparse = np.zeros((32, 32), np.float32)
    sparse[3, 4] = 500.0
    assert global_vmax([sparse]) == pytest.approx(500.0)
    assert global_vmax([np.zeros((8, 8), np.float32)]) == 0.0
    assert global_vmax([]) == 0.0
    with pytest.raises(ValueError):
        global_vmax([sparse], percentile=101.0)


# --- tiles -------------------------------------------------------------------


def test_label_tile_size_and_image_region() -> None:
    img = _gradient()
    tile = label_tile(img, "double.7", scale=3)
    arr = np.asarray(tile)
    assert tile.width == 192
    assert tile.height > 192
    upscaled = img.repeat(3, axis=0).repeat(3, axis=1)
    assert np.array_equal(arr[:192], upscaled)

    caption = arr[192:]
    assert len(np.unique(caption.reshape(-1, 3), axis=0)) > 2  # text was drawn


def test_label_tile_caption_height_is_fixed_and_bottom_drawn() -> None:
    img = _gradient()
    plain = label_tile(img, "double.7", scale=3)
    with_bottom = label_tile(img, "double.7", bottom="SSIM 0.981", scale=3)
    assert plain.size == with_bottom.size
    assert not np.array_equal(np.asarray(plain)[192:], np.asarray(with_bottom)[192:])


def test_label_tile_top_right_box() -> None:
    img = _gradient()
    tile = np.asarray(label_tile(img, "double.7", top_right="MSE 123.4", scale=3))
    upscaled = img.repeat(3, axis=0).repeat(3, axis=1)
    corner = (slice(0, 12), slice(192 - 12, 192))
    assert not np.array_equal(tile[corner], upscaled[corner])
    # The box is dark: the corner got darker on average.
    assert tile[corner].astype(int).sum() < upscaled[corner].astype(int).sum()
    # The rest of the image is untouched.
    assert np.array_equal(tile[100:192, :100], upscaled[100:192, :100])
    assert np.array_equal(tile[0:12, 0:40], upscaled[0:12, 0:40])


def test_label_tile_rejects_bad_scale() -> None:
    with pytest.raises(ValueError):
        label_tile(_gradient(), "x", scale=0)


# --- sheets ------------------------------------------------------------------


def _tiles(n: int, w: int = 30, h: int = 40) -> list[Image.Image]:
    return [Image.new("RGB", (w, h), (10 * i % 256, 200, 50)) for i in range(n)]


def test_contact_sheet_dimensions() -> None:
    sheet = contact_sheet(_tiles(5), columns=2, gap=4)
    assert sheet.size == (2 * 30 + 3 * 4, 3 * 40 + 4 * 4)
    # Default columns: ceil(sqrt(10)) = 4 -> 3 rows.
    sheet = contact_sheet(_tiles(10), gap=4)
    assert sheet.size == (4 * 30 + 5 * 4, 3 * 40 + 4 * 4)
    # More columns than tiles collapse to one row.
    assert contact_sheet(_tiles(3), columns=8, gap=0).size == (90, 40)


def test_contact_sheet_places_tiles_in_order() -> None:
    tiles = _tiles(4)
    sheet = np.asarray(contact_sheet(tiles, columns=2, gap=4))
    assert tuple(sheet[4, 4]) == tiles[0].getpixel((0, 0))
    assert tuple(sheet[4, 4 + 34]) == tiles[1].getpixel((0, 0))
    assert tuple(sheet[4 + 44, 4]) == tiles[2].getpixel((0, 0))
    assert tuple(sheet[0, 0]) == (24, 24, 24)


def test_contact_sheet_header_adds_height() -> None:
    plain = contact_sheet(_tiles(4), columns=2)
    headed = contact_sheet(_tiles(4), columns=2, header="lora.safetensors seed 0")
    assert headed.width == plain.width
    assert headed.height > plain.height
    top = np.asarray(headed)[: headed.height - plain.height]
    assert len(np.unique(top.reshape(-1, 3), axis=0)) > 1


def test_contact_sheet_respects_max_pixels() -> None:
    tiles = _tiles(63, 192, 230)
    full = contact_sheet(tiles)
    assert full.width * full.height > 2_000_000
    small = contact_sheet(tiles, max_pixels=2_000_000, header="sweep")
    assert small.width * small.height <= 2_000_000
    assert small.width * small.height > 1_500_000  # shrunk no more than needed
    with pytest.raises(ValueError):
        contact_sheet(tiles, max_pixels=100)


def test_side_by_side_is_one_row() -> None:
    sheet = side_by_side(_tiles(4))
    assert sheet.size == (4 * 30 + 5 * 4, 40 + 2 * 4)


# --- influence chart ---------------------------------------------------------

# --- save_png ----------------------------------------------------------------


def test_save_png_round_trip_leaves_no_temp(tmp_path: Path) -> None:
    img = _gradient(16, 20)
    out = tmp_path / "sheet.png"
    save_png(img, out)
    with Image.open(out) as read:
        assert read.format == "PNG"
        assert np.array_equal(np.asarray(read.convert("RGB")), img)
    # Overwrite with a PIL image.
    save_png(Image.new("RGB", (5, 3), (1, 2, 3)), out)
    with Image.open(out) as read:
        assert read.size == (5, 3)
    assert os.listdir(tmp_path) == ["sheet.png"]


def test_save_png_missing_folder_is_output_error(tmp_path: Path) -> None:
    target = tmp_path / "nope" / "x.png"
    with pytest.raises(OutputError) as info:
        save_png(_gradient(4, 4), target)
    assert str(target) in str(info.value)
    assert info.value.exit_code == 6
    assert "\n" not in str(info.value)


def test_save_png_failed_write_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    # The PNG is encoded in memory first; a full disk shows when the bytes are flushed.
    monkeypatch.setattr("lora_prune.fileio.os.fsync", fail)
    with pytest.raises(OutputError, match="No space left"):
        save_png(_gradient(4, 4), tmp_path / "x.png")
    assert os.listdir(tmp_path) == []
