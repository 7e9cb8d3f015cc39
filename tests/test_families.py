"""The family seam: a model's facts live in its family module and nowhere else.

Outside ``lora_prune/families/`` (and ``lora_prune/render/families/``, the
torch side of the same modules) no module may name a FLUX.1 layer or width:
everything else asks the family (``lora.family``).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np
import pytest
from clitools import run_cli
from conftest import write_tensors

from lora_prune.blocks import (
    BlockLayout,
    BlockSpec,
    format_block_spec,
    parse_block_spec,
    short_label,
    sort_blocks,
)
from lora_prune.errors import EXIT_UNSUPPORTED, BlockSpecError
from lora_prune.families import FLUX1, family_named
from lora_prune.lora import read_lora
from lora_prune.stats import inspect_lora
from lora_prune.testing import SynthSpec, write_synth_lora

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "lora_prune"

#: FLUX.1's layer names (BFL and diffusers naming) and widths (hidden 3072, its MLP and
#: fused projections); 4096 and 768 are left out, as too common a number elsewhere.
FLUX1_FACTS = re.compile(
    r"double_blocks|single_blocks|img_attn|txt_attn|img_mlp|txt_mlp|img_mod|txt_mod"
    r"|single_transformer_blocks|transformer_blocks|guidance_in|time_in\b|vector_in|img_in\b"
    r"|txt_in\b|final_layer\b|x_embedder|context_embedder|time_text_embed|norm1_context"
    r"|norm_out|proj_out|linear1\b|linear2\b|\b(?:3072|9216|12288|15360|21504)\b"
)


def in_a_family(path: Path) -> bool:
    return "families" in path.relative_to(PACKAGE).parts


def test_no_module_outside_the_families_names_a_flux1_layer_or_width() -> None:
    found: dict[str, list[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        if in_a_family(path):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if FLUX1_FACTS.search(line):
                found.setdefault(str(path.relative_to(ROOT)), []).append(
                    f"{number}: {line.strip()}"
                )
    assert not found, "\n".join(f"{p}:\n  " + "\n  ".join(lines) for p, lines in found.items())


def test_the_pattern_finds_what_it_is_for() -> None:
    for text in ("double_blocks.0.img_attn.qkv", "transformer.single_transformer_blocks.3", "3072"):
        assert FLUX1_FACTS.search(text), text
    for text in ("ANCHOR_PIXELS = 768 * 768", "_SNIFF_BYTES = 4096", "block.30", "linear10"):
        assert not FLUX1_FACTS.search(text), text


def test_a_lora_knows_its_family_and_inspect_names_it(tmp_path: Path) -> None:
    path = write_synth_lora(tmp_path / "l.safetensors", SynthSpec(blocks=("double.0",)))
    lora = read_lora(path)
    assert lora.family is FLUX1 and family_named("flux1") is FLUX1 and family_named("sdxl") is None
    report = inspect_lora(lora)
    assert report.family == "FLUX.1" and report.to_dict()["family"] == "FLUX.1"
    result = run_cli("inspect", str(path))
    assert result.exit_code == 0 and "\nfamily        FLUX.1\n" in result.stdout


def test_an_unsupported_family_is_refused_in_one_line_naming_it(tmp_path: Path) -> None:
    sdxl = write_tensors(
        tmp_path / "sdxl.safetensors",
        {
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q.lora_down.weight": np.ones(
                (4, 8)
            ),
            "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q.lora_up.weight": np.ones(
                (8, 4)
            ),
        },
    )
    result = run_cli("inspect", str(sdxl))
    assert result.exit_code == EXIT_UNSUPPORTED
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith(
        "error: this LoRA is for SDXL, which lora-prune does not support"
    )


# A made-up family of 4 plain blocks: the block grammar is the same for every family.
FOUR = BlockLayout(
    family="Four",
    ids=("t5", "input", *(f"block.{i}" for i in range(4)), "final"),
    vectors={4: tuple((f"block.{i}",) for i in range(4))},
    vector_help="use 4 values",
)


def test_block_specs_read_against_any_familys_layout() -> None:
    assert FOUR.counts == {"block": 4} and FOUR.groups["block"] == tuple(
        f"block.{i}" for i in range(4)
    )
    assert parse_block_spec("block.1-2,final", FOUR) == {"block.1", "block.2", "final"}
    assert parse_block_spec("0,1,0,1", FOUR) == {"t5", "input", "block.1", "block.3", "final"}
    assert parse_block_spec("te", FOUR) == {"t5"}
    assert format_block_spec({"block.0", "block.1", "block.2", "input"}) == "input,block.0-2"
    assert short_label("block.3") == "b3" and sort_blocks(
        ["final", "block.10", "block.2", "t5"]
    ) == [
        "t5",
        "block.2",
        "block.10",
        "final",
    ]
    for spec, message in (
        ("block.4", "block block index 4 is out of range 0..3"),
        ("double.0", "Four has no double blocks"),
        ("1,0,1", "a block-weight vector of 3 values has no known layout for Four"),
        ("train_double_block_indices=0", "kohya's block indices do not name Four's blocks"),
        ("clip", "unknown block 'clip'"),
    ):
        with pytest.raises(BlockSpecError, match=re.escape(message)):
            parse_block_spec(spec, FOUR)
    assert BlockSpec("block.0", "--keep").resolve(FOUR) == {"block.0"}
    with pytest.raises(BlockSpecError, match=r"--drop 'block.9'"):
        BlockSpec("block.9", "--drop").resolve(FOUR)


def test_rendering_asks_the_familys_pipeline_call() -> None:
    from lora_prune.errors import UnsupportedLoraError
    from lora_prune.render.families import pipeline_call

    assert pipeline_call(FLUX1).text_blocks == ("clip", "t5")
    with pytest.raises(UnsupportedLoraError, match="rendering Four is not supported yet"):
        pipeline_call(dataclasses.replace(FLUX1, name="four", display="Four"))


def _bfl_transformer(path: Path, *, guidance: bool) -> Path:
    tensors = {
        "double_blocks.0.img_attn.qkv.weight": np.zeros((96, 32)),
        "double_blocks.0.img_attn.norm.query_norm.scale": np.zeros(16),
        "single_blocks.0.linear1.weight": np.zeros((224, 32)),
        "img_in.weight": np.zeros((32, 64)),
        "txt_in.weight": np.zeros((32, 32)),
        "vector_in.in_layer.weight": np.zeros((32, 32)),
    }
    if guidance:
        tensors["guidance_in.in_layer.weight"] = np.zeros((32, 256))
    return write_tensors(path, tensors)


def test_krea_is_named_by_its_metadata_and_its_file_name(tmp_path: Path) -> None:
    from lora_prune.comfy import Component, identify
    from lora_prune.families.flux1.variants import base_model

    assert base_model([], {"modelspec.architecture": "flux-1-krea-dev/lora"}) == (
        "FLUX.1-Krea-dev",
        [],
    )
    assert base_model([], {"ss_base_model_version": "flux1_schnell"}) == ("FLUX.1-schnell", [])
    krea = identify(_bfl_transformer(tmp_path / "flux1-krea-dev.safetensors", guidance=True))
    dev = identify(_bfl_transformer(tmp_path / "flux1-dev.safetensors", guidance=True))
    schnell = identify(_bfl_transformer(tmp_path / "krea-schnell.safetensors", guidance=False))
    assert (
        isinstance(krea, Component)
        and isinstance(dev, Component)
        and isinstance(schnell, Component)
    )
    assert krea.reason.startswith("FLUX.1-Krea-dev transformer, BFL naming: 1 double + 1 single")
    assert krea.variant == dev.variant == "dev"  # Krea renders with dev's config
    assert dev.reason.startswith("FLUX.1-dev transformer")
    assert schnell.reason.startswith("FLUX.1-schnell transformer")  # a schnell layout is never Krea
