"""Proving a slim LoRA: it must render like the full one.

:func:`check_subset` (from :mod:`lora_prune.provenance`, re-exported here) proves at the byte level that a slim file holds whole
blocks of the full file and nothing else. Because of that, rendering the full
LoRA with only the slim file's blocks switched on *is* rendering the slim file,
so :func:`verify_slim` and :func:`auto_keep` render per-image block masks on one
engine attached to the full LoRA (torch-free here: the renderer is passed in).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from ._version import __version__
from .blocks import block_order, format_block_spec, sort_blocks
from .errors import NoEffectError, NotASubsetError, UsageError
from .fileio import refuse_overwrite, write_json
from .lora import LoraFile
from .markers import pinned_blocks
from .metrics import diff_map
from .pictures import (
    HEATMAP_UNIT,
    colour_scale,
    contact_sheet,
    global_vmax,
    heatmap_overlay,
    label_tile,
    save_png,
    side_by_side,
)
from .provenance import (
    CRITERION,
    FORMULA,
    VERIFICATION_KEY,
    VerificationRecord,
    check_subset,
    resized_source,
)
from .renderer import Renderer
from .settings import DEFAULT_BATCH_SIZE, DEFAULT_CMAP, AnalyzeSettings, settings_to_json
from .slim import keep_size
from .verdict import (
    BASE_DISTANCES,
    DEFAULT_CRITERION,
    NOISE_MSE,
    Criterion,
    CurvePoint,
    Distance,
    ImageScore,
    curve_point,
    effect_of,
    no_effect_error,
    score_image,
    unmeasurable,
    verdict_passes,
    worst_kept,
)

__all__ = [
    "VERIFICATION_KEY",
    "AutoResult",
    "NotASubsetError",
    "RankRenderer",
    "RankedBlock",
    "Ranking",
    "VerifyResult",
    "auto_keep",
    "auto_keep_ranked",
    "check_subset",
    "reference_renders",
    "verify_candidate",
    "verify_candidates",
    "verify_slim",
    "verify_target",
]


#: per (prompt index, seed): the base render, the full render and the full LoRA's effect
_References = dict[tuple[int, int], tuple[np.ndarray, np.ndarray, dict[str, float]]]


class RankRenderer(Protocol):
    """A :class:`Renderer` that also renders each variant at its own module ranks.

    ``ranks[i]``: module stem -> rank of variant i (the others as stored), as
    the file :func:`~lora_prune.resize.resize_lora` writes with those ranks;
    the block engine's renderer in a session opened ``truncatable``.
    """

    model_id: str
    versions: Mapping[str, str]

    def __call__(
        self,
        variants: Sequence[frozenset[str]],
        prompt: str,
        seed: int,
        settings: AnalyzeSettings,
        ranks: Sequence[Mapping[str, int] | None] | None = None,
    ) -> list[np.ndarray]: ...


class RankedBlock(Protocol):
    """A row of a ranking: the block it ranks (an analysis' :class:`~lora_prune.analysis.BlockRow`)."""

    @property
    def block(self) -> str: ...


class Ranking(Protocol):
    """Blocks ranked per mode, most important first: what :func:`auto_keep_ranked` reads.

    :class:`~lora_prune.analysis.Analysis` is one. Spelled as a protocol because
    the analysis renders its pruning curve with this module, so this module
    cannot import it back.
    """

    def rows_for(self, mode: str) -> Sequence[RankedBlock]: ...


@dataclass
class VerifyResult:
    """A slim LoRA's verification: per-image scores against its full LoRA, and the verdict."""

    full: str
    slim: str | None
    full_sha256: str
    kept_blocks: list[str]
    criterion: Criterion
    settings: dict[str, Any]
    model: str
    images: list[ImageScore] = field(default_factory=list)

    @property
    def min_ssim(self) -> float | None:
        return self.criterion.min_ssim

    @property
    def min_kept(self) -> float:
        return self.criterion.min_kept

    @property
    def measurable(self) -> bool:
        """False when the LoRA shows no effect on some image: then nothing is proved."""
        return all(i.measurable for i in self.images)

    @property
    def passed(self) -> bool:
        return verdict_passes(self.images)

    @property
    def worst_ssim(self) -> float:
        return min(i.ssim for i in self.images)

    @property
    def mean_ssim(self) -> float:
        return float(np.mean([i.ssim for i in self.images]))

    @property
    def worst_kept(self) -> dict[str, float]:
        return worst_kept(self.images)

    @property
    def kept_share(self) -> float | None:
        """The smallest kept share over images and distances (None without an effect)."""
        if not self.measurable:
            return None
        worst = self.worst_kept
        return min(worst.values()) if worst else None

    def no_effect_error(self) -> NoEffectError:
        return no_effect_error(self.images, self.settings["prompts"], self.slim or self.full)

    def to_json(self) -> dict[str, Any]:
        return {
            "tool": {"name": "lora-prune", "version": __version__},
            "full": self.full,
            "slim": self.slim,
            "full_sha256": self.full_sha256,
            "kept_blocks": format_block_spec(self.kept_blocks),
            "model": self.model,
            "settings": self.settings,
            "criterion": CRITERION,
            "formula": FORMULA,
            "min_kept": self.min_kept,
            "min_ssim": self.min_ssim,
            "noise_floor_mse": NOISE_MSE,
            "measurable": self.measurable,
            "passed": self.passed,
            "worst_ssim": self.worst_ssim,
            "mean_ssim": self.mean_ssim,
            "kept_share": self.kept_share,
            "worst_kept": self.worst_kept,
            "images": [asdict(i) for i in self.images],
        }

    def record(self) -> VerificationRecord:
        return VerificationRecord(
            passed=self.passed,
            full_sha256=self.full_sha256,
            min_kept=self.min_kept,
            min_ssim=self.min_ssim,
            worst_ssim=self.worst_ssim,
            worst_kept=self.worst_kept,
            distances=sorted(self.images[0].effect) if self.images else [],
            images=[
                {
                    "prompt": i.prompt,
                    "seed": i.seed,
                    "kept": {k: round(v, 6) for k, v in i.kept.items()},
                    "effect_mse": round(i.effect["mse"], 6),
                }
                for i in self.images
            ],
            model=self.model,
            settings={
                "prompts": list(self.settings["prompts"]),
                "seeds": list(self.settings["seeds"]),
                "size": [self.settings["width"], self.settings["height"]],
                "steps": self.settings["steps"],
            },
        )

    def metadata_value(self) -> str:
        """The compact JSON stored in a slim file's ``lora_prune.verification``."""
        return self.record().to_metadata()


def verify_slim(
    full: LoraFile,
    full_sha256: str,
    keep: Sequence[str],
    settings: AnalyzeSettings,
    renderer: Renderer,
    *,
    criterion: Criterion = DEFAULT_CRITERION,
    distances: Mapping[str, Distance] = BASE_DISTANCES,
    slim_path: Path | None = None,
    out_dir: Path | None = None,
    scale: int = 1,
    candidate: Renderer | None = None,
) -> VerifyResult:
    """Render base, full and the kept blocks for every prompt x seed and score them.

    The verdict is :mod:`lora_prune.verdict`'s: the share of the LoRA's effect
    kept, on every image and distance. With ``out_dir``, writes ``verify.png``
    (rows of base | full | slim | heatmap of slim vs full) and ``verify.json``.

    Args:
        full: the full LoRA; ``full_sha256`` its file hash (recorded in the result).
        keep: the blocks the slim file keeps (see :func:`check_subset`).
        settings: prompts, seeds, size, steps, guidance and strength of the renders.
        renderer: renders a batch of block variants of ``full``.
        criterion: the verdict's thresholds (share of the effect kept, SSIM).
        distances: the image distances the verdict uses.
        slim_path: the slim file, recorded in the result.
        out_dir: where to write ``verify.png`` and ``verify.json``; None writes nothing.
            A folder that is or holds the full or the slim file is refused first.
        scale: upscale factor of the picture's tiles.
        candidate: renders the file under test instead of ``full``'s kept blocks,
            for a file that is no subset of ``full`` (a resized LoRA): a renderer
            attached to that file, whose blocks ``keep`` then names. The verdict
            is the same: the share of the full LoRA's effect the file keeps.

    Example::

        kept = check_subset(full, read_lora("small.safetensors"))
        with open_session(ModelSpec(model="tiny"), full) as session:
            result = verify_slim(full, file_sha256(full.path), kept, settings, session.renderer)
        print(result.passed, result.worst_kept)
    """
    refuse_overwrite([full.path, slim_path], folders=[out_dir])
    kept = frozenset(keep)
    all_blocks = frozenset(full.blocks)
    result = _new_result(
        full, full_sha256, sort_blocks(kept), criterion, settings, renderer, slim_path=slim_path
    )
    shown: list[tuple[np.ndarray, np.ndarray, np.ndarray, ImageScore]] = []
    for p, prompt in enumerate(settings.prompts):
        for seed in settings.seeds:
            if candidate is None:
                base, full_img, slim_img = renderer(
                    [frozenset(), all_blocks, kept], prompt, seed, settings
                )
            else:
                base, full_img = renderer([frozenset(), all_blocks], prompt, seed, settings)
                (slim_img,) = candidate([kept], prompt, seed, settings)
            score = score_image(base, full_img, slim_img, p, seed, criterion, distances)
            result.images.append(score)
            if out_dir is not None:
                shown.append((base, full_img, slim_img, score))
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        save_png(_verify_picture(shown, scale), out_dir / "verify.png")
        write_json(out_dir / "verify.json", result.to_json())
    return result


def verify_target(full: LoraFile, full_sha256: str, file: LoraFile) -> tuple[list[str], bool]:
    """The blocks of the file to verify, and whether it must be rendered itself.

    A slim is proved part of ``full`` byte for byte (:func:`check_subset`) and
    rendered as ``full``'s kept blocks; a ``resize`` output of ``full`` (which
    ``slim --auto --max-size`` writes) holds other tensors by design, so it is
    rendered as itself (``verify_slim(..., candidate=...)``).
    """
    source = resized_source(file.metadata)
    if source is None:
        return check_subset(full, file), False
    if source != full_sha256:
        raise NotASubsetError(
            "the resized file was made from another file than the full one",
            file.path,
            "give the LoRA it was resized from",
        )
    extra = sorted(set(file.blocks) - set(full.blocks))
    if extra:
        raise NotASubsetError(
            f"the resized file has blocks the full file lacks ({format_block_spec(extra)})",
            file.path,
            "give the LoRA it was resized from",
        )
    return file.blocks, True


def verify_candidate(
    full: LoraFile,
    full_sha256: str,
    keep: Sequence[str],
    settings: AnalyzeSettings,
    candidate: Renderer,
    references: _References,
    *,
    criterion: Criterion = DEFAULT_CRITERION,
    distances: Mapping[str, Distance] = BASE_DISTANCES,
    slim_path: Path | None = None,
) -> VerifyResult:
    """:func:`verify_slim` of a file rendered by ``candidate``, against base and full
    renders made earlier (:attr:`AutoResult.references`): one render per image."""
    result = _new_result(
        full, full_sha256, sort_blocks(keep), criterion, settings, candidate, slim_path=slim_path
    )
    kept = frozenset(keep)
    for p, prompt in enumerate(settings.prompts):
        for seed in settings.seeds:
            base, full_img, effect = references[(p, seed)]
            (img,) = candidate([kept], prompt, seed, settings)
            result.images.append(
                score_image(base, full_img, img, p, seed, criterion, distances, effect=effect)
            )
    return result


def verify_candidates(
    full: LoraFile,
    full_sha256: str,
    candidates: Sequence[tuple[Sequence[str], Mapping[str, int]]],
    settings: AnalyzeSettings,
    renderer: RankRenderer,
    references: _References,
    *,
    criterion: Criterion = DEFAULT_CRITERION,
    distances: Mapping[str, Distance] = BASE_DISTANCES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    progress: Callable[[int, int], None] | None = None,
) -> list[VerifyResult]:
    """:func:`verify_candidate` of many (keep set, module ranks) files without writing them.

    Each candidate is rendered as per-image block masks and rank caps of the
    full LoRA (``renderer`` on an engine attached ``truncatable``), ``batch_size``
    candidates per pipeline call, and judged against ``references`` as the
    written file would be; float rounding of the file's dtype aside, an image
    is the render of ``resize_lora(full, keep=..., ranks=...)``. ``progress``
    gets (candidates done, all) after each batch of every image.
    """
    results = [
        _new_result(full, full_sha256, sort_blocks(keep), criterion, settings, renderer)
        for keep, _ in candidates
    ]
    images = len(settings.prompts) * len(settings.seeds)
    done = 0
    for p, prompt in enumerate(settings.prompts):
        for seed in settings.seeds:
            base, full_img, effect = references[(p, seed)]
            for start in range(0, len(candidates), batch_size):
                batch = candidates[start : start + batch_size]
                imgs = renderer(
                    [frozenset(keep) for keep, _ in batch],
                    prompt,
                    seed,
                    settings,
                    ranks=[caps for _, caps in batch],
                )
                for result, img in zip(results[start : start + batch_size], imgs, strict=True):
                    result.images.append(
                        score_image(
                            base, full_img, img, p, seed, criterion, distances, effect=effect
                        )
                    )
                done += len(batch)
                if progress is not None:
                    progress(done, len(candidates) * images)
    return results


def _new_result(
    full: LoraFile,
    full_sha256: str,
    kept_blocks: list[str],
    criterion: Criterion,
    settings: AnalyzeSettings,
    renderer: Renderer,
    *,
    slim_path: Path | None = None,
    images: list[ImageScore] | None = None,
) -> VerifyResult:
    """A verification of ``kept_blocks`` against ``full``, with the scores known so far."""
    return VerifyResult(
        full=str(full.path),
        slim=str(slim_path) if slim_path else None,
        full_sha256=full_sha256,
        kept_blocks=kept_blocks,
        criterion=criterion,
        settings=settings_to_json(settings),
        model=renderer.model_id,
        images=images if images is not None else [],
    )


def _verify_picture(
    shown: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray, ImageScore]], scale: int
) -> Image.Image:
    """``verify.png``: a row per image, base | full | slim | heatmap of slim vs full.

    Every heatmap is on one scale, that of the LoRA's effect (full vs no LoRA,
    pooled over the images): a slim file that keeps the effect looks calm
    however small its residual, one that loses it glows.
    """
    vmax = global_vmax(diff_map(full, base) for base, full, _slim, _score in shown)
    rows = [_verify_row(*row, vmax=vmax, scale=scale) for row in shown]
    label = f"heatmaps, slim vs full: {HEATMAP_UNIT}; on the scale of the LoRA's effect"
    legend = colour_scale(DEFAULT_CMAP, vmax, label=label, width=min(rows[0].width - 8, 1000))
    return contact_sheet(rows, columns=1, legend=legend)


def _verify_row(
    base: np.ndarray,
    full_img: np.ndarray,
    slim_img: np.ndarray,
    score: ImageScore,
    *,
    vmax: float,
    scale: int,
) -> Image.Image:
    """One row of ``verify.png``; a failed image's verdict tile is red."""
    d = diff_map(slim_img, full_img)
    verdict = ("pass" if score.passed else "FAIL") if score.measurable else "no effect"
    share = "n/a" if score.kept_share is None else f"{100 * score.kept_share:.1f}%"
    return side_by_side(
        [
            label_tile(
                base, "no LoRA", bottom=f"prompt {score.prompt}, seed {score.seed}", scale=scale
            ),
            label_tile(
                full_img,
                "full",
                bottom=f"effect MSE {score.effect['mse']:.1f}",
                scale=scale,
            ),
            label_tile(
                slim_img,
                "slim",
                top_right=f"kept {share}",
                bottom=f"SSIM {score.ssim:.4f}",
                scale=scale,
            ),
            label_tile(
                heatmap_overlay(slim_img, d, vmax, 0.75),
                f"slim vs full: {verdict}",
                bottom=f"residual MSE {score.mse:.1f}",
                scale=scale,
                alert=score.measurable and not score.passed,
            ),
        ]
    )


@dataclass
class AutoResult:
    """What :func:`auto_keep` chose: the blocks, the ranking, the pruning curve and the proof."""

    blocks: list[str]
    order: list[str]
    #: the pruning curve: top-k of ``order`` for k = 0, every k rendered, and n
    curve: list[CurvePoint]
    verification: VerifyResult
    #: the base and full renders of every image, for judging other files against them
    references: _References = field(default_factory=dict, repr=False)


def auto_keep(
    full: LoraFile,
    full_sha256: str,
    order: Sequence[str],
    settings: AnalyzeSettings,
    renderer: Renderer,
    *,
    criterion: Criterion = DEFAULT_CRITERION,
    distances: Mapping[str, Distance] = BASE_DISTANCES,
    batch_size: int = DEFAULT_BATCH_SIZE,
    stop_at_pass: bool = True,
    size_of: Callable[[Sequence[str]], int] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> AutoResult:
    """The fewest blocks, in ranking order, whose slim passes the verdict on every image.

    Candidate sets are the top-k blocks of ``order`` for k = 1..n, rendered as
    per-image block masks in batches; with ``stop_at_pass`` the scan stops at
    the batch holding the first passing k, otherwise every k is rendered (the
    full pruning curve). Raises :class:`NoEffectError` when the LoRA shows no
    measurable effect on some image: no keep set can be proved there. Blocks
    holding the marker keys loaders need to read the file at all
    (:func:`~lora_prune.markers.pinned_blocks`) lead the order and are in every
    candidate.

    Args:
        full: the full LoRA; ``full_sha256`` its file hash.
        order: block ids, most important first (an :func:`~lora_prune.analysis.analyze` ranking).
        settings: prompts, seeds and render settings, as for :func:`verify_slim`.
        renderer: renders a batch of block variants of ``full``.
        criterion: the verdict's thresholds; ``distances`` its image distances.
        batch_size: candidate sets per renderer call.
        stop_at_pass: stop at the first batch with a passing k.
        size_of: bytes of a keep set, for the curve (None: 0).
        progress: called with ``(k done, n)`` after each batch.

    Example::

        order = [r.block for r in analysis.rows_for("loo")]
        auto = auto_keep(full, sha, order, settings, session.renderer)
        slim_lora(full, auto.blocks, output="small.safetensors")
    """
    order = [b for b in order if b in full.blocks]
    # Loaders ignore the whole file without these blocks' marker keys: in every candidate.
    pinned = [b for b in sort_blocks(pinned_blocks(full)) if b in order]
    order = pinned + [b for b in order if b not in pinned]
    if not order:
        raise UsageError(
            "the ranking names none of the LoRA's blocks",
            full.path,
            "run analyze on this LoRA first",
        )
    refs, ref_scores = reference_renders(full, settings, renderer, criterion, distances)
    if unmeasurable(ref_scores):
        raise no_effect_error(ref_scores, settings.prompts, str(full.path))
    size = size_of or (lambda blocks: 0)
    n = len(order)
    scores, chosen = _scan_keep_sets(
        order,
        refs,
        ref_scores,
        settings,
        renderer,
        criterion,
        distances,
        batch_size=batch_size,
        stop_at_pass=stop_at_pass,
        progress=progress,
        first=max(1, len(pinned)),
    )
    curve = _curve(order, scores, size, distances)
    if chosen is None:
        chosen = n
    blocks = sorted(order[:chosen], key=block_order)
    result = _new_result(
        full, full_sha256, blocks, criterion, settings, renderer, images=scores.get(chosen, [])
    )
    return AutoResult(blocks, list(order), curve, result, refs)


def auto_keep_ranked(
    full: LoraFile,
    full_sha256: str,
    analysis: Ranking,
    settings: AnalyzeSettings,
    renderer: Renderer,
    *,
    criterion: Criterion,
    distances: Mapping[str, Distance],
    batch_size: int,
    stop_at_pass: bool = True,
    progress: Callable[[int, int], None] | None = None,
) -> AutoResult:
    """:func:`auto_keep` over ``analysis``'s ranking (leave-one-out when it was rendered).

    The curve's sizes are those of the slim files the keep sets would make.
    """
    primary = "loo" if "loo" in settings.modes else "solo"
    return auto_keep(
        full,
        full_sha256,
        [r.block for r in analysis.rows_for(primary)],
        settings,
        renderer,
        criterion=criterion,
        distances=distances,
        batch_size=batch_size,
        stop_at_pass=stop_at_pass,
        size_of=lambda blocks: keep_size(full, blocks),
        progress=progress,
    )


def reference_renders(
    full: LoraFile,
    settings: AnalyzeSettings,
    renderer: Renderer,
    criterion: Criterion = DEFAULT_CRITERION,
    distances: Mapping[str, Distance] = BASE_DISTANCES,
) -> tuple[_References, list[ImageScore]]:
    """Base and full renders of every image, and the empty keep set's scores."""
    all_blocks = frozenset(full.blocks)
    refs: _References = {}
    ref_scores: list[ImageScore] = []
    for p, prompt in enumerate(settings.prompts):
        for seed in settings.seeds:
            base, full_img = renderer([frozenset(), all_blocks], prompt, seed, settings)
            effect = effect_of(base, full_img, distances)
            refs[(p, seed)] = (base, full_img, effect)
            ref_scores.append(
                score_image(base, full_img, base, p, seed, criterion, distances, effect=effect)
            )
    return refs, ref_scores


def _scan_keep_sets(
    order: list[str],
    refs: _References,
    ref_scores: list[ImageScore],
    settings: AnalyzeSettings,
    renderer: Renderer,
    criterion: Criterion,
    distances: Mapping[str, Distance],
    *,
    batch_size: int,
    stop_at_pass: bool,
    progress: Callable[[int, int], None] | None,
    first: int = 1,
) -> tuple[dict[int, list[ImageScore]], int | None]:
    """Scores of the top-k keep sets for k >= ``first``, batch by batch, and the first passing k."""
    n = len(order)
    # The scores of the chosen set are those of the very renders that chose it.
    scores: dict[int, list[ImageScore]] = {0: ref_scores}
    chosen: int | None = None
    for start in range(first, n + 1, batch_size):
        ks = list(range(start, min(start + batch_size, n + 1)))
        for k in ks:
            scores[k] = []
        for p, prompt in enumerate(settings.prompts):
            for seed in settings.seeds:
                base, full_img, effect = refs[(p, seed)]
                imgs = renderer([frozenset(order[:k]) for k in ks], prompt, seed, settings)
                for k, img in zip(ks, imgs, strict=True):
                    scores[k].append(
                        score_image(
                            base, full_img, img, p, seed, criterion, distances, effect=effect
                        )
                    )
        if progress:
            progress(ks[-1], n)
        passing = [k for k in ks if verdict_passes(scores[k])]
        if passing and chosen is None:
            chosen = passing[0]
            if stop_at_pass:
                break
    return scores, chosen


def _curve(
    order: list[str],
    scores: dict[int, list[ImageScore]],
    size: Callable[[Sequence[str]], int],
    distances: Mapping[str, Distance],
) -> list[CurvePoint]:
    """The pruning curve of the rendered top-k sets, ending at the full keep set."""
    n = len(order)
    curve = [
        curve_point(k, sorted(order[:k], key=block_order), size(order[:k]), s, rendered=k != 0)
        for k, s in sorted(scores.items())
    ]
    if n not in scores:
        # The full keep set renders as the full LoRA: all of the effect, by definition.
        curve.append(
            CurvePoint(
                n,
                sorted(order, key=block_order),
                size(order),
                dict.fromkeys(distances, 1.0),
                dict.fromkeys(distances, 1.0),
                True,
                rendered=False,
            )
        )
    return curve
