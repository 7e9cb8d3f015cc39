"""Scoring and ranking: per-image MSE/SSIM against the right reference, block ranks, a keep set.

:func:`compute_analysis` reads the renders a manifest lists and writes every
output. Memory stays bounded by one prompt x seed: the references of every
prompt x seed (two images each) and the variants of the contact sheet's
prompt x seed are held; every other render is decoded when scored and then
dropped. Each render is decoded once, plus once more on the global heatmap
scale, whose maximum pools every difference map before the first heatmap can
be coloured (holding all maps instead would grow with the sweep).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..blocks import block_order, format_block_spec, sort_blocks
from ..errors import UsageError
from ..lora import LoraFile, read_lora
from ..markers import pinned_blocks
from ..metrics import diff_map, mean_std, mse, spearman, ssim
from ..pictures import colorize, global_vmax, save_png
from ..recipes import input_ranks
from ..rendercache import check_render, damaged, load_render
from ..settings import (
    DEFAULT_COVERAGE,
    AnalyzeSettings,
    PictureOptions,
    check_coverage,
    settings_from_json,
)
from ..slim import keep_size
from ..verdict import effect_is_measurable, effect_of
from .curve import attach_curve, read_curve
from .model import Analysis, AnalysisSettings, BlockRow, Suggestion
from .outputs import write_csv, write_pictures, write_results
from .plan import Job, read_manifest

RefKey = tuple[str, int, int]


def _ranks(values: Sequence[float]) -> list[int]:
    """1 = largest; ties share the better rank."""
    order = sorted(range(len(values)), key=lambda i: -values[i])
    ranks = [0] * len(values)
    for position, i in enumerate(order):
        if position and values[i] == values[order[position - 1]]:
            ranks[i] = ranks[order[position - 1]]
        else:
            ranks[i] = position + 1
    return ranks


def suggest_keep(
    rows: Sequence[BlockRow],
    coverage_target: float,
    lora: LoraFile | None,
    bytes_by_block: Mapping[str, int],
    lora_name: str,
) -> Suggestion:
    """The fewest top-ranked blocks whose MSE covers ``coverage_target`` of the total.

    Blocks holding the marker keys loaders need (:mod:`lora_prune.markers`) are added.
    """
    mode = rows[0].mode if rows else "solo"
    ranked = sorted((r for r in rows if r.norm > 0), key=lambda r: (r.rank, block_order(r.block)))
    total = sum(r.mse for r in ranked)
    chosen: list[str] = []
    covered = 0.0
    if total > 0:
        for row in ranked:
            if covered / total >= coverage_target - 1e-12:
                break
            chosen.append(row.block)
            covered += row.mse
    if lora is not None and chosen:
        # Without their marker keys loaders ignore the whole file: a keep set slim can write.
        mse = {r.block: r.mse for r in ranked}
        for block in sort_blocks(pinned_blocks(lora)):
            if block not in chosen:
                chosen.append(block)
                covered += mse.get(block, 0.0)
    bytes_before = sum(bytes_by_block.values())
    if lora is not None and chosen:
        size = keep_size(lora, chosen)
        bytes_before = lora.header.file_size
    else:
        size = sum(bytes_by_block.get(b, 0) for b in chosen)
    spec = format_block_spec(chosen)
    command = f"lora-prune slim {lora_name} --keep {spec}" if chosen else None
    return Suggestion(
        mode=mode,
        coverage_target=coverage_target,
        coverage=covered / total if total > 0 else 0.0,
        blocks=sorted(chosen, key=block_order),
        spec=spec,
        bytes=size,
        bytes_before=bytes_before,
        command=command,
    )


def _manifest_jobs(
    manifest: Mapping[str, Any], out_dir: Path, settings: AnalyzeSettings
) -> list[Job]:
    """The manifest's jobs, refused up front (before anything is written) when one is missing or damaged."""
    jobs = [
        Job(j["key"], j["kind"], j["block"], frozenset(j["blocks"]), j["prompt"], j["seed"])
        for j in manifest["jobs"]
    ]
    missing = [j for j in jobs if not (out_dir / j.path).exists()]
    if missing:
        raise UsageError(
            f"{len(missing)} of {len(jobs)} renders are missing (first {missing[0].path})",
            out_dir,
            "run analyze again without --from to render them",
        )
    for j in jobs:
        reason = check_render(out_dir / j.path, j.key, settings.width, settings.height)
        if reason is not None:
            raise damaged(out_dir / j.path, reason)
    return jobs


@dataclass
class _Images:
    """Decoded renders: references and the contact sheet's prompt x seed are kept, the rest is not."""

    out_dir: Path
    settings: AnalyzeSettings
    kept_group: tuple[int, int]
    kept: dict[str, np.ndarray] = field(default_factory=dict)

    def __call__(self, job: Job) -> np.ndarray:
        if job.key in self.kept:
            return self.kept[job.key]
        s = self.settings
        pixels = load_render(self.out_dir / job.path, job.key, s.width, s.height)
        if job.kind in ("base", "full") or (job.prompt, job.seed) == self.kept_group:
            self.kept[job.key] = pixels
        return pixels


@dataclass
class _Scores:
    #: (mode, block) -> (MSE, SSIM) per prompt x seed
    per: dict[tuple[str, str], list[tuple[float, float]]] = field(default_factory=dict)
    images: list[dict[str, Any]] = field(default_factory=list)
    vmax: dict[str, float] = field(default_factory=dict)


def _score_mode(
    mode: str,
    jobs: Sequence[Job],
    refs: Mapping[RefKey, Job],
    image: _Images,
    options: PictureOptions,
    out_dir: Path,
    scores: _Scores,
) -> None:
    """Score one mode's variants against their reference and write their heatmaps."""
    ref_kind = "base" if mode == "solo" else "full"
    mode_jobs = [j for j in jobs if j.kind == mode]

    def diffs() -> Iterator[np.ndarray]:
        for j in mode_jobs:
            yield diff_map(image(j), image(refs[(ref_kind, j.prompt, j.seed)]))

    is_global = options.heatmap_scale == "global"
    scores.vmax[mode] = global_vmax(diffs()) if is_global else 0.0
    (out_dir / "heatmaps").mkdir(exist_ok=True)
    for j in mode_jobs:
        assert j.block is not None
        img = image(j)
        ref = image(refs[(ref_kind, j.prompt, j.seed)])
        d = diff_map(img, ref)
        m, s = mse(img, ref), ssim(img, ref)
        scores.per.setdefault((mode, j.block), []).append((m, s))
        vmax = scores.vmax[mode] if is_global else float(d.max())
        heat_path = f"heatmaps/{mode}_{j.block}_p{j.prompt}_s{j.seed}.png"
        save_png(colorize(d, vmax, options.cmap), out_dir / heat_path)
        scores.images.append(
            {
                "block": j.block,
                "mode": mode,
                "prompt": j.prompt,
                "seed": j.seed,
                "image": j.path,
                "heatmap": heat_path,
                "mse": m,
                "ssim": s,
            }
        )


def _rank_rows(
    modes: Sequence[str],
    block_info: Mapping[str, Mapping[str, Any]],
    per: Mapping[tuple[str, str], Sequence[tuple[float, float]]],
) -> tuple[list[BlockRow], dict[str, float | None]]:
    """The ranked rows of every mode and each mode's Spearman rho of MSE rank vs norm rank."""
    blocks = sorted(block_info, key=block_order)
    rows: list[BlockRow] = []
    spear: dict[str, float | None] = {}
    for mode in modes:
        mode_blocks = [b for b in blocks if (mode, b) in per]
        mses = [mean_std([v[0] for v in per[(mode, b)]]) for b in mode_blocks]
        ssims = [mean_std([v[1] for v in per[(mode, b)]]) for b in mode_blocks]
        norms = [float(block_info[b]["norm"]) for b in mode_blocks]
        # A block whose delta is exactly zero changes nothing, whatever render noise says:
        # it ranks last (tied) and is never kept.
        ranks = _ranks([m.mean if n > 0 else -math.inf for m, n in zip(mses, norms, strict=True)])
        norm_ranks = _ranks(norms)
        for b, m, s, r, nr, n in zip(
            mode_blocks, mses, ssims, ranks, norm_ranks, norms, strict=True
        ):
            info = block_info[b]
            rows.append(
                BlockRow(
                    b,
                    mode,
                    m.mean,
                    m.std,
                    s.mean,
                    s.std,
                    r,
                    int(info["params"]),
                    int(info["bytes"]),
                    n,
                    nr,
                )
            )
        spear[mode] = spearman([m.mean for m in mses], norms)
    return rows, spear


def _references_and_effects(
    refs: Mapping[RefKey, Job], image: _Images
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The reference pairs of every prompt x seed and what the full LoRA does to each."""
    references: list[dict[str, Any]] = []
    effects: list[dict[str, Any]] = []
    for kind, p, s in refs:
        if kind != "base":
            continue
        base, full = refs[("base", p, s)], refs[("full", p, s)]
        references.append({"prompt": p, "seed": s, "base": base.path, "full": full.path})
        effect = effect_of(image(base), image(full))
        effects.append(
            {
                "prompt": p,
                "seed": s,
                "mse": effect["mse"],
                "ssim_distance": effect["ssim"],
                "measurable": effect_is_measurable(effect["mse"]),
            }
        )
    return references, effects


def analyze_from(
    out_dir: Path, *, coverage: float = DEFAULT_COVERAGE, options: PictureOptions = PictureOptions()
) -> Analysis:
    """``analyze --from``: an earlier run's analysis recomputed from its folder; nothing renders.

    The LoRA is read again where the manifest says it was, when it is still there
    (the suggestion's sizes and retraining recipes come from it).
    """
    manifest = read_manifest(out_dir)
    lora_path = Path(manifest["lora"]["path"])
    lora = read_lora(lora_path) if lora_path.exists() else None
    return compute_analysis(manifest, out_dir, coverage=coverage, options=options, lora=lora)


def compute_analysis(
    manifest: Mapping[str, Any],
    out_dir: Path,
    *,
    coverage: float = DEFAULT_COVERAGE,
    options: PictureOptions = PictureOptions(),
    lora: LoraFile | None = None,
) -> Analysis:
    """Metrics, ranking, pictures and report from the renders listed in a manifest."""
    check_coverage(coverage)
    settings = settings_from_json(manifest["settings"])
    jobs = _manifest_jobs(manifest, out_dir, settings)
    refs: dict[RefKey, Job] = {
        (j.kind, j.prompt, j.seed): j for j in jobs if j.kind in ("base", "full")
    }
    image = _Images(out_dir, settings, kept_group=(0, settings.seeds[0]))
    scores = _Scores()
    for mode in settings.modes:
        _score_mode(mode, jobs, refs, image, options, out_dir, scores)
    block_info: dict[str, dict[str, Any]] = manifest["blocks"]
    rows, spear = _rank_rows(settings.modes, block_info, scores.per)
    primary = "loo" if "loo" in settings.modes else "solo"
    suggestion = suggest_keep(
        [r for r in rows if r.mode == primary],
        coverage,
        lora,
        {b: int(info["bytes"]) for b, info in block_info.items()},
        Path(manifest["lora"]["path"]).name,
    )
    references, effects = _references_and_effects(refs, image)
    analysis = Analysis(
        settings=AnalysisSettings(
            render=settings,
            lora=manifest["lora"]["path"],
            lora_sha256=manifest["lora"]["sha256"],
            model=manifest["model"],
            heatmap_scale=options.heatmap_scale,
            cmap=options.cmap,
            heatmap_vmax=scores.vmax,
        ),
        rows=rows,
        spearman=spear,
        suggestion=suggestion,
        references=references,
        images=scores.images,
        out_dir=out_dir,
        effects=effects,
        input_ranks=input_ranks(lora) if lora is not None else None,
    )
    if lora is not None:
        analysis.family = lora.family
    write_pictures(analysis, out_dir, options, image, refs, jobs)
    write_csv(out_dir / "ranking.csv", rows)
    stored = read_curve(out_dir, manifest)
    if stored is not None:
        attach_curve(analysis, *stored, lora=lora)
    write_results(analysis)
    return analysis
