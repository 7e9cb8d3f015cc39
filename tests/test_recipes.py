"""Retraining recipes: each trainer's setting for a known keep set, in ranking.json and on screen.

The expected strings are written by hand from each trainer's documentation (cited
beside each), not from lora_prune.recipes, so a change in either shows here.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from clitools import run_cli
from conftest import write_tensors

from lora_prune.blocks import parse_block_spec
from lora_prune.families.flux1.blocks import LAYOUT
from lora_prune.families.flux1.recipes import recipes_for
from lora_prune.lora import read_lora
from lora_prune.recipes import input_ranks
from lora_prune.testing import SynthSpec, planted_lora, synth_modules, write_synth_lora

KEEP = parse_block_spec("input,double.0-2,double.7,single.5,single.30-37,final", LAYOUT)

# kohya-ss/sd-scripts docs/flux_train_network.md 6.4: "train_double_block_indices=0,1,8-12,18"
# style lists; 6.3: "in_dims=[4,2,2,2,4]" (img_in, time_in, vector_in, guidance_in, txt_in);
# 6.6: "--network_train_unet_only" trains FLUX.1 only. Without a LoRA to read ranks from, in_dims
# are the "--network_dim=16" of the example command in section 4.
KOHYA = (
    "--network_train_unet_only --network_args "
    '"train_double_block_indices=0-2,7" '
    '"train_single_block_indices=5,30-37" '
    '"in_dims=[16,16,16,16,16]"'
)

# ostris/ai-toolkit README.md "Training Specific Layers": network: network_kwargs:
# only_if_contains: - "transformer.single_transformer_blocks.7.proj_out"; the trailing dot
# keeps block 1 from matching block 10. transformer_only: toolkit/config_modules.py.
AI_TOOLKIT = """network:
  transformer_only: false
  network_kwargs:
    only_if_contains:
      - "transformer.transformer_blocks.0."
      - "transformer.transformer_blocks.1."
      - "transformer.transformer_blocks.2."
      - "transformer.transformer_blocks.7."
      - "transformer.single_transformer_blocks.5."
      - "transformer.single_transformer_blocks.30."
      - "transformer.single_transformer_blocks.31."
      - "transformer.single_transformer_blocks.32."
      - "transformer.single_transformer_blocks.33."
      - "transformer.single_transformer_blocks.34."
      - "transformer.single_transformer_blocks.35."
      - "transformer.single_transformer_blocks.36."
      - "transformer.single_transformer_blocks.37."
      - "transformer.x_embedder"
      - "transformer.context_embedder"
      - "transformer.time_text_embed"
      - "transformer.norm_out"
      - "transformer.proj_out\""""

# Nerogar/OneTrainer wiki, LoRA page: "Layer Preset: ... You can choose "custom" and specify
# your own, comma separated" (copy: aklevecz/onetrainer-docs src/content/docs/wiki/LoRA.md);
# "Diffusion Models Overview": "down_blocks.1.attentions.0,down_blocks.1.attentions.1,...".
# The Regex toggle is in the UI's tooltip only (modules/ui/BaseTrainingTabView.py):
# layer_filter_regex (modules/util/config/TrainConfig.py); modules/util/ModuleFilter.py
# matches with re.search on names like "transformer_blocks.0.attn.to_q".
ONE_TRAINER = (
    r'"layer_filter": "^transformer_blocks\\.(0|1|2|7)\\.,'
    r"^single_transformer_blocks\\.(5|30|31|32|33|34|35|36|37)\\.,"
    r"^x_embedder\\b,^context_embedder\\b,^time_text_embed\\b,^norm_out\\b,^proj_out\\b"
    '",\n'
    '"layer_filter_preset": "custom",\n'
    '"layer_filter_regex": true'
)

# FLUX.1 transformer module names in diffusers naming (field guide, section 1).
NAMES = [
    *(f"transformer_blocks.{i}.attn.to_q" for i in range(19)),
    *(f"single_transformer_blocks.{i}.proj_out" for i in range(38)),
    "x_embedder",
    "context_embedder",
    "time_text_embed.timestep_embedder.linear_1",
    "norm_out.linear",
    "proj_out",
]


def test_recipes_for_a_known_keep_set_match_the_documented_syntax() -> None:
    kohya, ai_toolkit, one_trainer = recipes_for(KEEP)
    assert (kohya.trainer, ai_toolkit.trainer, one_trainer.trainer) == (
        "kohya sd-scripts",
        "ai-toolkit",
        "OneTrainer",
    )
    assert kohya.text == KOHYA
    assert "final layer cannot be trained" in kohya.note
    assert ai_toolkit.text == AI_TOOLKIT
    assert one_trainer.text == ONE_TRAINER
    assert all(r.source for r in (kohya, ai_toolkit, one_trainer))


def test_one_trainer_patterns_select_exactly_the_kept_modules() -> None:
    # OneTrainer splits on "," and strips each pattern, then re.search-es module names.
    text = json.loads("{" + recipes_for(KEEP)[2].text + "}")["layer_filter"]
    patterns = [re.compile(p.strip()) for p in text.split(",")]
    chosen = {n for n in NAMES if any(p.search(n) for p in patterns)}
    # modules/module/LoRAModule.py refuses a filter that matches no module.
    assert all(any(p.search(n) for n in NAMES) for p in patterns)
    expected = {
        *(f"transformer_blocks.{i}.attn.to_q" for i in (0, 1, 2, 7)),
        *(f"single_transformer_blocks.{i}.proj_out" for i in (5, *range(30, 38))),
        "x_embedder",
        "context_embedder",
        "time_text_embed.timestep_embedder.linear_1",
        "norm_out.linear",
        "proj_out",
    }
    assert chosen == expected


def test_ai_toolkit_substrings_select_exactly_the_kept_modules() -> None:
    # ai-toolkit tests "word in clean_name", clean_name being "transformer." + module name
    # (lora_special.py; "lora_transformer." when not saving in PEFT format).
    words = re.findall(r'- "([^"]+)"', recipes_for(KEEP)[1].text)
    for prefix in ("transformer.", "lora_transformer."):
        chosen = {n for n in NAMES if any(w in prefix + n for w in words)}
        assert chosen == {
            *(f"transformer_blocks.{i}.attn.to_q" for i in (0, 1, 2, 7)),
            *(f"single_transformer_blocks.{i}.proj_out" for i in (5, *range(30, 38))),
            "x_embedder",
            "context_embedder",
            "time_text_embed.timestep_embedder.linear_1",
            "norm_out.linear",
            "proj_out",
        }


def test_recipes_for_text_encoders_and_whole_kinds() -> None:
    kohya, ai_toolkit, one_trainer = recipes_for(parse_block_spec("t5,single.0-37", LAYOUT))
    # docs/flux_train_network.md 6.4: "all" / "none"; 6.6: "train_t5xxl=True", CLIP-L trains too.
    assert kohya.text == (
        '--network_args "train_double_block_indices=none" '
        '"train_single_block_indices=all" "train_t5xxl=True"'
    )
    assert "CLIP-L trains too" in kohya.note
    assert "transformer_only" not in ai_toolkit.text
    assert "text encoders are not trained" in ai_toolkit.note
    assert '"text_encoder_2": {\n    "train": true\n}' in one_trainer.text
    assert '"text_encoder":' not in one_trainer.text


def test_an_empty_keep_set_never_means_train_everything() -> None:
    kohya, ai_toolkit, one_trainer = recipes_for(["clip"])
    assert '"train_double_block_indices=none" "train_single_block_indices=none"' in kohya.text
    assert ai_toolkit.text.endswith("only_if_contains: []")
    # OneTrainer: an empty layer_filter trains every layer and one matching nothing raises
    # (modules/module/LoRAModule.py), so the transformer's training is switched off
    # (training_presets/Flux Dev.1/#flux LoRA.json: "transformer": {"train": true, ...}).
    assert one_trainer.text == (
        '"transformer": {\n    "train": false\n},\n"text_encoder": {\n    "train": true\n}'
    )
    assert "untrained" in one_trainer.note


def _mixed_rank_lora(path: Path, ranks: dict[str, int]) -> Path:
    """A kohya LoRA of input and double.0 whose modules have the given ranks (stem -> rank).

    Stems the mapping leaves out are not written; the others are random factors.
    """
    rng = np.random.default_rng(3)
    tensors: dict[str, npt.NDArray[np.float64]] = {}
    for m in synth_modules(SynthSpec(grammar="kohya", blocks=("input", "double.0"))):
        r = ranks.get(m.stem, ranks.get(m.block))
        if r is None:
            continue
        tensors[f"{m.stem}.lora_up.weight"] = rng.standard_normal((m.out_features, r))
        tensors[f"{m.stem}.lora_down.weight"] = rng.standard_normal((r, m.in_features))
    return write_tensors(path, tensors, {})


def test_in_dims_are_the_ranks_the_lora_has_on_its_input_layers(tmp_path: Path) -> None:
    # docs/flux_train_network.md 6.3: "in_dims=[4,2,2,2,4]", one rank per img_in, time_in,
    # vector_in, guidance_in, txt_in; 0 trains no LoRA there (networks/lora_flux.py skips dim 0).
    lora = read_lora(
        _mixed_rank_lora(
            tmp_path / "mixed.safetensors",
            {
                "lora_unet_img_in": 32,
                "lora_unet_time_in_in_layer": 8,
                "lora_unet_time_in_out_layer": 12,
                "lora_unet_vector_in_in_layer": 8,
                "lora_unet_vector_in_out_layer": 8,
                "lora_unet_txt_in": 4,
                "double.0": 6,
            },  # no guidance_in: a schnell LoRA
        )
    )
    assert input_ranks(lora) == (32, 12, 8, 0, 4)
    kohya = recipes_for({"input", "double.0"}, input_ranks=input_ranks(lora))[0]
    assert kohya.text == (
        "--network_train_unet_only --network_args "
        '"train_double_block_indices=0" "train_single_block_indices=none" '
        '"in_dims=[32,12,8,0,4]"'
    )
    assert "the LoRA's ranks" in kohya.note
    # Without input modules: the LoRA's network dim (its most common rank), not kohya's 16.
    blocks_only = read_lora(_mixed_rank_lora(tmp_path / "b.safetensors", {"double.0": 6}))
    assert input_ranks(blocks_only) == (6, 6, 6, 6, 6)


def test_slim_writes_the_loras_own_input_rank_into_in_dims(tmp_path: Path) -> None:
    spec = SynthSpec(grammar="kohya", rank=8, blocks=("input", "double.0", "double.1"))
    lora = write_synth_lora(tmp_path / "r8.safetensors", spec)
    out = tmp_path / "slim.safetensors"
    result = run_cli("slim", lora, "--keep", "input,double.1", "-o", out, "--recipes")
    assert result.exit_code == 0, result.output
    assert (
        '    --network_train_unet_only --network_args "train_double_block_indices=1" '
        '"train_single_block_indices=none" "in_dims=[8,8,8,8,8]"\n'
    ) in result.output


def test_slim_prints_the_recipes_of_the_kept_blocks(tmp_path: Path) -> None:
    lora = write_synth_lora(tmp_path / "k.safetensors", SynthSpec(grammar="kohya", rank=4))
    out = tmp_path / "slim.safetensors"
    quiet = run_cli("slim", lora, "--keep", "double.0-2,double.7", "-o", out)
    assert quiet.exit_code == 0, quiet.output
    # Without --recipes, one line says where they are, not 10-60 lines of settings.
    assert "to retrain only these blocks:" not in quiet.output
    assert quiet.output.splitlines()[-1].startswith("retrain  --recipes prints the kohya")
    result = run_cli(
        "slim", lora, "--keep", "double.0-2,double.7", "-o", out, "--force", "--recipes"
    )
    assert result.exit_code == 0, result.output
    assert "to retrain only these blocks:" in result.output
    for recipe in recipes_for(parse_block_spec("double.0-2,double.7", LAYOUT)):
        for line in recipe.text.split("\n"):
            assert f"    {line}\n" in result.output


def test_analyze_writes_and_prints_the_recipes_of_the_suggestion(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    lora = planted_lora(tmp_path / "p.safetensors", {"double.3": 1.0, "single.7": 1.0})
    out = tmp_path / "out"
    args = ["analyze", str(lora), "--model", "tiny", "--prompt", "a fox", "--size", "32"]
    result = run_cli(*args, "--steps", "2", "--out", out)
    assert result.exit_code == 0, result.output
    ranking = json.loads((out / "ranking.json").read_text())
    blocks = ranking["suggestion"]["blocks"]
    assert blocks
    ranks = input_ranks(read_lora(lora))
    assert ranking["recipes"] == [asdict(r) for r in recipes_for(blocks, input_ranks=ranks)]
    kohya = ranking["recipes"][0]["text"]
    assert "train_double_block_indices=" in kohya and "train_single_block_indices=" in kohya
    tail = result.output.split("suggested keep", 1)[1]
    assert (
        kohya not in tail
        and "are in ranking.json ('recipes'); analyze --recipes prints them" in tail
    )
    again = run_cli("analyze", "--from", out, "--recipes")
    assert again.exit_code == 0, again.output
    assert kohya in again.output.split("suggested keep", 1)[1]
