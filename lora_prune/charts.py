"""The charts of ``analyze``'s outputs: the block-influence bar chart and the pruning curve.

Drawn with Pillow alone, with :mod:`.pictures`' fonts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .blocks import block_kind, short_label
from .pictures import RGB, _Font, _font, _line_height, _text_width
from .units import human_bytes

CATEGORY_COLORS: dict[str, RGB] = {
    "double": (47, 110, 196),
    "single": (232, 130, 30),
    "other": (60, 160, 90),
}
"""Bar colours of the influence chart by block kind."""

_CATEGORY_LEGEND = {
    "double": "double blocks",
    "single": "single blocks",
    "other": "input / final / text encoders",
}


def _chart_category(block: str) -> str:
    """Colour group of a block id: ``double``, ``single`` or ``other``."""
    kind = block_kind(block)
    return kind if kind in ("double", "single") else "other"


def _fmt(value: float) -> str:
    """Axis numbers: whole numbers from 1000 up (MSE runs to 65025), 4 significant digits below."""
    if value == 0.0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    if abs(value) < 0.001:
        return f"{value:.2e}"
    return f"{value:.4g}"


_CHART_BG: RGB = (255, 255, 255)
_AXIS: RGB = (60, 60, 60)
_GRID: RGB = (225, 225, 225)
_TEXT: RGB = (30, 30, 30)


def _draw_rotated(
    image: Image.Image, center: tuple[int, int], text: str, font: _Font, fill: RGB
) -> None:
    """Text rotated 90 degrees (reading upwards), centred on ``center``."""
    w = math.ceil(_text_width(font, text)) + 2
    h = _line_height(font) + 2
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).text((1, 0), text, font=font, fill=255)
    mask = mask.rotate(90, expand=True)
    x = center[0] - mask.width // 2
    y = center[1] - mask.height // 2
    image.paste(Image.new("RGB", mask.size, fill), (x, y), mask)


def _draw_panel(
    chart: Image.Image,
    box: tuple[int, int, int, int],
    values: np.ndarray,
    colours: list[RGB],
    labels: list[str],
    title: str,
    axis_title: str,
    font: _Font,
) -> None:
    """One bar panel in ``box`` (left, top, right, bottom of the plot area)."""
    draw = ImageDraw.Draw(chart)
    left, top, right, bottom = box
    finite = values[np.isfinite(values)]
    vmax = float(finite.max()) if finite.size else 0.0
    axis_max = vmax if vmax > 0.0 else 1.0
    line_h = _line_height(font)

    # Grid and y tick labels at quarters of the axis maximum.
    widest = 0.0
    for q in range(5):
        y = round(bottom - (bottom - top) * q / 4)
        draw.line([(left, y), (right, y)], fill=_GRID if q else _AXIS, width=1)
        label = _fmt(axis_max * q / 4) if vmax > 0.0 or q == 0 else ""
        tw = _text_width(font, label)
        widest = max(widest, tw)
        draw.text((left - 6 - tw, y - line_h // 2), label, font=font, fill=_TEXT)
    draw.line([(left, top), (left, bottom)], fill=_AXIS, width=1)

    if values.size:
        peak_i = int(np.nanargmax(np.where(np.isfinite(values), values, -np.inf)))
        peak = f"max {_fmt(vmax)} ({labels[peak_i]})" if vmax > 0.0 else "all 0"
        if not finite.size:
            peak = "no data"
    else:
        peak = "no data"
    draw.text((left, top - line_h - 6), f"{title}  -  {peak}", font=font, fill=_TEXT)
    title_x = max(line_h // 2 + 2, round(left - 12 - widest - line_h / 2))
    _draw_rotated(chart, (title_x, (top + bottom) // 2), axis_title, font, _TEXT)

    n = values.size
    slot = (right - left) / max(1, n)
    bar_w = max(1.0, min(48.0, slot * 0.72))
    prev_kind: RGB | None = None
    for i, (value, colour) in enumerate(zip(values, colours, strict=True)):
        x_mid = left + slot * (i + 0.5)
        if prev_kind is not None and colour != prev_kind:
            xs = round(left + slot * i)
            draw.line([(xs, top), (xs, bottom)], fill=(190, 190, 190), width=1)
        prev_kind = colour
        if not np.isfinite(value) or value <= 0.0:
            continue
        # Any positive value gets at least a 1 px bar so "tiny" reads apart from "none".
        y = min(round(bottom - (bottom - top) * min(1.0, value / axis_max)), bottom - 1)
        draw.rectangle(
            (round(x_mid - bar_w / 2), y, round(x_mid + bar_w / 2) - 1, bottom - 1),
            fill=colour,
        )


def _draw_title_and_legend(
    draw: ImageDraw.ImageDraw, kinds: list[str], left: int, right: int, font: _Font
) -> int:
    """The influence chart's title and colour legend; returns the legend's y."""
    title_font = _font(17)
    line_h = _line_height(font)
    # Title and legend share the first line when both fit; else the legend gets its own.
    chart_title = "Block influence (blocks in model order)"
    present = [k for k in CATEGORY_COLORS if k in kinds]
    swatch = line_h
    legend_w = sum(
        swatch + 6 + math.ceil(_text_width(font, _CATEGORY_LEGEND[k])) + 18 for k in present
    )
    title_w = _text_width(title_font, chart_title)
    legend_y = 16 if left + title_w + 24 + legend_w <= right else 16 + line_h + 12
    draw.text((left, 12), chart_title, font=title_font, fill=_TEXT)
    x = right
    for kind in reversed(present):
        text = _CATEGORY_LEGEND[kind]
        x -= math.ceil(_text_width(font, text))
        draw.text((x, legend_y), text, font=font, fill=_TEXT)
        x -= swatch + 6
        draw.rectangle(
            (x, legend_y + 1, x + swatch - 1, legend_y + swatch), fill=CATEGORY_COLORS[kind]
        )
        x -= 18

    return legend_y


def _draw_block_labels(
    chart: Image.Image,
    labels: list[str],
    lower: tuple[int, int, int, int],
    slot: float,
    label_font: _Font,
    font: _Font,
    height: int,
) -> None:
    """The block labels and the x axis title under the lower panel."""
    draw = ImageDraw.Draw(chart)
    left, right = lower[0], lower[2]
    x_title_h = _line_height(font) + 8
    # x labels under the lower panel, rotated so 61 of them fit.
    label_top = lower[3] + 6
    for i, label in enumerate(labels):
        x_mid = round(left + slot * (i + 0.5))
        draw.line([(x_mid, lower[3]), (x_mid, lower[3] + 3)], fill=_AXIS)
        lw = math.ceil(_text_width(label_font, label))
        _draw_rotated(chart, (x_mid, label_top + lw // 2 + 1), label, label_font, _TEXT)
    x_title = "block"
    draw.text(
        ((left + right - _text_width(font, x_title)) / 2, height - x_title_h),
        x_title,
        font=font,
        fill=_TEXT,
    )


def influence_chart(
    blocks: Sequence[str],
    mse: Sequence[float],
    one_minus_ssim: Sequence[float],
    width: int = 1400,
    height: int = 600,
) -> Image.Image:
    """Bar chart of each block's influence, blocks in the given (model) order.

    Two stacked panels share the x axis: MSE vs the reference render (top) and
    1 - SSIM (bottom), each scaled to its own maximum, which is printed with the
    block that reaches it. Double blocks, single blocks and everything else
    (input, final layer, text encoders) get distinct colours; x labels are
    abbreviated (``d7``, ``s20``, ``in``, ``fin``). NaN values draw no bar.
    """
    n = len(blocks)
    if n == 0:
        raise ValueError("influence_chart needs at least one block")
    if len(mse) != n or len(one_minus_ssim) != n:
        raise ValueError(
            f"influence_chart got {n} blocks, {len(mse)} MSE and {len(one_minus_ssim)} SSIM values"
        )
    if width < 400 or height < 300:
        raise ValueError(f"influence_chart needs at least 400x300 px, got {width}x{height}")

    kinds = [_chart_category(b) for b in blocks]
    labels = [short_label(b) for b in blocks]
    colours = [CATEGORY_COLORS[kind] for kind in kinds]

    chart = Image.new("RGB", (width, height), _CHART_BG)
    draw = ImageDraw.Draw(chart)
    font = _font(13)
    line_h = _line_height(font)

    left, right = 90, width - 20
    slot = (right - left) / n
    label_font = _font(max(8, min(13, int(slot * 0.75))))
    label_len = max(_text_width(label_font, s) for s in labels)
    x_title_h = line_h + 8
    label_area = math.ceil(label_len) + 10
    plot_bottom = height - x_title_h - label_area
    legend_y = _draw_title_and_legend(draw, kinds, left, right, font)

    top = legend_y + 28 + line_h + 8
    panel_gap = line_h + 18
    panel_h = (plot_bottom - top - panel_gap) // 2
    if panel_h < 40:
        raise ValueError(f"influence_chart: {width}x{height} px leaves no room for the bars")

    mse_vals = np.asarray(mse, dtype=np.float64)
    ssim_vals = np.asarray(one_minus_ssim, dtype=np.float64)
    upper = (left, top, right, top + panel_h)
    lower = (left, top + panel_h + panel_gap, right, top + 2 * panel_h + panel_gap)
    _draw_panel(
        chart, upper, mse_vals, colours, labels, "MSE vs reference (8-bit, 0..65025)", "MSE", font
    )
    _draw_panel(chart, lower, ssim_vals, colours, labels, "1 - SSIM vs reference", "1 - SSIM", font)

    _draw_block_labels(chart, labels, lower, slot, label_font, font, height)
    return chart


def _draw_series(
    draw: ImageDraw.ImageDraw,
    ks: Sequence[int],
    kept: Mapping[str, Sequence[float]],
    x_of: Callable[[float], float],
    y_of: Callable[[float], float],
    left: int,
    font: _Font,
) -> None:
    """The pruning curve's kept-share lines, one per distance, and their legend."""
    line_h = _line_height(font)
    colours = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (148, 103, 189)]
    legend_x = left
    for (name, values), colour in zip(kept.items(), colours, strict=False):
        points = [(x_of(k), y_of(v)) for k, v in zip(ks, values, strict=True)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse((x - 3, y - 3, x + 3, y + 3), fill=colour)
        label = f"{name} kept (mean over images)"
        draw.rectangle(
            (legend_x, 14 + line_h + 6, legend_x + line_h, 14 + 2 * line_h + 6), fill=colour
        )
        draw.text((legend_x + line_h + 6, 14 + line_h + 6), label, font=font, fill=_TEXT)
        legend_x += line_h + 24 + math.ceil(_text_width(font, label))
    draw.text((legend_x, 14 + line_h + 6), "grey bars: file size", font=font, fill=(120, 120, 120))


def pruning_curve_chart(
    ks: Sequence[int],
    kept: Mapping[str, Sequence[float]],
    sizes: Sequence[int],
    *,
    min_kept: float | None = None,
    chosen: int | None = None,
    width: int = 1000,
    height: int = 520,
) -> Image.Image:
    """Share of the LoRA's effect kept by the top-k blocks, with each keep set's size.

    One line per distance (mean kept share over the images, 0..100%), the
    file size of each keep set as grey bars on a second scale, the verdict's
    threshold as a dashed line and the chosen k marked.
    """
    if not ks or any(len(v) != len(ks) for v in kept.values()) or len(sizes) != len(ks):
        raise ValueError("pruning_curve_chart needs one value per k for every series")
    chart = Image.new("RGB", (width, height), _CHART_BG)
    draw = ImageDraw.Draw(chart)
    font = _font(13)
    title_font = _font(17)
    line_h = _line_height(font)
    left, right, top, bottom = 70, width - 80, 20 + 2 * line_h + 16, height - 2 * line_h - 24
    draw.text(
        (left, 12),
        "Pruning curve: share of the LoRA's effect kept by the top-k blocks",
        font=title_font,
        fill=_TEXT,
    )
    k_max = max(max(ks), 1)
    size_max = max(max(sizes), 1)

    def x_of(k: float) -> float:
        return left + (right - left) * k / k_max

    def y_of(share: float) -> float:
        return bottom - (bottom - top) * min(max(share, 0.0), 1.0)

    bar_w = max(1.0, (right - left) / (k_max + 1) * 0.6)
    for k, size in zip(ks, sizes, strict=True):
        h = (bottom - top) * size / size_max
        draw.rectangle(
            (x_of(k) - bar_w / 2, bottom - h, x_of(k) + bar_w / 2, bottom), fill=(215, 215, 215)
        )
    draw.line([(left, top), (left, bottom), (right, bottom), (right, top)], fill=_AXIS)
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = y_of(tick)
        draw.line([(left - 4, y), (left, y)], fill=_AXIS)
        text = f"{100 * tick:.0f}%"
        draw.text((left - 8 - _text_width(font, text), y - line_h / 2), text, font=font, fill=_TEXT)
        size_text = human_bytes(int(size_max * tick))
        draw.text((right + 6, y - line_h / 2), size_text, font=font, fill=(120, 120, 120))
    if min_kept is not None:
        y = y_of(min_kept)
        for x0 in range(left, right, 12):
            draw.line([(x0, y), (min(x0 + 6, right), y)], fill=(200, 40, 40))
    _draw_series(draw, ks, kept, x_of, y_of, left, font)
    if chosen is not None:
        x = x_of(chosen)
        draw.line([(x, top), (x, bottom)], fill=(200, 40, 40))
        draw.text((x + 4, top + 2), f"chosen: top {chosen}", font=font, fill=(200, 40, 40))
    step = max(1, math.ceil(k_max / 20))
    for k in range(0, k_max + 1, step):
        text = str(k)
        draw.text((x_of(k) - _text_width(font, text) / 2, bottom + 4), text, font=font, fill=_TEXT)
    x_title = "k = number of top-ranked blocks kept"
    draw.text(
        ((left + right - _text_width(font, x_title)) / 2, height - line_h - 8),
        x_title,
        font=font,
        fill=_TEXT,
    )
    return chart
