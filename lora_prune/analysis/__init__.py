"""The per-block sweep behind ``lora-prune analyze``, minus the rendering itself.

It plans every render and checks the cache (:mod:`.plan`), asks a
:class:`Renderer` only for the images that are not on disk yet, then scores
and ranks the blocks and suggests a keep set (:mod:`.scoring`, :mod:`.curve`)
and writes ranking.csv/json, heatmaps, the contact sheet, the influence chart
and the report (:mod:`.outputs`). Torch-free: the renderer is passed in (see
:mod:`lora_prune.render.sweep`), and ``--from DIR`` runs with none.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..fileio import refuse_overwrite, write_json
from ..lora import LoraFile
from ..renderer import Renderer as Renderer
from ..settings import DEFAULT_BATCH_SIZE, DEFAULT_COVERAGE, check_batch_size, check_coverage
from ..settings import AnalyzeSettings as AnalyzeSettings
from ..settings import PictureOptions as PictureOptions
from ..stats import BlockStats
from ..verdict import BASE_DISTANCES, Criterion, Distance
from ..verify import auto_keep_ranked
from .curve import CURVE_FILE as CURVE_FILE
from .curve import read_curve as read_curve
from .curve import set_curve as set_curve
from .model import Analysis as Analysis
from .model import AnalysisSettings as AnalysisSettings
from .model import BlockRow as BlockRow
from .model import Suggestion as Suggestion
from .outputs import write_results as write_results
from .plan import MANIFEST as MANIFEST
from .plan import SCHEMA_VERSION as SCHEMA_VERSION
from .plan import CachingRenderer as CachingRenderer
from .plan import Job as Job
from .plan import Progress as Progress
from .plan import RenderStats as RenderStats
from .plan import Shard as Shard
from .plan import batches as batches
from .plan import build_manifest as build_manifest
from .plan import cache_key as cache_key
from .plan import plan_jobs as plan_jobs
from .plan import read_manifest as read_manifest
from .plan import render_missing as render_missing
from .scoring import analyze_from as analyze_from
from .scoring import compute_analysis as compute_analysis
from .scoring import suggest_keep as suggest_keep


def _write_plan(
    lora: LoraFile,
    lora_sha256: str,
    settings: AnalyzeSettings,
    out_dir: Path,
    renderer: Renderer,
    stats: list[BlockStats] | None,
) -> tuple[list[Job], dict[str, Any]]:
    """The sweep's jobs and its manifest, written into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    blocks = [b for b in lora.blocks if b != "other"]
    jobs = plan_jobs(
        blocks,
        settings,
        model_id=renderer.model_id,
        lora_sha256=lora_sha256,
        versions=renderer.versions,
    )
    manifest = build_manifest(
        lora,
        lora_sha256,
        settings,
        jobs,
        model_id=renderer.model_id,
        versions=renderer.versions,
        stats=stats,
    )
    write_json(out_dir / MANIFEST, manifest)
    return jobs, manifest


def _render_plan(
    lora: LoraFile,
    lora_sha256: str,
    settings: AnalyzeSettings,
    out_dir: Path,
    renderer: Renderer,
    batch_size: int,
    progress: Progress | None,
    stats: list[BlockStats] | None,
    shard: Shard | None,
) -> tuple[RenderStats, dict[str, Any]]:
    """Write the sweep's manifest and render this process's share of what is missing."""
    refuse_overwrite([lora.path], folders=[out_dir])
    jobs, manifest = _write_plan(lora, lora_sha256, settings, out_dir, renderer, stats)
    renders = render_missing(
        jobs,
        out_dir,
        renderer,
        settings,
        batch_size=batch_size,
        progress=progress,
        shard=shard,
    )
    return renders, manifest


def render_sweep(
    lora: LoraFile,
    lora_sha256: str,
    settings: AnalyzeSettings,
    out_dir: Path,
    renderer: Renderer,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
    stats: list[BlockStats] | None = None,
    shard: Shard | None = None,
) -> RenderStats:
    """Plan the sweep, write its manifest and render what is missing (this process's share).

    The first half of :func:`analyze`. Processes that render a sweep together
    (see :class:`Shard`) all call it; each writes the same manifest and only
    its own share of the images.

    Args:
        lora, lora_sha256, settings, out_dir, renderer, batch_size, progress,
            stats: as for :func:`analyze`.
        shard: this process's share of the batches; None renders them all.

    Example::

        stats = render_sweep(lora, sha, settings, Path("out"), renderer, shard=Shard(1, 2))
        print(stats.rendered, "rendered,", stats.cached, "cached")
    """
    check_batch_size(batch_size)
    renders, _ = _render_plan(
        lora, lora_sha256, settings, out_dir, renderer, batch_size, progress, stats, shard
    )
    return renders


def analyze(
    lora: LoraFile,
    lora_sha256: str,
    settings: AnalyzeSettings,
    out_dir: Path,
    renderer: Renderer,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    coverage: float = DEFAULT_COVERAGE,
    options: PictureOptions = PictureOptions(),
    progress: Progress | None = None,
    curve: Criterion | None = None,
    distances: Mapping[str, Distance] | None = None,
    stats: list[BlockStats] | None = None,
    shard: Shard | None = None,
) -> Analysis:
    """Render what is missing, then analyse. Rerunning renders nothing new.

    With ``curve`` (a verdict's thresholds), also renders the pruning curve: the
    top-k blocks of the ranking for every k, scored by the share of the LoRA's
    effect they keep; the suggestion is then the fewest blocks that pass.

    Args:
        lora: the LoRA to rank (:func:`~lora_prune.lora.read_lora`).
        lora_sha256: its file hash, part of every cache key.
        settings: prompts, seeds, size, steps, guidance, strength and modes
            (``solo``: one block on; ``loo``: one block off).
        out_dir: where the renders, ``manifest.json``, ``ranking.json``/``.csv``,
            heatmaps and ``report.html`` go; earlier renders there are reused. A
            folder that is or holds the LoRA's file is refused before anything is written.
        renderer: renders a batch of block variants (the render extra's
            session renderer, or any :class:`Renderer`).
        batch_size: variants per renderer call.
        coverage: share of the total influence the suggested keep set covers.
        options: heatmap and contact-sheet options.
        progress: called with ``(done, total)`` renders.
        curve: with a criterion, also render and score the pruning curve.
        distances: the image distances of the curve's verdict.
        stats: the LoRA's :func:`~lora_prune.stats.block_stats` when the caller
            has them already (saves reading the tensors again); None computes them.
        shard: in a sweep rendered by several processes, the main process's
            :class:`Shard`: it renders its share, waits for the others (which
            call :func:`render_sweep` and ``shard.wait()``), then analyses.
            The pruning curve is rendered by this process alone.

    Example::

        with open_session(ModelSpec(model="tiny"), lora) as session:
            result = analyze(lora, file_sha256(lora.path), AnalyzeSettings(prompts=("a cat",)),
                             Path("out"), session.renderer)
        print([(r.block, r.mse) for r in result.rows_for("solo")[:5]])
    """
    check_coverage(coverage)
    if shard is not None and not shard.is_main:
        raise ValueError("only the main process analyses; the others call render_sweep")
    check_batch_size(batch_size)
    renders, manifest = _render_plan(
        lora, lora_sha256, settings, out_dir, renderer, batch_size, progress, stats, shard
    )
    if shard is not None:
        shard.wait()
    result = compute_analysis(manifest, out_dir, coverage=coverage, options=options, lora=lora)
    result.renders = renders
    if curve is not None and not result.warnings:
        caching = CachingRenderer(renderer, out_dir, lora_sha256)
        auto = auto_keep_ranked(
            lora,
            lora_sha256,
            result,
            settings,
            caching,
            criterion=curve,
            distances=distances or BASE_DISTANCES,
            batch_size=batch_size,
            stop_at_pass=False,
        )
        set_curve(result, auto.curve, curve, lora=lora)
        # The curve's keep sets are renders of this run too: counted with the sweep's.
        result.renders = replace(
            renders,
            planned=renders.planned + caching.rendered + caching.cached,
            rendered=renders.rendered + caching.rendered,
            cached=renders.cached + caching.cached,
        )
    return result
