"""The engine's speed options: compiled blocks that switch without recompiling, step caches refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch._dynamo
from diffusers.hooks import FirstBlockCacheConfig

from lora_prune.errors import UsageError
from lora_prune.lora import read_lora
from lora_prune.render.engine import BlockEngine
from lora_prune.render.loading import LoadedModel
from lora_prune.render.tiny import TINY_MAX_SEQUENCE_LENGTH, build_tiny_pipeline
from lora_prune.resize import resized_ranks
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


@pytest.mark.slow
def test_compiled_matches_eager_and_switching_does_not_recompile(lora_path: Path) -> None:
    """Compiled with rank caps (truncatable): blocks and ranks switch by mask values alone."""
    loaded = _loaded()
    lora = read_lora(lora_path)
    variants = [frozenset(), frozenset(BLOCKS), frozenset({"double.0"}), frozenset({"single.1"})]
    caps = [resized_ranks(lora, BLOCKS, r) for r in (1, 2, 3, 1)]
    with BlockEngine(loaded, lora) as engine:
        eager = engine.render(variants, SETTINGS, batch_size=2, output="float")
    with BlockEngine(loaded, lora, truncatable=True) as engine:
        eager_capped = engine.render(variants, SETTINGS, batch_size=2, output="float", ranks=caps)
    torch._dynamo.reset()
    hook_guards = torch._dynamo.config.skip_nnmodule_hook_guards
    try:
        with BlockEngine(loaded, lora, compile=True, truncatable=True) as engine:
            assert torch._dynamo.config.skip_nnmodule_hook_guards is False
            first = engine.render(variants, SETTINGS, batch_size=2, output="float")
            torch._dynamo.config.error_on_recompile = True
            # Other selections and ranks, same batch size: new mask values, the same compiled code.
            again = engine.render(variants[::-1], SETTINGS, batch_size=2, output="float")
            capped = engine.render(variants, SETTINGS, batch_size=2, output="float", ranks=caps)
        blocks = [*loaded.pipe.transformer.transformer_blocks]
        assert all(b._compiled_call_impl is None for b in blocks)  # close() restored eager blocks
        # ... and dynamo's process-wide hook-guard setting.
        assert torch._dynamo.config.skip_nnmodule_hook_guards == hook_guards
    finally:
        torch._dynamo.config.error_on_recompile = False
        torch._dynamo.reset()
    for ref, got in zip(eager + eager[::-1] + eager_capped, first + again + capped, strict=True):
        assert float(np.abs(ref - got).max()) < 1e-4
    # The caps change the images they apply to (the empty variant has nothing to cap).
    assert all(
        float(np.abs(a - b).max()) > 1e-3 for a, b in zip(eager[1:], eager_capped[1:], strict=True)
    )


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
    from diffusers.hooks import apply_first_block_cache

    from lora_prune.render.compiled import step_cache

    transformer = build_tiny_pipeline(0, torch.float32).transformer
    assert step_cache(transformer) is None
    apply_first_block_cache(transformer, FirstBlockCacheConfig(threshold=0.2))
    assert step_cache(transformer) == "fbc_leader_block_hook on transformer_blocks.0"
