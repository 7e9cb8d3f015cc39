"""The engine's speed options: compiled blocks that switch without recompiling, step caches refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
from diffusers.hooks import FirstBlockCacheConfig  # type: ignore[attr-defined]

from lora_prune.errors import UsageError
from lora_prune.lora import read_lora
from lora_prune.render.engine import BlockEngine
from lora_prune.render.loading import LoadedModel
from lora_prune.render.tiny import TINY_MAX_SEQUENCE_LENGTH, build_tiny_pipeline
from lora_prune.settings import ImageSettings
from lora_prune.testing import SynthSpec, write_synth_lora

SETTINGS = ImageSettings(
    "a fox", seed=0, width=32, height=32, steps=2, max_sequence_length=TINY_MAX_SEQUENCE_LENGTH
)
BLOCKS = ("input", "double.0", "single.0", "single.1", "final")


def _loaded() -> LoadedModel:
    torch.set_num_threads(1)
    return LoadedModel(
        build_tiny_pipeline(0, torch.float32), "tiny", torch.device("cpu"), torch.float32
    )


@pytest.fixture(scope="module")
def lora_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synth_lora(
        tmp_path_factory.mktemp("speed") / "l.safetensors", SynthSpec(blocks=BLOCKS)
    )


def test_compiled_matches_eager_and_switching_does_not_recompile(lora_path: Path) -> None:
    loaded = _loaded()
    lora = read_lora(lora_path)
    variants = [frozenset(), frozenset(BLOCKS), frozenset({"double.0"}), frozenset({"single.1"})]
    with BlockEngine(loaded, lora) as engine:
        eager = engine.render(variants, SETTINGS, batch_size=2, output="float")
    torch._dynamo.reset()
    try:
        with BlockEngine(loaded, lora, compile=True) as engine:
            first = engine.render(variants, SETTINGS, batch_size=2, output="float")
            torch._dynamo.config.error_on_recompile = True
            # Other selections, same batch size: new mask values, the same compiled code.
            again = engine.render(variants[::-1], SETTINGS, batch_size=2, output="float")
        blocks = [*loaded.pipe.transformer.transformer_blocks]
        assert all(b._compiled_call_impl is None for b in blocks)  # close() restored eager blocks
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    for ref, got in zip(eager + eager[::-1], first + again, strict=True):
        assert float(np.abs(ref - got).max()) < 1e-4
    # The LoRA changes the image: agreement is not two no-LoRA renders agreeing.
    assert float(np.abs(eager[0] - eager[1]).max()) > 0.01


def test_step_cache_is_refused_by_name(lora_path: Path) -> None:
    loaded = _loaded()
    lora = read_lora(lora_path)
    transformer = loaded.pipe.transformer
    with BlockEngine(loaded, lora) as engine:
        transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
        try:
            with pytest.raises(UsageError, match="step cache enabled \\(FirstBlockCacheConfig\\)"):
                engine.render([frozenset()], SETTINGS)
        finally:
            transformer.disable_cache()
        assert engine.render([frozenset()], SETTINGS)[0].shape == (32, 32, 3)
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.2))
    try:
        with pytest.raises(UsageError) as caught:
            BlockEngine(loaded, lora)
    finally:
        transformer.disable_cache()
    assert "\n" not in str(caught.value) and "disable_cache()" in str(caught.value)


def test_step_cache_applied_without_enable_cache_is_named() -> None:
    from diffusers.hooks import apply_first_block_cache  # type: ignore[attr-defined]

    from lora_prune.render.compiled import step_cache

    transformer = build_tiny_pipeline(0, torch.float32).transformer
    assert step_cache(transformer) is None
    apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=0.2))
    assert step_cache(transformer) == "fbc_leader_block_hook on transformer_blocks.0"
