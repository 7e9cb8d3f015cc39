"""Blocks whose marker keys loaders need: slim and resize refuse to drop them, ``--auto`` keeps them.

ComfyUI and Forge convert BFL control files (and ComfyUI XLabs/USO files) as a
whole, only when every marker key is there (``tests/test_loaders.py`` replays
that); a slim without one would load as nothing at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
from clitools import run_cli

from lora_prune.analysis.model import BlockRow
from lora_prune.analysis.scoring import suggest_keep
from lora_prune.blocks import block_order
from lora_prune.errors import UsageError
from lora_prune.families.flux1.markers import MARKER_SETS
from lora_prune.lora import read_lora
from lora_prune.markers import pinned_blocks
from lora_prune.resize import resize_lora
from lora_prune.safetensors_io import file_sha256
from lora_prune.settings import AnalyzeSettings
from lora_prune.slim import slim_lora
from lora_prune.testing import SynthSpec, write_synth_lora
from lora_prune.verify import auto_keep


def _lora(tmp_path: Path, grammar: str) -> Path:
    return write_synth_lora(tmp_path / f"{grammar}.safetensors", SynthSpec(grammar=grammar))


@pytest.mark.parametrize(
    ("grammar", "pinned"),
    [
        ("bfl-control", {"input", "single.0"}),
        ("xlabs", {"double.18", "single.37"}),
        ("kohya", set()),
    ],
)
def test_pinned_blocks_are_those_holding_a_whole_marker_set(
    tmp_path: Path, grammar: str, pinned: set[str]
) -> None:
    lora = read_lora(_lora(tmp_path, grammar))
    assert set(pinned_blocks(lora)) == pinned
    if pinned:
        # A file already missing a marker is converted by no loader: nothing left to protect.
        blocks = tuple(b for b in lora.blocks if b != sorted(pinned, key=block_order)[0])
        spec = SynthSpec(grammar=grammar, blocks=blocks)
        partial = read_lora(write_synth_lora(tmp_path / "partial.safetensors", spec))
        assert pinned_blocks(partial) == {}


def test_slim_and_resize_refuse_to_drop_a_marker_block(tmp_path: Path) -> None:
    path = _lora(tmp_path, "bfl-control")
    lora = read_lora(path)
    (control,) = (m for m in MARKER_SETS if m.format == "BFL control LoRA")
    for keep in (["double.0", "single.5"], ["input", "double.0"]):
        with pytest.raises(
            UsageError, match="silently loads as nothing in ComfyUI and Forge"
        ) as info:
            slim_lora(lora, keep, output=tmp_path / "slim.safetensors")
        assert "img_in.lora_A.weight" in str(info.value) and "input,single.0" in str(info.value)
        with pytest.raises(UsageError, match=r"img_in\.lora_A\.weight"):
            resize_lora(lora, tmp_path / "r.safetensors", rank=2, keep=keep)
    assert (
        not (tmp_path / "slim.safetensors").exists() and not (tmp_path / "r.safetensors").exists()
    )
    written = slim_lora(lora, ["input", "double.0", "single.0"], output=tmp_path / "ok.st")
    assert control.keys <= read_lora(written.output).header.tensors.keys()
    # The CLI ends in one error line and the usage exit code.
    result = run_cli("slim", path, "--keep", "double.0-3", "-o", tmp_path / "c.st")
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 2 and len(errors) == 1, result.output
    assert "keep input,single.0 too" in errors[0]


class _Renderer:
    """Images where only ``double.3`` does anything: it alone passes the verdict."""

    model_id = "fake"
    versions: Mapping[str, str] = {"fake": "1"}

    def __call__(
        self, variants: Sequence[frozenset[str]], prompt: str, seed: int, settings: AnalyzeSettings
    ) -> list[np.ndarray]:
        base = np.random.default_rng(seed).uniform(60, 190, (settings.height, settings.width, 3))
        effect = np.random.default_rng(99).normal(0, 40, base.shape)
        return [
            np.clip(np.rint(base + effect * ("double.3" in v)), 0, 255).astype(np.uint8)
            for v in variants
        ]


def test_auto_keeps_the_marker_blocks_in_every_candidate(tmp_path: Path) -> None:
    settings = AnalyzeSettings(prompts=("a",), seeds=(0, 1), width=16, height=16, steps=1)
    order = ["double.3", "double.7", "single.0", "input", "final"]
    for grammar, pinned in (("kohya", []), ("bfl-control", ["input", "single.0"])):
        lora = read_lora(_lora(tmp_path, grammar))
        result = auto_keep(lora, file_sha256(lora.path), order, settings, _Renderer())
        assert result.verification.passed
        assert result.blocks == sorted({"double.3", *pinned}, key=block_order)
        assert result.order[: len(pinned)] == pinned
        # Every rendered candidate holds the pinned blocks (k = 0 is the base image).
        assert all(set(pinned) <= set(p.blocks) for p in result.curve if p.k > 0)


def test_the_suggested_keep_set_holds_the_marker_blocks(tmp_path: Path) -> None:
    def row(block: str, mse: float, rank: int) -> BlockRow:
        # norm 1: a block that carries weight (one of norm 0 is never suggested)
        return BlockRow(block, "solo", mse, 0.0, 1.0, 0.0, rank, 0, 0, 1.0, rank)

    rows = [row("double.3", 90.0, 1), row("single.0", 6.0, 2), row("input", 4.0, 3)]
    for grammar, expected in (
        ("kohya", ["double.3"]),
        ("bfl-control", ["input", "double.3", "single.0"]),
    ):
        lora = read_lora(_lora(tmp_path, grammar))
        suggestion = suggest_keep(rows, 0.5, lora, {}, lora.path.name)
        assert suggestion.blocks == expected
        assert suggestion.coverage == pytest.approx(
            sum(r.mse for r in rows if r.block in expected) / 100
        )
        # What analyze suggests, slim writes.
        slim_lora(lora, suggestion.blocks, output=tmp_path / f"{grammar}.slim.safetensors")
