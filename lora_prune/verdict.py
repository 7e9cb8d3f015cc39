"""The one definition of whether a slim LoRA renders like its full LoRA.

``verify``, ``slim --auto``, ``check`` and the suggestion of ``analyze`` all judge
a keep set here, by the share of the LoRA's effect it keeps. For each image
(prompt x seed) and each distance ``d``::

    E    = d(base, full)        what the LoRA does to this image
    R    = d(slim, full)        what the slim LoRA still misses
    kept = 1 - R / E            the share of the effect the slim LoRA keeps

Distances: ``mse`` (MSE on 8-bit RGB, 0..65025) and ``ssim`` (``1 - SSIM``),
plus ``perceptual`` (``1 - cosine`` of image-encoder embeddings) when one is
given. A verdict passes when, on every image, ``kept >= min_kept`` for every
distance (and, when asked for, SSIM(slim, full) reaches an absolute
``min_ssim``).

An absolute SSIM bar alone cannot do this: a LoRA that moves SSIM(base, full)
only to 0.94 lets every keep set, the empty one included, clear 0.95.

Noise floor: two renders of the same image differ by at most one 8-bit level
on some pixels (batch companions, thread counts), so an effect whose MSE is at
most :data:`NOISE_MSE` (one level RMS over the whole image) cannot be told
apart from that noise, and ``1 - R/E`` would divide noise by noise. Such an
image proves nothing: it is reported as having no measurable effect, never
passed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from .errors import NoEffectError, UsageError
from .metrics import mse, ssim

__all__ = [
    "BASE_DISTANCES",
    "DEFAULT_CRITERION",
    "DEFAULT_MIN_KEPT",
    "NOISE_MSE",
    "Criterion",
    "CurvePoint",
    "Distance",
    "ImageScore",
    "curve_point",
    "effect_is_measurable",
    "effect_of",
    "no_effect_error",
    "score_image",
    "ssim_distance",
    "unmeasurable",
    "verdict_passes",
    "worst_kept",
]

#: An effect (MSE of base vs full, 8-bit units) at or below this is render noise.
NOISE_MSE = 1.0
#: Default share of the LoRA's effect a slim must keep on every image and distance.
DEFAULT_MIN_KEPT = 0.90

Distance = Callable[[np.ndarray, np.ndarray], float]


def ssim_distance(a: np.ndarray, b: np.ndarray) -> float:
    """``1 - SSIM``: 0 for identical images."""
    return 1.0 - ssim(a, b)


#: The distances every verdict uses; a perceptual one joins them when given.
BASE_DISTANCES: Mapping[str, Distance] = {"mse": mse, "ssim": ssim_distance}


@dataclass(frozen=True)
class Criterion:
    """The thresholds of a verdict."""

    min_kept: float = DEFAULT_MIN_KEPT
    #: optional absolute floor on SSIM(slim, full); None = off
    min_ssim: float | None = None

    def __post_init__(self) -> None:
        if not (np.isfinite(self.min_kept) and 0.0 < self.min_kept <= 1.0):
            raise UsageError(
                f"--min-kept {self.min_kept} is not in (0, 1]",
                "--min-kept",
                "use e.g. 0.9 (keep 90% of the LoRA's effect)",
            )
        if self.min_ssim is not None and not (
            np.isfinite(self.min_ssim) and 0.0 <= self.min_ssim <= 1.0
        ):
            raise UsageError(
                f"--min-ssim {self.min_ssim} is not in 0..1",
                "--min-ssim",
                "use e.g. 0.95, or leave it out",
            )

    def describe(self) -> str:
        text = (
            f"share of the LoRA's effect kept >= {self.min_kept:g} on every image (MSE and 1-SSIM)"
        )
        if self.min_ssim is not None:
            text += f", SSIM(slim, full) >= {self.min_ssim:g}"
        return text


@dataclass
class ImageScore:
    """One image's effect, residual and kept share for every distance."""

    prompt: int
    seed: int
    #: d(base, full) per distance
    effect: dict[str, float]
    #: d(slim, full) per distance
    residual: dict[str, float]
    #: SSIM(slim, full), for the optional absolute floor and for display
    ssim: float
    mse: float
    measurable: bool
    kept: dict[str, float] = field(default_factory=dict)
    passed: bool = False

    @property
    def kept_share(self) -> float | None:
        """The smallest share over the distances (None when the LoRA shows no effect)."""
        return min(self.kept.values()) if self.kept and self.measurable else None


def effect_is_measurable(effect_mse: float) -> bool:
    """Whether an MSE(base, full) is above the render noise floor."""
    return effect_mse > NOISE_MSE


def effect_of(
    base: np.ndarray, full: np.ndarray, distances: Mapping[str, Distance] = BASE_DISTANCES
) -> dict[str, float]:
    """E = d(base, full) per distance: what the LoRA does to one image."""
    return {name: d(base, full) for name, d in distances.items()}


def score_image(
    base: np.ndarray,
    full: np.ndarray,
    slim: np.ndarray,
    prompt: int,
    seed: int,
    criterion: Criterion,
    distances: Mapping[str, Distance] = BASE_DISTANCES,
    *,
    effect: Mapping[str, float] | None = None,
) -> ImageScore:
    """Effect, residual, kept share and verdict of one slim render.

    ``effect`` is :func:`effect_of` ``(base, full)`` when the caller already has
    it: a scan over many keep sets scores each against the same references.
    """
    effect = dict(effect) if effect is not None else effect_of(base, full, distances)
    residual = {name: d(slim, full) for name, d in distances.items()}
    measurable = effect_is_measurable(effect["mse"])
    score = ImageScore(
        prompt,
        seed,
        effect,
        residual,
        ssim=1.0 - residual["ssim"],
        mse=residual["mse"],
        measurable=measurable,
    )
    if measurable:
        score.kept = {
            name: (1.0 - residual[name] / effect[name]) if effect[name] > 0 else 1.0
            for name in distances
        }
        score.passed = all(v >= criterion.min_kept for v in score.kept.values()) and (
            criterion.min_ssim is None or score.ssim >= criterion.min_ssim
        )
    return score


def unmeasurable(scores: Sequence[ImageScore]) -> list[ImageScore]:
    return [s for s in scores if not s.measurable]


def no_effect_error(
    scores: Sequence[ImageScore], prompts: Sequence[str], where: str
) -> NoEffectError:
    """The one error for images on which the LoRA shows no measurable effect."""
    bad = unmeasurable(scores)
    first = bad[0]
    named = ", ".join(f"prompt {s.prompt} ({prompts[s.prompt]!r}) seed {s.seed}" for s in bad[:3])
    more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
    return NoEffectError(
        f"the LoRA has no measurable effect on {named}{more} "
        f"(MSE(base, full) {first.effect['mse']:.3g} <= noise floor {NOISE_MSE:g}), so nothing "
        "can be verified there",
        where,
        "use prompts where the LoRA shows, such as its trigger words",
    )


def verdict_passes(scores: Sequence[ImageScore]) -> bool:
    """Every image measurable and passing."""
    return bool(scores) and all(s.measurable and s.passed for s in scores)


def worst_kept(scores: Sequence[ImageScore]) -> dict[str, float]:
    """The smallest kept share per distance over the measurable images."""
    out: dict[str, float] = {}
    for s in scores:
        for name, value in s.kept.items():
            out[name] = min(out.get(name, value), value)
    return out


def _mean_kept(scores: Sequence[ImageScore]) -> dict[str, float]:
    """The mean kept share per distance over the measurable images."""
    names = {n for s in scores for n in s.kept}
    return {n: float(np.mean([s.kept[n] for s in scores if n in s.kept])) for n in sorted(names)}


@dataclass
class CurvePoint:
    """The top-k blocks of a ranking: their kept shares and file size."""

    k: int
    blocks: list[str]
    bytes: int
    #: mean kept share per distance over the images
    kept: dict[str, float]
    #: worst kept share per distance over the images
    worst: dict[str, float]
    passed: bool
    #: False for k = 0 and k = n, whose shares hold by definition (0 and 1)
    rendered: bool = True


def curve_point(
    k: int, blocks: Sequence[str], size: int, scores: Sequence[ImageScore], rendered: bool = True
) -> CurvePoint:
    return CurvePoint(
        k,
        list(blocks),
        size,
        _mean_kept(scores),
        worst_kept(scores),
        verdict_passes(scores),
        rendered,
    )


#: The default verdict: 90% of the effect kept, no absolute SSIM floor.
DEFAULT_CRITERION = Criterion()
