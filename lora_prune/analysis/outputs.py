"""The files an analysis writes: ranking.csv/json, the contact sheets, the charts and the report."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..blocks import block_order
from ..charts import (
    MODE_TITLES,
    ModeInfluence,
    figure_image,
    influence_figure,
    pruning_curve_figure,
)
from ..fileio import atomic_write_bytes, write_json
from ..metrics import diff_map
from ..pictures import (
    HEATMAP_UNIT,
    colour_scale,
    contact_sheet,
    heatmap_overlay,
    label_tile,
    save_png,
)
from ..provenance import CRITERION
from ..report import write_report
from ..settings import MODES, PictureOptions
from .model import Analysis, BlockRow
from .plan import Job


def write_results(analysis: Analysis) -> None:
    """ranking.json and report.html (and the curve's picture) from ``analysis``."""
    out_dir = analysis.out_dir
    if analysis.curve:
        curve = analysis.curve
        chosen = analysis.suggestion.blocks and analysis.suggestion.criterion == CRITERION
        names = sorted({n for p in curve for n in p.kept})
        chart = pruning_curve_figure(
            [p.k for p in curve],
            {n: [p.worst.get(n, 0.0) for p in curve] for n in names},
            {n: [p.kept.get(n, 0.0) for p in curve] for n in names},
            [p.bytes for p in curve],
            min_kept=analysis.curve_criterion.min_kept if analysis.curve_criterion else None,
            chosen=len(analysis.suggestion.blocks) if chosen else None,
            ranking=analysis.suggestion.mode,
        )
        save_png(figure_image(chart), out_dir / "pruning_curve.png")
    write_json(out_dir / "ranking.json", analysis.to_json())
    write_report(out_dir, analysis.to_json())


def write_csv(path: Path, rows: Sequence[BlockRow]) -> None:
    """ranking.csv: one row per block and mode, by mode, rank and block."""
    buf = io.StringIO()
    fields = list(BlockRow.__dataclass_fields__)
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: (MODES.index(r.mode), r.rank, block_order(r.block))):
        writer.writerow(
            {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(row).items()}
        )
    atomic_write_bytes(path, buf.getvalue().encode())


def _tile_scale(options: PictureOptions, width: int) -> int:
    if options.tile_scale > 0:
        return options.tile_scale
    return max(1, 256 // max(width, 1))


def write_pictures(
    analysis: Analysis,
    out_dir: Path,
    options: PictureOptions,
    image: Callable[[Job], np.ndarray],
    refs: Mapping[tuple[str, int, int], Job],
    jobs: Sequence[Job],
) -> None:
    """The contact sheet of each mode (prompt 0, first seed) and the influence chart."""
    settings = analysis.settings
    modes = settings.render.modes
    primary = "solo" if "solo" in modes else "loo"
    scale = _tile_scale(options, settings.render.width)
    p0, s0 = 0, settings.render.seeds[0]
    n_images = len(settings.render.prompts) * len(settings.render.seeds)
    # The badges are the shown image's own scores: the ranks are by the mean over the images.
    own = {
        (e["mode"], e["block"]): (float(e["mse"]), float(e["ssim"]))
        for e in analysis.images
        if e["prompt"] == p0 and e["seed"] == s0
    }
    for mode in modes:
        ref_kind = "base" if mode == "solo" else "full"
        rows = analysis.rows_for(mode)
        if options.sheet_order == "block":
            rows = sorted(rows, key=lambda r: block_order(r.block))
        by_block = {j.block: j for j in jobs if j.kind == mode and j.prompt == p0 and j.seed == s0}
        ref = image(refs[(ref_kind, p0, s0)])
        vmax_global = float(settings.heatmap_vmax.get(mode, 0.0))
        tiles = [
            label_tile(image(refs[("base", p0, s0)]), "no LoRA", bottom="reference", scale=scale),
            label_tile(image(refs[("full", p0, s0)]), "full LoRA", bottom="reference", scale=scale),
        ]
        for row in rows:
            img = image(by_block[row.block])
            d = diff_map(img, ref)
            vmax = vmax_global if options.heatmap_scale == "global" else float(d.max())
            shown = heatmap_overlay(img, d, vmax, options.opacity, options.cmap)
            m, s = own[(mode, row.block)]
            tiles.append(
                label_tile(
                    shown,
                    f"{row.block} #{row.rank}",
                    top_right=f"MSE {m:.1f}",
                    bottom=f"SSIM {s:.3f}",
                    scale=scale,
                )
            )
        versus = "no LoRA" if mode == "solo" else "full LoRA"
        ranked = (
            f"#: rank by the mean over {n_images} images (ranking.csv)"
            if n_images > 1
            else "#: rank"
        )
        header = (
            f"{Path(settings.lora).name} - {MODE_TITLES[mode]}. Renders of prompt 0, seed {s0}; "
            f"MSE and SSIM vs {versus} of that image; {ranked}"
        )
        scale_text = (
            "one scale for the sweep"
            if options.heatmap_scale == "global"
            else "each map on its own scale"
        )
        legend = colour_scale(
            options.cmap,
            vmax_global if options.heatmap_scale == "global" else None,
            label=f"heatmap vs {versus}: {HEATMAP_UNIT}; {scale_text}",
            width=1000,
            font_size=18,
        )
        sheet = contact_sheet(
            tiles, max_pixels=options.sheet_max_pixels, header=header, legend=legend
        )
        name = "contact_sheet.png" if mode == primary else f"contact_sheet_{mode}.png"
        save_png(sheet, out_dir / name)
    blocks = sorted({r.block for r in analysis.rows}, key=block_order)
    nan = float("nan")
    charted = []
    for mode in modes:
        by = {r.block: r for r in analysis.rows_for(mode)}
        charted.append(
            ModeInfluence(
                mode,
                [by[b].mse if b in by else nan for b in blocks],
                [1.0 - by[b].ssim if b in by else nan for b in blocks],
            )
        )
    suggestion = analysis.suggestion
    chart = influence_figure(
        blocks,
        charted,
        images=n_images,
        keep=suggestion.blocks,
        keep_mode=suggestion.mode,
        title=f"Block influence: {Path(settings.lora).name}",
    )
    save_png(figure_image(chart), out_dir / "influence.png")
