"""Plan and cache of the sweep: which images it needs, their cache keys, what is missing.

:func:`plan_jobs` lists every render (references and one variant per block
and mode for every prompt x seed) named by a cache key of everything that
determines it; :func:`render_missing` checks each cached image against its
record (see :mod:`lora_prune.rendercache`) and renders only the batches
holding one that is missing or damaged (this process's share, with a
:class:`Shard`).
The manifest records the plan beside the renders for ``analyze --from``.
:class:`CachingRenderer` keeps renders outside the plan (the pruning curve's
keep sets) in the same cache, so a rerun renders them only once.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from .._version import __version__
from ..blocks import block_order
from ..boundedjson import JsonLimitError, loads_bounded
from ..errors import UnreadableFileError, UsageError
from ..fileio import read_limited
from ..lora import LoraFile
from ..rendercache import DamagedRenderError, check_render, load_render, save_render
from ..renderer import Renderer
from ..settings import AnalyzeSettings, settings_to_json
from ..stats import BlockStats, block_stats

T = TypeVar("T")

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1
#: A manifest lists every job (~300 bytes each): this bounds sweeps far beyond any real one.
MANIFEST_MAX_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class Job:
    """One image to have: a set of active blocks for one prompt x seed."""

    key: str
    kind: str  # "base", "full", "solo" or "loo"
    block: str | None
    blocks: frozenset[str]
    prompt: int
    seed: int

    @property
    def path(self) -> str:
        return image_path(self.key)


def image_path(key: str) -> str:
    """Where the image of a cache key lies, relative to the analysis folder."""
    return f"images/{key}.png"


def _no_wait() -> None:
    return None


@dataclass(frozen=True)
class Shard:
    """This process's share of a sweep that several processes render together.

    Processes take the batches of the full plan round-robin (batch ``index``,
    ``index + count``, ...), so every image is rendered with the same batch
    companions as in a one-process run (its pixels can depend on them), and a
    rerun with any number of processes finds the same cache keys. ``wait``
    returns once every process has called it (a barrier, e.g. accelerate's
    ``wait_for_everyone``); the main process (index 0) analyses after it.
    """

    index: int
    count: int
    wait: Callable[[], None] = field(default=_no_wait, compare=False, repr=False)

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ValueError(f"shard {self.index} of {self.count} does not exist")

    @property
    def is_main(self) -> bool:
        return self.index == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's items of ``items`` (the same list in every process)."""
        return list(items[self.index :: self.count])


Progress = Callable[[int, int], None]


def cache_key(
    *,
    model_id: str,
    lora_sha256: str,
    blocks: frozenset[str],
    prompt: str,
    seed: int,
    settings: AnalyzeSettings,
    versions: Mapping[str, str],
) -> str:
    """A key of everything that determines one image.

    The no-LoRA image does not depend on the LoRA or its strength, so its key
    leaves them out and it is shared between LoRAs analysed into one folder.
    """
    doc: dict[str, object] = {
        "model": model_id,
        "blocks": sorted(blocks, key=block_order),
        "prompt": prompt,
        "seed": seed,
        "width": settings.width,
        "height": settings.height,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "versions": dict(sorted(versions.items())),
    }
    if blocks:
        doc["lora"] = lora_sha256
        doc["strength"] = settings.strength
    edited = settings.input_image(prompt)
    if edited is not None:
        doc["image"] = edited.sha256  # an edit: the image it edits decides it too
    text = json.dumps(doc, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def plan_jobs(
    lora_blocks: Sequence[str],
    settings: AnalyzeSettings,
    *,
    model_id: str,
    lora_sha256: str,
    versions: Mapping[str, str],
) -> list[Job]:
    """Every image of the sweep, grouped by prompt x seed (references first)."""
    all_blocks = frozenset(lora_blocks)
    jobs: list[Job] = []
    for p, prompt in enumerate(settings.prompts):
        for seed in settings.seeds:
            variants: list[tuple[str, str | None, frozenset[str]]] = [
                ("base", None, frozenset()),
                ("full", None, all_blocks),
            ]
            for mode in settings.modes:
                for block in lora_blocks:
                    active = frozenset({block}) if mode == "solo" else all_blocks - {block}
                    variants.append((mode, block, active))
            for kind, block_id, active in variants:
                key = cache_key(
                    model_id=model_id,
                    lora_sha256=lora_sha256,
                    blocks=active,
                    prompt=prompt,
                    seed=seed,
                    settings=settings,
                    versions=versions,
                )
                jobs.append(Job(key, kind, block_id, active, p, seed))
    return jobs


def batches(jobs: Sequence[Job], batch_size: int) -> Iterator[list[Job]]:
    """Fixed batches within each prompt x seed, unique images only.

    The batches do not depend on what is cached: an image's pixels depend (by a
    level at most) on its batch companions, so a resumed run must rebuild the
    same batches to give identical results.
    """
    groups: dict[tuple[int, int], list[Job]] = {}
    seen: set[str] = set()
    for job in jobs:
        if job.key in seen:
            continue
        seen.add(job.key)
        groups.setdefault((job.prompt, job.seed), []).append(job)
    for group in groups.values():
        for start in range(0, len(group), batch_size):
            yield group[start : start + batch_size]


@dataclass
class RenderStats:
    planned: int = 0
    cached: int = 0
    rendered: int = 0
    #: cached images that had no record or did not match it, and were rendered again
    damaged: int = 0


def render_missing(
    jobs: Sequence[Job],
    out_dir: Path,
    renderer: Renderer,
    settings: AnalyzeSettings,
    *,
    batch_size: int,
    progress: Progress | None = None,
    shard: Shard | None = None,
) -> RenderStats:
    """Render the batches with an image that is missing or damaged; save each with its record.

    A cached image is used only when it matches its record (see
    :mod:`lora_prune.rendercache`); a damaged one is rendered again and counted.
    ``renderer`` is called only for a batch with such an image, so a renderer
    that loads its model on first call loads nothing when all is cached.
    The batches are those of :func:`batches` over ``jobs``, the full plan;
    with a ``shard`` only this process's share of them (see :class:`Shard`).
    """
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    all_batches = list(batches(jobs, batch_size))
    if shard is not None:
        all_batches = shard.share(all_batches)
    total = sum(len(b) for b in all_batches)
    stats = RenderStats(planned=total)
    done = 0
    for batch in all_batches:
        missing: set[str] = set()
        for j in batch:
            path = out_dir / j.path
            if not path.exists():
                missing.add(j.key)
            elif check_render(path, j.key, settings.width, settings.height) is not None:
                missing.add(j.key)
                stats.damaged += 1
        if not missing:
            stats.cached += len(batch)
            done += len(batch)
            if progress:
                progress(done, total)
            continue
        job0 = batch[0]
        images = renderer(
            [j.blocks for j in batch], settings.prompts[job0.prompt], job0.seed, settings
        )
        stats.rendered += len(batch)
        for job, image in zip(batch, images, strict=True):
            if job.key in missing:
                save_render(image, out_dir / job.path, job.key)
        done += len(batch)
        if progress:
            progress(done, total)
    return stats


class CachingRenderer:
    """A :class:`Renderer` that keeps what it renders in ``out_dir/images``, by cache key.

    For the renders outside the sweep's plan (the pruning curve of ``analyze
    --curve`` and ``slim --auto``): a call whose images are all cached, each
    matching its record, renders nothing (the base and full images are the
    sweep's own); otherwise the whole batch is rendered, as the first run
    did (an image depends, by a level at most, on its batch companions, and
    the callers build the same batches every run), and the images missing or
    damaged are saved. ``rendered`` and ``cached`` count images.
    """

    def __init__(self, renderer: Renderer, out_dir: Path, lora_sha256: str) -> None:
        self.inner = renderer
        self.out_dir = out_dir
        self.lora_sha256 = lora_sha256
        self.model_id = renderer.model_id
        self.versions = renderer.versions
        self.rendered = 0
        self.cached = 0

    def __call__(
        self, variants: Sequence[frozenset[str]], prompt: str, seed: int, settings: AnalyzeSettings
    ) -> list[np.ndarray]:
        keys = [
            cache_key(
                model_id=self.model_id,
                lora_sha256=self.lora_sha256,
                blocks=frozenset(v),
                prompt=prompt,
                seed=seed,
                settings=settings,
                versions=self.versions,
            )
            for v in variants
        ]
        paths = [self.out_dir / image_path(k) for k in keys]
        if all(p.exists() for p in paths):
            try:
                images = [
                    load_render(p, k, settings.width, settings.height)
                    for p, k in zip(paths, keys, strict=True)
                ]
            except DamagedRenderError:
                pass  # rendered again below, and replaced
            else:
                self.cached += len(images)
                return images
        images = self.inner(variants, prompt, seed, settings)
        self.rendered += len(images)
        (self.out_dir / "images").mkdir(parents=True, exist_ok=True)
        for path, key, image in zip(paths, keys, images, strict=True):
            if not path.exists() or check_render(path, key, settings.width, settings.height):
                save_render(image, path, key)
        return images


def build_manifest(
    lora: LoraFile,
    lora_sha256: str,
    settings: AnalyzeSettings,
    jobs: Sequence[Job],
    *,
    model_id: str,
    versions: Mapping[str, str],
    stats: Sequence[BlockStats] | None = None,
) -> dict[str, Any]:
    """The manifest of a sweep; ``stats`` are the LoRA's block statistics when known already."""
    by_block = {
        b.block: {"params": b.params, "bytes": b.bytes, "norm": b.norm, "modules": b.modules}
        for b in (block_stats(lora) if stats is None else stats)
    }
    return {
        "schema": SCHEMA_VERSION,
        "tool": {"name": "lora-prune", "version": __version__},
        "versions": dict(versions),
        "model": model_id,
        "lora": {
            "path": str(lora.path),
            "sha256": lora_sha256,
            "format": lora.format,
            "bytes": lora.header.file_size,
        },
        "settings": settings_to_json(settings),
        "blocks": by_block,
        "jobs": [
            {
                "key": j.key,
                "kind": j.kind,
                "block": j.block,
                "blocks": sorted(j.blocks, key=block_order),
                "prompt": j.prompt,
                "seed": j.seed,
                "path": j.path,
            }
            for j in jobs
        ],
    }


def read_manifest(out_dir: Path) -> dict[str, Any]:
    """The manifest of an earlier analyze in ``out_dir``, parsed within bounds."""
    path = out_dir / MANIFEST
    try:
        doc = loads_bounded(read_limited(path, MANIFEST_MAX_BYTES), max_bytes=MANIFEST_MAX_BYTES)
    except FileNotFoundError as exc:
        raise UsageError(
            "no manifest.json in the folder", out_dir, "give the --out folder of an earlier analyze"
        ) from exc
    except (OSError, ValueError) as exc:
        # JsonLimitError and an over-long file are ValueErrors too.
        reason = exc.reason if isinstance(exc, JsonLimitError) else type(exc).__name__
        raise UnreadableFileError(
            f"cannot read manifest.json ({reason})", path, "run analyze again"
        ) from exc
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_VERSION:
        raise UnreadableFileError("manifest.json has an unknown layout", path, "run analyze again")
    return doc
