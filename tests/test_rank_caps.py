"""Rank candidates rendered without writing them: per-image rank caps on a truncatable engine.

``slim --auto --max-size`` renders every lower-rank candidate in batches as
block masks and rank caps of the full LoRA held in its SVD basis. The
reference for each image is the file ``resize_lora`` writes for that
candidate, rendered by a plain engine on its own: the two must agree to
float rounding, image by image, whatever else shares the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_prune.errors import UsageError
from lora_prune.lora import LoraFile, read_lora
from lora_prune.render.engine import BlockEngine
from lora_prune.render.loading import LoadedModel
from lora_prune.render.sweep import EngineRenderer
from lora_prune.render.tiny import TINY_MAX_SEQUENCE_LENGTH
from lora_prune.resize import resize_lora, resized_ranks, rotated_factors
from lora_prune.safetensors_io import file_sha256
from lora_prune.settings import AnalyzeSettings, ImageSettings
from lora_prune.testing import SynthSpec, write_synth_lora
from lora_prune.verify import reference_renders, verify_candidate, verify_candidates

torch.set_num_threads(1)

SETTINGS = ImageSettings(
    "a red fox", seed=3, width=32, height=32, steps=2, max_sequence_length=TINY_MAX_SEQUENCE_LENGTH
)
# Fused targets (double qkv, single linear1), modulation, the swapped final adaLN, text encoders.
BLOCKS = ("input", "double.0", "double.5", "single.0", "single.9", "final", "clip", "t5")
#: float32 factors rotated in float64: the same product to float rounding.
TOLERANCE = 2e-5


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> LoraFile:
    spec = SynthSpec(grammar="kohya", blocks=BLOCKS, rank=4, alpha=2.0, seed=5)
    return read_lora(write_synth_lora(tmp_path_factory.mktemp("caps") / "l.safetensors", spec))


def _render_file(tiny_model: LoadedModel, path: Path, blocks: frozenset[str]) -> np.ndarray:
    with BlockEngine(tiny_model, read_lora(path)) as engine:
        (image,) = engine.render([blocks], SETTINGS, output="float")
    return image


def test_rotated_factors_keep_the_product_in_decreasing_components() -> None:
    rng = np.random.default_rng(0)
    up, down = rng.normal(size=(12, 4)), rng.normal(size=(4, 9))
    new_up, new_down, s = rotated_factors(up, down)
    assert np.allclose(new_up @ new_down, up @ down, atol=1e-12)
    assert np.all(np.diff(s) <= 0) and s[-1] > 0
    # Each component carries its singular value on both sides, and the first k are Eckart-Young's.
    assert np.allclose(np.linalg.norm(new_up, axis=0), np.sqrt(s))
    u, sv, vt = np.linalg.svd(up @ down)
    assert np.allclose(new_up[:, :2] @ new_down[:2], (u[:, :2] * sv[:2]) @ vt[:2], atol=1e-10)


def test_truncatable_engine_at_full_rank_renders_as_the_plain_one(
    tiny_model: LoadedModel, lora: LoraFile
) -> None:
    variants = [frozenset(BLOCKS), frozenset({"double.0", "clip"}), frozenset()]
    with BlockEngine(tiny_model, lora) as engine:
        plain = engine.render(variants, SETTINGS, output="float")
    with BlockEngine(tiny_model, lora, truncatable=True) as engine:
        assert set(engine.ranks) == set(lora.modules) and set(engine.ranks.values()) == {4}
        rotated = engine.render(variants, SETTINGS, output="float")
        capped_at_full = engine.render(
            variants, SETTINGS, output="float", ranks=[dict.fromkeys(lora.modules, 4)] * 3
        )
    assert float(np.abs(plain[0] - plain[2]).max()) > 0.01  # the LoRA does something
    for a, b, c in zip(plain, rotated, capped_at_full, strict=True):
        assert float(np.abs(a - b).max()) < TOLERANCE
        assert np.array_equal(b, c)  # a cap at the attached rank is no cap


def test_each_image_renders_as_the_resized_file_of_its_caps(
    tiny_model: LoadedModel, lora: LoraFile, tmp_path: Path
) -> None:
    everything = frozenset(BLOCKS)
    some = frozenset({"double.0", "single.9", "final", "t5"})
    candidates: list[tuple[frozenset[str], int | Mapping[str, int]]] = [
        (everything, 1),
        (everything, 2),
        (some, {"double.0": 1, "single.9": 3, "t5": 2}),
        (some, 3),
    ]
    caps = [resized_ranks(lora, blocks, rank) for blocks, rank in candidates]
    assert all(caps) and len(set(map(str, caps))) == len(caps)
    with BlockEngine(tiny_model, lora, truncatable=True) as engine:
        # One batch holds every candidate and a full-rank image: each keeps its own caps.
        batch = engine.render(
            [frozenset(BLOCKS), *(b for b, _ in candidates)],
            SETTINGS,
            output="float",
            ranks=[None, *caps],
        )
        one_by_one = [
            engine.render([b], SETTINGS, output="float", ranks=[c])[0]
            for (b, _), c in zip(candidates, caps, strict=True)
        ]
    full = _render_file(tiny_model, lora.path, everything)
    assert float(np.abs(batch[0] - full).max()) < TOLERANCE
    for i, (blocks, rank) in enumerate(candidates):
        path = tmp_path / f"c{i}.safetensors"
        if isinstance(rank, int):
            resize_lora(lora, path, rank=rank, keep=blocks)
        else:
            resize_lora(lora, path, ranks=rank, keep=blocks)
        assert {s: m.rank for s, m in read_lora(path).modules.items() if s in caps[i]} == caps[i]
        reference = _render_file(tiny_model, path, blocks)
        # The truncation changes the image, and the batch renders it as the file does.
        assert float(np.abs(reference - full).max()) > 1e-3
        assert float(np.abs(batch[1 + i] - reference).max()) < TOLERANCE
        assert float(np.abs(one_by_one[i] - reference).max()) < TOLERANCE


def test_rank_caps_are_checked(tiny_model: LoadedModel, lora: LoraFile) -> None:
    stem = next(iter(lora.modules))
    with BlockEngine(tiny_model, lora) as engine, pytest.raises(UsageError, match="truncatable"):
        engine.render([frozenset(BLOCKS)], SETTINGS, ranks=[{stem: 1}])
    with BlockEngine(tiny_model, lora, truncatable=True) as engine:
        for ranks, match in (
            ([{stem: 1}, {stem: 1}], "2 rank caps for 1 variants"),
            ([{"lora_unet_nothing": 1}], "no plain low-rank module"),
            ([{stem: 0}], "integer >= 1"),
            ([{stem: True}], "integer >= 1"),
        ):
            with pytest.raises(UsageError, match=match):
                engine.render([frozenset(BLOCKS)], SETTINGS, ranks=ranks)


class _Counting:
    """A renderer that records how many images each call renders."""

    def __init__(self, inner: EngineRenderer) -> None:
        self.inner, self.model_id, self.versions = inner, inner.model_id, inner.versions
        self.calls: list[int] = []

    def __call__(
        self,
        variants: Sequence[frozenset[str]],
        prompt: str,
        seed: int,
        settings: AnalyzeSettings,
        ranks: Sequence[Mapping[str, int] | None] | None = None,
    ) -> list[np.ndarray]:
        self.calls.append(len(variants))
        return self.inner(variants, prompt, seed, settings, ranks)


def test_candidates_scored_in_batches_as_their_files_score(
    tiny_model: LoadedModel, lora: LoraFile, tmp_path: Path
) -> None:
    settings = AnalyzeSettings(
        prompts=("a red fox", "a lighthouse"), seeds=(0,), width=32, height=32, steps=2
    )
    sha = file_sha256(lora.path)
    keep = sorted(BLOCKS)
    candidates = [(keep, resized_ranks(lora, keep, r)) for r in (1, 2, 3)]
    with BlockEngine(tiny_model, lora, truncatable=True) as engine:
        renderer = _Counting(EngineRenderer(engine, tiny_model, TINY_MAX_SEQUENCE_LENGTH))
        refs, _ = reference_renders(lora, settings, renderer)
        renderer.calls.clear()
        searched = verify_candidates(lora, sha, candidates, settings, renderer, refs, batch_size=2)
    # Two prompts, three candidates in batches of two: four pipeline calls.
    assert renderer.calls == [2, 1, 2, 1]
    shares = [v.kept_share for v in searched]
    assert all(s is not None for s in shares) and shares == sorted(shares)  # type: ignore[type-var]
    for r, result in zip((1, 2, 3), searched, strict=True):
        path = tmp_path / f"r{r}.safetensors"
        resize_lora(lora, path, rank=r, keep=keep)
        with BlockEngine(tiny_model, read_lora(path)) as engine:
            file_renderer = EngineRenderer(engine, tiny_model, TINY_MAX_SEQUENCE_LENGTH)
            proved = verify_candidate(lora, sha, keep, settings, file_renderer, refs)
        assert proved.kept_share is not None and result.kept_share is not None
        assert abs(proved.kept_share - result.kept_share) < 1e-3
        assert proved.passed == result.passed
        assert len(result.images) == len(proved.images) == 2
