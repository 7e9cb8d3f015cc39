"""Matching a LoRA against a model, without torch (lora_prune.matching).

The model is described by plain data: the diffusers FLUX.1 transformer's Linear
shapes at a geometry (``diffusers_linear_shapes``), so every case is a dict edit
away: a module missing, a width changed, a norm where a Linear should be.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from conftest import write_tensors

from lora_prune.errors import ModelMismatchError, UnsupportedAdapterError
from lora_prune.families.flux1.geometry import FLUX1_DEV, TINY, FluxGeometry
from lora_prune.lora import LoraFile, read_lora
from lora_prune.matching import ModelIndex, ModelModule, plan_attach
from lora_prune.testing import SynthSpec, diffusers_linear_shapes, write_synth_lora


def index(shapes: Mapping[str, tuple[int, int]], hidden: int) -> ModelIndex:
    modules = {
        f"transformer:{path}": ModelModule("linear", "Linear", out, fan_in)
        for path, (fan_in, out) in shapes.items()
    }
    return ModelIndex(frozenset({"transformer"}), modules.get, {"transformer": hidden})


def lora(
    tmp_path: Path,
    grammar: str = "kohya",
    geometry: FluxGeometry = TINY,
    *,
    rank: int = 4,
    blocks: tuple[str, ...] | None = None,
) -> LoraFile:
    spec = SynthSpec(grammar=grammar, geometry=geometry, rank=rank, blocks=blocks)
    return read_lora(write_synth_lora(tmp_path / f"{grammar}.safetensors", spec))


@pytest.mark.parametrize("grammar", ["kohya", "diffusers", "comfyui", "xlabs"])
def test_a_lora_of_the_models_geometry_plans_every_module(tmp_path: Path, grammar: str) -> None:
    shapes = diffusers_linear_shapes(TINY)
    lf = lora(tmp_path, grammar)
    plans = plan_attach(lf, index(shapes, TINY.hidden))
    assert {p.module.stem for p in plans} == {
        m.stem for m in lf.modules.values() if m.adapter != "empty"
    }
    for plan in plans:
        target = plan.module.target
        assert target is not None
        assert plan.hook_keys == [f"transformer:{m}" for m in target.modules]
        # A fused projection's rows are its parts' rows, in the target's order.
        assert plan.rows == [shapes[m][1] for m in target.modules]
        assert plan.in_features == shapes[target.modules[0]][0]


def test_every_mismatch_is_named_in_one_error_with_the_loras_model(tmp_path: Path) -> None:
    # A FLUX.1-width LoRA against the tiny model: every module mismatches, the width names FLUX.1.
    lf = lora(tmp_path, geometry=FLUX1_DEV, rank=1, blocks=("double.0", "single.0"))
    with pytest.raises(ModelMismatchError) as caught:
        plan_attach(lf, index(diffusers_linear_shapes(TINY), TINY.hidden))
    text = str(caught.value)
    assert text.startswith(
        f"{len(lf.modules)} of {len(lf.modules)} LoRA modules do not fit the model"
    )
    assert "LoRA 3072->" in text and "and " in text and " more" in text
    assert "this LoRA is for FLUX.1 (hidden 3072) but the model has hidden 32" in text


def test_a_missing_module_and_the_schnell_hint(tmp_path: Path) -> None:
    shapes = diffusers_linear_shapes(TINY)
    lf = lora(tmp_path, blocks=("input", "double.0"))
    guidance = [p for p in shapes if "guidance_embedder" in p]
    assert guidance  # the tiny model is a dev
    schnell = {p: s for p, s in shapes.items() if p not in guidance}
    with pytest.raises(ModelMismatchError) as caught:
        plan_attach(lf, index(schnell, TINY.hidden))
    assert "has no counterpart time_text_embed.guidance_embedder" in str(caught.value)
    assert "a FLUX.1-schnell model has no guidance embedder: this LoRA is for FLUX.1-dev" in str(
        caught.value
    )


def test_a_norm_where_a_linear_is_targeted_and_a_missing_component(tmp_path: Path) -> None:
    shapes = diffusers_linear_shapes(TINY)
    lf = lora(tmp_path, blocks=("double.0",))
    first = next(iter(m.target for m in lf.modules.values() if m.target is not None))
    assert first is not None
    model = index(shapes, TINY.hidden)
    modules = {
        f"transformer:{p}": ModelModule("linear", "Linear", o, i) for p, (i, o) in shapes.items()
    }
    modules[f"transformer:{first.modules[0]}"] = ModelModule("norm", "RMSNorm", 32)
    with pytest.raises(ModelMismatchError, match="targets RMSNorm, not a Linear layer"):
        plan_attach(lf, ModelIndex(model.components, modules.get, model.widths))
    with pytest.raises(ModelMismatchError, match="the pipeline has no transformer"):
        plan_attach(lf, ModelIndex(frozenset(), modules.get, {}))


def test_an_adapter_the_engine_does_not_apply_is_refused_before_matching(tmp_path: Path) -> None:
    stem = "lora_unet_double_blocks_0_img_attn_proj"
    path = write_tensors(
        tmp_path / "dora.safetensors",
        {
            f"{stem}.lora_down.weight": np.ones((4, 32)),
            f"{stem}.lora_up.weight": np.ones((32, 4)),
            f"{stem}.dora_scale": np.ones((1, 32)),
        },
    )
    with pytest.raises(UnsupportedAdapterError, match="DoRA"):
        plan_attach(read_lora(path), index(diffusers_linear_shapes(TINY), TINY.hidden))


def test_matching_runs_without_torch(tmp_path: Path) -> None:
    path = write_synth_lora(tmp_path / "l.safetensors", SynthSpec(blocks=("double.0", "final")))
    code = f"""
import sys
from lora_prune.lora import read_lora
from lora_prune.matching import ModelIndex, ModelModule, plan_attach
from lora_prune.testing import diffusers_linear_shapes
shapes = diffusers_linear_shapes()
mods = {{f"transformer:{{p}}": ModelModule("linear", "Linear", o, i) for p, (i, o) in shapes.items()}}
plans = plan_attach(read_lora({str(path)!r}), ModelIndex(frozenset({{"transformer"}}), mods.get, {{"transformer": 32}}))
assert plans and "torch" not in sys.modules, sorted(m for m in sys.modules if "torch" in m)
print(len(plans))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 0
