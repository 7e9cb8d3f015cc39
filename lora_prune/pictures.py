"""Pictures for ``analyze``, ``render`` and ``verify``: heatmaps, labelled tiles
and contact sheets, drawn with Pillow alone (the charts are in :mod:`.charts`).

Heatmaps share one colour scale across a sweep by default (:func:`global_vmax`):
every ComfyUI peer normalises each map on its own, so a block that barely changes
the image looks as hot as one that repaints it and maps cannot be compared.
Per-image scaling stays available by passing a map's own maximum to
:func:`colorize`.

Images are numpy ``uint8`` arrays ``H x W x 3`` (RGB) or ``PIL.Image.Image``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeAlias

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .errors import UsageError
from .fileio import atomic_write_bytes
from .metrics import diff_map
from .settings import COLORMAP_NAMES, DEFAULT_CMAP, DEFAULT_OPACITY

RGB: TypeAlias = tuple[int, int, int]
_Font: TypeAlias = "ImageFont.FreeTypeFont | ImageFont.ImageFont"

# ---------------------------------------------------------------------------
# Colour maps


def _lut(fn: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """256 x 3 uint8 table from a function of t in [0, 1] returning N x 3 floats in [0, 1]."""
    t = np.linspace(0.0, 1.0, 256)
    rgb = np.clip(fn(t), 0.0, 1.0)
    return np.asarray(np.rint(rgb * 255.0), dtype=np.uint8)


def _jet(t: np.ndarray) -> np.ndarray:
    # Classic piecewise-linear jet: dark blue -> cyan -> yellow -> dark red.
    return np.stack(
        [1.5 - np.abs(4.0 * t - 3.0), 1.5 - np.abs(4.0 * t - 2.0), 1.5 - np.abs(4.0 * t - 1.0)],
        axis=-1,
    )


def _poly(coeffs: Sequence[Sequence[float]]) -> Callable[[np.ndarray], np.ndarray]:
    """Per-channel polynomial; ``coeffs[i]`` holds the RGB coefficients of ``t**i``."""
    c = np.asarray(coeffs, dtype=np.float64)

    def fn(t: np.ndarray) -> np.ndarray:
        powers = np.stack([t**i for i in range(c.shape[0])], axis=-1)
        return np.asarray(powers @ c)

    return fn


# Google's published polynomial fit of Turbo (Mikhailov 2019).
_TURBO = _poly(
    [
        [0.13572138, 0.09140261, 0.10667330],
        [4.61539260, 2.19418839, 12.64194608],
        [-42.66032258, 4.84296658, -60.58204836],
        [132.13108234, -14.18503333, 110.36276771],
        [-152.94239396, 4.27729857, -89.90310912],
        [59.28637943, 2.82956604, 27.34824973],
    ]
)

# Polynomial fit of matplotlib's inferno (Matt Zucker's fit, max error ~1 level).
_INFERNO = _poly(
    [
        [0.0002189403691192265, 0.001651004631001012, -0.01948089843709184],
        [0.1065134194856116, 0.5639564367884091, 3.932712388889277],
        [11.60249308247187, -3.972853965665698, -15.9423941062914],
        [-41.70399613139459, 17.43639888205313, 44.35414519872813],
        [77.162935699427, -33.40235894210092, -81.80730925738993],
        [-71.31942824499214, 32.62606426397723, 73.20951985803202],
        [25.13112622477341, -12.24266895238567, -23.07032500287172],
    ]
)

_CURVES: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "jet": _jet,
    "turbo": _TURBO,
    "inferno": _INFERNO,
    "gray": lambda t: np.stack([t, t, t], axis=-1),
}

# The names a user may give are the settings' (they validate --cmap without Pillow);
# a name there without a curve here fails on import, not on first use.
COLORMAPS: dict[str, np.ndarray] = {name: _lut(_CURVES[name]) for name in COLORMAP_NAMES}
"""Colour maps as 256 x 3 uint8 lookup tables, index 0 = no change, 255 = most change."""


def _cmap_table(cmap: str) -> np.ndarray:
    try:
        return COLORMAPS[cmap]
    except KeyError:
        raise UsageError(
            f"unknown colour map {cmap!r}", "--cmap", f"use one of: {', '.join(COLORMAPS)}"
        ) from None


def colorize(diff: np.ndarray, vmax: float, cmap: str = DEFAULT_CMAP) -> np.ndarray:
    """Map an ``H x W`` difference map to ``H x W x 3`` uint8 colours.

    0 maps to the low end of ``cmap`` (blue for jet), values at or above ``vmax``
    to the high end (red). ``vmax <= 0`` colours everything as "no change".
    """
    table = _cmap_table(cmap)
    d = np.asarray(diff, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"expected an H x W difference map, got shape {d.shape}")
    if not vmax > 0.0:
        return np.broadcast_to(table[0], (*d.shape, 3)).copy()
    d = np.nan_to_num(d, nan=0.0, posinf=vmax, neginf=0.0)
    idx = np.rint(np.clip(d / vmax, 0.0, 1.0) * 255.0).astype(np.intp)
    return np.asarray(table[idx], dtype=np.uint8)


def heatmap_overlay(
    image: np.ndarray,
    diff: np.ndarray,
    vmax: float,
    opacity: float = DEFAULT_OPACITY,
    cmap: str = DEFAULT_CMAP,
) -> np.ndarray:
    """:func:`colorize` of ``diff`` over a dimmed grey copy of ``image``, as strong as the change.

    Each pixel's heatmap weight is ``opacity * sqrt(diff / vmax)`` (at most
    ``opacity``): where nothing changed the render shows in grey, untinted, and
    the strongest change is coloured at ``opacity``. The grey keeps the heat
    legible over a colourful render; a uniform blend would tint a block that
    changes nothing in the map's low colour. The square root keeps a change of
    a tenth of ``vmax`` visible (a third of the full weight).
    """
    img = _as_array(image)
    if diff.shape != img.shape[:2]:
        raise ValueError(f"diff map {diff.shape} does not match image {img.shape[:2]}")
    if not 0.0 <= opacity <= 1.0:
        raise ValueError(f"opacity must be within 0..1, got {opacity}")
    colours = colorize(diff, vmax, cmap).astype(np.float64)
    luma = img.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    grey = np.repeat((0.75 * luma)[..., None], 3, axis=-1)
    if vmax > 0.0:
        d = np.nan_to_num(np.asarray(diff, dtype=np.float64), nan=0.0, posinf=vmax, neginf=0.0)
        weight = opacity * np.sqrt(np.clip(d / vmax, 0.0, 1.0))[..., None]
    else:
        weight = np.zeros((*diff.shape, 1))
    blended = (1.0 - weight) * grey + weight * colours
    return np.asarray(np.clip(np.rint(blended), 0, 255), dtype=np.uint8)


# A diff_map of 8-bit RGB renders is a sum of three squared integers over 3, so a
# histogram with 3 bins per unit holds it exactly and keeps memory flat however many
# renders a sweep streams past (sd-webui-lora-block-weight's analyzer ran out of RAM).
_DIFF_MAX = 65025.0
_BINS_PER_UNIT = 3


def global_vmax(diffs: Iterable[np.ndarray], percentile: float = 99.5) -> float:
    """One colour-scale maximum for every heatmap of a sweep.

    The ``percentile`` of all values pooled over ``diffs`` (linear interpolation, as
    ``numpy.percentile``), so a single hot pixel does not wash out every map. Falls
    back to the maximum when the percentile is 0 but some pixel changed; 0.0 when
    nothing changed. Values are in :func:`~lora_prune.metrics.diff_map` units and
    clipped to 0..65025; off-grid values are rounded to 1/3 of a unit.
    """
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"percentile must be within 0..100, got {percentile}")
    nbins = int(_DIFF_MAX) * _BINS_PER_UNIT + 1
    counts = np.zeros(nbins, dtype=np.int64)
    peak = 0.0
    for diff in diffs:
        v = np.asarray(diff, dtype=np.float64).ravel()
        if v.size == 0:
            continue
        v = np.clip(np.nan_to_num(v, nan=0.0, posinf=_DIFF_MAX, neginf=0.0), 0.0, _DIFF_MAX)
        counts += np.bincount(np.rint(v * _BINS_PER_UNIT).astype(np.intp), minlength=nbins)
        peak = max(peak, float(v.max()))
    n = int(counts.sum())
    if n == 0:
        return 0.0
    cum = np.cumsum(counts)

    def kth(k: int) -> float:
        # k-th smallest pooled value, 0-based.
        return float(np.searchsorted(cum, k, side="right")) / _BINS_PER_UNIT

    pos = (n - 1) * percentile / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, n - 1)
    value = kth(lo) + (kth(hi) - kth(lo)) * (pos - lo)
    if value <= 0.0 and peak > 0.0:
        return peak
    return value


# ---------------------------------------------------------------------------
# Text helpers


@lru_cache(maxsize=32)
def _font(size: int) -> _Font:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed-size bitmap font exists
        return ImageFont.load_default()


def _line_height(font: _Font) -> int:
    return math.ceil(font.getbbox("Ayg|")[3])


def _text_width(font: _Font, text: str) -> float:
    return float(font.getlength(text))


def _fit(text: str, font: _Font, max_width: float) -> str:
    """``text`` shortened with an ellipsis until it fits ``max_width`` pixels."""
    if _text_width(font, text) <= max_width:
        return text
    while text and _text_width(font, text + "…") > max_width:
        text = text[:-1]
    return text + "…" if text else ""


def _wrap(text: str, font: _Font, max_width: float) -> list[str]:
    """Greedy word wrap; words longer than a line are shortened with an ellipsis."""
    lines: list[str] = []
    for paragraph in text.splitlines() or [""]:
        current = ""
        for word in paragraph.split():
            candidate = f"{current} {word}" if current else word
            if current and _text_width(font, candidate) > max_width:
                lines.append(_fit(current, font, max_width))
                current = word
            else:
                current = candidate
        lines.append(_fit(current, font, max_width))
    return lines


def _as_array(image: np.ndarray | Image.Image) -> np.ndarray:
    arr = np.asarray(image.convert("RGB")) if isinstance(image, Image.Image) else image
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[2] != 3:
        raise ValueError(f"expected a uint8 H x W x 3 image, got {arr.dtype} {arr.shape}")
    return arr


# ---------------------------------------------------------------------------
# Tiles and sheets

_CAPTION_BG: RGB = (40, 40, 40)
_ALERT_BG: RGB = (170, 25, 25)
_TITLE_FG: RGB = (255, 255, 255)
_BOTTOM_FG: RGB = (215, 215, 215)
_BOX_ALPHA = 200


def _tile_font_size(width: int) -> int:
    # ~12 characters per line: "MSE 12345.6" fits a tile's width while 64 px renders
    # upscaled x3 still get a 16 px font.
    return max(10, min(28, round(width / 12)))


def label_tile(
    image: np.ndarray | Image.Image,
    title: str,
    top_right: str | None = None,
    bottom: str | None = None,
    scale: int = 1,
    *,
    alert: bool = False,
) -> Image.Image:
    """The image, nearest-neighbour upscaled by ``scale``, above a two-line caption.

    ``title`` (e.g. ``"double.7"``) is the caption's first line and ``bottom``
    (e.g. ``"SSIM 0.981"``) its second; ``top_right`` (e.g. ``"MSE 123.4"``) sits in
    the image's top-right corner on a dark box. The caption always has room for
    two lines so tiles with and without ``bottom`` line up in a sheet. ``alert``
    gives the caption a red background (a failed verdict).
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    arr = _as_array(image)
    h, w = arr.shape[:2]
    img = Image.fromarray(arr, mode="RGB")
    if scale != 1:
        img = img.resize((w * scale, h * scale), Image.Resampling.NEAREST)
    width, height = img.size
    font = _font(_tile_font_size(width))
    line_h = _line_height(font)
    pad = max(2, line_h // 4)
    caption_h = 2 * line_h + 3 * pad

    tile = Image.new("RGB", (width, height + caption_h), _ALERT_BG if alert else _CAPTION_BG)
    tile.paste(img, (0, 0))

    if top_right:
        text = _fit(top_right, font, width - 2 * pad)
        text_w = math.ceil(_text_width(font, text))
        box_w = text_w + 2 * pad
        box_h = line_h + 2 * pad
        overlay = Image.new("RGBA", (box_w, box_h), (0, 0, 0, _BOX_ALPHA))
        ImageDraw.Draw(overlay).text((pad, pad), text, font=font, fill=(*_TITLE_FG, 255))
        region = (width - box_w, 0, width, box_h)
        corner = tile.crop(region).convert("RGBA")
        tile.paste(Image.alpha_composite(corner, overlay).convert("RGB"), region[:2])

    draw = ImageDraw.Draw(tile)
    draw.text((pad, height + pad), _fit(title, font, width - 2 * pad), font=font, fill=_TITLE_FG)
    if bottom:
        y = height + 2 * pad + line_h
        draw.text((pad, y), _fit(bottom, font, width - 2 * pad), font=font, fill=_BOTTOM_FG)
    return tile


_MAX_COLUMNS = 12
_HEADER_FONT_SIZE = 18
_HEADER_FG: RGB = (235, 235, 235)


def _sheet_size(
    cols: int,
    rows: int,
    cell: tuple[int, int],
    gap: int,
    header_lines: int,
    header_line_h: int,
    legend: tuple[int, int],
) -> tuple[int, int]:
    header_h = header_lines * header_line_h + gap if header_lines else 0
    header_h += legend[1]
    width = max(cols * cell[0] + (cols + 1) * gap, legend[0] + 2 * gap)
    return width, header_h + rows * cell[1] + (rows + 1) * gap


def contact_sheet(
    tiles: Sequence[Image.Image],
    columns: int | None = None,
    max_pixels: int | None = None,
    background: RGB = (24, 24, 24),
    header: str | None = None,
    gap: int = 4,
    legend: Image.Image | None = None,
) -> Image.Image:
    """Tiles in a grid, row by row, ``gap`` pixels apart, under an optional header and legend.

    ``columns`` defaults to ``ceil(sqrt(n))`` (at most 12). Tiles of different sizes
    are centred in cells of the largest size. When the sheet would have more than
    ``max_pixels`` pixels the tiles shrink uniformly, keeping their aspect, until
    it fits; gaps, header and ``legend`` (e.g. a :func:`colour_scale`, placed
    under the header) keep their size so that they stay readable.
    """
    n = len(tiles)
    if n == 0:
        raise ValueError("contact_sheet needs at least one tile")
    if columns is not None and columns < 1:
        raise ValueError(f"columns must be >= 1, got {columns}")
    if gap < 0:
        raise ValueError(f"gap must be >= 0, got {gap}")
    cols = min(n, columns if columns is not None else min(_MAX_COLUMNS, math.ceil(math.sqrt(n))))
    rows = math.ceil(n / cols)
    cell_w = max(t.width for t in tiles)
    cell_h = max(t.height for t in tiles)

    font = _font(_HEADER_FONT_SIZE)
    header_line_h = _line_height(font) + 2
    legend_size = (legend.width, legend.height) if legend is not None else (0, 0)

    def layout(tw: int) -> tuple[tuple[int, int], list[str], tuple[int, int]]:
        th = max(1, round(cell_h * tw / cell_w))
        sheet_w = max(cols * tw + (cols + 1) * gap, legend_size[0] + 2 * gap)
        lines = _wrap(header, font, sheet_w - 2 * max(gap, 4)) if header else []
        size = _sheet_size(cols, rows, (tw, th), gap, len(lines), header_line_h, legend_size)
        return (tw, th), lines, size

    (tw, th), lines, (sheet_w, sheet_h) = layout(cell_w)
    if max_pixels is not None and sheet_w * sheet_h > max_pixels:
        lo, hi = 1, cell_w
        while lo < hi:  # largest tile width that fits
            mid = (lo + hi + 1) // 2
            if math.prod(layout(mid)[2]) <= max_pixels:
                lo = mid
            else:
                hi = mid - 1
        (tw, th), lines, (sheet_w, sheet_h) = layout(lo)
        if sheet_w * sheet_h > max_pixels:
            raise ValueError(f"{n} tiles cannot fit in {max_pixels} pixels")

    sheet = Image.new("RGB", (sheet_w, sheet_h), background)
    draw = ImageDraw.Draw(sheet)
    y0 = gap
    for line in lines:
        draw.text((max(gap, 4), y0), line, font=font, fill=_HEADER_FG)
        y0 += header_line_h
    if legend is not None:
        sheet.paste(legend.convert("RGB"), (gap, y0 + (gap if lines else 0)))
    top = sheet_h - (rows * th + (rows + 1) * gap)
    shrink = (tw, th) != (cell_w, cell_h)
    for i, tile in enumerate(tiles):
        img = tile.convert("RGB")
        if shrink:
            size = (
                max(1, round(img.width * tw / cell_w)),
                max(1, round(img.height * th / cell_h)),
            )
            img = img.resize(size, Image.Resampling.LANCZOS)
        r, c = divmod(i, cols)
        x = gap + c * (tw + gap) + (tw - img.width) // 2
        y = top + gap + r * (th + gap) + (th - img.height) // 2
        sheet.paste(img, (x, y))
    return sheet


def side_by_side(tiles: Sequence[Image.Image], legend: Image.Image | None = None) -> Image.Image:
    """Tiles in one row (``render``/``verify``: base | full | slim | heatmap)."""
    return contact_sheet(tiles, columns=max(1, len(tiles)), legend=legend)


#: ``render``'s tiles are upscaled to about this width, so captions stay legible.
_LEGIBLE_WIDTH = 256


def combination_picture(
    base: np.ndarray,
    full: np.ndarray,
    chosen: np.ndarray,
    label: str,
    *,
    full_mse: float,
    chosen_mse: float,
    chosen_ssim: float,
    scale: int | None = None,
) -> Image.Image:
    """``render``'s picture: base | full | chosen | heatmap of chosen vs full, labelled.

    Args:
        base, full, chosen: the renders without LoRA, with the whole LoRA and with
            the chosen blocks (``H x W x 3`` uint8).
        label: the chosen blocks, as the caption of their tile.
        full_mse: MSE of the full LoRA vs base; ``chosen_mse`` and
            ``chosen_ssim``: of the chosen blocks vs the full LoRA.
        scale: upscale factor of the tiles; None upscales small renders to
            about 256 px wide.

    Example::

        picture = combination_picture(base, full, chosen, "double.7",
                                      full_mse=812.0, chosen_mse=20.5, chosen_ssim=0.97)
        save_png(picture, Path("combo.png"))
    """
    if scale is None:
        scale = max(1, round(_LEGIBLE_WIDTH / max(base.shape[1], 1)))
    diff = diff_map(chosen, full)
    # On the scale of the LoRA's effect, as in verify.png: a combination that renders
    # like the full LoRA looks calm, however small its own differences are.
    vmax = global_vmax([diff_map(full, base)])
    tiles = [
        label_tile(base, "base (no LoRA)", scale=scale),
        label_tile(full, "full LoRA", f"MSE {full_mse:.1f}", "vs base", scale=scale),
        label_tile(
            chosen, label, f"MSE {chosen_mse:.1f}", f"SSIM {chosen_ssim:.3f} vs full", scale=scale
        ),
        label_tile(
            heatmap_overlay(chosen, diff, vmax), "chosen vs full", bottom="heatmap", scale=scale
        ),
    ]
    scale_bar = colour_scale(
        DEFAULT_CMAP,
        vmax,
        label=f"heatmap: {HEATMAP_UNIT}; on the scale of the LoRA's effect",
        width=min(4 * tiles[0].width, 1000),
    )
    return side_by_side(tiles, legend=scale_bar)


#: What a heatmap's colours measure, as the colour scales say it.
HEATMAP_UNIT = "per-pixel squared error of the 8-bit RGB render (0-65025, as MSE)"


def _nice_step(span: float, most: int) -> float:
    """The smallest 1, 2, 2.5 or 5 times a power of ten that cuts ``span`` into at most ``most`` steps."""
    base = 10.0 ** math.floor(math.log10(span / most))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if span / (m * base) <= most:
            return m * base
    return 10.0 * base


def colour_scale(
    cmap: str,
    vmax: float | None,
    *,
    label: str,
    width: int = 900,
    font_size: int = 16,
    background: RGB = (24, 24, 24),
) -> Image.Image:
    """A horizontal colour bar: the map from 0 to ``vmax`` with round ticks, under ``label``.

    ``vmax`` None means each heatmap has its own scale: the ends read "0" and
    "each map's maximum" instead of numbers.
    """
    table = _cmap_table(cmap)
    font = _font(font_size)
    line_h = _line_height(font)
    pad = 6
    bar_h = max(10, line_h)
    bar_w = width - 2 * pad
    height = pad + line_h + 4 + bar_h + 4 + line_h + pad
    strip = Image.new("RGB", (width, height), background)
    draw = ImageDraw.Draw(strip)
    draw.text((pad, pad), _fit(label, font, bar_w), font=font, fill=_HEADER_FG)
    top = pad + line_h + 4
    ramp = table[np.rint(np.linspace(0, 255, bar_w)).astype(np.intp)]
    strip.paste(Image.fromarray(np.repeat(ramp[None], bar_h, axis=0), "RGB"), (pad, top))
    ticks: list[tuple[float, str]] = [(0.0, "0 (no change)")]
    if vmax is None:
        ticks.append((1.0, "each map's own maximum"))
    elif vmax > 0.0:
        step = _nice_step(vmax, 4)
        values = [step * i for i in range(1, int(vmax / step) + 1)]
        # The end is labelled with its value; a round tick too close to it is dropped.
        ticks += [(v / vmax, f"{v:g}") for v in values if v <= 0.85 * vmax]
        ticks.append((1.0, f"{vmax:.4g}"))
    y = top + bar_h + 4
    for q, text in ticks:
        x = pad + q * (bar_w - 1)
        draw.line([(x, top + bar_h), (x, top + bar_h + 3)], fill=_HEADER_FG)
        tw = _text_width(font, text)
        tx = min(max(pad, x - tw / 2), width - pad - tw)
        draw.text((tx, y), text, font=font, fill=_HEADER_FG)
    return strip


# ---------------------------------------------------------------------------
# Output


def encode_png(image: Image.Image | np.ndarray) -> bytes:
    """``image`` as the bytes of a PNG file."""
    pil = image if isinstance(image, Image.Image) else Image.fromarray(_as_array(image), "RGB")
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def save_png(image: Image.Image | np.ndarray, path: Path) -> None:
    """Write ``image`` as PNG to ``path`` atomically.

    A temporary file in the same folder is written, fsynced and renamed over
    ``path``, so an interrupted run never leaves a half-written picture.
    """
    atomic_write_bytes(path, encode_png(image), what="picture")
