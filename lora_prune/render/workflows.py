"""The jobs that render, from files to results: ``render``, ``verify``, ``slim --auto``,
``demo`` and ``check --model``'s re-verification (``analyze``'s is :mod:`.runs`).

Each refuses to write over an input before it writes anything, opens its
sessions and chains the library verbs (analyze -> rank -> choose blocks -> slim
-> verify); the CLI only prints the dataclasses they return.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..analysis import (
    MANIFEST,
    Analysis,
    CachingRenderer,
    analyze,
    read_manifest,
    set_curve,
)
from ..blocks import BlockSpec, resolve_blocks, sort_blocks
from ..budget import BudgetCandidate, budget_error, plan_budget, record_reserve
from ..errors import LoraPruneError, OutputError, OutputExistsError
from ..fileio import refuse_overwrite
from ..lora import LoraFile, read_lora
from ..pictures import save_png
from ..resize import module_spectra, resize_lora, resized_ranks
from ..safetensors_io import file_sha256, read_header
from ..settings import (
    DEFAULT_BATCH_SIZE,
    MODES,
    TINY_MODEL_ID,
    AnalyzeSettings,
    ModelSpec,
    PictureOptions,
    RenderRequest,
    RenderSettings,
    settings_from_json,
)
from ..slim import SlimResult, default_output, keep_size, slim_lora
from ..stats import block_stats_and_sha256
from ..testing import planted_lora
from ..verdict import DEFAULT_CRITERION, Criterion, Distance
from ..verify import (
    VERIFICATION_KEY,
    AutoResult,
    VerifyResult,
    auto_keep_ranked,
    reference_renders,
    verify_candidate,
    verify_candidates,
    verify_slim,
    verify_target,
)
from .combination import CombinationResult, render_combination
from .loading import LoadedModel
from .perceptual import verdict_distances
from .session import open_session

Progress = Callable[[int, int], None]


def render_blocks(
    lora_path: Path,
    spec: ModelSpec,
    settings: RenderSettings,
    blocks: Iterable[str] | BlockSpec,
    output: Path,
    *,
    force: bool = False,
) -> CombinationResult:
    """Render ``blocks`` of the LoRA beside no LoRA and the full LoRA; write the picture.

    The first prompt and seed of ``settings``; blocks the LoRA does not have are
    left out (the result's ``blocks`` are those rendered).
    """
    model_file = None if spec.model == TINY_MODEL_ID else Path(spec.model)
    refuse_overwrite([lora_path, spec.transformer_file, model_file], [output])
    if output.exists() and not force:
        raise OutputExistsError("the output exists", output, "pass --force to replace it")
    lora = read_lora(lora_path)
    chosen = (resolve_blocks(blocks, lora.family.blocks) or frozenset()) & set(lora.blocks)
    with open_session(spec, lora) as session:
        image = settings.image(
            settings.prompts[0], settings.seeds[0], session.renderer.max_sequence_length
        )
        result = render_combination(session.engine, chosen, image)
    save_png(result.picture, output)
    return result


def verify_files(
    full_path: Path,
    slim_path: Path,
    spec: ModelSpec,
    settings: RenderSettings,
    out_dir: Path,
    *,
    criterion: Criterion = DEFAULT_CRITERION,
    perceptual: str | None = None,
) -> VerifyResult:
    """``verify``: render the slim file against its full file and judge it; write the proof.

    A block subset renders as block masks of the full LoRA; a resized file (from
    ``slim --auto --max-size``) as itself, beside the full LoRA.
    """
    refuse_overwrite([full_path, slim_path, spec.transformer_file], folders=[out_dir])
    full, slim = read_lora(full_path), read_lora(slim_path)
    sha = file_sha256(full_path)
    kept, resized = verify_target(full, sha, slim)
    with (
        open_session(spec, full) as session,
        open_session(spec, slim) if resized else contextlib.nullcontext() as candidate,
    ):
        return verify_slim(
            full,
            sha,
            kept,
            settings,
            session.renderer,
            criterion=criterion,
            distances=verdict_distances(perceptual, spec.device),
            slim_path=slim_path,
            out_dir=out_dir,
            scale=max(1, 256 // settings.width),
            candidate=candidate.renderer if candidate is not None else None,
        )


@dataclass
class AutoSlimResult:
    analysis: Analysis
    auto: AutoResult
    #: the file written (for a reduced rank, its verification is :attr:`verification`)
    slim: SlimResult
    #: with ``max_size``: every file tried, the full-rank keep set first
    tried: list[BudgetCandidate] = field(default_factory=list)
    #: the uniform rank of the file written; None: the blocks as stored or :attr:`ranks`
    rank: int | None = None
    #: the per-module ranks of the file written (stem -> rank), when it was an allocation
    ranks: dict[str, int] | None = None
    verification: VerifyResult | None = None


def auto_slim(
    lora: LoraFile,
    spec: ModelSpec,
    settings: AnalyzeSettings,
    work_dir: Path,
    *,
    criterion: Criterion = DEFAULT_CRITERION,
    perceptual: str | None = None,
    output: Path | None = None,
    force: bool = False,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Progress | None = None,
    max_size: int | None = None,
) -> AutoSlimResult:
    """Rank blocks (leave-one-out, reusing earlier renders), find the smallest passing keep set, write it.

    The keep set is the fewest top-ranked blocks whose slim keeps ``criterion``'s
    share of the LoRA's effect on every image; the pruning curve of every k
    rendered goes into ``work_dir`` (pruning_curve.png, ranking.json, report).

    With ``max_size`` (bytes), the file written must fit it. When that keep set
    does not, per uniform rank (half the LoRA's rank, a quarter, ... 1) the most
    top-ranked blocks that fit are resized, and a few keep sets with per-module
    ranks water-filled by energy per byte (:func:`~lora_prune.budget.plan_budget`);
    all are rendered in batches as block masks and rank caps of the full LoRA,
    against the same base and full renders, and the passing one keeping the
    largest share of the effect is written (to ``work_dir/budget`` first,
    re-rendered from the file) with the verification record of its own file. None passing raises
    :class:`~lora_prune.errors.BudgetError` with the smallest size found to pass.

    ``perceptual`` (a transformers image encoder) adds its distance to the verdict.
    Refuses, before anything is written, an ``output`` or ``work_dir`` that would hit an input.
    """
    refuse_overwrite([lora.path, spec.transformer_file], [output], [work_dir])
    distances = verdict_distances(perceptual, spec.device)
    # One read of the LoRA's data: its hash (cache keys, provenance) and the manifest's norms.
    stats, sha = block_stats_and_sha256(lora)
    settings = _keep_earlier_modes(settings, work_dir)
    with open_session(spec, lora) as session:
        analysis = analyze(
            lora,
            sha,
            settings,
            work_dir,
            session.renderer,
            batch_size=batch_size,
            progress=progress,
            stats=stats,
        )
        auto = auto_keep_ranked(
            lora,
            sha,
            analysis,
            settings,
            # The curve's keep sets are cached beside the sweep: a rerun renders none again.
            CachingRenderer(session.renderer, work_dir, sha),
            criterion=criterion,
            distances=distances,
            batch_size=batch_size,
            progress=progress,
        )
        loaded = session.loaded
    set_curve(analysis, auto.curve, criterion, lora=lora)
    full_rank = BudgetCandidate(
        auto.blocks,
        None,
        keep_size(lora, auto.blocks),
        auto.verification.kept_share,
        auto.verification.passed,
    )
    record = {VERIFICATION_KEY: auto.verification.metadata_value()}
    if max_size is None or _slim_size(lora, auto.blocks, record, sha, work_dir) <= max_size:
        slim = slim_lora(
            lora, auto.blocks, output=output, force=force, extra_metadata=record, source_sha256=sha
        )
        tried = [full_rank] if max_size is not None else []
        return _within(AutoSlimResult(analysis, auto, slim, tried), max_size)
    tried = [full_rank]
    zero = set(analysis.zero_blocks)
    pool = [b for b in auto.order if b not in zero]
    reserve = record_reserve(lora, len(settings.prompts) * len(settings.seeds), pool)
    best = _search_budget(
        lora, sha, spec, settings, work_dir, analysis, auto, loaded, max_size - reserve,
        tried, pool, criterion=criterion, distances=distances, batch_size=batch_size,
        progress=progress,
    )  # fmt: skip
    if best is None:
        raise budget_error(lora, max_size, tried, full_rank)
    chosen, verification = best
    slim = _write_resized(lora, sha, chosen, verification, output, force)
    result = AutoSlimResult(analysis, auto, slim, tried, chosen.rank, chosen.ranks, verification)
    return _within(result, max_size)


def _search_budget(
    lora: LoraFile,
    sha: str,
    spec: ModelSpec,
    settings: AnalyzeSettings,
    work_dir: Path,
    analysis: Analysis,
    auto: AutoResult,
    loaded: LoadedModel,
    budget: int,
    tried: list[BudgetCandidate],
    order: list[str],
    *,
    criterion: Criterion,
    distances: Mapping[str, Distance],
    batch_size: int,
    progress: Progress | None,
) -> tuple[BudgetCandidate, VerifyResult] | None:
    """The best lower-rank candidate under ``budget`` that passes, proved on its own file.

    Every candidate is rendered without writing it: one engine holds the full
    LoRA in its SVD basis and renders each candidate's keep set as block masks
    and its ranks as rank caps, ``batch_size`` candidates per pipeline call.
    Then the passing candidates, the largest share first, are written to
    ``work_dir/budget`` and rendered from that file (its stored dtype rounds
    the factors) until one passes there too: that verification is what the
    output records. Every candidate is appended to ``tried``; a candidate whose
    file was rendered carries the file's share and verdict. ``order``: the ranked
    blocks candidates take from (a block whose delta is exactly zero is none of them).
    """
    # The blocks' influence weighs their energy in the per-module allocations.
    weights = {r.block: r.mse for r in analysis.rows_for(analysis.suggestion.mode)}
    spectra = module_spectra(lora, order)
    plan = plan_budget(lora, order, len(auto.blocks), budget, spectra, weights)
    if not plan:
        return None
    caps = [resized_ranks(lora, c.blocks, c.ranks if c.ranks is not None else c.rank) for c in plan]
    with open_session(spec, lora, loaded=loaded, truncatable=True) as session:
        searched = verify_candidates(
            lora,
            sha,
            [(c.blocks, cap) for c, cap in zip(plan, caps, strict=True)],
            settings,
            session.renderer,
            auto.references,
            criterion=criterion,
            distances=distances,
            batch_size=batch_size,
            progress=progress,
        )
    for candidate, verification in zip(plan, searched, strict=True):
        candidate.kept_share, candidate.passed = verification.kept_share, verification.passed
    tried.extend(plan)
    passing = [(i, c) for i, c in enumerate(plan) if c.passed]
    folder = work_dir / "budget"
    if passing:
        folder.mkdir(parents=True, exist_ok=True)
    # sorted() is stable: among equal shares the earlier (higher-rank) candidate goes first.
    for i, candidate in sorted(passing, key=lambda ic: _share(ic[1]), reverse=True):
        name = f"rank{candidate.rank}" if candidate.ranks is None else f"ranks{i}"
        path = folder / f"{name}.safetensors"
        resize_lora(
            lora,
            path,
            rank=candidate.rank,
            ranks=candidate.ranks,
            keep=candidate.blocks,
            force=True,
            source_sha256=sha,
        )
        with open_session(spec, read_lora(path), loaded=loaded) as session:
            verification = verify_candidate(
                lora,
                sha,
                candidate.blocks,
                settings,
                session.renderer,
                auto.references,
                criterion=criterion,
                distances=distances,
            )
        candidate.kept_share, candidate.passed = verification.kept_share, verification.passed
        if verification.passed:
            return candidate, verification
    return None


def _write_resized(
    lora: LoraFile,
    sha: str,
    chosen: BudgetCandidate,
    verification: VerifyResult,
    output: Path | None,
    force: bool,
) -> SlimResult:
    """Write the chosen candidate with its verification record; reported like a slim."""
    resized = resize_lora(
        lora,
        output if output is not None else default_output(lora.path),
        rank=chosen.rank,
        ranks=chosen.ranks,
        keep=chosen.blocks,
        force=force,
        extra_metadata={VERIFICATION_KEY: verification.metadata_value()},
        source_sha256=sha,
    )
    verification.slim = str(resized.output)
    slim = SlimResult(
        source=lora.path,
        output=resized.output,
        kept_blocks=sort_blocks(chosen.blocks),
        dropped_blocks=sort_blocks(set(lora.blocks) - set(chosen.blocks)),
        absent=[],
        bytes_before=resized.bytes_before,
        bytes_after=resized.bytes_after,
        tensors_before=len(lora.header.tensors),
        tensors_after=len(read_header(resized.output).tensors),
        metadata=resized.metadata,
    )
    return slim


def _slim_size(
    lora: LoraFile, blocks: Sequence[str], record: Mapping[str, str], sha: str, work_dir: Path
) -> int:
    """The size of the slim file with its verification record, as written: measured, not estimated."""
    trial = work_dir / "budget" / "full-rank.trial.safetensors"
    trial.parent.mkdir(parents=True, exist_ok=True)
    try:
        written = slim_lora(
            lora, blocks, output=trial, force=True, extra_metadata=record, source_sha256=sha
        )
        return written.bytes_after
    finally:
        trial.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            trial.parent.rmdir()  # only when empty: earlier candidates stay


def _share(candidate: BudgetCandidate) -> float:
    # Shares equal to render noise tie, and the earlier (higher-rank) candidate stays.
    return round(candidate.kept_share, 4) if candidate.kept_share is not None else -1.0


def _within(result: AutoSlimResult, max_size: int | None) -> AutoSlimResult:
    """The result, after making sure the file written fits the budget."""
    if max_size is not None and result.slim.bytes_after > max_size:
        # record_reserve leaves room for every key written: a bug, not the user's doing.
        raise OutputError(
            f"the file written is {result.slim.bytes_after} bytes, over the budget of {max_size}",
            result.slim.output,
            "report this bug",
        )
    return result


def _keep_earlier_modes(settings: AnalyzeSettings, work_dir: Path) -> AnalyzeSettings:
    """Settings that also keep the modes of an earlier analyze in ``work_dir``.

    Reusing an analyze folder must not replace its solo ranking and report with a
    leave-one-out-only one; when the earlier run differs in anything but its
    modes, it is replaced as usual.
    """
    if not (work_dir / MANIFEST).exists():
        return settings
    try:
        earlier = settings_from_json(read_manifest(work_dir)["settings"])
    except (LoraPruneError, KeyError, TypeError, ValueError):
        return settings
    if replace(earlier, modes=settings.modes) != settings:
        return settings
    modes = tuple(m for m in MODES if m in {*earlier.modes, *settings.modes})
    return replace(settings, modes=modes)


#: The demo's planted blocks and their strengths: a strong double and single
#: block and a weaker pair.
DEMO_PLANTED: Mapping[str, float] = {
    "double.3": 1.0,
    "double.12": 0.6,
    "single.7": 1.0,
    "single.20": 0.6,
}
DEMO_PROMPTS = ("a red fox in the snow", "a lighthouse at dusk")
DEMO_SEEDS = (0, 1)


@dataclass
class DemoResult:
    lora_path: Path
    planted: dict[str, float]
    analysis: Analysis
    slim: SlimResult
    verification: VerifyResult
    seconds: float


def run_demo(
    out_dir: Path, *, progress: Progress | None = None, batch_size: int = 32
) -> DemoResult:
    """Plant a few strong blocks in a LoRA for the tiny model, find them, slim and verify."""
    t0 = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)
    lora_path = out_dir / "demo_lora.safetensors"
    if not lora_path.exists():
        planted_lora(lora_path, DEMO_PLANTED, grammar="kohya", rank=4, seed=0)
    lora = read_lora(lora_path)
    spec = ModelSpec(model=TINY_MODEL_ID)
    settings = RenderRequest(prompts=DEMO_PROMPTS, seeds=DEMO_SEEDS).settings(spec.model, MODES)
    sha = file_sha256(lora_path)
    with open_session(spec, lora) as session:
        # The weaker planted blocks carry only a few percent of the influence: cover
        # (nearly) all of it so that the demo keeps every block that does something.
        analysis = analyze(
            lora,
            sha,
            settings,
            out_dir / "analysis",
            session.renderer,
            batch_size=batch_size,
            coverage=0.99,
            options=PictureOptions(),
            progress=progress,
        )
        keep = analysis.suggestion.blocks
        slim = slim_lora(lora, keep, output=out_dir / "demo_lora.slim.safetensors", force=True)
        verification = verify_slim(
            lora,
            sha,
            read_lora(slim.output).blocks,
            settings,
            session.renderer,
            slim_path=slim.output,
            out_dir=out_dir / "verify",
            scale=4,
        )
    return DemoResult(
        lora_path, dict(DEMO_PLANTED), analysis, slim, verification, time.perf_counter() - t0
    )


def make_reverify(
    spec: ModelSpec, settings: AnalyzeSettings, criterion: Criterion
) -> Callable[[Path, Path], VerifyResult]:
    """A re-rendering verifier for ``check --model``: (slim, full) -> verification."""

    def reverify(slim_path: Path, full_path: Path) -> VerifyResult:
        full, file = read_lora(full_path), read_lora(slim_path)
        sha = file_sha256(full_path)
        kept, resized = verify_target(full, sha, file)
        with open_session(spec, full) as session:
            if not resized:
                return verify_slim(
                    full,
                    sha,
                    kept,
                    settings,
                    session.renderer,
                    criterion=criterion,
                    slim_path=slim_path,
                )
            refs, _ = reference_renders(full, settings, session.renderer, criterion)
            loaded = session.loaded
        with open_session(spec, file, loaded=loaded) as session:
            return verify_candidate(
                full,
                sha,
                kept,
                settings,
                session.renderer,
                refs,
                criterion=criterion,
                slim_path=slim_path,
            )

    return reverify
