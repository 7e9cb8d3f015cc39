"""Crash trials: temp files of dead processes are swept, SIGTERM cleans up, kills never damage.

``slim`` runs as a subprocess (``python -m lora_prune.cli``) on a FLUX.1-dev-sized
synthetic LoRA (38 MB) and is killed at many points: before, during and after
the write of its output. The unit tests pin the temp-name pattern and the rule
that only temps of dead processes of this host are removed.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_prune import fileio
from lora_prune.families.flux1.geometry import FLUX1_DEV
from lora_prune.lora import read_lora
from lora_prune.testing import SynthSpec, write_synth_lora

TOKEN = "0123456789ab"


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        check=True,
        capture_output=True,
        text=True,
    )
    return int(proc.stdout)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def temps(folder: Path) -> list[Path]:
    return sorted(folder.glob(".*.tmp"))


def test_temp_name_round_trips_and_foreign_names_are_not_ours() -> None:
    name = fileio.temp_name("my lora.safetensors", 4242, TOKEN)
    assert name == f".my lora.safetensors.lora-prune-{fileio.HOST_TAG}-4242-{TOKEN}.tmp"
    assert fileio.temp_owner(name) == (fileio.HOST_TAG, 4242)
    # A destination whose own name looks like a temp still parses by its last tag.
    tricky = fileio.temp_name(".a.lora-prune-00000000-1-000000000000.tmp", 7, TOKEN)
    assert fileio.temp_owner(tricky) == (fileio.HOST_TAG, 7)
    host = fileio.HOST_TAG
    for foreign in (
        ".x.safetensors.0123456789ab.tmp",  # the old layout, without an owner
        f".x.lora-prune-{host}-0-{TOKEN}.tmp",  # pid 0 is no process
        f".x.lora-prune-{host}--1-{TOKEN}.tmp",
        f".x.lora-prune-{host}-12345678901-{TOKEN}.tmp",  # 11 digits
        f".x.lora-prune-{host}-\u0661\u0662-{TOKEN}.tmp",  # Arabic-Indic digits
        f".x.lora-prune-{host}-12-{TOKEN}0.tmp",
        f".x.lora-prune-{host}-12-{TOKEN.upper()}.tmp",
        f".x.lora-prune-zz-12-{TOKEN}.tmp",
        f".lora-prune-{host}-12-{TOKEN}.tmp",  # no destination name
        f"x.lora-prune-{host}-12-{TOKEN}.tmp",  # not a dotfile
        f".x.lora-prune-{host}-12-{TOKEN}.tmp.bak",
        ".bashrc",
    ):
        assert fileio.temp_owner(foreign) is None, foreign
    long_name = fileio.temp_name("é" * 200, 1, TOKEN)
    assert len(long_name.encode()) < 255 and fileio.temp_owner(long_name) == (host, 1)


def test_sweep_removes_only_temps_of_dead_processes_of_this_host(tmp_path: Path) -> None:
    dead = dead_pid()
    assert not fileio.pid_alive(dead)
    assert fileio.pid_alive(os.getpid()) and fileio.pid_alive(1)  # pid 1 is never ours to kill
    stale = tmp_path / fileio.temp_name("out.safetensors", dead, TOKEN)
    live = tmp_path / fileio.temp_name("out.safetensors", os.getpid(), TOKEN)
    init = tmp_path / fileio.temp_name("out.safetensors", 1, TOKEN)
    other_host = tmp_path / fileio.temp_name("out.safetensors", dead, TOKEN, host="00000000")
    if fileio.HOST_TAG == "00000000":  # pragma: no cover - one host in 4 billion
        other_host = tmp_path / fileio.temp_name("out.safetensors", dead, TOKEN, host="00000001")
    unrelated = [tmp_path / n for n in (".bashrc", ".out.safetensors.0123456789ab.tmp", "x.tmp")]
    for p in [stale, live, init, other_host, *unrelated]:
        p.write_bytes(b"data")
    folder_named_like_temp = tmp_path / fileio.temp_name("dir", dead, "ba9876543210")
    folder_named_like_temp.mkdir()

    assert fileio.sweep_stale_temps(tmp_path) == [stale]
    assert not stale.exists()
    for p in [live, init, other_host, *unrelated]:
        assert p.read_bytes() == b"data", p
    assert folder_named_like_temp.is_dir()


def test_every_atomic_write_sweeps_its_folder_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(fileio, "_swept", set())
    stale = tmp_path / fileio.temp_name("a.png", dead_pid(), TOKEN)
    stale.write_bytes(b"half a picture")
    fileio.atomic_write_bytes(tmp_path / "b.json", b"{}")
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b.json"]
    # Later writes into the same folder do not list it again.
    stale.write_bytes(b"half a picture")
    fileio.atomic_write_bytes(tmp_path / "c.json", b"{}")
    assert stale.exists()


def test_an_interrupt_right_after_the_temp_is_created_removes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process-wide TERM can be taken by any thread (BLAS, torch), so its handler
    # may run in the main thread just after the open returns, before the caller
    # holds the fd: the name must already be known then.
    real_open_new = fileio.open_new
    opened: list[Path] = []

    def open_then_interrupted(path: Path) -> int | None:
        fd = real_open_new(path)
        assert fd is not None
        os.close(fd)  # the process would be on its way out; the test lives on
        opened.append(path)
        raise KeyboardInterrupt

    monkeypatch.setattr(fileio, "open_new", open_then_interrupted)
    dest = tmp_path / "out.safetensors"
    with pytest.raises(KeyboardInterrupt), fileio.atomic_output(dest) as f:
        f.write(b"never")
    assert len(opened) == 1 and fileio.temp_owner(opened[0].name) == (
        fileio.HOST_TAG,
        os.getpid(),
    )
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def big_lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("big") / "big.safetensors"
    return write_synth_lora(path, SynthSpec(geometry=FLUX1_DEV, rank=4, dtype="F16"))


def slim_cmd(lora: Path, out: Path) -> list[str]:
    # The module's own entry point: main() installs the SIGTERM handler.
    python_cli = [sys.executable, "-m", "lora_prune.cli"]
    return [*python_cli, "slim", str(lora), "--drop", "double.0", "-o", str(out), "--force"]


def kill_slim(
    lora: Path, out: Path, sig: int, *, at: float | None, after_temp: float | None
) -> tuple[int, int, str, bool]:
    """Start slim; send ``sig`` ``at`` s after start, or ``after_temp`` s after its temp appears.

    Returns the pid, the exit code, stderr, and whether the temp file was seen before the signal.
    """
    proc = subprocess.Popen(
        slim_cmd(lora, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    t0 = time.monotonic()
    seen_at: float | None = None
    pattern = f".{out.name}.lora-prune-*-{proc.pid}-*.tmp"
    while proc.poll() is None:
        now = time.monotonic()
        if seen_at is None and any(out.parent.glob(pattern)):
            seen_at = now
        if at is not None and now - t0 >= at:
            break
        if after_temp is not None and seen_at is not None and now - seen_at >= after_temp:
            break
        if now - t0 > 60:
            break
        time.sleep(0.0005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.pid, proc.returncode, err, seen_at is not None


def test_killed_slim_never_damages_and_leaves_no_temp_after_the_next_run(
    big_lora: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "work"
    folder.mkdir()
    lora = folder / big_lora.name
    lora.write_bytes(big_lora.read_bytes())
    input_sha = sha(lora)
    reference = tmp_path / "reference.safetensors"
    t0 = time.monotonic()
    done = subprocess.run(slim_cmd(lora, reference), capture_output=True, text=True, check=False)
    duration = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    reference_sha = sha(reference)
    reference_tensors = set(read_lora(reference).header.tensors)

    out = folder / "slim.safetensors"
    trials: list[tuple[int, float | None, float | None]] = [
        # By time: from start-up (nothing written yet) to the end of the run.
        *((signal.SIGKILL, duration * f, None) for f in (0.3, 0.6, 0.75, 0.9, 1.0)),
        # While the temp file is being written, fsynced and read back.
        *((signal.SIGKILL, None, d) for d in (0.0, 0.005, 0.02, 0.05)),
        (signal.SIGTERM, duration * 0.3, None),
        (signal.SIGTERM, None, 0.0),
        (signal.SIGTERM, None, 0.02),
    ]
    outcomes: list[tuple[str, int, bool, bool, int]] = []
    for sig, at, after_temp in trials:
        out.unlink(missing_ok=True)
        pid, rc, err, saw_temp = kill_slim(lora, out, sig, at=at, after_temp=after_temp)
        assert sha(lora) == input_sha
        if out.exists():
            assert sha(out) == reference_sha
            assert set(read_lora(out).header.tensors) == reference_tensors
        assert "Traceback" not in err, err
        left = temps(folder)
        if sig == signal.SIGTERM:
            # The handler turns TERM into Ctrl-C: the temp is removed, exit 130
            # (or 0 when the run was already done, or -TERM before start-up ended).
            assert [p for p in left if fileio.temp_owner(p.name) == (fileio.HOST_TAG, pid)] == []
            assert rc in (0, 130, -signal.SIGTERM), (rc, err)
            if saw_temp and rc == 130:
                assert err.strip().splitlines() == [
                    "error: interrupted, run the command again to continue"
                ]
        outcomes.append((signal.Signals(sig).name, rc, saw_temp, out.exists(), len(left)))
        # A leftover is only ever the temp of a dead process: never any other file.
        for p in left:
            owner = fileio.temp_owner(p.name)
            assert owner is not None and not fileio.pid_alive(owner[1])
        assert {p.name for p in folder.iterdir()} - {p.name for p in left} <= {
            lora.name,
            out.name,
        }

    mid_write = [o for o in outcomes if o[0] == "SIGTERM" and o[2] and o[1] == 130]
    assert mid_write, outcomes  # a TERM landed while the temp existed and was cleaned up
    assert any(o[0] == "SIGKILL" and o[4] for o in outcomes), outcomes  # a KILL left a temp

    done = subprocess.run(slim_cmd(lora, out), capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert temps(folder) == []
    assert sha(out) == reference_sha and sha(lora) == input_sha
