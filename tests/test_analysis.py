"""The analyze sweep's planning, caching, ranking and outputs, with a fake renderer.

The fake renderer paints each active block's own pattern into the image, so the
true influence of every block is known. Rendering with the real engine is
covered in test_analyze_tiny.py.
"""

from __future__ import annotations

import contextlib
import csv
import json
import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import lora_prune.render.runs
from lora_prune.analysis import (
    AnalyzeSettings,
    Job,
    RenderStats,
    analyze,
    batches,
    compute_analysis,
    outputs,
    plan_jobs,
    read_manifest,
    set_curve,
    suggest_keep,
)
from lora_prune.analysis.scoring import _rank_rows
from lora_prune.blocks import block_order
from lora_prune.cli import cli
from lora_prune.errors import UsageError
from lora_prune.lora import LoraFile, read_lora
from lora_prune.rendercache import DamagedRenderError
from lora_prune.safetensors_io import file_sha256
from lora_prune.testing import planted_lora
from lora_prune.verdict import Criterion, CurvePoint

PLANTED = {"double.3": 1.0, "single.7": 0.5, "single.20": 0.25}


class FakeRenderer:
    """Images whose change per block is known: block b adds strength(b) * pattern(b)."""

    model_id = "fake"
    versions: Mapping[str, str] = {"fake": "1"}

    def __init__(self, strengths: Mapping[str, float], fail_after: int | None = None) -> None:
        self.strengths = strengths
        self.calls = 0
        self.rendered = 0
        self.fail_after = fail_after

    def __call__(
        self, variants: Sequence[frozenset[str]], prompt: str, seed: int, settings: AnalyzeSettings
    ) -> list[np.ndarray]:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt
        self.calls += 1
        self.rendered += len(variants)
        base_rng = np.random.default_rng(abs(hash((prompt, seed))) % 2**32)
        base = base_rng.uniform(60, 190, (settings.height, settings.width, 3))
        out = []
        for active in variants:
            img = base.copy()
            for block in active:
                s = self.strengths.get(block, 0.0)
                if s:
                    rng = np.random.default_rng(block_order(block))
                    img += s * rng.normal(0, 40, img.shape)
            out.append(np.clip(np.rint(img), 0, 255).astype(np.uint8))
        return out


@pytest.fixture()
def lora(tmp_path: Path) -> LoraFile:
    path = planted_lora(tmp_path / "planted.safetensors", PLANTED)
    return read_lora(path)


def settings(modes: tuple[str, ...] = ("solo", "loo")) -> AnalyzeSettings:
    return AnalyzeSettings(
        prompts=("a fox", "a <b>lighthouse</b>"),
        seeds=(0, 1),
        width=32,
        height=32,
        steps=2,
        modes=modes,
    )


def test_plan_covers_every_block_prompt_seed_and_mode(lora: LoraFile) -> None:
    jobs = plan_jobs(lora.blocks, settings(), model_id="m", lora_sha256="x", versions={})
    per_combo = 2 + 2 * len(lora.blocks)
    assert len(jobs) == 4 * per_combo
    assert {j.kind for j in jobs} == {"base", "full", "solo", "loo"}
    solo = [j for j in jobs if j.kind == "solo" and j.prompt == 0 and j.seed == 0]
    assert [j.block for j in solo] == lora.blocks
    assert all(j.blocks == frozenset({j.block}) for j in solo)
    loo = [j for j in jobs if j.kind == "loo"]
    assert all(j.block not in j.blocks and len(j.blocks) == len(lora.blocks) - 1 for j in loo)


def test_cache_key_depends_on_everything_that_determines_the_image(lora: LoraFile) -> None:
    base = plan_jobs(lora.blocks, settings(), model_id="m", lora_sha256="x", versions={"t": "1"})
    keys = {j.key for j in base}
    for changed in (
        plan_jobs(lora.blocks, settings(), model_id="m2", lora_sha256="x", versions={"t": "1"}),
        plan_jobs(lora.blocks, settings(), model_id="m", lora_sha256="x", versions={"t": "2"}),
        plan_jobs(
            lora.blocks,
            AnalyzeSettings(
                prompts=("a fox", "a <b>lighthouse</b>"),
                seeds=(0, 1),
                width=32,
                height=32,
                steps=3,
                modes=("solo", "loo"),
            ),
            model_id="m",
            lora_sha256="x",
            versions={"t": "1"},
        ),
    ):
        assert keys.isdisjoint(j.key for j in changed)
    other_lora = plan_jobs(
        lora.blocks, settings(), model_id="m", lora_sha256="y", versions={"t": "1"}
    )
    # Only the no-LoRA references are shared between LoRAs.
    shared = keys & {j.key for j in other_lora}
    assert shared == {j.key for j in base if j.kind == "base"}


def test_ranking_puts_planted_blocks_first_and_others_at_zero(
    lora: LoraFile, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    renderer = FakeRenderer(PLANTED)
    result = analyze(lora, file_sha256(lora.path), settings(), out, renderer, batch_size=16)
    for mode in ("solo", "loo"):
        rows = result.rows_for(mode)
        assert [r.block for r in rows[:3]] == ["double.3", "single.7", "single.20"]
        assert all(r.mse > 0 for r in rows[:3])
        assert all(r.mse == 0.0 and r.ssim == 1.0 and r.mse_std == 0.0 for r in rows[3:])
        assert all(r.rank == 4 for r in rows[3:])  # ties share a rank
    assert set(result.suggestion.blocks) <= set(PLANTED)
    assert result.suggestion.blocks[0] == "double.3" or "double.3" in result.suggestion.blocks
    assert result.suggestion.coverage >= 0.9
    assert result.suggestion.command == (
        f"lora-prune slim planted.safetensors --keep {result.suggestion.spec}"
    )
    assert 0 < result.suggestion.bytes < result.suggestion.bytes_before
    # The weight norm is exactly 0 for non-planted blocks, so both rankings agree strongly.
    assert result.spearman["solo"] is not None and result.spearman["solo"] > 0.5


def test_outputs_are_written_and_read_back(lora: LoraFile, tmp_path: Path) -> None:
    out = tmp_path / "out"
    analyze(lora, file_sha256(lora.path), settings(), out, FakeRenderer(PLANTED), batch_size=16)
    ranking = json.loads((out / "ranking.json").read_text())
    assert ranking["suggestion"]["mode"] == "loo"
    assert {r["block"] for r in ranking["rows"]} == set(lora.blocks)
    with (out / "ranking.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(lora.blocks)
    for column in (
        "block",
        "mode",
        "mse",
        "mse_std",
        "ssim",
        "ssim_std",
        "rank",
        "params",
        "bytes",
        "norm",
    ):
        assert column in rows[0]
    assert rows[0]["block"] == "double.3" and rows[0]["rank"] == "1"
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["prompts"] == ["a fox", "a <b>lighthouse</b>"]
    assert len(list((out / "images").glob("*.png"))) == len({j["key"] for j in manifest["jobs"]})
    assert len(list((out / "heatmaps").glob("*.png"))) == 2 * 4 * len(lora.blocks)
    sheet = Image.open(out / "contact_sheet.png")
    # two references + one tile per block, each 32 px upscaled x8 plus a caption
    assert sheet.width >= 8 * 256 and sheet.height > 8 * 256
    assert (out / "contact_sheet_loo.png").exists()
    assert Image.open(out / "influence.png").size == (1400, 110 + 4 * 230)  # both modes
    assert (out / "report.html").exists()


def test_the_pictures_show_what_was_measured(
    lora: LoraFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = {}
    for name in ("influence_figure", "pruning_curve_figure", "label_tile"):
        real = getattr(outputs, name)

        def spy(*args: Any, _real: Any = real, _name: str = name, **kwargs: Any) -> Any:
            calls.setdefault(_name, []).append((args, kwargs))
            return _real(*args, **kwargs)

        monkeypatch.setattr(outputs, name, spy)
    out = tmp_path / "out"
    result = analyze(lora, file_sha256(lora.path), settings(), out, FakeRenderer(PLANTED))

    # The influence chart: every mode swept, its mean over the 4 images, the keep set's source.
    (blocks, charted), kwargs = calls["influence_figure"][-1]
    assert blocks == sorted(lora.blocks, key=block_order)
    assert [m.mode for m in charted] == ["solo", "loo"]
    for m in charted:
        rows = {r.block: r for r in result.rows_for(m.mode)}
        assert m.mse == [rows[b].mse for b in blocks]
        assert m.one_minus_ssim == [1.0 - rows[b].ssim for b in blocks]
    assert kwargs["images"] == 4
    assert kwargs["keep"] == result.suggestion.blocks and kwargs["keep_mode"] == "loo"

    # The sheets' badges are the shown image's own scores (prompt 0, seed 0), not the means.
    own = {(e["mode"], e["block"]): e for e in result.images if (e["prompt"], e["seed"]) == (0, 0)}
    badged = [(args, kw) for args, kw in calls["label_tile"] if kw.get("top_right")]
    assert len(badged) == 2 * len(lora.blocks)
    differs = 0
    for i, (args, kw) in enumerate(badged):
        mode = "solo" if i < len(lora.blocks) else "loo"
        block = args[1].split(" #")[0]
        assert kw["top_right"] == f"MSE {own[(mode, block)]['mse']:.1f}"
        assert kw["bottom"] == f"SSIM {own[(mode, block)]['ssim']:.3f}"
        mean = next(r for r in result.rows_for(mode) if r.block == block).mse
        differs += kw["top_right"] != f"MSE {mean:.1f}"
    assert differs  # the planted blocks' means are not their first image's scores

    # The pruning curve: the worst image (the verdict's) and the mean, apart.
    order = [r.block for r in result.rows_for("loo")]
    points = [
        CurvePoint(
            k,
            order[:k],
            1000 * k,
            kept={"mse": min(1.0, 0.3 * k), "ssim": min(1.0, 0.25 * k)},
            worst={"mse": min(1.0, 0.2 * k), "ssim": min(1.0, 0.15 * k)},
            passed=0.2 * k >= 0.9 and 0.15 * k >= 0.9,
        )
        for k in (0, 1, 2, 3, 7, len(order))
    ]
    set_curve(result, points, Criterion(min_kept=0.9), lora=lora)
    (ks, worst, mean, sizes), kwargs = calls["pruning_curve_figure"][-1]
    assert ks == [0, 1, 2, 3, 7, len(order)] and sizes == [1000 * k for k in ks]
    assert worst == {n: [p.worst[n] for p in points] for n in ("mse", "ssim")}
    assert mean == {n: [p.kept[n] for p in points] for n in ("mse", "ssim")}
    assert kwargs["min_kept"] == 0.9 and kwargs["chosen"] == 7 and kwargs["ranking"] == "loo"
    assert (out / "pruning_curve.png").exists()


def test_rerun_renders_nothing_and_interrupted_run_resumes_identically(
    lora: LoraFile, tmp_path: Path
) -> None:
    sha = file_sha256(lora.path)
    full_out = tmp_path / "uninterrupted"
    analyze(lora, sha, settings(), full_out, FakeRenderer(PLANTED), batch_size=10)
    again = FakeRenderer(PLANTED)
    analyze(lora, sha, settings(), full_out, again, batch_size=10)
    assert again.rendered == 0

    out = tmp_path / "interrupted"
    first = FakeRenderer(PLANTED, fail_after=5)
    with pytest.raises(KeyboardInterrupt):
        analyze(lora, sha, settings(), out, first, batch_size=10)
    assert first.rendered == 50
    resumed = FakeRenderer(PLANTED)
    analyze(lora, sha, settings(), out, resumed, batch_size=10)
    jobs = read_manifest(out)["jobs"]
    unique = len({j["key"] for j in jobs})
    assert resumed.rendered == unique - 50
    for name in ("ranking.json", "ranking.csv"):
        a = (out / name).read_text().replace(str(out), "")
        b = (full_out / name).read_text().replace(str(full_out), "")
        assert a == b


def test_from_dir_recomputes_without_a_renderer(lora: LoraFile, tmp_path: Path) -> None:
    out = tmp_path / "out"
    first = analyze(
        lora, file_sha256(lora.path), settings(), out, FakeRenderer(PLANTED), batch_size=16
    )
    again = compute_analysis(read_manifest(out), out)
    assert [(r.block, r.mode, r.rank, r.mse) for r in again.rows] == [
        (r.block, r.mode, r.rank, r.mse) for r in first.rows
    ]
    (out / first.images[0]["image"]).unlink()
    with pytest.raises(UsageError, match="renders are missing"):
        compute_analysis(read_manifest(out), out)


def test_batches_stay_within_one_prompt_and_seed(lora: LoraFile) -> None:
    jobs = plan_jobs(lora.blocks, settings(), model_id="m", lora_sha256="x", versions={})
    for batch in batches(jobs, 7):
        assert len({(j.prompt, j.seed) for j in batch}) == 1
        assert len(batch) <= 7


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"prompts": ()}, "no prompt"),
        ({"width": 30}, "multiple of 16"),
        ({"modes": ("sideways",)}, "unknown mode"),
        ({"steps": 0}, "steps"),
    ],
)
def test_bad_settings_are_usage_errors(kwargs: dict[str, object], fragment: str) -> None:
    base: dict[str, object] = {"prompts": ("a",), "width": 32, "height": 32}
    base.update(kwargs)
    with pytest.raises(UsageError, match=fragment):
        AnalyzeSettings(**base)  # type: ignore[arg-type]


def test_contact_sheet_has_one_labelled_tile_per_block(lora: LoraFile, tmp_path: Path) -> None:
    import math

    from lora_prune.pictures import label_tile

    out = tmp_path / "out"
    analyze(
        lora, file_sha256(lora.path), settings(("solo",)), out, FakeRenderer(PLANTED), batch_size=16
    )
    # Same tile size as analyze makes: 32 px renders upscaled x8 with a caption strip.
    tile = label_tile(
        np.zeros((32, 32, 3), np.uint8), "x", top_right="MSE 0", bottom="SSIM 1", scale=8
    )
    tw, th = tile.size
    n = 2 + len(lora.blocks)
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    sheet = np.asarray(Image.open(out / "contact_sheet.png"))
    assert sheet.shape[1] == cols * tw + (cols + 1) * 4
    top = sheet.shape[0] - (rows * th + (rows + 1) * 4)
    assert top > 0  # room for the header line
    for i in range(n):
        r, c = divmod(i, cols)
        x, y = 4 + c * (tw + 4), top + 4 + r * (th + 4)
        caption = sheet[y + 256 : y + th, x : x + tw]
        assert (caption.min(axis=2) > 180).sum() > 30, f"tile {i} has no caption text"
        if i >= 2:  # block tiles carry the MSE box in the top-right corner
            corner = sheet[y : y + 20, x + tw - 60 : x + tw]
            assert (corner.min(axis=2) > 180).sum() > 10, f"tile {i} has no MSE label"
    # Cells beyond the last tile stay background.
    r, c = divmod(n, cols)
    if r < rows:
        x, y = 4 + c * (tw + 4), top + 4 + r * (th + 4)
        assert (sheet[y : y + th, x : x + tw] == 24).all()


def _solo_path(out: Path, block: str, prompt: int = 0, seed: int = 0) -> Path:
    manifest = read_manifest(out)
    (job,) = [
        j
        for j in manifest["jobs"]
        if j["kind"] == "solo"
        and j["block"] == block
        and (j["prompt"], j["seed"]) == (prompt, seed)
    ]
    return out / str(job["path"])


def _truncate(out: Path) -> Path:
    path = _solo_path(out, "double.0")
    path.write_bytes(path.read_bytes()[:100])
    return path


def _wrong_size(out: Path) -> Path:
    path = _solo_path(out, "double.1")
    Image.new("RGB", (16, 16), (90, 90, 90)).save(path, format="PNG")
    return path


def _other_content(out: Path) -> Path:
    # The strongest block's image in place of a block without effect: trusted,
    # it would rank single.0 among the first.
    path = _solo_path(out, "single.0")
    path.write_bytes(_solo_path(out, "double.3").read_bytes())
    return path


def _corrupt(out: Path) -> Path:
    path = _solo_path(out, "double.2", seed=1)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return path


def _unrecorded(out: Path) -> Path:
    path = _solo_path(out, "single.1", prompt=1)
    path.with_suffix(".json").unlink()
    return path


DAMAGES = {
    "truncated": _truncate,
    "wrong size": _wrong_size,
    "other content": _other_content,
    "corrupt": _corrupt,
    "no record": _unrecorded,
}


def _ranking(out: Path) -> str:
    return (out / "ranking.json").read_text().replace(str(out), "")


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[LoraFile, Path]:
    """One finished sweep (batches of 10) that tests copy, then damage."""
    folder = tmp_path_factory.mktemp("finished")
    lora = read_lora(planted_lora(folder / "planted.safetensors", PLANTED))
    run = folder / "run"
    first = analyze(
        lora, file_sha256(lora.path), settings(), run, FakeRenderer(PLANTED), batch_size=10
    )
    assert first.renders.damaged == 0
    return lora, run


def _copy(finished: tuple[LoraFile, Path], tmp_path: Path) -> tuple[LoraFile, str, Path]:
    lora, run = finished
    return lora, file_sha256(lora.path), Path(shutil.copytree(run, tmp_path / "out"))


def test_damaged_cached_renders_are_rendered_again_and_change_nothing(
    finished: tuple[LoraFile, Path], tmp_path: Path
) -> None:
    lora, sha, out = _copy(finished, tmp_path)
    reference = finished[1]
    damaged = [damage(out) for damage in DAMAGES.values()]

    again = FakeRenderer(PLANTED)
    result = analyze(lora, sha, settings(), out, again, batch_size=10)
    assert result.renders.damaged == len(damaged) == 5
    # Exactly the batches holding a damaged image were rendered again.
    jobs = [
        Job(j["key"], j["kind"], j["block"], frozenset(j["blocks"]), j["prompt"], j["seed"])
        for j in read_manifest(out)["jobs"]
    ]
    names = {p.name for p in damaged}
    touched = [b for b in batches(jobs, 10) if any(Path(j.path).name in names for j in b)]
    assert 1 < len(touched) < len(list(batches(jobs, 10)))
    assert again.calls == len(touched) and again.rendered == sum(len(b) for b in touched)
    assert result.renders.rendered == again.rendered
    assert _ranking(out) == _ranking(reference)
    for path in damaged:
        assert path.read_bytes() == (reference / path.relative_to(out)).read_bytes()
    assert analyze(lora, sha, settings(), out, FakeRenderer(PLANTED), batch_size=10).renders == (
        RenderStats(planned=result.renders.planned, cached=result.renders.planned)
    )


def test_a_record_copied_with_another_image_is_refused(
    finished: tuple[LoraFile, Path], tmp_path: Path
) -> None:
    lora, sha, out = _copy(finished, tmp_path)
    target, source = _solo_path(out, "single.0"), _solo_path(out, "double.3")
    for suffix in (".png", ".json"):
        target.with_suffix(suffix).write_bytes(source.with_suffix(suffix).read_bytes())
    result = analyze(lora, sha, settings(), out, FakeRenderer(PLANTED), batch_size=10)
    assert result.renders.damaged == 1
    assert next(r for r in result.rows_for("solo") if r.block == "single.0").mse == 0.0


@pytest.mark.parametrize("kind", list(DAMAGES))
def test_from_dir_refuses_a_damaged_render_by_name(
    finished: tuple[LoraFile, Path], tmp_path: Path, kind: str
) -> None:
    _, _, out = _copy(finished, tmp_path)
    ranking = (out / "ranking.json").read_bytes()
    bad = DAMAGES[kind](out)
    with pytest.raises(DamagedRenderError) as err:
        compute_analysis(read_manifest(out), out)
    assert err.value.where == str(bad)
    result = CliRunner().invoke(cli, ["analyze", "--from", str(out)])
    assert result.exit_code == 3
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert result.output.startswith("error: cached render ") and f", {bad}, " in result.output
    assert "render it again" in result.output
    # Refused before anything was written.
    assert (out / "ranking.json").read_bytes() == ranking


def test_analyze_prints_one_note_for_damaged_renders(
    lora: LoraFile, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    @contextlib.contextmanager
    def fake_session(spec: object, lora_file: LoraFile) -> Iterator[SimpleNamespace]:
        yield SimpleNamespace(renderer=FakeRenderer(PLANTED))

    # The sweep's one seam to the render stack: everything above it runs for real.
    monkeypatch.setattr(lora_prune.render.runs, "_session", fake_session)
    out = tmp_path / "out"
    args = ["analyze", str(lora.path), "--model", "fake", "--prompt", "a fox", "--size", "32"]
    args += ["--steps", "2", "--out", str(out)]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "damaged" not in first.output
    # Every block but the planted ones carries no weight: said once, not ranked among them.
    zero = len(lora.blocks) - len(PLANTED)
    assert f"note: {zero} blocks carry no weight (norm 0): ranked last and never kept: " in (
        first.output
    )
    _truncate(out), _wrong_size(out), _other_content(out)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 0, again.output
    notes = [line for line in again.output.splitlines() if "damaged" in line]
    assert notes == ["note: 3 cached images were damaged or had no record and rendered again"]


def test_a_block_without_weight_ranks_last_and_is_never_kept() -> None:
    info = {
        "double.0": {"norm": 0.0, "params": 10, "bytes": 40},  # zero delta, noisy render
        "double.1": {"norm": 2.0, "params": 10, "bytes": 40},
        "single.0": {"norm": 1.0, "params": 10, "bytes": 40},
    }
    per = {
        ("loo", "double.0"): [(9.0, 0.9)],
        ("loo", "double.1"): [(4.0, 0.95)],
        ("loo", "single.0"): [(1.0, 0.99)],
    }
    rows, _ = _rank_rows(["loo"], info, per)
    rank = {r.block: r.rank for r in rows}
    assert rank == {"double.1": 1, "single.0": 2, "double.0": 3}
    suggestion = suggest_keep(rows, 0.99, None, {b: 40 for b in info}, "x.safetensors")
    assert "double.0" not in suggestion.blocks and suggestion.blocks == ["double.1", "single.0"]
