"""FLUX.1 Kontext: LoRAs for image editing, rendered as edits of the ``--image`` files.

Kontext has FLUX.1-dev's transformer; an edit renders with diffusers'
``FluxKontextPipeline`` on the loaded components, its input image at the render's
size. The engine's edits are held to diffusers' own (the LoRA loaded with
``load_lora_weights``), and the whole loop (analyze, slim --auto, verify) runs on
the tiny model with an input image.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from clitools import run_cli
from PIL import Image

from lora_prune.errors import EXIT_UNREADABLE, EXIT_USAGE
from lora_prune.families.flux1.variants import base_model, checkpoint_name
from lora_prune.lora import read_lora
from lora_prune.render.engine import BlockEngine
from lora_prune.render.loading import LoadedModel
from lora_prune.render.plain import plain_render
from lora_prune.settings import (
    TINY_MAX_SEQUENCE_LENGTH,
    ImageSettings,
    RenderRequest,
    input_images,
)
from lora_prune.testing import SynthSpec, planted_lora, supported_blocks, write_synth_lora

torch.set_num_threads(1)

SIZE = 32
PLANTED = {"double.3": 3.0, "single.7": 2.0, "double.12": 1.5}


def picture(path: Path, seed: int, shape: tuple[int, int] = (SIZE, SIZE)) -> Path:
    pixels = np.random.default_rng(seed).uniform(0, 255, (*shape, 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def test_edits_equal_diffusers_kontext_with_the_lora_loaded(
    tiny_model: LoadedModel, tmp_path: Path
) -> None:
    (source,) = input_images([picture(tmp_path / "in.png", 1)])
    settings = ImageSettings(
        "make it red",
        seed=5,
        width=SIZE,
        height=SIZE,
        steps=2,
        max_sequence_length=TINY_MAX_SEQUENCE_LENGTH,
        image=source,
    )
    text_only = ImageSettings(
        "make it red", seed=5, width=SIZE, height=SIZE, steps=2, max_sequence_length=32
    )
    spec = SynthSpec(
        grammar="diffusers",
        blocks=supported_blocks("diffusers"),
        alpha=2.0,
        alpha_in="metadata",
        seed=2,
    )
    path = write_synth_lora(tmp_path / "edit.safetensors", spec)
    pipe = tiny_model.pipe
    plain = plain_render(pipe, settings)
    pipe.load_lora_weights(str(path), adapter_name="ref")
    try:
        reference = plain_render(pipe, settings)
    finally:
        pipe.unload_lora_weights()
    assert np.abs(reference - plain).max() > 0.05  # the LoRA changes the edit

    lora = read_lora(path)
    with BlockEngine(tiny_model, lora) as engine:
        none, full = engine.render([frozenset(), frozenset(lora.blocks)], settings, output="float")
        (text,) = engine.render([frozenset(lora.blocks)], text_only, output="float")
    assert np.abs(none - plain).max() <= 1e-5
    assert np.abs(full - reference).max() <= 1e-5
    assert np.abs(full - text).max() > 0.01  # an edit is not the text-to-image render


def test_image_options_are_checked_before_anything_renders(tmp_path: Path) -> None:
    one, two = picture(tmp_path / "a.png", 1), picture(tmp_path / "b.png", 2)
    images = input_images([one, two])
    assert images[0].sha256 != images[1].sha256 and images[0].path == str(one)
    # One image for every prompt, or one per prompt (which must then differ).
    settings = RenderRequest(prompts=("x", "y"), images=images).settings("tiny")
    assert [settings.input_image(p) for p in ("x", "y")] == list(images)
    assert (
        RenderRequest(prompts=("x", "y"), images=images[:1]).settings("tiny").input_image("y")
        == images[0]
    )
    lora = planted_lora(tmp_path / "l.safetensors", PLANTED)
    common = ["--model", "tiny", "--blocks", "double.3", "-o", str(tmp_path / "r.png")]
    for args, message in (
        (
            [
                "--prompt",
                "x",
                "--prompt",
                "y",
                "--prompt",
                "z",
                "--image",
                str(one),
                "--image",
                str(two),
            ],
            "2 images for 3 prompts",
        ),
        (
            ["--prompt", "x", "--prompt", "x", "--image", str(one), "--image", str(two)],
            "the same prompt twice",
        ),
    ):
        result = run_cli("render", str(lora), *common, *args)
        assert result.exit_code == EXIT_USAGE, result.stdout
        assert message in result.stderr
    text = tmp_path / "not-an-image.png"
    text.write_text("hello")
    result = run_cli("render", str(lora), *common, "--prompt", "x", "--image", str(text))
    assert result.exit_code == EXIT_UNREADABLE, result.stdout
    assert result.stderr.strip().splitlines() == [
        f"error: cannot read the image to edit (UnidentifiedImageError), {text}, "
        "give a PNG, JPEG or WebP file"
    ]


def test_kontext_is_named_by_metadata_and_file_name() -> None:
    claim = {"modelspec.architecture": "flux-1-kontext-dev/lora"}
    assert base_model([], claim) == ("FLUX.1-Kontext-dev", [])
    assert checkpoint_name("dev", "flux1-kontext-dev.safetensors") == "FLUX.1-Kontext-dev"
    assert checkpoint_name("dev", "flux1-dev-fp8.safetensors") == "FLUX.1-dev"


@pytest.mark.slow
def test_analyze_slim_auto_and_verify_work_on_edits(tmp_path: Path) -> None:
    lora = planted_lora(tmp_path / "edit.safetensors", PLANTED)
    image = picture(tmp_path / "in.png", 1, (48, 80))  # resized to the render's size
    render = ["--model", "tiny", "--prompt", "make it red", "--image", str(image), "--seeds", "0"]
    out = tmp_path / "an"
    result = run_cli("analyze", str(lora), *render, "--mode", "both", "--out", str(out))
    assert result.exit_code == 0, result.stdout
    ranking = json.loads((out / "ranking.json").read_text())
    assert ranking["settings"]["images"][0]["path"] == str(image)
    for mode in ("solo", "loo"):
        rows = sorted((r for r in ranking["rows"] if r["mode"] == mode), key=lambda r: r["rank"])
        assert {r["block"] for r in rows[:3]} == set(PLANTED), mode
    # Another image is another edit: nothing is reused from the first.
    other = picture(tmp_path / "other.png", 2)
    again = run_cli(
        "analyze", str(lora), *render[:-4], "--image", str(other), "--seeds", "0",
        "--mode", "both", "--out", str(out),
    )  # fmt: skip
    assert again.exit_code == 0 and "(0 cached of" in again.stdout, again.stdout

    slim = tmp_path / "edit.auto.safetensors"
    auto = run_cli("slim", str(lora), "--auto", *render, "-o", str(slim), "--work-dir", str(out))
    assert auto.exit_code == 0, auto.stdout
    assert set(read_lora(slim).blocks) <= set(PLANTED)
    verified = run_cli("verify", str(lora), str(slim), *render, "--out", str(tmp_path / "v"))
    assert verified.exit_code == 0 and "PASS" in verified.stdout, verified.stdout
