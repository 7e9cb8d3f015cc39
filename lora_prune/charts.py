"""The charts of ``analyze``'s outputs: the block-influence bar chart and the pruning curve.

Drawn with matplotlib (the ``render`` extra) on its Agg canvas through the
object API: no pyplot, so no global figure state and no GUI backend. The
``*_figure`` functions return the :class:`~matplotlib.figure.Figure` (tests read
its data: which mode, which statistic, the axis ranges); :func:`figure_image`
draws one as a Pillow image for :func:`.pictures.save_png`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from .blocks import block_kind, short_label
from .errors import MissingDependencyError
from .pictures import RGB

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

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

#: What each mode's bars measure, as the panel titles say it.
MODE_TITLES = {
    "solo": "solo: each block alone vs no LoRA",
    "loo": "leave-one-out: the full LoRA without the block vs the full LoRA",
}

_DPI = 100
_KEEP_EDGE = "black"
#: The curve's colour per distance; the verdict's threshold is red.
_SERIES_COLORS = {"mse": "#1f77b4", "ssim": "#2ca02c"}
_SERIES_STYLES = {"mse": ("o", "-"), "ssim": ("s", "--")}
_THRESHOLD_COLOR = "#c82828"


def _chart_category(block: str) -> str:
    """Colour group of a block id: ``double``, ``single`` or ``other``."""
    kind = block_kind(block)
    return kind if kind in ("double", "single") else "other"


def _hex(rgb: RGB) -> str:
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def _new_figure(width: int, height: int) -> Figure:
    """An Agg-backed figure of ``width`` x ``height`` pixels."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError(
            "the charts need matplotlib, which is not installed",
            "matplotlib",
            "install the render extra: pip install 'lora-prune[render]'",
        ) from exc
    fig = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def figure_image(fig: Figure) -> Image.Image:
    """``fig`` drawn at its own size, as an RGB Pillow image."""
    buf = io.BytesIO()
    # No "Software" text chunk: the same chart gives the same bytes with any matplotlib.
    fig.savefig(buf, format="png", dpi=_DPI, metadata={"Software": None})
    buf.seek(0)
    with Image.open(buf) as img:
        return img.convert("RGB")


# ---------------------------------------------------------------------------
# Block influence


@dataclass(frozen=True)
class ModeInfluence:
    """One mode's bars: per block (in the chart's block order), the mean over the images."""

    mode: str
    mse: Sequence[float]
    one_minus_ssim: Sequence[float]


def _peak(values: np.ndarray, labels: Sequence[str]) -> str:
    finite = np.where(np.isfinite(values), values, -np.inf)
    if not np.isfinite(finite).any():
        return "no data"
    i = int(np.argmax(finite))
    if finite[i] <= 0.0:
        return "all 0"
    return f"max {values[i]:.4g} at {labels[i]}"


def _bar_panel(
    ax: Axes,
    values: np.ndarray,
    colours: Sequence[str],
    keep: Sequence[bool],
    labels: Sequence[str],
    title: str,
    ylabel: str,
) -> None:
    x = np.arange(values.size)
    shown = np.where(np.isfinite(values), np.maximum(values, 0.0), 0.0)
    ax.bar(
        x,
        shown,
        width=0.75,
        color=colours,
        edgecolor=[_KEEP_EDGE if k else "none" for k in keep],
        linewidth=[1.6 if k else 0.0 for k in keep],
    )
    top = float(shown.max()) if shown.size else 0.0
    # Headroom: the tallest bar ends below the frame, not on it.
    ax.set_ylim(0.0, top * 1.12 if top > 0.0 else 1.0)
    ax.set_xlim(-0.75, values.size - 0.25)
    ax.set_title(f"{title}  ({_peak(values, labels)})", loc="left", fontsize=10)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", color="#e0e0e0", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def influence_figure(
    blocks: Sequence[str],
    modes: Sequence[ModeInfluence],
    *,
    images: int,
    keep: Sequence[str] = (),
    keep_mode: str | None = None,
    title: str = "Block influence",
    width: int = 1400,
) -> Figure:
    """Bars of each block's influence, blocks in the given (model) order.

    Two panels per mode share the x axis: MSE vs the mode's reference and
    1 - SSIM, each the mean over ``images`` renders and scaled to its own
    maximum (named in the panel's title with its block). Double blocks, single
    blocks and the rest get distinct colours; the blocks of ``keep`` (the
    suggested keep set, chosen from ``keep_mode``) are outlined. NaN draws no bar.
    """
    n = len(blocks)
    if n == 0:
        raise ValueError("influence_figure needs at least one block")
    if not modes:
        raise ValueError("influence_figure needs at least one mode")
    for m in modes:
        if len(m.mse) != n or len(m.one_minus_ssim) != n:
            raise ValueError(
                f"influence_figure got {n} blocks but {len(m.mse)} MSE and "
                f"{len(m.one_minus_ssim)} SSIM values for {m.mode}"
            )
    if width < 400:
        raise ValueError(f"influence_figure needs at least 400 px, got {width}")

    kinds = [_chart_category(b) for b in blocks]
    labels = [short_label(b) for b in blocks]
    colours = [_hex(CATEGORY_COLORS[k]) for k in kinds]
    kept = set(keep)
    outlined = [b in kept for b in blocks]
    panels = 2 * len(modes)
    fig = _new_figure(width, 110 + 230 * panels)
    axes = fig.subplots(panels, 1, sharex=True, squeeze=False)[:, 0]
    per = "image" if images == 1 else f"{images} images"
    for i, m in enumerate(modes):
        what = MODE_TITLES.get(m.mode, m.mode)
        _bar_panel(
            axes[2 * i],
            np.asarray(m.mse, dtype=np.float64),
            colours,
            outlined,
            labels,
            f"{what}: MSE (8-bit, 0-65025), mean over {per}",
            "MSE",
        )
        _bar_panel(
            axes[2 * i + 1],
            np.asarray(m.one_minus_ssim, dtype=np.float64),
            colours,
            outlined,
            labels,
            f"{what}: 1 - SSIM, mean over {per}",
            "1 - SSIM",
        )
    # A thin line where the block kind changes (double -> single -> rest).
    for ax in axes:
        for j in range(1, n):
            if kinds[j] != kinds[j - 1]:
                ax.axvline(j - 0.5, color="#bbbbbb", linewidth=0.8)
    bottom = axes[-1]
    bottom.set_xticks(np.arange(n), labels, rotation=90, fontsize=8 if n > 30 else 9)
    bottom.set_xlabel("block (model order)")

    from matplotlib.patches import Patch

    handles = [
        Patch(facecolor=_hex(CATEGORY_COLORS[k]), label=_CATEGORY_LEGEND[k])
        for k in CATEGORY_COLORS
        if k in kinds
    ]
    if kept:
        source = f" (from {keep_mode})" if keep_mode else ""
        handles.append(
            Patch(
                facecolor="white",
                edgecolor=_KEEP_EDGE,
                linewidth=1.6,
                label=f"in the suggested keep set{source}",
            )
        )
    fig.legend(handles=handles, loc="outside upper right", ncols=len(handles), frameon=False)
    fig.suptitle(title, x=0.01, ha="left", fontsize=13)
    return fig


# ---------------------------------------------------------------------------
# Pruning curve


def _positions(ks: Sequence[int]) -> tuple[list[float], list[tuple[float, int, int]]]:
    """x positions of ``ks`` (sorted): one unit per k, a short gap where ks were skipped.

    Returns the positions and, for each gap, its middle and the first and last
    k it leaves out. An axis linear in k would squeeze k = 0..8 into the left
    edge when the last point is k = 59.
    """
    positions: list[float] = []
    gaps: list[tuple[float, int, int]] = []
    x = 0.0
    for i, k in enumerate(ks):
        if i:
            step = k - ks[i - 1]
            if step > 2:
                gaps.append((x + 0.75, ks[i - 1] + 1, k - 1))
                x += 1.5
            else:
                x += step
        positions.append(x)
    return positions, gaps


def _size_unit(peak: float) -> tuple[float, str]:
    # The unit of human_bytes for the largest size, so the ticks are round numbers of it.
    for factor, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if peak >= factor:
            return factor, unit
    return 1.0, "B"


def pruning_curve_figure(
    ks: Sequence[int],
    worst: Mapping[str, Sequence[float]],
    mean: Mapping[str, Sequence[float]],
    sizes: Sequence[int],
    *,
    min_kept: float | None = None,
    chosen: int | None = None,
    ranking: str | None = None,
    width: int = 1000,
    height: int = 560,
) -> Figure:
    """The share of the LoRA's effect kept by the top-k blocks, and each keep set's size.

    Per distance, the worst image's kept share (what the verdict judges, solid
    line) and the mean over the images (dotted); the verdict's threshold
    ``min_kept`` as a labelled line, the ``chosen`` k marked and named in the
    legend, the file size of each keep set as grey bars on the right axis. Only
    the rendered ks are plotted, one unit apart; skipped ranges are a labelled gap.
    """
    order = sorted(range(len(ks)), key=lambda i: ks[i])
    n = len(ks)
    series = [*worst.values(), *mean.values()]
    if not ks or len(sizes) != n or any(len(v) != n for v in series):
        raise ValueError("pruning_curve_figure needs one value per k for every series")
    k_sorted = [ks[i] for i in order]
    xs, gaps = _positions(k_sorted)

    from matplotlib.ticker import MaxNLocator, PercentFormatter

    fig = _new_figure(width, height)
    ax = fig.add_subplot()
    sizes_ax = ax.twinx()
    # The shares over the size bars: the share axis is drawn last, with a clear patch.
    ax.set_zorder(sizes_ax.get_zorder() + 1)
    ax.patch.set_visible(False)

    factor, unit = _size_unit(float(max(sizes)))
    sized = [sizes[i] / factor for i in order]
    sizes_ax.bar(xs, sized, width=0.6, color="#d9d9d9", label="file size (right axis)")
    sizes_ax.set_ylim(0.0, max(sized) * 1.08 if max(sized) > 0 else 1.0)
    sizes_ax.yaxis.set_major_locator(MaxNLocator(nbins=6, steps=[1, 2, 2.5, 5, 10]))
    sizes_ax.yaxis.set_major_formatter(lambda v, _pos: f"{v:g} {unit}")
    sizes_ax.set_ylabel("keep set's file size", color="#707070")
    sizes_ax.tick_params(axis="y", colors="#707070")

    for name, values in worst.items():
        marker, style = _SERIES_STYLES.get(name, ("^", "-."))
        colour = _SERIES_COLORS.get(name, "#9467bd")
        shown = [values[i] for i in order]
        ax.plot(
            xs,
            shown,
            linestyle=style,
            marker=marker,
            color=colour,
            linewidth=2.0,
            markersize=7 if marker == "o" else 5,
            label=f"{name.upper()} kept, worst image",
        )
        if name in mean:
            ax.plot(
                xs,
                [mean[name][i] for i in order],
                linestyle=":",
                color=colour,
                linewidth=1.2,
                label=f"{name.upper()} kept, mean over images",
            )
    if min_kept is not None:
        ax.axhline(
            min_kept,
            color=_THRESHOLD_COLOR,
            linestyle="--",
            linewidth=1.2,
            label=f"verdict threshold: {100 * min_kept:.0f}% on every image",
        )
    if chosen is not None and chosen in k_sorted:
        ax.axvline(
            xs[k_sorted.index(chosen)],
            color=_THRESHOLD_COLOR,
            linewidth=1.2,
            label=f"chosen: the top {chosen}, the fewest that pass",
        )
    for middle, first, last in gaps:
        ax.text(
            middle,
            0.5,
            f"k = {first}-{last} not rendered" if last > first else f"k = {first} not rendered",
            rotation=90,
            ha="center",
            va="center",
            fontsize=8,
            color="#808080",
        )
        ax.axvspan(middle - 0.35, middle + 0.35, color="#f3f3f3", zorder=0)

    ax.set_ylim(0.0, 1.05)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    ax.set_ylabel("share of the LoRA's effect kept")
    ax.set_xlim(xs[0] - 0.6, xs[-1] + 0.6)
    every = max(1, math.ceil(n / 25))
    ticks = [(x, k) for j, (x, k) in enumerate(zip(xs, k_sorted, strict=True)) if j % every == 0]
    if ticks[-1][1] != k_sorted[-1]:
        ticks.append((xs[-1], k_sorted[-1]))
    ax.set_xticks([t[0] for t in ticks], [str(t[1]) for t in ticks])
    ax.set_xlabel("k = number of top-ranked blocks kept")
    ax.grid(axis="y", color="#e8e8e8", linewidth=0.8)
    fig.legend(loc="outside lower center", ncols=3, fontsize=9, frameon=False)
    by = f", ranked by {ranking}" if ranking else ""
    fig.suptitle(
        f"Pruning curve: the share of the LoRA's effect kept by the top-k blocks{by}",
        x=0.01,
        ha="left",
        fontsize=12,
    )
    return fig
