"""The ``analyze`` job: one process's part of a sweep that may span several processes.

Under ``accelerate launch``/``torchrun`` every process renders its share of the
plan into the shared run folder and the main one analyses once all are done;
otherwise one process does both. The session opens lazily, so a rerun whose
renders are all cached imports no diffusers and loads no model (this module
imports neither at import time).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..analysis import Analysis, RenderStats, Shard, analyze, render_sweep
from ..fileio import refuse_overwrite
from ..lora import LoraFile, read_lora
from ..settings import ModelSpec, PictureOptions, RenderSettings
from ..stats import block_stats_and_sha256
from ..verdict import Criterion
from .deps import require_render
from .distributed import join_processes, launched_processes
from .lazy import lazy_renderer
from .perceptual import verdict_distances

if TYPE_CHECKING:
    from .session import Session

Progress = Callable[[int, int], None]


@dataclass
class AnalyzeRun:
    """What one process of :func:`run_analyze` did."""

    #: None in a helper process of a multi-process sweep: the main one analyses
    analysis: Analysis | None
    renders: RenderStats
    seconds: float
    #: this process's share of a launched sweep; None when not launched
    shard: Shard | None


@contextmanager
def _session(spec: ModelSpec, lora: LoraFile) -> Iterator[Session]:
    # The one seam between a sweep and the render stack (tests replace it).
    require_render()
    from .session import open_session

    with open_session(spec, lora) as session:
        yield session


def run_analyze(
    lora_path: Path,
    spec: ModelSpec,
    settings: RenderSettings,
    out: Path,
    *,
    batch_size: int,
    coverage: float,
    options: PictureOptions,
    curve: Criterion | None = None,
    perceptual: str | None = None,
    progress: Progress | None = None,
) -> AnalyzeRun:
    """Render what ``out`` lacks and analyse it (:func:`~lora_prune.analysis.analyze`).

    Refuses before anything is written when ``out`` holds an input. In a launched
    multi-process sweep this process joins the group, renders its share, and
    (the main process) waits for the others and analyses; ``progress`` is only
    fed in the main process, so that one terminal shows one bar.
    """
    refuse_overwrite([lora_path, spec.transformer_file], folders=[out])
    lora = read_lora(lora_path)
    shard = None
    if launched_processes() > 1:
        require_render()
        shard, spec = join_processes(spec)
    t0 = time.perf_counter()
    # One read of the LoRA's data gives its hash (the cache keys) and the manifest's norms.
    stats, sha = block_stats_and_sha256(lora)
    distances = verdict_distances(perceptual, spec.device) if curve is not None else None
    with lazy_renderer(spec, lambda: _session(spec, lora)) as renderer:
        if shard is not None and not shard.is_main:
            renders = render_sweep(
                lora, sha, settings, out, renderer, batch_size=batch_size, stats=stats, shard=shard
            )
            shard.wait()
            return AnalyzeRun(None, renders, time.perf_counter() - t0, shard)
        result = analyze(
            lora,
            sha,
            settings,
            out,
            renderer,
            batch_size=batch_size,
            coverage=coverage,
            options=options,
            progress=progress,
            curve=curve,
            distances=distances,
            stats=stats,
            shard=shard,
        )
    return AnalyzeRun(result, result.renders, time.perf_counter() - t0, shard)
