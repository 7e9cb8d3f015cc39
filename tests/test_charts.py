"""The charts' data: which mode and statistic each panel shows, the axis ranges, the marks.

The figures are read back from matplotlib (bar heights, line data, titles,
limits, ticks), so a chart that plots the wrong series or squeezes its data
fails here, not only when someone opens the PNG.
"""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest
from matplotlib.axes import Axes
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from lora_prune.charts import (
    CATEGORY_COLORS,
    ModeInfluence,
    figure_image,
    influence_figure,
    pruning_curve_figure,
)
from lora_prune.errors import EXIT_MISSING_DEPENDENCY, MissingDependencyError

BLOCKS = [
    "input",
    *(f"double.{i}" for i in range(19)),
    *(f"single.{i}" for i in range(38)),
    "final",
]


def xdata(line: Line2D) -> list[float]:
    return [float(v) for v in np.asarray(line.get_xdata(), dtype=np.float64)]


def ydata(line: Line2D) -> list[float]:
    return [float(v) for v in np.asarray(line.get_ydata(), dtype=np.float64)]


def label(artist: Line2D) -> str:
    return str(artist.get_label())


def bars(ax: Axes) -> list[Rectangle]:
    return [p for p in ax.patches if isinstance(p, Rectangle)]


def modes(seed: int = 3) -> list[ModeInfluence]:
    rng = np.random.default_rng(seed)
    n = len(BLOCKS)
    return [
        ModeInfluence("solo", list(rng.uniform(0, 3000, n)), list(rng.uniform(0, 0.5, n))),
        ModeInfluence("loo", list(rng.uniform(0, 900, n)), list(rng.uniform(0, 0.2, n))),
    ]


def test_influence_charts_every_mode_and_both_statistics_with_headroom() -> None:
    data = modes()
    fig = influence_figure(BLOCKS, data, images=4, keep=["double.3", "single.7"], keep_mode="loo")
    axes = fig.axes
    assert len(axes) == 4
    expected = [
        ("solo", "MSE", data[0].mse),
        ("solo", "1 - SSIM", data[0].one_minus_ssim),
        ("leave-one-out", "MSE", data[1].mse),
        ("leave-one-out", "1 - SSIM", data[1].one_minus_ssim),
    ]
    for ax, (mode, statistic, values) in zip(axes, expected, strict=True):
        title = ax.get_title(loc="left")
        assert title.startswith(mode) and f": {statistic}" in title, title
        assert "mean over 4 images" in title
        assert ax.get_ylabel() == statistic
        heights = [b.get_height() for b in bars(ax)]
        assert heights == pytest.approx(values)
        top = max(values)
        peak_block = BLOCKS[int(np.argmax(values))]
        assert f"at {peak_block.replace('double.', 'd').replace('single.', 's')}" in title or (
            peak_block in ("input", "final")
        )
        low, high = ax.get_ylim()
        assert low == 0.0 and top < high <= 1.2 * top  # the tallest bar ends below the frame
        left, right = ax.get_xlim()
        assert left < -0.5 and right > len(BLOCKS) - 0.5  # and the edge bars off the sides
    labels = [t.get_text() for t in axes[-1].get_xticklabels()]
    assert labels[:3] == ["in", "d0", "d1"] and labels[-1] == "fin" and len(labels) == len(BLOCKS)
    # The suggested keep set is outlined, in every panel, and the legend says where it is from.
    outlined = [BLOCKS[i] for i, b in enumerate(bars(axes[2])) if b.get_linewidth() > 0]
    assert outlined == ["double.3", "single.7"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "in the suggested keep set (from loo)" in legend
    assert "double blocks" in legend and "single blocks" in legend


def test_influence_bar_colours_follow_the_block_kind() -> None:
    fig = influence_figure(
        ["clip", "double.0", "single.1", "final"],
        [ModeInfluence("solo", [1.0, 2.0, 3.0, 4.0], [0.1] * 4)],
        images=1,
    )
    colours = [tuple(round(255 * c) for c in to_rgb(b.get_facecolor())) for b in bars(fig.axes[0])]
    assert colours == [
        CATEGORY_COLORS["other"],
        CATEGORY_COLORS["double"],
        CATEGORY_COLORS["single"],
        CATEGORY_COLORS["other"],
    ]
    assert "mean over image" in fig.axes[0].get_title(loc="left")
    assert len(fig.legends[0].get_texts()) == 3  # no keep-set entry without a keep set


def test_influence_of_missing_and_zero_values() -> None:
    fig = influence_figure(
        ["double.0", "single.3"],
        [ModeInfluence("loo", [float("nan"), 0.0], [0.0, 0.0])],
        images=2,
    )
    mse_ax, ssim_ax = fig.axes
    assert [b.get_height() for b in bars(mse_ax)] == [0.0, 0.0]
    assert "all 0" in mse_ax.get_title(loc="left") and mse_ax.get_ylim() == (0.0, 1.0)
    assert "all 0" in ssim_ax.get_title(loc="left")


def test_influence_refuses_mismatched_lengths_and_draws_at_its_size() -> None:
    with pytest.raises(ValueError, match="2 blocks"):
        influence_figure(
            ["double.0", "double.1"], [ModeInfluence("solo", [1.0], [0.1, 0.2])], images=1
        )
    with pytest.raises(ValueError):
        influence_figure(["double.0"], [], images=1)
    assert figure_image(influence_figure(BLOCKS, modes()[:1], images=4)).size == (
        1400,
        110 + 2 * 230,
    )
    assert figure_image(influence_figure(BLOCKS, modes(), images=4, width=900)).size == (
        900,
        110 + 4 * 230,
    )


# --- the pruning curve ------------------------------------------------------

# After slim --auto: k = 0..8 rendered, then the whole LoRA (k = 59).
KS = [*range(9), 59]
WORST = {
    "mse": [0.0, 0.2, 0.45, 0.85, 0.93, 0.96, 0.97, 0.98, 0.99, 1.0],
    "ssim": [0.0, 0.15, 0.4, 0.8, 0.91, 0.95, 0.97, 0.98, 0.985, 1.0],
}
MEAN = {name: [min(1.0, v + 0.04) if 0 < v < 1 else v for v in vs] for name, vs in WORST.items()}
SIZES = [0, 30_000, 61_000, 90_000, 118_000, 150_000, 181_000, 212_000, 240_000, 902_500]


def curve() -> tuple[Axes, Axes, Figure]:
    fig = pruning_curve_figure(KS, WORST, MEAN, SIZES, min_kept=0.9, chosen=4, ranking="loo")
    share_ax = next(a for a in fig.axes if a.get_ylabel().startswith("share"))
    size_ax = next(a for a in fig.axes if a is not share_ax)
    return share_ax, size_ax, fig


def test_curve_plots_the_worst_image_that_the_verdict_judges_and_the_mean_apart() -> None:
    ax, _, fig = curve()
    lines = {label(line): line for line in ax.get_lines()}
    worst_mse = lines["MSE kept, worst image"]
    assert ydata(worst_mse) == WORST["mse"]
    assert worst_mse.get_linestyle() == "-"
    assert ydata(lines["SSIM kept, worst image"]) == WORST["ssim"]
    # MSE and SSIM differ in marker and dash, so one never hides the other.
    assert lines["SSIM kept, worst image"].get_marker() != worst_mse.get_marker()
    assert lines["SSIM kept, worst image"].get_linestyle() != "-"
    assert ydata(lines["MSE kept, mean over images"]) == MEAN["mse"]
    assert lines["MSE kept, mean over images"].get_linestyle() == ":"
    threshold = lines["verdict threshold: 90% on every image"]
    assert ydata(threshold) == [0.9, 0.9]
    assert ax.get_ylim() == (0.0, 1.05)
    assert "ranked by loo" in fig.get_suptitle()


def test_curve_spreads_the_rendered_ks_and_marks_the_gap_and_the_choice() -> None:
    ax, _, _ = curve()
    xs = xdata(ax.get_lines()[0])
    # One unit per rendered k; the skipped k = 9..58 take a short gap, not 50 units.
    assert xs[:9] == list(range(9)) and 9.0 < xs[9] <= 10.0
    left, right = ax.get_xlim()
    assert left < 0 < xs[-1] < right and right - left < 12
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [str(k) for k in KS]
    assert any(t.get_text() == "k = 9-58 not rendered" for t in ax.texts)
    chosen = next(line for line in ax.get_lines() if label(line).startswith("chosen"))
    assert xdata(chosen) == [4.0, 4.0]
    assert label(chosen) == "chosen: the top 4, the fewest that pass"


def test_curve_size_axis_has_round_ticks_in_one_unit() -> None:
    _, size_ax, fig = curve()
    heights = [b.get_height() for b in bars(size_ax)]
    assert heights == pytest.approx([s / 1000 for s in SIZES])  # KB, the unit of the largest
    fig.canvas.draw()
    ticks = [t for t in size_ax.get_yticks() if 0 <= t <= size_ax.get_ylim()[1]]
    assert len(ticks) >= 4
    for t in ticks:
        if t:
            mantissa = t / 10 ** math.floor(math.log10(t))
            assert any(math.isclose(mantissa * f, round(mantissa * f)) for f in (1, 2, 4)), t
    texts = [t.get_text() for t in size_ax.get_yticklabels()]
    assert "200 KB" in texts and all(x.endswith(" KB") for x in texts if x)


def test_curve_of_every_k_is_linear_in_k() -> None:
    ks = list(range(11))
    shares = [k / 10 for k in ks]
    fig = pruning_curve_figure(ks, {"mse": shares}, {"mse": shares}, [k * 1000 for k in ks])
    ax = next(a for a in fig.axes if a.get_ylabel().startswith("share"))
    assert xdata(ax.get_lines()[0]) == ks
    assert not ax.texts  # no gap
    assert figure_image(pruning_curve_figure(ks, {"mse": shares}, {}, [1] * 11)).size == (1000, 560)
    with pytest.raises(ValueError):
        pruning_curve_figure(ks, {"mse": shares[:3]}, {}, [1] * 11)


def test_without_matplotlib_the_charts_are_a_one_line_missing_dependency(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # an import of it raises ImportError
    with pytest.raises(MissingDependencyError) as caught:
        influence_figure(["double.0"], [ModeInfluence("solo", [1.0], [0.1])], images=1)
    assert str(caught.value) == (
        "the charts need matplotlib, which is not installed, matplotlib, "
        "install the render extra: pip install 'lora-prune[render]'"
    )
    assert caught.value.exit_code == EXIT_MISSING_DEPENDENCY
