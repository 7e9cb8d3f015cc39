"""Sweeps split across processes: shards, and a real two-process run under accelerate.

The two-process test launches ``accelerate launch --multi_gpu --num_processes 2``
on the CPU (accelerate 1.x's ``--cpu`` launcher starts one process unless an MPI
hostfile is given; ``--multi_gpu`` starts one process per rank through torchrun,
and lora-prune joins them over gloo when the device is the CPU).
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_analysis import PLANTED, FakeRenderer, settings

from lora_prune.analysis import Shard, analyze, batches, plan_jobs, render_sweep
from lora_prune.lora import read_lora
from lora_prune.render.distributed import launched_processes
from lora_prune.testing import planted_lora

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
RANKING_FILES = ("ranking.json", "ranking.csv")


def test_shards_take_whole_batches_round_robin_and_cover_the_plan() -> None:
    items = list(range(11))
    shares = [Shard(i, 3).share(items) for i in range(3)]
    assert shares == [[0, 3, 6, 9], [1, 4, 7, 10], [2, 5, 8]]
    assert sorted(x for share in shares for x in share) == items
    assert Shard(0, 3).is_main and not Shard(2, 3).is_main
    for index, count in ((3, 3), (-1, 2), (0, 0)):
        with pytest.raises(ValueError, match="does not exist"):
            Shard(index, count)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 1),
        ({"WORLD_SIZE": "4"}, 4),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, 2),
        ({"WORLD_SIZE": "x"}, 1),
        ({"WORLD_SIZE": "9" * 4000}, 1),
        ({"WORLD_SIZE": "0"}, 1),
    ],
)
def test_launched_processes_reads_the_launcher_environment(
    env: dict[str, str], expected: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert launched_processes() == expected


def test_shards_render_disjoint_shares_that_add_up_to_a_one_process_run(tmp_path: Path) -> None:
    lora = read_lora(planted_lora(tmp_path / "planted.safetensors", PLANTED))
    s = settings()
    one = analyze(lora, "0" * 64, s, tmp_path / "one", FakeRenderer(PLANTED), batch_size=4)
    shared = tmp_path / "shared"
    renderers = [FakeRenderer(PLANTED) for _ in range(3)]
    helpers = [
        render_sweep(lora, "0" * 64, s, shared, renderers[i], batch_size=4, shard=Shard(i, 3))
        for i in (1, 2)
    ]
    main = analyze(lora, "0" * 64, s, shared, renderers[0], batch_size=4, shard=Shard(0, 3)).renders
    jobs = plan_jobs([b for b in lora.blocks if b != "other"], s, model_id="fake",
                     lora_sha256="0" * 64, versions={"fake": "1"})  # fmt: skip
    n_batches = len(list(batches(jobs, 4)))
    assert [r.rendered for r in (main, *helpers)] == [r.rendered for r in renderers]
    assert sum(r.rendered for r in renderers) == len(jobs) == one.renders.rendered
    assert main.planned + sum(h.planned for h in helpers) == len(jobs)
    assert max(r.calls for r in renderers) == -(-n_batches // 3)
    for name in RANKING_FILES:
        assert (shared / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    images = sorted(p.name for p in (tmp_path / "one" / "images").iterdir())
    assert sorted(p.name for p in (shared / "images").iterdir()) == images
    for name in images:
        assert (shared / "images" / name).read_bytes() == (
            tmp_path / "one" / "images" / name
        ).read_bytes()
    with pytest.raises(ValueError, match="only the main process"):
        analyze(lora, "0" * 64, s, shared, renderers[1], shard=Shard(1, 3))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _rendered(output: str) -> list[int]:
    return [int(n) for n in re.findall(r"rendered (\d+) images", output)]


@pytest.mark.slow
def test_two_process_accelerate_sweep_equals_one_process_and_resumes(tmp_path: Path) -> None:
    lora = planted_lora(tmp_path / "planted.safetensors", {"double.3": 1.0, "single.7": 1.0})
    args = ["analyze", str(lora), "--model", "tiny", "--prompt", "a fox", "--seeds", "0,1"]
    args += ["--size", "32", "--steps", "2", "--batch-size", "8", "--device", "cpu"]
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu"]
    launch += ["--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
    launch += ["--dynamo_backend", "no", "--main_process_port", str(_free_port())]
    two = subprocess.run(
        [*launch, "-m", "lora_prune.cli", *args, "--out", str(tmp_path / "two")],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stdout + two.stderr
    assert "process 1 of 2: rendered" in two.stdout and "process 2 of 2: rendered" in two.stdout
    # Each process rendered a share and together they rendered the whole plan, once.
    shares = _rendered(two.stdout)
    assert len(shares) == 2 and all(n > 0 for n in shares)
    one = subprocess.run(
        [sys.executable, "-m", "lora_prune.cli", *args, "--out", str(tmp_path / "one")],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert one.returncode == 0, one.stdout + one.stderr
    assert _rendered(one.stdout) == [sum(shares)]
    for name in RANKING_FILES:
        assert (tmp_path / "two" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    # Resuming the two-process run with one process renders nothing new.
    again = subprocess.run(
        [sys.executable, "-m", "lora_prune.cli", *args, "--out", str(tmp_path / "two")],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert again.returncode == 0, again.stdout + again.stderr
    assert _rendered(again.stdout) == [0]
