"""Multi-step jobs that render: ``slim --auto`` and the embedded ``demo``.

Each opens one session on the full LoRA and chains the library verbs
(analyze -> rank -> choose blocks -> slim -> verify); the CLI only prints the
dataclasses they return.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from ..analysis import (
    MANIFEST,
    Analysis,
    analyze,
    read_manifest,
    set_curve,
    settings_from_json,
)
from ..errors import LoraPruneError
from ..lora import LoraFile, read_lora
from ..safetensors_io import file_sha256
from ..settings import (
    MODES,
    TINY_MODEL_ID,
    AnalyzeSettings,
    ModelSpec,
    PictureOptions,
    RenderRequest,
)
from ..slim import SlimResult, slim_lora
from ..stats import block_stats_and_sha256
from ..testing import planted_lora
from ..verdict import BASE_DISTANCES, DEFAULT_CRITERION, Criterion, Distance
from ..verify import (
    VERIFICATION_KEY,
    AutoResult,
    VerifyResult,
    auto_keep_ranked,
    check_subset,
    verify_slim,
)
from .session import open_session

Progress = Callable[[int, int], None]


@dataclass
class AutoSlimResult:
    analysis: Analysis
    auto: AutoResult
    slim: SlimResult


def auto_slim(
    lora: LoraFile,
    spec: ModelSpec,
    settings: AnalyzeSettings,
    work_dir: Path,
    *,
    criterion: Criterion = DEFAULT_CRITERION,
    distances: Mapping[str, Distance] = BASE_DISTANCES,
    output: Path | None = None,
    force: bool = False,
    batch_size: int = 8,
    progress: Progress | None = None,
) -> AutoSlimResult:
    """Rank blocks (leave-one-out, reusing earlier renders), find the smallest passing keep set, write it.

    The keep set is the fewest top-ranked blocks whose slim keeps ``criterion``'s
    share of the LoRA's effect on every image; the pruning curve of every k
    rendered goes into ``work_dir`` (pruning_curve.png, ranking.json, report).
    """
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
            session.renderer,
            criterion=criterion,
            distances=distances,
            batch_size=batch_size,
            progress=progress,
        )
    set_curve(analysis, auto.curve, criterion, lora=lora)
    slim = slim_lora(
        lora,
        auto.blocks,
        output=output,
        force=force,
        extra_metadata={VERIFICATION_KEY: auto.verification.metadata_value()},
        source_sha256=sha,
    )
    return AutoSlimResult(analysis, auto, slim)


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
        full = read_lora(full_path)
        kept = check_subset(full, read_lora(slim_path))
        with open_session(spec, full) as session:
            return verify_slim(
                full,
                file_sha256(full_path),
                kept,
                settings,
                session.renderer,
                criterion=criterion,
                slim_path=slim_path,
            )

    return reverify
