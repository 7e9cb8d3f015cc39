"""End-to-end jobs on the tiny model: analyze, render, verify, slim --auto, check --model, demo.

Everything renders with the real block engine on ``--model tiny`` (offline,
seeded). LoRAs are "planted": every block is present but only known blocks
have non-zero weights, so the right answers are known.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import Result
from clitools import run_cli
from conftest import PLANTED
from PIL import Image

import lora_prune.render.workflows
import lora_prune.slim
from lora_prune.analysis import AnalyzeSettings, analyze, batches, plan_jobs, read_manifest
from lora_prune.lora import LoraFile, read_lora
from lora_prune.render.loading import LoadedModel, ModelSpec
from lora_prune.render.session import open_session
from lora_prune.render.workflows import run_demo
from lora_prune.safetensors_io import file_sha256
from lora_prune.slim import slim_lora
from lora_prune.stats import BlockStats, block_stats_and_sha256
from lora_prune.testing import planted_lora
from lora_prune.verify import VERIFICATION_KEY

torch.set_num_threads(1)

SMALL = ["--size", "32", "--steps", "2"]
#: Two prompts, two seeds: the four images per variant that analyze, verify and slim --auto see.
RENDER = ["--model", "tiny", "--prompt", "a red fox", "--prompt", "a lighthouse", "--seeds", "0,1"]
RENDER += SMALL
# Subprocesses pin threads the same way, so that their renders match bit for bit.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def test_analyze_ranks_exactly_the_planted_blocks_first(
    planted: Path, tiny_model: LoadedModel, tmp_path: Path
) -> None:
    lora = read_lora(planted)
    settings = AnalyzeSettings(
        prompts=("a red fox",), seeds=(0,), width=32, height=32, steps=2, modes=("solo", "loo")
    )
    with open_session(ModelSpec(model="tiny"), lora, loaded=tiny_model) as session:
        result = analyze(
            lora, file_sha256(planted), settings, tmp_path / "out", session.renderer, batch_size=16
        )
    assert len(lora.blocks) == 57 + 1  # kohya's double+single defaults plus the planted final
    for mode in ("solo", "loo"):
        rows = result.rows_for(mode)
        top = {r.block for r in rows[: len(PLANTED)]}
        assert top == set(PLANTED), mode
        assert all(r.mse > 1.0 for r in rows[: len(PLANTED)])
        assert all(r.mse == 0.0 and r.ssim == 1.0 for r in rows[len(PLANTED) :]), mode
    assert set(result.suggestion.blocks) <= set(PLANTED)


def _rendered(output: str) -> tuple[int, int, int]:
    m = re.search(r"rendered (\d+) images \((\d+) cached of (\d+)\)", output)
    assert m, output
    return int(m.group(1)), int(m.group(2)), int(m.group(3))


def _analyze_cmd(lora: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lora_prune.cli",
        "analyze",
        str(lora),
        *RENDER,
        "--mode",
        "both",
        "--batch-size",
        "4",
        "--out",
        str(out),
    ]


@pytest.mark.slow
def test_killed_analyze_resumes_with_identical_results(planted: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    done = subprocess.run(
        _analyze_cmd(planted, reference), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    rendered, cached, planned = _rendered(done.stdout)
    assert (rendered, cached) == (planned, 0)

    out = tmp_path / "killed"
    proc = subprocess.Popen(
        _analyze_cmd(planted, out), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if len(list((out / "images").glob("*.png"))) >= 40:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    on_disk = {p.stem for p in (out / "images").glob("*.png")}
    assert 40 <= len(on_disk) < planned

    # Resume works per batch (a batch's images depend, by a level at most, on its
    # companions): exactly the batches with a missing image are rendered again.
    manifest = read_manifest(out)
    jobs = plan_jobs(
        list(manifest["blocks"]),
        AnalyzeSettings(
            prompts=("a red fox", "a lighthouse"),
            seeds=(0, 1),
            width=32,
            height=32,
            steps=2,
            modes=("solo", "loo"),
        ),
        model_id=manifest["model"],
        lora_sha256=manifest["lora"]["sha256"],
        versions=manifest["versions"],
    )
    expected = sum(len(b) for b in batches(jobs, 4) if any(j.key not in on_disk for j in b))
    missing = planned - len(on_disk)
    assert missing <= expected < missing + 4

    again = subprocess.run(
        _analyze_cmd(planted, out), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert again.returncode == 0, again.stderr
    rendered, cached, _ = _rendered(again.stdout)
    assert rendered == expected and cached == planned - expected
    for name in ("ranking.json", "ranking.csv"):
        assert (out / name).read_text() == (reference / name).read_text(), name

    # Rerunning a finished analysis renders nothing.
    third = subprocess.run(
        _analyze_cmd(planted, out), env=ENV, capture_output=True, text=True, timeout=600
    )
    assert _rendered(third.stdout)[:2] == (0, planned)


#: Runs the CLI, then says whether diffusers was ever imported.
_NO_DIFFUSERS = """
import sys
from lora_prune.cli import cli
try:
    cli.main(sys.argv[1:], prog_name="lora-prune")
except SystemExit as exc:
    if exc.code:
        raise
print("diffusers imported:", "diffusers" in sys.modules)
"""


def _run_watching_diffusers(args: list[str]) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", _NO_DIFFUSERS, *args]
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)


def test_fully_cached_rerun_loads_no_model(planted: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["analyze", str(planted), "--model", "tiny", "--prompt", "a fox", *SMALL]
    args += ["--out", str(out)]
    result = run_cli(*args)
    assert result.exit_code == 0, result.output
    first = {n: (out / n).read_bytes() for n in ("ranking.json", "ranking.csv", "report.html")}
    again = _run_watching_diffusers(args)
    assert again.returncode == 0, again.stderr
    assert "diffusers imported: False" in again.stdout
    assert _rendered(again.stdout)[0] == 0
    assert {n: (out / n).read_bytes() for n in first} == first
    # A damaged image makes the same rerun load the model and render it again.
    (out / "images" / sorted(p.name for p in (out / "images").glob("*.png"))[0]).write_bytes(b"x")
    damaged = _run_watching_diffusers(args)
    assert damaged.returncode == 0, damaged.stderr
    assert "diffusers imported: True" in damaged.stdout
    assert _rendered(damaged.stdout)[0] > 0
    assert {n: (out / n).read_bytes() for n in first} == first


def test_analyze_from_dir_needs_no_model(planted: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = run_cli(
        "analyze", str(planted), "--model", "tiny", "--prompt", "a fox", *SMALL, "--out", str(out)
    )
    assert result.exit_code == 0, result.output
    before = json.loads((out / "ranking.json").read_text())
    result = run_cli("analyze", "--from", str(out), "--heatmap-scale", "per-image")
    assert result.exit_code == 0, result.output
    after = json.loads((out / "ranking.json").read_text())
    assert after["rows"] == before["rows"]
    assert after["settings"]["heatmap_scale"] == "per-image"
    assert "suggested keep" in result.output and "lora-prune slim" in result.output


def test_render_writes_side_by_side_with_scores(planted: Path, tmp_path: Path) -> None:
    out = tmp_path / "combo.png"

    def render(blocks: str, *extra: str) -> Result:
        common = ["--model", "tiny", "--prompt", "a fox", *SMALL]
        return run_cli("render", planted, *common, "--blocks", blocks, "-o", out, *extra)

    result = render("double.3")
    assert result.exit_code == 0, result.output
    image = Image.open(out)
    assert image.width >= 4 * 32  # base | full | chosen | heatmap
    mse_base = float(re.search(r"vs no LoRA\s+MSE\s+([\d.]+)", result.output).group(1))  # type: ignore[union-attr]
    mse_full = float(re.search(r"vs full LoRA MSE\s+([\d.]+)", result.output).group(1))  # type: ignore[union-attr]
    assert mse_base > 0 and mse_full > 0
    result = render("double.0", "--force")
    assert result.exit_code == 0
    assert re.search(r"vs no LoRA\s+MSE\s+0\.00\s+SSIM 1\.0000", result.output), result.output


def test_verify_passes_true_blocks_and_fails_a_dropped_planted_block(
    planted: Path, tmp_path: Path
) -> None:
    good = slim_lora(planted, set(PLANTED), output=tmp_path / "good.safetensors").output
    bad = slim_lora(planted, {"double.3", "final"}, output=tmp_path / "bad.safetensors").output
    result = run_cli("verify", str(planted), str(good), *RENDER, "--out", str(tmp_path / "v1"))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "v1" / "verify.json").read_text())
    assert report["passed"] is True and len(report["images"]) == 4
    assert all(i["ssim"] == 1.0 and i["mse"] == 0.0 for i in report["images"])
    assert report["kept_share"] == 1.0
    assert Image.open(tmp_path / "v1" / "verify.png").height >= 4 * 32

    result = run_cli("verify", str(planted), str(bad), *RENDER, "--out", str(tmp_path / "v2"))
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "v2" / "verify.json").read_text())
    assert report["passed"] is False and report["worst_ssim"] < 0.95
    assert 0 < report["kept_share"] < 1


def test_verify_refuses_a_file_that_is_not_a_block_subset(planted: Path, tmp_path: Path) -> None:
    other = planted_lora(tmp_path / "other.safetensors", {"double.3": 1.0}, seed=5)
    slim = slim_lora(other, {"double.3"}, output=tmp_path / "other.slim.safetensors").output
    result = run_cli("verify", str(planted), str(slim), "--model", "tiny", "--prompt", "a", *SMALL)
    assert result.exit_code == 4
    assert result.output.startswith("error: tensor values differ from the full file")
    assert "double_blocks_3" in result.output


def test_slim_auto_keeps_exactly_the_planted_blocks(
    planted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "auto.safetensors"
    hashed: list[Path] = []

    def counting_sha256(path: str | Path) -> str:
        hashed.append(Path(path))
        return file_sha256(path)

    def counting_stats(lora: LoraFile) -> tuple[list[BlockStats], str]:
        hashed.append(lora.path)
        return block_stats_and_sha256(lora)

    # slim --auto hashes the whole LoRA once (with its norms), not again to write the slim.
    for module in (lora_prune.render.workflows, lora_prune.slim):
        monkeypatch.setattr(module, "file_sha256", counting_sha256)
    monkeypatch.setattr(lora_prune.render.workflows, "block_stats_and_sha256", counting_stats)
    # A strict threshold: dropping any planted block must fail it, keeping them all gives 1.0.
    work = tmp_path / "work"
    result = run_cli(
        "slim", planted, "--auto", *RENDER, "--min-ssim", "0.999", "-o", out, "--work-dir", work
    )
    assert result.exit_code == 0, result.output
    assert hashed == [planted]
    slim = read_lora(out)
    assert set(slim.blocks) == set(PLANTED)
    verification = json.loads(slim.metadata[VERIFICATION_KEY])
    assert verification["passed"] is True and verification["worst_ssim"] == 1.0
    assert verification["full_sha256"] == file_sha256(planted)
    assert "kept     double.3,single.7,final" in result.output

    # The verified slim passes check with a policy that demands verification.
    policy = tmp_path / "policy.toml"
    policy.write_text("require_verified = true\n")
    result = run_cli("check", str(out), str(planted), "--policy", str(policy))
    assert "PASS" in result.output


def test_demo_finds_the_planted_blocks_and_verifies(tmp_path: Path) -> None:
    result = run_demo(tmp_path / "demo")
    assert set(result.analysis.suggestion.blocks) == set(result.planted)
    assert set(read_lora(result.slim.output).blocks) == set(result.planted)
    assert result.verification.passed and result.verification.worst_ssim == 1.0
    assert result.slim.bytes_after < result.slim.bytes_before / 5
    assert (tmp_path / "demo" / "analysis" / "report.html").exists()
    sheet = np.asarray(Image.open(tmp_path / "demo" / "analysis" / "contact_sheet.png"))
    assert sheet.shape[0] > 1000 and sheet.shape[1] > 1000


def test_rendering_without_the_render_extra_is_one_error_line(planted: Path) -> None:
    code = (
        "import sys\n"
        "sys.modules['torch'] = None\n"
        "from lora_prune.cli import main\n"
        f"main(['render', {str(planted)!r}, '--model', 'tiny', '--prompt', 'a', '--blocks', 'double.3',"
        " '-o', 'x.png'])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 5, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: rendering needs torch, which is not installed")
    assert "pip install 'lora-prune[render]'" in lines[0]


def test_slim_auto_in_an_analyze_folder_keeps_its_solo_ranking(
    planted: Path, tmp_path: Path
) -> None:
    work = tmp_path / "work"
    common = ["--model", "tiny", "--prompt", "a red fox", *SMALL]
    result = run_cli("analyze", str(planted), *common, "--mode", "solo", "--out", str(work))
    assert result.exit_code == 0, result.output
    solo_images = {p.name for p in (work / "images").glob("*.png")}
    out = tmp_path / "auto.safetensors"
    result = run_cli(
        "slim", planted, "--auto", *common, "--min-ssim", "0.999", "-o", out, "--work-dir", work
    )
    assert result.exit_code == 0, result.output
    ranking = json.loads((work / "ranking.json").read_text())
    assert {r["mode"] for r in ranking["rows"]} == {"solo", "loo"}
    assert ranking["settings"]["modes"] == ["solo", "loo"]
    # The earlier renders are still there and were reused, not replaced.
    assert solo_images <= {p.name for p in (work / "images").glob("*.png")}
