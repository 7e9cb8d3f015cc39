"""The files slim and resize write load where users load LoRAs (docs/loaders.md).

diffusers: ``pipe.load_lora_weights`` on the tiny pipeline, for the PEFT/diffusers
format; the render must differ from the base and equal the block engine's.
kohya's FLUX.1 converter in diffusers hard-codes the FLUX.1 widths (3072), so it
cannot load tiny-width kohya files: those are checked by key set only.

ComfyUI (Forge is taken to map keys as ComfyUI does; its code was not read): the key
set of a slim or resized kohya / ComfyUI-native file must be one ComfyUI maps.
The table below is derived from ComfyUI ``comfy/lora.py`` ``model_lora_keys_unet``:
for every ``diffusion_model.<path>.weight`` of the FLUX model it accepts the
stems ``lora_unet_<path with . as _>`` and ``diffusion_model.<path>``, and
``load_lora`` / ``comfy/weight_adapter`` read ``<stem>.lora_up.weight``,
``.lora_down.weight``, ``.alpha`` (and the LyCORIS suffixes, not used here).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lora_prune.blocks import DOUBLE_IDS, SINGLE_IDS, TEXT_ENCODER_IDS
from lora_prune.lora import read_lora
from lora_prune.render.engine import BlockEngine
from lora_prune.render.loading import LoadedModel, ModelSpec, load_pipeline
from lora_prune.render.plain import plain_render as pipe_render
from lora_prune.render.tiny import TINY_MAX_SEQUENCE_LENGTH
from lora_prune.resize import resize_lora
from lora_prune.safetensors_io import read_header
from lora_prune.settings import ImageSettings
from lora_prune.slim import slim_lora
from lora_prune.testing import SynthSpec, supported_blocks, write_synth_lora

torch.set_num_threads(1)

SETTINGS = ImageSettings(
    "a red fox", seed=3, width=32, height=32, steps=2, max_sequence_length=TINY_MAX_SEQUENCE_LENGTH
)
KEEP = {"input", "double.0", "double.3", "single.5", "single.7", "final"}

# The Linear weights of ComfyUI's FLUX model (comfy/ldm/flux/model.py, layers.py), in BFL names.
_DOUBLE_LINEARS = (
    "img_mod.lin",
    "img_attn.qkv",
    "img_attn.proj",
    "img_mlp.0",
    "img_mlp.2",
    "txt_mod.lin",
    "txt_attn.qkv",
    "txt_attn.proj",
    "txt_mlp.0",
    "txt_mlp.2",
)
_SINGLE_LINEARS = ("linear1", "linear2", "modulation.lin")
_OUTSIDE_LINEARS = (
    "img_in",
    "txt_in",
    "time_in.in_layer",
    "time_in.out_layer",
    "vector_in.in_layer",
    "vector_in.out_layer",
    "guidance_in.in_layer",
    "guidance_in.out_layer",
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
)
_LORA_SUFFIXES = ("lora_up.weight", "lora_down.weight", "alpha")


def comfy_flux_keys() -> set[str]:
    """Every key ComfyUI's FLUX LoRA loader maps, for the kohya and ComfyUI-native stems."""
    paths = [
        *(f"double_blocks.{i}.{m}" for i in range(19) for m in _DOUBLE_LINEARS),
        *(f"single_blocks.{i}.{m}" for i in range(38) for m in _SINGLE_LINEARS),
        *_OUTSIDE_LINEARS,
    ]
    stems = {f"lora_unet_{p.replace('.', '_')}" for p in paths}
    stems |= {f"diffusion_model.{p}" for p in paths}
    return {f"{s}.{suffix}" for s in stems for suffix in _LORA_SUFFIXES}


def _keys(path: Path) -> set[str]:
    return set(read_header(path).tensors)


@pytest.mark.parametrize("grammar", ["kohya", "comfyui"])
def test_slim_and_resized_files_keep_a_key_set_comfyui_loads(grammar: str, tmp_path: Path) -> None:
    accepted = comfy_flux_keys()
    # Text-encoder keys (lora_te1_/lora_te3_) go through model_lora_keys_clip: not tabled here.
    blocks = tuple(b for b in supported_blocks(grammar) if b not in TEXT_ENCODER_IDS)
    spec = SynthSpec(grammar=grammar, blocks=blocks, rank=4, seed=1)
    src = write_synth_lora(tmp_path / "src.safetensors", spec)
    assert _keys(src) <= accepted  # the table covers what the trainers write
    slim = slim_lora(src, KEEP, output=tmp_path / "slim.safetensors").output
    resized = resize_lora(slim, tmp_path / "resized.safetensors", rank=2).output
    for path in (slim, resized):
        keys = _keys(path)
        assert keys and keys <= accepted, sorted(keys - accepted)[:5]
        # a module keeps its whole stem: up and down together (partial modules break loaders)
        stems = {
            k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys
        }
        for stem in stems:
            assert {f"{stem}.lora_up.weight", f"{stem}.lora_down.weight"} <= keys


@pytest.fixture(scope="module")
def loaded() -> LoadedModel:
    return load_pipeline(ModelSpec("tiny", device="cpu", dtype="fp32"))


@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
def test_diffusers_loads_slim_and_resized_files_and_renders_like_the_engine(
    loaded: LoadedModel, tmp_path: Path
) -> None:
    spec = SynthSpec(
        grammar="diffusers",
        blocks=("input", *DOUBLE_IDS[:4], *SINGLE_IDS[:8], "final"),
        rank=4,
        alpha=4.0,
        alpha_in="metadata",
        seed=5,
    )
    src = write_synth_lora(tmp_path / "src.safetensors", spec)
    slim = slim_lora(src, KEEP, output=tmp_path / "slim.safetensors").output
    resized = resize_lora(slim, tmp_path / "resized.safetensors", rank=2).output
    pipe = loaded.pipe
    plain = pipe_render(pipe, SETTINGS)
    for path in (slim, resized):
        pipe.load_lora_weights(str(path), adapter_name="check")
        try:
            reference = pipe_render(pipe, SETTINGS)
        finally:
            pipe.unload_lora_weights()
        assert np.abs(reference - plain).max() > 0.02, path.name  # the LoRA is applied
        lora = read_lora(path)
        with BlockEngine(loaded, lora) as engine:
            (full,) = engine.render([frozenset(engine.blocks)], SETTINGS, output="float")
        assert np.abs(full - reference).max() <= 1e-5, path.name
