"""The per-block sweep behind ``lora-prune analyze``, minus the rendering itself.

It plans every render (references and one variant per block and mode for
every prompt x seed), names each by a cache key of everything that determines
it, asks a :class:`Renderer` only for the images that are not on disk yet, then
computes MSE/SSIM against the right reference, ranks the blocks, suggests a
keep set and writes ranking.csv/json, heatmaps, the contact sheet, the
influence chart and the report. Torch-free: the renderer is passed in (see
:mod:`lora_prune.render.sweep`), and ``--from DIR`` runs with none.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from . import __version__
from .blocks import block_order, format_block_spec
from .errors import UnreadableFileError, UsageError
from .fileio import atomic_write_bytes
from .lora import LoraFile
from .metrics import diff_map, mean_std, mse, spearman, ssim
from .pictures import (
    colorize,
    contact_sheet,
    global_vmax,
    heatmap_overlay,
    influence_chart,
    label_tile,
    pruning_curve_chart,
    save_png,
)
from .provenance import CRITERION, FORMULA
from .rendercache import check_render, damaged, load_render, save_render
from .report import write_report
from .safetensors_io import TensorEntry, build_header
from .settings import MODES, check_batch_size, check_coverage

# Re-exported: the analysis' settings have always been importable from here.
from .settings import AnalyzeSettings as AnalyzeSettings
from .settings import PictureOptions as PictureOptions
from .slim import plan_slim
from .stats import block_stats
from .verdict import (
    BASE_DISTANCES,
    NOISE_MSE,
    Criterion,
    CurvePoint,
    Distance,
    effect_is_measurable,
    effect_of,
)

MANIFEST = "manifest.json"
SCHEMA_VERSION = 1


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
        return f"images/{self.key}.png"


class Renderer(Protocol):
    """Renders variants (sets of active blocks) for one prompt and seed."""

    model_id: str
    versions: Mapping[str, str]

    def __call__(
        self, variants: Sequence[frozenset[str]], prompt: str, seed: int, settings: AnalyzeSettings
    ) -> list[np.ndarray]: ...


Progress = Callable[[int, int], None]


def settings_to_json(settings: AnalyzeSettings) -> dict[str, Any]:
    """Settings as stored in manifests and reports (lists for tuples)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}


def settings_from_json(doc: Mapping[str, Any]) -> AnalyzeSettings:
    """Settings as stored in a manifest (lists for tuples)."""
    return AnalyzeSettings(
        prompts=tuple(doc["prompts"]),
        seeds=tuple(int(s) for s in doc["seeds"]),
        width=int(doc["width"]),
        height=int(doc["height"]),
        steps=int(doc["steps"]),
        guidance=float(doc["guidance"]),
        strength=float(doc["strength"]),
        modes=tuple(doc["modes"]),
    )


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


def write_json(path: Path, doc: object) -> None:
    atomic_write_bytes(path, (json.dumps(doc, indent=2, sort_keys=False) + "\n").encode())


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
) -> RenderStats:
    """Render the batches with an image that is missing or damaged; save each with its record.

    A cached image is used only when it matches its record (see
    :mod:`lora_prune.rendercache`); a damaged one is rendered again and counted.
    """
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    all_batches = list(batches(jobs, batch_size))
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


# --- analysis ---------------------------------------------------------------
@dataclass
class BlockRow:
    block: str
    mode: str
    mse: float
    mse_std: float
    ssim: float
    ssim_std: float
    rank: int
    params: int
    bytes: int
    norm: float
    norm_rank: int


@dataclass
class Suggestion:
    mode: str
    coverage_target: float
    coverage: float
    blocks: list[str]
    spec: str
    bytes: int
    bytes_before: int
    command: str | None
    #: "coverage" (estimated from per-block influence) or "kept_share" (the verdict, from the curve)
    criterion: str = "coverage"
    #: with "kept_share": the worst kept share per distance of the suggested set
    kept: dict[str, float] | None = None


@dataclass
class Analysis:
    """The result of a sweep: what ``ranking.json`` holds."""

    settings: dict[str, Any]
    rows: list[BlockRow]
    spearman: dict[str, float | None]
    suggestion: Suggestion
    references: list[dict[str, Any]]
    images: list[dict[str, Any]]
    renders: RenderStats = field(default_factory=RenderStats)
    out_dir: Path = Path()
    #: per prompt x seed: what the full LoRA does to the image (see lora_prune.verdict)
    effects: list[dict[str, Any]] = field(default_factory=list)
    #: the pruning curve, when one was rendered (analyze --curve, slim --auto)
    curve: list[CurvePoint] | None = None
    curve_criterion: Criterion | None = None

    @property
    def warnings(self) -> list[str]:
        """Images on which the LoRA shows (next to) no effect: nothing can be verified there."""
        prompts = self.settings["prompts"]
        return [
            f"the LoRA has no measurable effect on prompt {e['prompt']} ({prompts[e['prompt']]!r}) "
            f"seed {e['seed']}: MSE(base, full) {e['mse']:.3g} <= noise floor {NOISE_MSE:g}; use "
            "prompts where the LoRA shows, such as its trigger words"
            for e in self.effects
            if not e["measurable"]
        ]

    def rows_for(self, mode: str) -> list[BlockRow]:
        return sorted((r for r in self.rows if r.mode == mode), key=lambda r: r.rank)

    def to_json(self) -> dict[str, Any]:
        return {
            "tool": {"name": "lora-prune", "version": __version__},
            "settings": self.settings,
            "rows": [asdict(r) for r in self.rows],
            "spearman": self.spearman,
            "suggestion": asdict(self.suggestion),
            "references": self.references,
            "images": self.images,
            "contact_sheet": "contact_sheet.png",
            "influence": "influence.png",
            "effects": self.effects,
            "noise_floor_mse": NOISE_MSE,
            "warnings": self.warnings,
            "pruning_curve": None
            if self.curve is None
            else {
                "image": "pruning_curve.png",
                "order": self.curve[-1].blocks if self.curve else [],
                "criterion": CRITERION,
                "formula": FORMULA,
                "min_kept": self.curve_criterion.min_kept if self.curve_criterion else None,
                "points": [asdict(p) for p in self.curve],
            },
        }


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


def keep_size(lora: LoraFile, blocks: Sequence[str]) -> int:
    """The size of the file ``slim --keep blocks`` would write (header included)."""
    if not blocks:
        return 0
    plan = plan_slim(lora, blocks)
    # The header lists every kept tensor; slim adds a few provenance keys on top.
    entries = [TensorEntry(t.name, t.dtype, t.shape, bytes) for t in plan.kept_tensors]
    header, _ = build_header(entries, lora.metadata)
    return plan.kept_bytes + len(header)


def suggest_keep(
    rows: Sequence[BlockRow],
    coverage_target: float,
    lora: LoraFile | None,
    bytes_by_block: Mapping[str, int],
    lora_name: str,
) -> Suggestion:
    """The fewest top-ranked blocks whose MSE covers ``coverage_target`` of the total."""
    mode = rows[0].mode if rows else "solo"
    ranked = sorted(rows, key=lambda r: (r.rank, block_order(r.block)))
    total = sum(r.mse for r in ranked)
    chosen: list[str] = []
    covered = 0.0
    if total > 0:
        for row in ranked:
            if covered / total >= coverage_target - 1e-12:
                break
            chosen.append(row.block)
            covered += row.mse
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


def _tile_scale(options: PictureOptions, width: int) -> int:
    if options.tile_scale > 0:
        return options.tile_scale
    return max(1, 256 // max(width, 1))


def compute_analysis(
    manifest: Mapping[str, Any],
    out_dir: Path,
    *,
    coverage: float = 0.9,
    options: PictureOptions = PictureOptions(),
    lora: LoraFile | None = None,
) -> Analysis:
    """Metrics, ranking, pictures and report from the renders listed in a manifest."""
    check_coverage(coverage)
    settings = settings_from_json(manifest["settings"])
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
    # Before anything is written: a damaged render is refused by name, up front.
    for j in jobs:
        reason = check_render(out_dir / j.path, j.key, settings.width, settings.height)
        if reason is not None:
            raise damaged(out_dir / j.path, reason)
    block_info: dict[str, dict[str, Any]] = manifest["blocks"]
    blocks = sorted(block_info, key=block_order)
    refs: dict[tuple[str, int, int], Job] = {}
    for j in jobs:
        if j.kind in ("base", "full"):
            refs[(j.kind, j.prompt, j.seed)] = j

    cache: dict[str, np.ndarray] = {}

    def load(job: Job) -> np.ndarray:
        return load_render(out_dir / job.path, job.key, settings.width, settings.height)

    def image(job: Job) -> np.ndarray:
        # Keep only references in memory: sweeps of hundreds of images stay on disk.
        if job.kind in ("base", "full"):
            if job.key not in cache:
                cache[job.key] = load(job)
            return cache[job.key]
        return load(job)

    per: dict[tuple[str, str], list[tuple[float, float]]] = {}
    image_rows: list[dict[str, Any]] = []
    vmax_by_mode: dict[str, float] = {}
    for mode in settings.modes:
        ref_kind = "base" if mode == "solo" else "full"
        mode_jobs = [j for j in jobs if j.kind == mode]

        def diffs(
            mode_jobs: list[Job] = mode_jobs, ref_kind: str = ref_kind
        ) -> Iterator[np.ndarray]:
            for j in mode_jobs:
                yield diff_map(image(j), image(refs[(ref_kind, j.prompt, j.seed)]))

        vmax_by_mode[mode] = global_vmax(diffs()) if options.heatmap_scale == "global" else 0.0
        (out_dir / "heatmaps").mkdir(exist_ok=True)
        for j in mode_jobs:
            assert j.block is not None
            img = image(j)
            ref = image(refs[(ref_kind, j.prompt, j.seed)])
            d = diff_map(img, ref)
            m, s = mse(img, ref), ssim(img, ref)
            per.setdefault((mode, j.block), []).append((m, s))
            vmax = vmax_by_mode[mode] if options.heatmap_scale == "global" else float(d.max())
            heat_path = f"heatmaps/{mode}_{j.block}_p{j.prompt}_s{j.seed}.png"
            save_png(colorize(d, vmax, options.cmap), out_dir / heat_path)
            image_rows.append(
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

    rows: list[BlockRow] = []
    spear: dict[str, float | None] = {}
    for mode in settings.modes:
        mode_blocks = [b for b in blocks if (mode, b) in per]
        mses = [mean_std([v[0] for v in per[(mode, b)]]) for b in mode_blocks]
        ssims = [mean_std([v[1] for v in per[(mode, b)]]) for b in mode_blocks]
        norms = [float(block_info[b]["norm"]) for b in mode_blocks]
        ranks = _ranks([m.mean for m in mses])
        norm_ranks = _ranks(norms)
        for b, m, s, r, nr, n in zip(
            mode_blocks, mses, ssims, ranks, norm_ranks, norms, strict=True
        ):
            rows.append(
                BlockRow(
                    b,
                    mode,
                    m.mean,
                    m.std,
                    s.mean,
                    s.std,
                    r,
                    int(block_info[b]["params"]),
                    int(block_info[b]["bytes"]),
                    n,
                    nr,
                )
            )
        spear[mode] = spearman([m.mean for m in mses], norms)

    primary = "loo" if "loo" in settings.modes else "solo"
    bytes_by_block = {b: int(block_info[b]["bytes"]) for b in blocks}
    suggestion = suggest_keep(
        [r for r in rows if r.mode == primary],
        coverage,
        lora,
        bytes_by_block,
        Path(manifest["lora"]["path"]).name,
    )
    references = [
        {
            "prompt": p,
            "seed": s,
            "base": refs[("base", p, s)].path,
            "full": refs[("full", p, s)].path,
        }
        for (kind, p, s) in refs
        if kind == "base"
    ]
    effects = []
    for kind, p_i, s_i in list(refs):
        if kind != "base":
            continue
        effect = effect_of(image(refs[("base", p_i, s_i)]), image(refs[("full", p_i, s_i)]))
        effects.append(
            {
                "prompt": p_i,
                "seed": s_i,
                "mse": effect["mse"],
                "ssim_distance": effect["ssim"],
                "measurable": effect_is_measurable(effect["mse"]),
            }
        )
    analysis = Analysis(
        settings={
            **manifest["settings"],
            "lora": manifest["lora"]["path"],
            "lora_sha256": manifest["lora"]["sha256"],
            "model": manifest["model"],
            "heatmap_scale": options.heatmap_scale,
            "cmap": options.cmap,
            "heatmap_vmax": vmax_by_mode,
        },
        rows=rows,
        spearman=spear,
        suggestion=suggestion,
        references=references,
        images=image_rows,
        out_dir=out_dir,
        effects=effects,
    )
    _write_pictures(analysis, out_dir, options, image, refs, jobs)
    _write_csv(out_dir / "ranking.csv", rows)
    stored = read_curve(out_dir, manifest)
    if stored is not None:
        _attach_curve(analysis, *stored, lora=lora)
    write_results(analysis)
    return analysis


CURVE_FILE = "pruning_curve.json"


def write_results(analysis: Analysis) -> None:
    """ranking.json and report.html (and the curve's picture) from ``analysis``."""
    out_dir = analysis.out_dir
    if analysis.curve:
        curve = analysis.curve
        chosen = analysis.suggestion.blocks and analysis.suggestion.criterion == CRITERION
        names = sorted({n for p in curve for n in p.kept})
        chart = pruning_curve_chart(
            [p.k for p in curve],
            {n: [p.kept.get(n, 0.0) for p in curve] for n in names},
            [p.bytes for p in curve],
            min_kept=analysis.curve_criterion.min_kept if analysis.curve_criterion else None,
            chosen=len(analysis.suggestion.blocks) if chosen else None,
        )
        save_png(chart, out_dir / "pruning_curve.png")
    write_json(out_dir / "ranking.json", analysis.to_json())
    write_report(out_dir, analysis.to_json())


def set_curve(
    analysis: Analysis,
    curve: Sequence[CurvePoint],
    criterion: Criterion,
    *,
    lora: LoraFile | None = None,
) -> None:
    """Attach a pruning curve; the suggestion becomes the fewest blocks passing the verdict.

    The curve is stored beside the renders (``pruning_curve.json``) so that
    ``analyze --from`` keeps it.
    """
    _attach_curve(analysis, curve, criterion, lora=lora)
    doc = {
        "lora_sha256": analysis.settings["lora_sha256"],
        "settings": {
            k: analysis.settings[k]
            for k in ("prompts", "seeds", "width", "height", "steps", "guidance", "strength")
        },
        "min_kept": criterion.min_kept,
        "min_ssim": criterion.min_ssim,
        "points": [asdict(p) for p in curve],
    }
    write_json(analysis.out_dir / CURVE_FILE, doc)
    write_results(analysis)


def _attach_curve(
    analysis: Analysis,
    curve: Sequence[CurvePoint],
    criterion: Criterion,
    *,
    lora: LoraFile | None = None,
) -> None:
    analysis.curve = list(curve)
    analysis.curve_criterion = criterion
    passing = [p for p in curve if p.passed and p.k > 0]
    if passing:
        best = passing[0]
        s = analysis.suggestion
        spec = format_block_spec(best.blocks)
        name = Path(analysis.settings["lora"]).name
        analysis.suggestion = Suggestion(
            mode=s.mode,
            coverage_target=s.coverage_target,
            coverage=s.coverage,
            blocks=list(best.blocks),
            spec=spec,
            bytes=best.bytes,
            bytes_before=lora.header.file_size if lora is not None else s.bytes_before,
            command=f"lora-prune slim {name} --keep {spec}",
            criterion=CRITERION,
            kept=dict(best.worst),
        )


def read_curve(
    out_dir: Path, manifest: Mapping[str, Any]
) -> tuple[list[CurvePoint], Criterion] | None:
    """A stored curve of the same LoRA and render settings, else None (never trusted blindly)."""
    path = out_dir / CURVE_FILE
    if not path.exists():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
        settings = manifest["settings"]
        if doc["lora_sha256"] != manifest["lora"]["sha256"] or any(
            doc["settings"][k] != settings[k] for k in doc["settings"]
        ):
            return None
        points = [CurvePoint(**p) for p in doc["points"]]
        criterion = Criterion(
            min_kept=float(doc["min_kept"]),
            min_ssim=None if doc["min_ssim"] is None else float(doc["min_ssim"]),
        )
    except (OSError, ValueError, KeyError, TypeError, RecursionError, UsageError):
        return None
    return points, criterion


def _write_csv(path: Path, rows: Sequence[BlockRow]) -> None:
    buf = io.StringIO()
    fields = list(BlockRow.__dataclass_fields__)
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in sorted(rows, key=lambda r: (MODES.index(r.mode), r.rank, block_order(r.block))):
        writer.writerow(
            {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in asdict(row).items()}
        )
    atomic_write_bytes(path, buf.getvalue().encode())


def _write_pictures(
    analysis: Analysis,
    out_dir: Path,
    options: PictureOptions,
    image: Callable[[Job], np.ndarray],
    refs: Mapping[tuple[str, int, int], Job],
    jobs: Sequence[Job],
) -> None:
    settings = analysis.settings
    primary = "solo" if "solo" in settings["modes"] else "loo"
    scale = _tile_scale(options, int(settings["width"]))
    p0, s0 = 0, int(settings["seeds"][0])
    for mode in settings["modes"]:
        ref_kind = "base" if mode == "solo" else "full"
        rows = analysis.rows_for(mode)
        if options.sheet_order == "block":
            rows = sorted(rows, key=lambda r: block_order(r.block))
        by_block = {j.block: j for j in jobs if j.kind == mode and j.prompt == p0 and j.seed == s0}
        ref = image(refs[(ref_kind, p0, s0)])
        vmax_global = float(settings["heatmap_vmax"].get(mode, 0.0))
        tiles = [
            label_tile(image(refs[("base", p0, s0)]), "no LoRA", bottom="reference", scale=scale),
            label_tile(image(refs[("full", p0, s0)]), "full LoRA", bottom="reference", scale=scale),
        ]
        for row in rows:
            img = image(by_block[row.block])
            d = diff_map(img, ref)
            vmax = vmax_global if options.heatmap_scale == "global" else float(d.max())
            shown = heatmap_overlay(img, d, vmax, options.opacity, options.cmap)
            tiles.append(
                label_tile(
                    shown,
                    f"{row.block} #{row.rank}",
                    top_right=f"MSE {row.mse:.1f}",
                    bottom=f"SSIM {row.ssim:.3f}",
                    scale=scale,
                )
            )
        header = (
            f"{Path(settings['lora']).name} - {mode} (vs {'no LoRA' if mode == 'solo' else 'full LoRA'}) - "
            f"prompt 0, seed {s0}; heatmaps on a {options.heatmap_scale} scale"
        )
        sheet = contact_sheet(tiles, max_pixels=options.sheet_max_pixels, header=header)
        name = "contact_sheet.png" if mode == primary else f"contact_sheet_{mode}.png"
        save_png(sheet, out_dir / name)
    chart_mode = primary
    rows = sorted(analysis.rows_for(chart_mode), key=lambda r: block_order(r.block))
    chart = influence_chart(
        [r.block for r in rows], [r.mse for r in rows], [1.0 - r.ssim for r in rows]
    )
    save_png(chart, out_dir / "influence.png")


def build_manifest(
    lora: LoraFile,
    lora_sha256: str,
    settings: AnalyzeSettings,
    jobs: Sequence[Job],
    *,
    model_id: str,
    versions: Mapping[str, str],
) -> dict[str, Any]:
    stats = {
        b.block: {"params": b.params, "bytes": b.bytes, "norm": b.norm, "modules": b.modules}
        for b in block_stats(lora)
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
        "blocks": stats,
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
    path = out_dir / MANIFEST
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise UsageError(
            "no manifest.json in the folder", out_dir, "give the --out folder of an earlier analyze"
        ) from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise UnreadableFileError("cannot read manifest.json", path, "run analyze again") from exc
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA_VERSION:
        raise UnreadableFileError("manifest.json has an unknown layout", path, "run analyze again")
    return doc


def analyze(
    lora: LoraFile,
    lora_sha256: str,
    settings: AnalyzeSettings,
    out_dir: Path,
    renderer: Renderer,
    *,
    batch_size: int = 8,
    coverage: float = 0.9,
    options: PictureOptions = PictureOptions(),
    progress: Progress | None = None,
    curve: Criterion | None = None,
    distances: Mapping[str, Distance] | None = None,
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
            heatmaps and ``report.html`` go; earlier renders there are reused.
        renderer: renders a batch of block variants (the render extra's
            session renderer, or any :class:`Renderer`).
        batch_size: variants per renderer call.
        coverage: share of the total influence the suggested keep set covers.
        options: heatmap and contact-sheet options.
        progress: called with ``(done, total)`` renders.
        curve: with a criterion, also render and score the pruning curve.
        distances: the image distances of the curve's verdict.

    Example::

        with open_session(ModelSpec(model="tiny"), lora) as session:
            result = analyze(lora, file_sha256(lora.path), AnalyzeSettings(prompts=("a cat",)),
                             Path("out"), session.renderer)
        print([(r.block, r.mse) for r in result.rows_for("solo")[:5]])
    """
    check_coverage(coverage)
    check_batch_size(batch_size)
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
        lora, lora_sha256, settings, jobs, model_id=renderer.model_id, versions=renderer.versions
    )
    write_json(out_dir / MANIFEST, manifest)
    stats = render_missing(
        jobs, out_dir, renderer, settings, batch_size=batch_size, progress=progress
    )
    result = compute_analysis(manifest, out_dir, coverage=coverage, options=options, lora=lora)
    result.renders = stats
    if curve is not None and not result.warnings:
        # Imported here: verify builds on this module.
        from .verify import auto_keep

        primary = "loo" if "loo" in settings.modes else "solo"
        order = [r.block for r in result.rows_for(primary)]
        auto = auto_keep(
            lora,
            lora_sha256,
            order,
            settings,
            renderer,
            criterion=curve,
            distances=distances or BASE_DISTANCES,
            batch_size=batch_size,
            stop_at_pass=False,
            size_of=lambda blocks: keep_size(lora, blocks),
        )
        set_curve(result, auto.curve, curve, lora=lora)
    return result
