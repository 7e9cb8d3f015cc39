"""A real GGUF transformer through diffusers' GGUF support, with the LoRA engine on top.

The reduced-depth FLUX.1-dev transformer at real widths (:mod:`real_width_model`;
diffusers' FLUX single-file converter assumes FLUX.1's widths, so the tiny model
cannot be a GGUF file) is written in BFL naming as city96's ComfyUI-GGUF tools
write one: ``general.architecture = "flux"``, the 2-D weights as Q8_0 and the
1-D tensors as F16. It is loaded by ``--transformer``'s path and compared with
the fp32 original: the weights stay quantised (about the file's bytes in
memory), diffusers dequantises them per call, and the output and a kohya LoRA's
effect on it match the original's within Q8_0's error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from real_width_model import (
    build_real_width_transformer,
    forward,
    real_width_config,
    real_width_inputs,
)
from test_render_loading import to_bfl

from lora_prune.errors import UsageError
from lora_prune.families.flux1.geometry import FLUX1_DEV
from lora_prune.lora import read_lora
from lora_prune.render.engine import BlockEngine
from lora_prune.render.loading import LoadedModel
from lora_prune.render.storage import dense_weight, inspect_transformer_file, weight_shape
from lora_prune.render.transformerfile import load_transformer_file
from lora_prune.testing import SynthSpec, write_synth_lora

# Slow (a 0.55 B model each): one worker runs both real-width files, one after the other.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("real_width")]

torch.set_num_threads(2)  # Q8_0 quantisation and dequantisation dominate; 2 threads halve them

Q8_0 = gguf.GGMLQuantizationType.Q8_0
#: Errors relative to the output's (or the LoRA effect's) scale: against the original with
#: the file's rounded weights (fp32 arithmetic), and against the fp32 original (Q8_0's ~8 bits).
TOLERANCE = 1e-4
Q8_0_TOLERANCE = 5e-2


def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _relative(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    return float((a - b).abs().max() / scale.abs().max())


def write_gguf(state: dict[str, torch.Tensor], path: Path) -> Path:
    """``state`` (BFL names) as a GGUF file: matrices Q8_0, vectors F16 (as ComfyUI-GGUF's Q8_0)."""
    writer = gguf.GGUFWriter(str(path), arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    for name, tensor in state.items():
        values = tensor.detach().to(torch.float32).numpy()
        if values.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(values, Q8_0), raw_dtype=Q8_0)
        else:
            writer.add_tensor(
                name, values.astype(np.float16), raw_dtype=gguf.GGMLQuantizationType.F16
            )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@dataclass
class Reference:
    """The fp32 original's output, and the original with its weights rounded as in the file."""

    plain: torch.Tensor
    rounded: torch.nn.Module
    path: Path
    dense_bytes: int


def _round_as_stored(model: torch.nn.Module) -> None:
    """Each weight as diffusers computes with it: Q8_0 matrices dequantised, vectors via F16.

    diffusers multiplies a Q8_0 block's fp16 scale by its int8 codes in fp16, so a
    dequantised weight is the exact product rounded to fp16 once.
    """
    with torch.no_grad():
        for param in model.parameters():
            values = param.detach().numpy()
            if values.ndim == 2:  # Q8_0 blocks run along a row, so BFL's fused rows round alike
                values = gguf.quants.dequantize(gguf.quants.quantize(values, Q8_0), Q8_0)
                param.copy_(torch.from_numpy(values.astype(np.float16)))
            else:
                param.copy_(param.to(torch.float16))


@pytest.fixture(scope="module")
def inputs() -> dict[str, torch.Tensor]:
    return real_width_inputs()


@pytest.fixture(scope="module")
def reference(
    inputs: dict[str, torch.Tensor], tmp_path_factory: pytest.TempPathFactory
) -> Reference:
    # One 0.55 B fp32 model, rounded in place once its output and file exist: a second copy
    # would double the test's memory.
    model = build_real_width_transformer()
    plain = forward(model, inputs)
    folder = tmp_path_factory.mktemp("gguf")
    path = write_gguf(to_bfl(model.state_dict()), folder / "flux1-dev-Q8_0.gguf")
    _round_as_stored(model)
    return Reference(plain, model, path, _param_bytes(model))


@pytest.fixture(scope="module")
def quantised(reference: Reference) -> Any:
    model, _ = load_transformer_file(reference.path, real_width_config(), torch.float32)
    return model


def test_gguf_file_loads_quantised_and_computes_as_its_weights(
    reference: Reference, quantised: Any, inputs: dict[str, torch.Tensor]
) -> None:
    path = reference.path
    assert inspect_transformer_file(path).format == "gguf"
    linears = {n: m for n, m in quantised.named_modules() if isinstance(m, torch.nn.Linear)}
    assert len(linears) == sum(isinstance(m, torch.nn.Linear) for m in reference.rounded.modules())
    rounded = dict(reference.rounded.named_modules())
    for name, module in linears.items():
        assert type(module).__name__ == "GGUFLinear", name
        assert type(module.weight).__name__ == "GGUFParameter", name
        assert getattr(module.weight, "quant_type", None) == Q8_0, name
        assert module.weight.dtype == torch.uint8, name  # the file's blocks, not values
        # what the engine reads: the shape in values, and the values diffusers computes with
        assert weight_shape(module.weight) == tuple(rounded[name].weight.shape), name
    probe = "single_transformer_blocks.0.proj_mlp"  # a row part of BFL's fused linear1
    assert torch.equal(dense_weight(linears[probe].weight), rounded[probe].weight)
    stored = _param_bytes(quantised)
    dense = reference.dense_bytes  # fp32
    size = path.stat().st_size
    print(
        f"\nGGUF Q8_0 at real width: {stored / 1e6:.0f} MB of parameters loaded, "
        f"file {size / 1e6:.0f} MB, fp32 {dense / 1e6:.0f} MB, bf16 {dense / 2e6:.0f} MB"
    )
    # 34 bytes per 32 weights, as in the file; bf16 would take 64.
    assert abs(stored - size) < 0.01 * size, (stored, size)
    assert stored < 0.55 * (dense / 2), (stored, dense)

    out = forward(quantised, inputs)
    assert out.dtype == torch.float32
    plain = reference.plain
    # diffusers' dequantisation and FLUX converter: the rounded weights' output, to fp32 rounding
    exact = _relative(out, forward(reference.rounded, inputs), plain)
    # Q8_0's own error against the fp32 original (measured 2.4e-2 of the output's scale)
    lossy = _relative(out, plain, plain)
    print(f"output error / output scale: {exact:.1e} vs rounded weights, {lossy:.1e} vs fp32")
    assert exact < TOLERANCE
    assert 1e-4 < lossy < Q8_0_TOLERANCE


def test_lora_on_a_gguf_transformer_acts_as_on_its_weights(
    reference: Reference, quantised: Any, inputs: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    spec = SynthSpec(
        grammar="kohya",  # fused qkv/linear1: row splits over GGUFLinear modules
        geometry=FLUX1_DEV,
        blocks=("double.0", "single.0"),
        rank=4,
        alpha=16.0,
        seed=3,
    )
    lora = read_lora(write_synth_lora(tmp_path / "kohya.safetensors", spec))
    effects: dict[str, torch.Tensor] = {}
    for label, model in (("rounded", reference.rounded), ("gguf", quantised)):
        loaded = LoadedModel(
            SimpleNamespace(transformer=model), label, torch.device("cpu"), torch.float32
        )
        with BlockEngine(loaded, lora) as engine:
            assert engine.blocks == ["double.0", "single.0"]
            base = forward(model, inputs)
            with engine.activated(frozenset(engine.blocks)):
                effects[label] = forward(model, inputs) - base
    # The pieces are in the compute dtype, not the GGUF weights' uint8 (which would zero them).
    assert float(effects["rounded"].abs().max()) > 1e-2
    error = _relative(effects["gguf"], effects["rounded"], effects["rounded"])
    print(f"\nLoRA effect error / LoRA effect on GGUF Q8_0: {error:.1e}")
    assert error < TOLERANCE


def test_gguf_file_with_other_block_counts_than_its_config_is_refused(
    reference: Reference,
) -> None:
    gguf_file = reference.path
    # No base folder: the shipped FLUX.1-dev config has 19 + 38 blocks, the file 1 + 1.
    with pytest.raises(UsageError) as info:
        load_transformer_file(gguf_file, None, torch.float32)
    assert str(info.value) == (
        "GGUF transformer has 1 double and 1 single blocks, its config 19 and 38, "
        f"{gguf_file}, use a complete FLUX.1-dev/schnell GGUF transformer of the model "
        "folder's variant"
    )
