"""The verdict: a slim LoRA is judged by the share of the LoRA's effect it keeps.

Unit tests of the formula on hand-made images, then the acceptance cases of the
tiny model: a LoRA whose blocks carry known, unequal shares (``final`` strong,
``double.3`` weaker, ``single.7`` weakest, every other block zero), and a LoRA
that changes nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from browser import Browser
from clitools import run_cli
from PIL import Image

from lora_prune import verify as verify_module
from lora_prune.analysis import AnalyzeSettings, Renderer, analyze, read_manifest
from lora_prune.check import load_policy, run_check
from lora_prune.errors import EXIT_NO_EFFECT, NoEffectError
from lora_prune.lora import read_lora
from lora_prune.pictures import label_tile
from lora_prune.provenance import VERIFICATION_KEY, VerificationRecord
from lora_prune.render.loading import LoadedModel, ModelSpec
from lora_prune.render.session import open_session
from lora_prune.safetensors_io import file_sha256
from lora_prune.slim import slim_lora
from lora_prune.testing import planted_lora
from lora_prune.verdict import NOISE_MSE, Criterion, score_image
from lora_prune.verify import auto_keep, verify_slim

torch.set_num_threads(1)

#: Not conftest's PLANTED: shares that differ, so that dropping the strongest block fails.
UNEQUAL = {"final": 1.0, "double.3": 0.5, "single.7": 0.25}
SMALL = ["--size", "32", "--steps", "2"]
RENDER = ["--model", "tiny", "--prompt", "a red fox", "--seed", "0", *SMALL]
SETTINGS = AnalyzeSettings(prompts=("a red fox",), seeds=(0,), width=32, height=32, steps=2)


@pytest.fixture(scope="module")
def unequal(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The planted LoRA of :data:`UNEQUAL` (conftest's ``planted`` has two equal blocks)."""
    return planted_lora(tmp_path_factory.mktemp("verdict") / "planted.safetensors", UNEQUAL)


@pytest.fixture(scope="module")
def inert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Every block present, every weight zero: the renders do not change.
    return planted_lora(tmp_path_factory.mktemp("inert") / "inert.safetensors", {})


# --- the formula ------------------------------------------------------------
def _img(value: int, noise: np.ndarray | None = None) -> np.ndarray:
    img = np.full((16, 16, 3), value, dtype=np.int16)
    if noise is not None:
        img = img + noise
    return np.clip(img, 0, 255).astype(np.uint8)


def test_kept_share_is_one_minus_residual_over_effect() -> None:
    rng = np.random.default_rng(0)
    pattern = rng.integers(-40, 40, size=(16, 16, 3))
    base, full = _img(100), _img(100, pattern)
    half = _img(100, pattern // 2)
    score = score_image(base, full, half, 0, 0, Criterion())
    effect = float(np.mean((full.astype(float) - base) ** 2))
    residual = float(np.mean((full.astype(float) - half) ** 2))
    assert score.effect["mse"] == pytest.approx(effect)
    assert score.kept["mse"] == pytest.approx(1 - residual / effect)
    assert 0.5 < score.kept["mse"] < 0.9 and not score.passed
    same = score_image(base, full, full, 0, 0, Criterion())
    assert same.kept == {"mse": 1.0, "ssim": 1.0} and same.passed
    empty = score_image(base, full, base, 0, 0, Criterion())
    assert empty.kept == {"mse": 0.0, "ssim": 0.0} and not empty.passed


def test_effect_at_the_noise_floor_is_not_measurable() -> None:
    base = _img(100)
    one_level = _img(101)  # every pixel one level off: MSE exactly 1
    score = score_image(base, one_level, one_level, 0, 0, Criterion())
    assert score.effect["mse"] == NOISE_MSE
    assert not score.measurable and not score.passed and score.kept_share is None


def test_absolute_ssim_floor_is_optional_and_extra() -> None:
    rng = np.random.default_rng(1)
    pattern = rng.integers(-60, 60, size=(16, 16, 3))
    base, full = _img(120), _img(120, pattern)
    close = _img(120, pattern + rng.integers(-3, 4, size=pattern.shape))
    loose = score_image(base, full, close, 0, 0, Criterion(min_kept=0.9))
    assert loose.passed
    strict = score_image(base, full, close, 0, 0, Criterion(min_kept=0.9, min_ssim=0.9999))
    assert strict.kept == loose.kept and not strict.passed


# --- the tiny model: known, unequal shares ------------------------------------
@pytest.fixture
def verdict_tiles(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """The verdict tiles ``verify.png`` gets: their captions and whether they are red."""
    tiles: list[dict[str, Any]] = []

    def spy(image: Any, title: str, *args: Any, **kwargs: Any) -> Image.Image:
        if title.startswith("slim vs full"):
            tiles.append({"title": title, **kwargs})
        return label_tile(image, title, *args, **kwargs)

    monkeypatch.setattr(verify_module, "label_tile", spy)
    return tiles


def test_verify_fails_a_slim_without_the_strongest_block(
    unequal: Path, tmp_path: Path, verdict_tiles: list[dict[str, Any]]
) -> None:
    slim = slim_lora(unequal, ["double.3", "single.7"], output=tmp_path / "nofinal.safetensors")
    result = run_cli(
        "verify", str(unequal), str(slim.output), *RENDER, "--out", str(tmp_path / "v")
    )
    assert result.exit_code == 1, result.stdout
    report = json.loads((tmp_path / "v" / "verify.json").read_text())
    assert report["criterion"] == "kept_share" and report["min_kept"] == 0.9
    assert report["passed"] is False and report["kept_share"] < 0.5
    assert "FAIL" in result.stdout and "worst share of the effect kept" in result.stdout
    # In verify.png the failed image's verdict is red, its residual named in MSE units.
    failed = [not i["passed"] for i in report["images"]]
    assert [t["alert"] for t in verdict_tiles] == failed and any(failed)
    assert all(t["title"].endswith("FAIL") == t["alert"] for t in verdict_tiles)
    assert all(t["bottom"].startswith("residual MSE ") for t in verdict_tiles)


def test_verify_passes_the_full_keep_set(
    unequal: Path, tmp_path: Path, verdict_tiles: list[dict[str, Any]]
) -> None:
    slim = slim_lora(unequal, list(UNEQUAL), output=tmp_path / "all.safetensors")
    result = run_cli(
        "verify", str(unequal), str(slim.output), *RENDER, "--out", str(tmp_path / "v")
    )
    assert result.exit_code == 0, result.stdout
    assert json.loads((tmp_path / "v" / "verify.json").read_text())["kept_share"] == 1.0
    assert verdict_tiles and not any(t["alert"] for t in verdict_tiles)
    assert all(t["title"] == "slim vs full: pass" for t in verdict_tiles)


def test_empty_keep_set_fails(unequal: Path, tiny_model: LoadedModel) -> None:
    lora = read_lora(unequal)
    with open_session(ModelSpec(model="tiny"), lora, loaded=tiny_model) as session:
        result = verify_slim(lora, file_sha256(unequal), [], SETTINGS, session.renderer)
    assert not result.passed and result.kept_share == 0.0


def test_slim_auto_keeps_only_blocks_that_carry_effect_and_passes(
    unequal: Path, tmp_path: Path
) -> None:
    out = tmp_path / "auto.safetensors"
    work = tmp_path / "work"
    result = run_cli(
        "slim",
        str(unequal),
        "--auto",
        *RENDER,
        "-o",
        str(out),
        "--work-dir",
        str(work),
        "--batch-size",
        "16",
    )
    assert result.exit_code == 0, result.stdout
    kept = set(read_lora(out).blocks)
    assert kept and kept <= set(UNEQUAL)
    assert "final" in kept
    record = VerificationRecord.parse(read_lora(out).metadata[VERIFICATION_KEY])
    assert isinstance(record, VerificationRecord)
    assert record.passed and record.criterion == "kept_share" and record.min_kept == 0.9
    assert record.kept_share is not None and record.kept_share >= 0.9
    assert record.images and set(record.images[0]["kept"]) == {"mse", "ssim"}
    assert "worst share of the effect kept" in result.stdout
    # The curve of every k rendered, from 0% (no block) to 100% (all blocks).
    ranking = json.loads((work / "ranking.json").read_text())
    points = ranking["pruning_curve"]["points"]
    assert points[0]["k"] == 0 and points[0]["kept"] == {"mse": 0.0, "ssim": 0.0}
    assert points[-1]["k"] == len(read_lora(unequal).blocks)
    assert points[-1]["kept"] == {"mse": 1.0, "ssim": 1.0}
    assert Image.open(work / "pruning_curve.png").size == (1000, 560)
    # ... and the verified slim passes check against a policy demanding 90%, not 99.99%.
    policy = tmp_path / "p.toml"
    policy.write_text("require_verified = true\nmin_kept = 0.9\n")
    assert run_check([out, unequal], load_policy(policy)).exit_code == 0
    policy.write_text("require_verified = true\nmin_kept = 0.9999\n")
    strict = run_check([out, unequal], load_policy(policy))
    assert strict.exit_code == 1
    codes = {f.code for f in strict.files[0].findings} | {f.code for f in strict.files[1].findings}
    assert "verification_too_weak" in codes


def test_analyze_curve_starts_at_zero_ends_at_all_and_suggests_a_passing_set(
    unequal: Path, tmp_path: Path
) -> None:
    out = tmp_path / "a"
    result = run_cli(
        "analyze",
        str(unequal),
        *RENDER,
        "--mode",
        "loo",
        "--curve",
        "--out",
        str(out),
        "--batch-size",
        "32",
    )
    assert result.exit_code == 0, result.stdout
    ranking = json.loads((out / "ranking.json").read_text())
    points = ranking["pruning_curve"]["points"]
    n = len(read_lora(unequal).blocks)
    assert [p["k"] for p in points] == list(range(n + 1))
    assert points[0]["kept"]["mse"] == 0.0 and points[-1]["kept"]["mse"] == 1.0
    assert points[-1]["bytes"] > points[1]["bytes"] > 0
    suggestion = ranking["suggestion"]
    assert suggestion["criterion"] == "kept_share"
    assert set(suggestion["blocks"]) <= set(UNEQUAL)
    assert min(suggestion["kept"].values()) >= 0.9
    assert ranking["effects"][0]["measurable"] is True and ranking["effects"][0]["mse"] > 100
    html = (out / "report.html").read_text()
    assert "id='pruning-curve'" in html and "id='effects-table'" in html
    # In a real browser: the curve's picture loads and its table has a row per k.
    with Browser(width=1280, height=900) as page:
        page.open(out / "report.html")
        page.wait_for("document.querySelector('#pruning-curve').complete")
        assert page.evaluate("document.querySelector('#pruning-curve').naturalWidth") == 1000
        assert page.evaluate("document.querySelectorAll('#curve-table tbody tr').length") == n + 1
        first = page.evaluate("document.querySelector('#curve-table tbody tr').innerText")
        assert first.split("\t")[:3] == ["0", "0.0%", "0.0%"]
    # --from keeps the stored curve.
    result = run_cli("analyze", "--from", str(out))
    assert result.exit_code == 0
    assert json.loads((out / "ranking.json").read_text())["pruning_curve"]["points"] == points


class _Counting:
    """The session's renderer, counting the images it renders (or refusing to render)."""

    def __init__(self, inner: Renderer, allowed: bool = True) -> None:
        self.inner, self.model_id, self.versions = inner, inner.model_id, inner.versions
        self.allowed, self.images = allowed, 0

    def __call__(
        self, variants: Sequence[frozenset[str]], prompt: str, seed: int, settings: AnalyzeSettings
    ) -> list[np.ndarray]:
        assert self.allowed, "rendered although every image was cached"
        self.images += len(variants)
        return self.inner(variants, prompt, seed, settings)


def test_the_curve_is_cached_beside_the_sweep_and_checked(
    unequal: Path, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    lora, sha = read_lora(unequal), file_sha256(unequal)
    settings = AnalyzeSettings(
        prompts=("a red fox",), seeds=(0,), width=32, height=32, steps=2, modes=("loo",)
    )
    out = tmp_path / "a"
    with open_session(ModelSpec(model="tiny"), lora, loaded=tiny_model) as session:
        first = _Counting(session.renderer)
        one = analyze(lora, sha, settings, out, first, curve=Criterion(), batch_size=16)
        # The sweep (base, full, one per block) and the curve's k = 1..n.
        n = len(lora.blocks)
        assert first.images == (2 + n) + n
        two = analyze(lora, sha, settings, out, _Counting(session.renderer, allowed=False),
                      curve=Criterion(), batch_size=16)  # fmt: skip
        assert one.curve is not None and two.curve is not None
        assert [p.kept for p in two.curve] == [p.kept for p in one.curve]
        # A damaged curve image is noticed and rendered again (with its batch).
        # One file per distinct image: k = n is the full image, k = n - 1 the last block's loo.
        assert len(list((out / "images").glob("*.png"))) == (2 + n) + n - 2
        swept = {job["key"] for job in read_manifest(out)["jobs"]}
        victim = next(p for p in sorted((out / "images").glob("*.png")) if p.stem not in swept)
        victim.write_bytes(victim.read_bytes()[:-8])
        third = _Counting(session.renderer)
        again = analyze(lora, sha, settings, out, third, curve=Criterion(), batch_size=16)
    assert 0 < third.images <= 16  # the damaged image's batch of the curve, nothing else
    assert again.curve is not None
    assert [p.kept for p in again.curve] == [p.kept for p in one.curve]


# --- a LoRA that changes nothing ----------------------------------------------
def test_no_effect_is_a_named_error_never_a_pass(inert: Path, tmp_path: Path) -> None:
    slim = slim_lora(inert, ["double.3"], output=tmp_path / "s.safetensors")
    result = run_cli("verify", str(inert), str(slim.output), *RENDER, "--out", str(tmp_path / "v"))
    assert result.exit_code == EXIT_NO_EFFECT == 7
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith(
        "error: the LoRA has no measurable effect on prompt 0 ('a red fox') seed 0"
    )
    assert "trigger words" in line
    result = run_cli(
        "slim",
        str(inert),
        "--auto",
        *RENDER,
        "-o",
        str(tmp_path / "a.st"),
        "--work-dir",
        str(tmp_path / "w"),
    )
    assert result.exit_code == 7 and "no measurable effect" in result.stderr
    assert not (tmp_path / "a.st").exists()
    result = run_cli("analyze", str(inert), *RENDER, "--out", str(tmp_path / "an"))
    assert result.exit_code == 0
    assert "warning: the LoRA has no measurable effect on prompt 0" in result.stderr
    ranking = json.loads((tmp_path / "an" / "ranking.json").read_text())
    assert ranking["effects"][0]["measurable"] is False and ranking["warnings"]


def test_auto_keep_raises_no_effect(inert: Path, tiny_model: LoadedModel) -> None:
    lora = read_lora(inert)
    with (
        open_session(ModelSpec(model="tiny"), lora, loaded=tiny_model) as session,
        pytest.raises(NoEffectError),
    ):
        auto_keep(lora, file_sha256(inert), ["double.3"], SETTINGS, session.renderer)


def test_seed_is_accepted_wherever_seeds_is() -> None:
    for command in ("render", "analyze", "verify", "slim", "check"):
        result = run_cli(command, "--help")
        assert result.exit_code == 0 and "--seed" in result.stdout, command


# --- the optional perceptual distance ----------------------------------------
@pytest.fixture(scope="module")
def encoder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A tiny, randomly initialised DINOv2 built from a config: plumbing, not quality.
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    config = Dinov2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    folder = tmp_path_factory.mktemp("dino") / "tiny-dinov2"
    Dinov2Model(config).save_pretrained(folder)
    return folder


def test_perceptual_distance_joins_the_verdict(
    unequal: Path, encoder: Path, tmp_path: Path
) -> None:
    from lora_prune.render.perceptual import PerceptualDistance

    d = PerceptualDistance(str(encoder))
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    b = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    assert d(a, a) == 0.0 and 0.0 < d(a, b) <= 2.0
    slim = slim_lora(unequal, ["double.3", "single.7"], output=tmp_path / "nofinal.safetensors")
    result = run_cli(
        "verify",
        str(unequal),
        str(slim.output),
        *RENDER,
        "--perceptual",
        str(encoder),
        "--out",
        str(tmp_path / "v"),
    )
    assert result.exit_code == 1, result.stdout
    image = json.loads((tmp_path / "v" / "verify.json").read_text())["images"][0]
    assert set(image["kept"]) == {"mse", "ssim", "perceptual"}
    assert image["effect"]["perceptual"] > 0
    result = run_cli(
        "verify", str(unequal), str(slim.output), *RENDER, "--perceptual", str(tmp_path / "missing")
    )
    assert result.exit_code == 2 and result.stderr.startswith("error: cannot load image encoder")


def test_the_curves_renders_are_counted_with_the_sweeps(unequal: Path, tmp_path: Path) -> None:
    def counts(output: str) -> tuple[int, int, int]:
        m = re.search(r"rendered (\d+) images \((\d+) cached of (\d+)\)", output)
        assert m, output
        return int(m.group(1)), int(m.group(2)), int(m.group(3))

    plain = run_cli("analyze", unequal, *RENDER, "--mode", "loo", "--out", tmp_path / "a")
    assert plain.exit_code == 0, plain.output
    swept, _, _ = counts(plain.output)
    args: list[str | Path] = ["analyze", unequal, *RENDER, "--mode", "loo", "--curve"]
    args += ["--out", tmp_path / "b"]
    first = run_cli(*args)
    assert first.exit_code == 0, first.output
    rendered, cached, planned = counts(first.output)
    # Every k of the curve but the two it knows by definition (none, all) is a render of its own.
    points = json.loads((tmp_path / "b" / "pruning_curve.json").read_text())["points"]
    rendered_points = sum(1 for p in points if p.get("rendered") is not False)
    # Each rendered k is one more image here (one prompt, one seed), with the references the
    # verdict compares against; keep sets the sweep rendered already come from the cache.
    assert rendered + cached == planned >= swept + rendered_points
    assert cached > 0
    again = run_cli(*args)
    assert counts(again.output) == (0, planned, planned)
