"""The render engine at FLUX.1's real widths: a 1 double + 1 single block FLUX.1-dev transformer.

Hidden 3072, mlp 12288, text context 4096, 24 heads (~0.55 B parameters, fp32,
CPU): the shapes where a row split of fused qkv/linear1 or a Kronecker factor
layout can go wrong without the tiny model noticing. LoRAs in kohya (fused
qkv/linear1), ComfyUI (BFL names), PEFT/diffusers and LyCORIS LoKr/LoHa
grammars are applied by the engine and compared on a transformer forward with
two independent references: the deltas merged into the weights by the field
guide's BFL -> diffusers row split (:mod:`flux_oracle`), and diffusers' own
loader where it reads the format. Errors are relative to the LoRA's effect
(max |engine - reference| / max |reference - no LoRA|) and printed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import diffusers
import numpy as np
import pytest
import torch
from flux_oracle import dense_delta, kohya_targets
from real_width_model import forward, real_width_inputs
from safetensors.numpy import load_file

from lora_prune.families.flux1.geometry import FLUX1_DEV
from lora_prune.lora import read_lora
from lora_prune.render.engine import BlockEngine
from lora_prune.render.loading import LoadedModel
from lora_prune.testing import SynthSpec, expected_scale, write_synth_lora

# Slow (a 0.55 B model each): one worker runs both real-width files, one after the other.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("real_width")]

torch.set_num_threads(1)

BLOCKS = ("input", "double.0", "single.0", "final")
VARIANTS = [frozenset(BLOCKS), *(frozenset({b}) for b in BLOCKS)]
#: Relative error allowed against the references (fp32; measured ~1e-6).
TOLERANCE = 1e-4
_SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".lora_A.weight", ".lora_B.weight", ".alpha")


@pytest.fixture(scope="module")
def transformer(real_width_transformer: torch.nn.Module) -> torch.nn.Module:
    return real_width_transformer


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return real_width_inputs()


@pytest.fixture(scope="module")
def plain(transformer: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return forward(transformer, inputs)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("real-width")


def _stem(key: str) -> str:
    for suffix in _SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)]
    return key.rpartition(".")[0]  # LyCORIS roles: .hada_w1_a, .lokr_w2 ...


def _targets(stem: str) -> tuple[str, list[str], bool]:
    """(block, diffusers modules, whether the LoRA uses BFL row order) of a module stem."""
    if stem.startswith("lora_unet_"):
        return (*kohya_targets(stem), True)
    if stem.startswith("diffusion_model."):
        flat = stem.removeprefix("diffusion_model.").replace(".", "_")
        return (*kohya_targets(f"lora_unet_{flat}"), True)
    path = stem.removeprefix("transformer.")
    head, _, rest = path.partition(".")
    index = rest.partition(".")[0]
    block = {
        "transformer_blocks": f"double.{index}",
        "single_transformer_blocks": f"single.{index}",
    }
    if head in block:
        return block[head], [path], False
    return ("final" if head in ("proj_out", "norm_out") else "input"), [path], False


def _merged_forward(
    transformer: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    tensors: dict[str, np.ndarray],
    blocks: frozenset[str],
    default_scale: float,
) -> torch.Tensor:
    """The forward with ``blocks``' deltas added to the weights, restored afterwards."""
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for stem in sorted({_stem(k) for k in tensors}):
                block, names, bfl = _targets(stem)
                if block not in blocks:
                    continue
                delta = dense_delta(tensors, stem, default_scale, torch.float32)
                if bfl and stem.endswith(("adaLN_modulation_1", "adaLN_modulation.1")):
                    shift, scale = delta.chunk(2, dim=0)  # BFL (shift, scale) rows
                    delta = torch.cat([scale, shift], dim=0)
                row = 0
                for name in names:
                    weight = _linear(transformer, name).weight
                    saved.setdefault(name, weight.detach().clone())
                    rows = int(weight.shape[0])
                    weight += delta[row : row + rows].to(weight.dtype)
                    row += rows
                assert row == delta.shape[0], stem
        return forward(transformer, inputs)
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                _linear(transformer, name).weight.copy_(weight)


def _linear(transformer: torch.nn.Module, name: str) -> torch.nn.Linear:
    module = transformer.get_submodule(name)
    assert isinstance(module, torch.nn.Linear), name
    return module


def _diffusers_forward(
    transformer: torch.nn.Module, inputs: dict[str, torch.Tensor], path: Path
) -> torch.Tensor:
    """The forward with the file loaded by diffusers' own Flux LoRA loader (its converters)."""
    pipe: Any = diffusers.FluxPipeline
    model: Any = transformer
    state, alphas, metadata = pipe.lora_state_dict(
        str(path), return_alphas=True, return_lora_metadata=True
    )
    pipe.load_lora_into_transformer(
        state, alphas, transformer=model, adapter_name="reference", metadata=metadata
    )
    try:
        return forward(transformer, inputs)
    finally:
        model.unload_lora()


def _relative(a: torch.Tensor, b: torch.Tensor, base: torch.Tensor) -> float:
    return float((a - b).abs().max() / (b - base).abs().max())


@contextmanager
def _engine(transformer: torch.nn.Module, path: Path) -> Iterator[BlockEngine]:
    # The engine's public entry: a LoadedModel whose pipeline need only hold the transformer.
    loaded = LoadedModel(
        SimpleNamespace(transformer=transformer), "real-width", torch.device("cpu"), torch.float32
    )
    with BlockEngine(loaded, read_lora(path)) as engine:
        yield engine


#: grammar -> the blocks diffusers' loader applies (None: it cannot read the format).
#: Its kohya converter drops input/final modules; it cannot read LyCORIS files for Flux.
_DIFFUSERS: dict[str, frozenset[str] | None] = {
    "kohya": frozenset({"double.0", "single.0"}),
    "comfyui": None,
    "diffusers": frozenset(BLOCKS),
    "lycoris-kohya-lokr": None,
    "lycoris-kohya-loha": None,
}


@pytest.mark.parametrize("grammar", list(_DIFFUSERS))
def test_engine_equals_merged_weights_and_diffusers_at_real_width(
    transformer: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    plain: torch.Tensor,
    files: Path,
    grammar: str,
) -> None:
    spec = SynthSpec(
        grammar=grammar,
        geometry=FLUX1_DEV,
        blocks=BLOCKS,
        rank=4,
        alpha=16.0,  # scale 4: an effect well above fp32 rounding of the merged weights
        seed=3,
        alpha_in="metadata" if grammar == "diffusers" else "keys",
    )
    path = write_synth_lora(files / f"{grammar}.safetensors", spec)
    tensors = load_file(str(path))
    errors: dict[str, float] = {}
    with _engine(transformer, path) as engine:
        assert engine.blocks == list(BLOCKS)
        if grammar.startswith("lycoris"):
            stored = sum(a.nbytes for k, a in tensors.items() if not k.endswith(".alpha"))
            dense = sum(
                m.weight.numel() * 4
                for name, m in transformer.named_modules()
                if name in {n for s in {_stem(k) for k in tensors} for n in _targets(s)[1]}
            )
            # the factors, not out x in per module (at rank 4: 1/70 to 1/270 of the dense deltas)
            assert engine.attached_bytes <= 4 * stored < dense / 10, (stored, dense)
        outputs = {}
        # LyCORIS: all blocks at once (the row splits and swapped halves are the same code per block)
        variants = VARIANTS[:1] if grammar.startswith("lycoris") else VARIANTS
        for variant in variants:
            with engine.activated(variant):
                outputs[variant] = forward(transformer, inputs)
        covered = _DIFFUSERS[grammar]
        if covered is not None and covered not in outputs:
            with engine.activated(covered):
                outputs[covered] = forward(transformer, inputs)
    for variant in variants:
        merged = _merged_forward(transformer, inputs, tensors, variant, expected_scale(spec))
        assert float((merged - plain).abs().max()) > 1e-3, sorted(variant)  # the block acts
        errors["merged " + "+".join(sorted(variant))] = _relative(outputs[variant], merged, plain)
    if covered is not None:
        reference = _diffusers_forward(transformer, inputs, path)
        assert float((reference - plain).abs().max()) > 1e-3
        errors["diffusers " + "+".join(sorted(covered))] = _relative(
            outputs[covered], reference, plain
        )
    # the engine is off once closed and the references restored the weights
    assert torch.equal(forward(transformer, inputs), plain)
    print(f"\n{grammar} at real width, error / LoRA effect:")
    for name, error in errors.items():
        print(f"  {name}: {error:.1e}")
    assert max(errors.values()) <= TOLERANCE, errors
