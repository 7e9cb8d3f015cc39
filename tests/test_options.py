"""Bad command lines over all seven commands: one ``error:`` line, the documented exit code.

Every option is checked when the command starts (lora_prune.settings), before a
file is read or a model loaded, so none of these renders anything.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clitools import run_cli
from test_cli import assert_one_error_line

from lora_prune.errors import UsageError
from lora_prune.settings import (
    MIN_SHEET_PIXELS,
    ImageSettings,
    ModelSpec,
    PictureOptions,
    RenderRequest,
    RenderSettings,
    check_coverage,
    model_defaults,
    parse_seeds,
)
from lora_prune.testing import SynthSpec, write_synth_lora


@pytest.fixture(scope="module")
def lora(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synth_lora(tmp_path_factory.mktemp("opts") / "lora.safetensors", SynthSpec())


@pytest.fixture(scope="module")
def earlier(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder that looks like an earlier analyze: --from must be checked before reading it."""
    folder = tmp_path_factory.mktemp("earlier")
    (folder / "manifest.json").write_text(json.dumps({"schema": 1}))
    return folder


RENDER = ["--model", "tiny", "--prompt", "a cat"]
# (option values, a fragment of the one error line): the same for every command with
# the render options.
BAD_RENDER_VALUES: list[tuple[list[str], str]] = [
    (["--guidance", "nan"], "--guidance"),
    (["--guidance", "inf"], "--guidance"),
    (["--guidance", "-1"], "--guidance"),
    (["--strength", "inf"], "--strength"),
    (["--strength", "nan"], "--strength"),
    (["--seeds", "-1"], "--seeds"),
    (["--seeds", "1" + "0" * 30], "--seeds"),
    (["--seeds", "a,b"], "--seeds"),
    (["--seeds", ","], "--seeds"),
    (["--steps", "0"], "--steps"),
    (["--steps", "-3"], "--steps"),
    (["--steps", "100000"], "--steps"),
    (["--size", "0"], "--size"),
    (["--size", "30"], "multiple of 16"),
    (["--size", "1600000"], "--size"),
    (["--width", "-16"], "--size/--width/--height"),
    (["--height", "17"], "multiple of 16"),
    (["--size", "abc"], "'--size'"),
    (["--steps", "1.5"], "'--steps'"),
    (["--dtype", "fp8"], "'--dtype'"),
    (["--bogus"], "--bogus"),
]


def _cases(lora: Path, earlier: Path, tmp: Path) -> dict[str, list[tuple[list[str], int, str]]]:
    out = str(tmp / "out.png")
    folder = str(lora.parent)
    slim_auto = ["slim", str(lora), "--auto", *RENDER]
    render = ["render", str(lora), *RENDER, "--blocks", "all", "-o", out]
    analyze = ["analyze", str(lora), *RENDER]
    verify = ["verify", str(lora), str(lora), *RENDER]
    cases: dict[str, list[tuple[list[str], int, str]]] = {
        "inspect": [
            (["inspect"], 2, "Missing argument 'LORA'"),
            (["inspect", str(lora), "--sort", "sideways"], 2, "'--sort'"),
            (["inspect", str(lora), "--bogus"], 2, "--bogus"),
            (["inspect", folder], 3, "is a folder, not a file"),
        ],
        "slim": [
            (["slim"], 2, "Missing argument"),
            (["slim", folder, "--keep", "all"], 3, "is a folder, not a file"),
            (["slim", str(lora), "--keep", "all", "--batch-size", "0"], 2, "--batch-size"),
            (["slim", str(lora), "--keep", "all", "--min-kept", "2"], 2, "--min-kept"),
            (["slim", str(lora), "--keep", "all", "--min-kept", "nan"], 2, "--min-kept"),
            (["slim", str(lora), "--keep", "all", "--min-ssim", "2"], 2, "--min-ssim"),
            (["slim", str(lora), "--keep", "all", "-o", str(lora), "--force"], 2, "replace"),
            ([*slim_auto, "--batch-size", "-1"], 2, "--batch-size"),
            ([*slim_auto, "--work-dir", str(lora)], 2, "'--work-dir'"),
            (["slim", str(lora), "--drop", ",,"], 2, "empty block spec, --drop"),
        ],
        "render": [
            (["render", str(lora), *RENDER, "-o", out], 2, "Missing option '--blocks'"),
            (["render", folder, *RENDER, "--blocks", "all", "-o", out], 3, "is a folder"),
            ([*render[:-2], "-o", folder], 2, "'-o'"),
            (["render", str(lora), *RENDER, "--blocks", ",,", "-o", out], 2, "empty block spec"),
            (
                [*render, "--transformer", folder],
                3,
                "is a folder, not a file",
            ),
        ],
        "analyze": [
            (["analyze", folder, *RENDER], 3, "is a folder, not a file"),
            (["analyze", folder], 3, "is a folder, not a file"),
            ([*analyze, "--batch-size", "0"], 2, "--batch-size"),
            ([*analyze, "--coverage", "7"], 2, "--coverage"),
            ([*analyze, "--coverage", "0"], 2, "--coverage"),
            ([*analyze, "--coverage", "nan"], 2, "--coverage"),
            (["analyze", "--from", str(earlier), "--coverage", "7"], 2, "--coverage"),
            (["analyze", "--from", str(earlier), "--coverage", "-0.5"], 2, "--coverage"),
            (["analyze", "--from", str(earlier), "--sheet-max-pixels", "100"], 2, "pixels"),
            (["analyze", "--from", str(earlier), "--sheet-max-pixels", "-1"], 2, "pixels"),
            (["analyze", "--from", str(earlier), "--opacity", "nan"], 2, "--opacity"),
            (["analyze", "--from", str(earlier), "--opacity", "2"], 2, "--opacity 2.0 is not"),
            (["analyze", "--from", str(earlier), "--min-kept", "-1"], 2, "--min-kept"),
            (["analyze", "--from", str(lora)], 2, "'--from'"),
            # --from recomputes with the earlier run's own LoRA, model and renders.
            (["analyze", str(lora), "--from", str(earlier)], 2, "; LORA cannot apply"),
            (
                ["analyze", "--from", str(earlier), "--model", "tiny", "--steps", "3"],
                2,
                "; --model, --steps cannot apply",
            ),
            (["analyze", "--from", str(earlier), "--curve"], 2, "; --curve cannot apply"),
            ([*analyze, "--mode", "sideways"], 2, "'--mode'"),
            ([*analyze, "--curve", "--min-ssim", "2"], 2, "--min-ssim"),
            ([*analyze, "--out", str(lora)], 2, "'--out'"),
        ],
        "verify": [
            (["verify", str(lora)], 2, "Missing argument 'SLIM'"),
            (["verify", str(lora), str(lora)], 2, "Missing option '--model'"),
            (["verify", folder, str(lora), *RENDER], 3, "is a folder, not a file"),
            (["verify", str(lora), folder, *RENDER], 3, "is a folder, not a file"),
            ([*verify, "--min-kept", "0"], 2, "--min-kept"),
            ([*verify, "--min-ssim", "inf"], 2, "--min-ssim"),
            ([*verify, "--out", str(lora.parent)], 2, "holds an input"),
        ],
        "check": [
            (["check"], 2, "Missing argument 'PATHS"),
            (["check", str(lora), "--seeds", "-1"], 2, "--seeds"),
            (["check", str(lora), "--min-kept", "2"], 2, "--min-kept"),
            (["check", str(lora), "--format", "xml"], 2, "'--format'"),
            (["check", str(lora), "--policy", folder], 3, "is a folder, not a file"),
            (["check", str(lora), "--model", "tiny"], 2, "--model needs --prompt"),
            (
                ["check", str(lora), "--model", "tiny", "--prompt", "a", "--steps", "0"],
                2,
                "--steps",
            ),
            (["check", str(lora), "--model", "tiny", "--prompt", "a", "--size", "17"], 2, "16"),
            (["check", str(lora), "--bogus"], 2, "--bogus"),
        ],
        "demo": [
            (["demo", "--out", str(lora)], 2, "'--out'"),
            (["demo", "--bogus"], 2, "--bogus"),
            (["demo", "extra"], 2, "unexpected extra argument"),
        ],
    }
    for base in (slim_auto, render, analyze, verify):
        cases[base[0]] += [([*base, *bad], 2, fragment) for bad, fragment in BAD_RENDER_VALUES]
    return cases


COMMANDS = ["inspect", "slim", "render", "analyze", "verify", "check", "demo"]


@pytest.mark.parametrize("command", COMMANDS)
def test_bad_command_lines_give_one_error_line(
    command: str, lora: Path, earlier: Path, tmp_path: Path
) -> None:
    before = lora.read_bytes()
    cases = _cases(lora, earlier, tmp_path)[command]
    assert len(cases) >= 3
    for args, code, fragment in cases:
        result = run_cli(*args)
        line = assert_one_error_line(result, code, fragment)
        assert result.stdout == "", (args, result.stdout)
        if code == 2:
            assert ", " in line, line  # the three-part form: what, where, what to do
    assert lora.read_bytes() == before
    assert list(tmp_path.iterdir()) == []


def test_click_usage_errors_name_the_command_help(lora: Path) -> None:
    line = assert_one_error_line(run_cli("analyze", lora, "--sise", "64"), 2, "--sise")
    assert line.endswith("see 'lora-prune analyze --help'"), line
    line = assert_one_error_line(run_cli("nonsense"), 2, "nonsense")
    assert line.endswith("see 'lora-prune --help'"), line


def test_help_and_version_still_exit_0() -> None:
    assert run_cli("--help").exit_code == 0
    assert run_cli("analyze", "--help").exit_code == 0
    version = run_cli("--version")
    assert version.exit_code == 0 and "lora-prune, version" in version.stdout


def test_analyze_from_refuses_coverage_7(earlier: Path) -> None:
    # It used to exit 0 and print "target 700%".
    result = run_cli("analyze", "--from", earlier, "--coverage", "7")
    assert_one_error_line(result, 2, "coverage 7.0 is not in (0, 1]", "--coverage")


def test_sheet_max_pixels_100_is_one_error_line(lora: Path) -> None:
    # It used to end in a ValueError traceback after the renders.
    result = run_cli("analyze", lora, *RENDER, "--sheet-max-pixels", "100")
    assert_one_error_line(result, 2, "--sheet-max-pixels 100", f"{MIN_SHEET_PIXELS:,}")


@pytest.mark.parametrize(
    "args",
    [
        ["inspect", "{dir}"],
        ["slim", "{dir}", "--keep", "all"],
        ["render", "{dir}", *RENDER, "--blocks", "all", "-o", "{out}"],
        ["analyze", "{dir}", *RENDER],
        ["verify", "{dir}", "{lora}", *RENDER],
        ["verify", "{lora}", "{dir}", *RENDER],
        ["check", "{lora}", "--policy", "{dir}"],
    ],
)
def test_a_folder_where_a_file_is_needed_is_exit_3_everywhere(
    args: list[str], lora: Path, tmp_path: Path
) -> None:
    values = {"dir": str(tmp_path), "lora": str(lora), "out": str(tmp_path / "o.png")}
    result = run_cli(*(a.format(**values) for a in args))
    assert_one_error_line(result, 3, "is a folder, not a file", str(tmp_path))
    assert list(tmp_path.iterdir()) == []


def test_render_never_writes_over_its_input_lora(lora: Path, tmp_path: Path) -> None:
    copy = tmp_path / "mine.safetensors"
    copy.write_bytes(lora.read_bytes())
    link = tmp_path / "link.png"
    link.symlink_to(copy)
    before = copy.read_bytes()
    for target in (copy, link, tmp_path / "." / copy.name):
        result = run_cli("render", copy, *RENDER, "--blocks", "all", "-o", target, "--force")
        assert_one_error_line(result, 2, "would replace the input")
        assert copy.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.png", "mine.safetensors"]


def test_verify_and_analyze_output_folders_never_hold_an_input(lora: Path) -> None:
    before = lora.read_bytes()
    cases: list[list[str | Path]] = [
        ["analyze", lora, *RENDER, "--out", lora.parent],
        ["verify", lora, lora, *RENDER, "--out", lora.parent],
        ["slim", lora, "--auto", *RENDER, "--work-dir", lora.parent],
    ]
    for args in cases:
        assert_one_error_line(run_cli(*args), 2, "the output folder holds an input")
    assert lora.read_bytes() == before


# --- the settings layer itself ---------------------------------------------------------
def test_model_defaults_are_the_ones_the_cli_always_used() -> None:
    tiny, dev = model_defaults("tiny"), model_defaults("black-forest-labs/FLUX.1-dev")
    assert (tiny.size, tiny.steps, tiny.max_sequence_length) == (64, 4, 32)
    assert (dev.size, dev.steps, dev.max_sequence_length) == (768, 20, 512)
    request = RenderRequest(prompts=("a",), seeds=(3, 4), width=96)
    assert request.settings("tiny", ("loo",)) == RenderSettings(
        prompts=("a",), seeds=(3, 4), width=96, height=64, steps=4, modes=("loo",)
    )
    assert request.settings("some/model").height == 768


def test_a_sweep_image_carries_every_setting() -> None:
    settings = RenderSettings(prompts=("a", "b"), seeds=(5,), width=32, height=48, steps=2)
    image = settings.image("b", 5, 32)
    assert image == ImageSettings("b", 5, 32, 48, 2, 3.5, 1.0, 32)


@pytest.mark.parametrize(
    ("build", "fragment"),
    [
        (lambda: RenderSettings(prompts=("a",), guidance=float("nan")), "--guidance"),
        (lambda: RenderSettings(prompts=("a",), strength=float("inf")), "--strength"),
        (lambda: RenderSettings(prompts=("a",), seeds=(-1,)), "--seeds"),
        (lambda: RenderSettings(prompts=("a",), width=0), "multiple of 16"),
        (lambda: ImageSettings("a", max_sequence_length=0), "max_sequence_length"),
        (lambda: ImageSettings("a", steps=0), "steps"),
        (lambda: PictureOptions(sheet_max_pixels=100), "--sheet-max-pixels"),
        (lambda: PictureOptions(cmap="rainbow"), "--cmap"),
        (lambda: PictureOptions(opacity=float("nan")), "--opacity"),
        (lambda: PictureOptions(tile_scale=-1), "tile scale"),
        (lambda: ModelSpec("tiny", dtype="fp8"), "dtype"),
        (lambda: ModelSpec(""), "--model"),
        (lambda: check_coverage(7.0), "--coverage"),
        (lambda: parse_seeds("9" * 5000), "--seeds"),
    ],
)
def test_settings_refuse_bad_values(build: object, fragment: str) -> None:
    assert callable(build)
    with pytest.raises(UsageError, match=fragment):
        build()


def test_parse_seeds_reads_lists() -> None:
    assert parse_seeds(" 0, 1,,2 ") == (0, 1, 2)
    assert parse_seeds(str(2**64 - 1)) == (2**64 - 1,)
