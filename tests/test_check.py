"""Tests of ``check``: per-file verdicts in all four output formats, policies, exit codes.

The main fixture is a folder as a LoRA repository might hold it: a good FLUX.1
LoRA, one with a NaN, a cut download, a torch pickle, an SDXL LoRA, a pickle
that would leave a marker file behind if anything unpickled it, and unrelated
files. Every format is parsed back (JSON, XML, annotation lines) and asserted
file by file, so a renderer that drops or mislabels a file fails.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from conftest import TensorFile, write_tensors
from hostile import make_hostile_corpus

from lora_prune.check import (
    CheckResult,
    FileResult,
    Finding,
    Policy,
    github_escape_data,
    github_escape_property,
    load_policy,
    parse_policy,
    parse_size,
    render,
    render_github,
    render_json,
    render_junit,
    render_text,
    run_check,
)
from lora_prune.errors import EXIT_FAILED, EXIT_OK, EXIT_UNREADABLE, UnsafeFileError, UsageError
from lora_prune.safetensors_io import file_sha256, read_header
from lora_prune.slim import slim_lora
from lora_prune.testing import GRAMMARS, SynthSpec, write_synth_lora

ROOT = Path(__file__).resolve().parents[1]

SDXL_KEYS = (
    "lora_unet_down_blocks_0_attentions_0_proj_in",
    "lora_unet_down_blocks_1_attentions_0_transformer_blocks_1_attn1_to_q",
    "lora_te2_text_model_encoder_layers_0_self_attn_q_proj",
)
NAN_KEY = "lora_unet_double_blocks_3_img_attn_qkv.lora_up.weight"
PROJ = "lora_unet_double_blocks_0_img_attn_proj"


def synth(path: Path, **kwargs: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_synth_lora(path, SynthSpec(**kwargs))  # type: ignore[arg-type]


def poke(path: Path, key: str, raw: bytes, index: int = 0) -> None:
    """Overwrite element ``index`` of tensor ``key`` in place with ``raw`` bytes."""
    info = read_header(path).tensors[key]
    with open(path, "r+b") as f:
        f.seek(info.begin + index * len(raw))
        f.write(raw)


def sdxl_tensors() -> dict[str, npt.NDArray[np.float32]]:
    rng = np.random.default_rng(0)
    out: dict[str, npt.NDArray[np.float32]] = {}
    for stem in SDXL_KEYS:
        out[f"{stem}.lora_down.weight"] = rng.normal(size=(4, 8)).astype(np.float32)
        out[f"{stem}.lora_up.weight"] = rng.normal(size=(8, 4)).astype(np.float32)
        out[f"{stem}.alpha"] = np.array(4.0, dtype=np.float32)
    return out


class _Marker:
    """Unpickling this creates a file: proof that something loaded the pickle."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


@dataclass
class Repo:
    root: Path
    good: Path
    nan: Path
    truncated: Path
    pickle_pt: Path
    sdxl: Path
    evil: Path
    marker: Path
    zip_pickle: Path


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    import torch

    root = tmp_path_factory.mktemp("repo")
    good = synth(root / "loras" / "good.safetensors")
    nan = synth(root / "loras" / "nan.safetensors", seed=1)
    poke(nan, NAN_KEY, struct.pack("<f", float("nan")), index=5)
    cut = synth(root / "loras" / "truncated.safetensors", seed=2)
    data = cut.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    pt = root / "old" / "x.pt"
    pt.parent.mkdir()
    torch.save({"lora_down.weight": torch.zeros(2, 2)}, pt)
    sdxl = write_tensors(root / "sdxl" / "style.safetensors", sdxl_tensors())
    marker = root / "UNPICKLED"
    evil = root / "old" / "evil.ckpt"
    evil.write_bytes(pickle.dumps(_Marker(marker), protocol=4))
    # A torch.save zip under a name no extension rule catches: found by its bytes.
    zip_pickle = root / "old" / "weights.dat"
    torch.save({"w": torch.ones(1)}, zip_pickle)
    (root / "README.md").write_text("# my LoRAs\n")
    np.savez(root / "preview.npz", a=np.zeros(3))  # a zip without pickle code: not reported
    (root / ".git").mkdir()
    torch.save({"w": torch.ones(1)}, root / ".git" / "objects.pt")  # VCS folders are skipped
    return Repo(root, good, nan, cut, pt, sdxl, evil, marker, zip_pickle)


def rel(repo: Repo, path: Path) -> str:
    return str(path.relative_to(repo.root))


@pytest.fixture(scope="module")
def repo_result(repo: Repo) -> CheckResult:
    cwd = os.getcwd()
    os.chdir(repo.root)
    try:
        # As the CI workflow runs it: `lora-prune check .` from the repository root.
        return run_check([Path(".")])
    finally:
        os.chdir(cwd)


EXPECTED = {
    "good": ("pass", set()),
    "nan": ("fail", {"nonfinite"}),
    "truncated": ("unreadable", {"incomplete"}),
    "pickle_pt": ("unsafe", {"unsafe"}),
    "sdxl": ("fail", {"wrong_base_model"}),
    "evil": ("unsafe", {"unsafe"}),
    "zip_pickle": ("unsafe", {"unsafe"}),
}


def expected_by_path(repo: Repo) -> dict[str, tuple[str, set[str]]]:
    return {rel(repo, getattr(repo, name)): value for name, value in EXPECTED.items()}


# ---------------------------------------------------------------------------
# The repository folder, in every format


def test_verdicts(repo: Repo, repo_result: CheckResult) -> None:
    by_path = {str(f.path): f for f in repo_result.files}
    assert set(by_path) == set(expected_by_path(repo))
    for path, (status, codes) in expected_by_path(repo).items():
        result = by_path[path]
        assert result.status == status, (path, result.findings)
        assert {f.code for f in result.errors} == codes, path
    assert repo_result.exit_code == EXIT_UNREADABLE
    assert not repo.marker.exists()

    good = by_path[rel(repo, repo.good)]
    assert good.format == "kohya"
    assert good.base_model == "FLUX.1-dev"  # from modelspec.architecture
    assert good.dtypes == {"F32": good.tensors}
    assert good.bytes == repo.good.stat().st_size
    assert len(good.blocks) == 19 + 38
    assert good.ranks == {4: 19 * 10 + 38 * 3}
    assert good.alphas == {4.0: 19 * 10 + 38 * 3}
    assert good.findings == []

    nan = by_path[rel(repo, repo.nan)]
    assert [(f.code, f.key) for f in nan.errors] == [("nonfinite", NAN_KEY)]
    assert "1 NaN of" in nan.errors[0].message and NAN_KEY in nan.errors[0].message

    sdxl = by_path[rel(repo, repo.sdxl)]
    assert sdxl.base_model == "SDXL"
    assert "SDXL" in sdxl.errors[0].message

    truncated = by_path[rel(repo, repo.truncated)]
    assert "incomplete download" in truncated.errors[0].message
    assert truncated.bytes == repo.truncated.stat().st_size
    assert "pickle data (protocol 4)" in by_path[rel(repo, repo.evil)].errors[0].message
    assert "torch.save" in by_path[rel(repo, repo.zip_pickle)].errors[0].message


def test_text_format(repo: Repo, repo_result: CheckResult) -> None:
    text = render_text(repo_result)
    blocks: dict[str, list[str]] = {}
    current = ""
    for line in text.splitlines()[:-1]:
        if not line.startswith(" "):
            label, path = line.split(maxsplit=1)
            current = path
            blocks[path] = [label]
        else:
            blocks[current].append(line.strip())
    assert set(blocks) == set(expected_by_path(repo))
    for path, (status, codes) in expected_by_path(repo).items():
        lines = blocks[path]
        assert lines[0] == status.upper(), path
        found = {ln.split()[1].rstrip(":") for ln in lines[1:] if ln.startswith("error")}
        assert found == codes, path
    assert NAN_KEY in "\n".join(blocks[rel(repo, repo.nan)])
    assert text.splitlines()[-1] == ("7 files: 1 passed, 2 failed, 1 unreadable, 3 unsafe; exit 3")


def test_json_format(repo: Repo, repo_result: CheckResult) -> None:
    doc = json.loads(render_json(repo_result))
    assert doc["exit_code"] == 3
    assert doc["summary"] == {"files": 7, "pass": 1, "fail": 2, "unreadable": 1, "unsafe": 3}
    files = {f["path"]: f for f in doc["files"]}
    assert set(files) == set(expected_by_path(repo))
    for path, (status, codes) in expected_by_path(repo).items():
        assert files[path]["status"] == status, path
        assert {x["code"] for x in files[path]["findings"] if x["level"] == "error"} == codes
    nan = files[rel(repo, repo.nan)]
    assert nan["findings"][0]["key"] == NAN_KEY
    assert files[rel(repo, repo.sdxl)]["base_model"] == "SDXL"
    assert files[rel(repo, repo.good)]["ranks"] == {"4": 304}


def test_junit_format(repo: Repo, repo_result: CheckResult) -> None:
    suite = ET.fromstring(render_junit(repo_result))
    assert suite.tag == "testsuite"
    assert (suite.get("tests"), suite.get("failures"), suite.get("errors")) == ("7", "2", "4")
    cases = {c.get("name"): c for c in suite.findall("testcase")}
    assert set(cases) == set(expected_by_path(repo))
    tags = {"pass": None, "fail": "failure", "unreadable": "error", "unsafe": "error"}
    for path, (status, codes) in expected_by_path(repo).items():
        case = cases[path]
        outcome = [c for c in case if c.tag in ("failure", "error")]
        if tags[status] is None:
            assert outcome == [], path
        else:
            assert [c.tag for c in outcome] == [tags[status]], path
            assert outcome[0].get("type") in codes
            assert outcome[0].get("message")
    nan_failure = cases[rel(repo, repo.nan)].find("failure")
    assert nan_failure is not None and NAN_KEY in (nan_failure.get("message") or "")


def test_github_format(repo: Repo, repo_result: CheckResult) -> None:
    lines = render_github(repo_result).splitlines()
    assert (
        lines[-1] == "lora-prune check: 7 files: 1 passed, 2 failed, 1 unreadable, 3 unsafe; exit 3"
    )
    annotations: dict[str, set[str]] = {}
    for line in lines[:-1]:
        command, _, message = line[2:].partition("::")
        level, _, props = command.partition(" ")
        fields = dict(p.split("=", 1) for p in props.split(","))
        assert level == "error"
        assert message
        annotations.setdefault(fields["file"], set()).add(
            fields["title"].removeprefix("lora-prune ")
        )
    expected = {p: codes for p, (_, codes) in expected_by_path(repo).items() if codes}
    assert annotations == expected
    nan_line = next(ln for ln in lines if "nan.safetensors" in ln)
    assert NAN_KEY in nan_line


def test_render_dispatch(repo_result: CheckResult) -> None:
    assert render(repo_result, "junit") == render_junit(repo_result)
    with pytest.raises(UsageError, match="unknown format 'xml'"):
        render(repo_result, "xml")


# ---------------------------------------------------------------------------
# Single-file checks


def test_every_synthetic_grammar_and_dtype_passes(tmp_path: Path) -> None:
    """No false alarms: LoRA, LoHa, LoKr and diff files of every grammar and dtype pass."""
    for grammar in GRAMMARS:
        path = tmp_path / f"{grammar}.safetensors"
        try:
            synth(path, grammar=grammar, text_encoders=True)
        except ValueError:  # the grammar has no text-encoder keys
            synth(path, grammar=grammar)
    for dtype in ("F16", "BF16", "F8_E4M3", "F8_E5M2"):
        synth(tmp_path / f"kohya-{dtype}.safetensors", dtype=dtype, blocks=("double.0", "final"))
    result = run_check([tmp_path])
    assert len(result.files) == len(GRAMMARS) + 4
    for f in result.files:
        assert (f.status, f.findings) == ("pass", []), f.path
        assert f.base_model is not None and f.base_model.startswith("FLUX.1")
    assert result.exit_code == EXIT_OK


def test_inf_named_by_key_in_f16(tmp_path: Path) -> None:
    path = synth(tmp_path / "inf.safetensors", dtype="F16")
    key = "lora_unet_single_blocks_7_linear2.lora_down.weight"
    poke(path, key, struct.pack("<H", 0x7C00), index=3)  # +inf in float16
    poke(path, key, struct.pack("<H", 0xFC00), index=4)  # -inf
    result = run_check([path])
    (f,) = result.files
    assert f.status == "fail" and result.exit_code == EXIT_FAILED
    assert [(x.code, x.key) for x in f.errors] == [("nonfinite", key)]
    assert "2 Inf of" in f.errors[0].message
    assert f.dtypes == {"F16": f.tensors}


def test_rank_mismatch_named_by_key(tensor_file: TensorFile) -> None:
    rng = np.random.default_rng(0)
    path = tensor_file(
        {
            f"{PROJ}.lora_down.weight": rng.normal(size=(4, 32)),
            f"{PROJ}.lora_up.weight": rng.normal(size=(32, 8)),
            f"{PROJ}.alpha": np.array(4.0),
        },
        name="rank.safetensors",
    )
    (f,) = run_check([path]).files
    assert f.status == "fail"
    (finding,) = f.errors
    assert finding.code == "rank_mismatch"
    assert finding.key == f"{PROJ}.lora_down.weight"
    assert "4 rows ([4, 32])" in finding.message and "8 columns ([32, 8])" in finding.message


@pytest.mark.parametrize("alpha", [0.0, -4.0, float("inf")])
def test_bad_alpha(tensor_file: TensorFile, alpha: float) -> None:
    path = tensor_file(
        {
            f"{PROJ}.lora_down.weight": np.ones((4, 32)),
            f"{PROJ}.lora_up.weight": np.ones((32, 4)),
            f"{PROJ}.alpha": np.array(alpha),
        },
        name="alpha.safetensors",
    )
    (f,) = run_check([path]).files
    codes = {(x.code, x.key) for x in f.errors}
    assert ("bad_alpha", f"{PROJ}.alpha") in codes
    # inf is also a non-finite value of the tensor itself
    assert (("nonfinite", f"{PROJ}.alpha") in codes) == (alpha == float("inf"))


def test_missing_factor_and_mixed_ranks(tensor_file: TensorFile) -> None:
    other = "lora_unet_double_blocks_1_img_attn_proj"
    path = tensor_file(
        {
            f"{PROJ}.lora_down.weight": np.ones((4, 32)),
            f"{other}.lora_down.weight": np.ones((8, 32)),
            f"{other}.lora_up.weight": np.ones((32, 8)),
        },
        name="half.safetensors",
    )
    (f,) = run_check([path]).files
    assert [(x.code, x.key) for x in f.errors] == [("missing_factor", f"{PROJ}.lora_down.weight")]
    assert [x.code for x in f.warnings] == ["mixed_ranks"]
    assert f.ranks == {4: 1, 8: 1}
    assert f.alphas == {}


def test_a_file_of_unknown_keys_alone_is_not_a_lora_once(tensor_file: TensorFile) -> None:
    path = tensor_file({"model.layers.0.weight": np.ones((4, 4)), "model.norm.bias": np.ones(4)})
    result = run_check([path])
    (f,) = result.files
    assert [x.code for x in f.errors] == ["not_a_lora"]
    assert (
        "none of its 2 keys is a FLUX.1 LoRA key (e.g. 'model.layers.0.weight')"
        in f.errors[0].message
    )
    assert f.format is None and f.base_model is None
    text = render(result, "text")
    assert "empty" not in text and "FLUX.1," not in text.splitlines()[1]


def test_unknown_keys_are_named_and_the_rest_still_checked(tensor_file: TensorFile) -> None:
    with_unknown = tensor_file(
        {
            f"{PROJ}.lora_down.weight": np.ones((4, 32)),
            f"{PROJ}.lora_up.weight": np.full((32, 4), np.nan),
            "my_custom_embedding.weight": np.ones(3),
        },
        name="unknown.safetensors",
    )
    (f,) = run_check([with_unknown]).files
    codes = [(x.code, x.key) for x in f.errors]
    assert ("unknown_key", "my_custom_embedding.weight") in codes
    assert ("nonfinite", f"{PROJ}.lora_up.weight") in codes
    assert f.blocks == ["double.0"]
    assert f.format == "kohya"


def test_base_model_variants(tmp_path: Path) -> None:
    from lora_prune.families.flux1.geometry import TINY

    schnell_geometry = type(TINY)(**{**TINY.__dict__, "guidance": False})
    synth(tmp_path / "s.safetensors", geometry=schnell_geometry)
    synth(tmp_path / "d.safetensors", grammar="diffusers")
    synth(tmp_path / "g.safetensors", grammar="diffusers", blocks=("input", "double.0"))
    synth(
        tmp_path / "l.safetensors",
        blocks=("input", "double.0"),
        metadata={"modelspec.architecture": "flux-1-schnell/lora"},
    )
    synth(
        tmp_path / "o.safetensors",
        metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/lora"},
    )
    result = {f.path.name: f for f in run_check([tmp_path]).files}
    assert result["s.safetensors"].base_model == "FLUX.1-schnell"
    assert result["d.safetensors"].base_model == "FLUX.1"  # no metadata, no guidance_in
    assert result["g.safetensors"].base_model == "FLUX.1-dev"  # guidance_in is dev-only
    assert result["l.safetensors"].base_model == "FLUX.1-dev"
    assert [x.code for x in result["l.safetensors"].warnings] == ["base_model_mismatch"]
    assert result["o.safetensors"].status == "pass"
    assert result["o.safetensors"].warnings[0].key == "modelspec.architecture"


def test_hostile_corpus(tmp_path: Path) -> None:
    corpus = make_hostile_corpus(tmp_path / "hostile")
    result = run_check([tmp_path / "hostile"])
    by_path = {f.path: f for f in result.files}
    for name, (path, cls, fragment) in corpus.items():
        if name in ("missing", "directory"):
            assert path not in by_path
            continue
        f = by_path[path]
        assert f.status == ("unsafe" if cls is UnsafeFileError else "unreadable"), name
        assert fragment in f.findings[0].message, name
    assert result.exit_code == EXIT_UNREADABLE


def test_explicit_file_any_name_and_missing_path(tmp_path: Path) -> None:
    odd = tmp_path / "lora.weights"
    write_synth_lora(odd, SynthSpec(blocks=("double.0",)))
    (f,) = run_check([odd]).files
    assert f.status == "pass"
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    (g,) = run_check([text]).files
    assert g.status == "unreadable"
    with pytest.raises(UsageError, match="path not found"):
        run_check([tmp_path / "nope.safetensors"])
    assert render_text(CheckResult([])).splitlines() == [
        "no LoRA files found",
        "0 files: 0 passed, 0 failed, 0 unreadable, 0 unsafe; exit 0",
    ]


# ---------------------------------------------------------------------------
# Escaping


def test_github_escaping() -> None:
    assert github_escape_data("50% done\r\nnext") == "50%25 done%0D%0Anext"
    assert github_escape_property("a,b:c%\n") == "a%2Cb%3Ac%25%0A"
    result = CheckResult(
        [
            FileResult(
                Path("dir/a,b:c%.safetensors"),
                "fail",
                [
                    Finding("error", "nonfinite", "line one\nline two: 100%"),
                    Finding("warning", "mixed_ranks", "ranks differ"),
                ],
            )
        ]
    )
    lines = render_github(result).splitlines()
    assert lines[0] == (
        "::error file=dir/a%2Cb%3Ac%25.safetensors,title=lora-prune nonfinite::"
        "FAIL dir/a,b:c%25.safetensors: line one\\x0aline two: 100%25"
    )
    assert lines[1].startswith(
        "::warning file=dir/a%2Cb%3Ac%25.safetensors,title=lora-prune mixed_ranks::"
    )


def test_outputs_survive_hostile_names_and_keys(tensor_file: TensorFile, tmp_path: Path) -> None:
    key = "evil\x01key\n<&>\"'"
    path = tensor_file({key: np.array([np.nan, 1.0], dtype=np.float32)}, name="a,b:c%.safetensors")
    result = run_check([tmp_path])
    (f,) = result.files
    assert ("nonfinite", key) in [(x.code, x.key) for x in f.errors]
    suite = ET.fromstring(render_junit(result))  # valid XML despite \x01
    case = suite.find("testcase")
    assert case is not None and case.get("name") == str(path)
    assert json.loads(render_json(result))["files"][0]["findings"][-1]["key"] == key
    for line in render_text(result).splitlines() + render_github(result).splitlines():
        assert "\x01" not in line
    assert "\\x01" in render_text(result)


# ---------------------------------------------------------------------------
# Policies


def write_policy(path: Path, text: str) -> Policy:
    path.write_text(text)
    return load_policy(path)


def test_policy_rules(tmp_path: Path) -> None:
    lora = synth(
        tmp_path / "loras" / "style.safetensors",
        blocks=("double.0", "double.7", "single.3"),
        metadata={"modelspec.trigger_phrase": "xyz style", "modelspec.title": ""},
    )
    size = lora.stat().st_size

    def verdict(policy_text: str) -> tuple[int, list[tuple[str, str | None]]]:
        policy = write_policy(tmp_path / "lora-policy.toml", policy_text)
        result = run_check([tmp_path / "loras"], policy)
        (f,) = result.files
        assert result.policy == tmp_path / "lora-policy.toml"
        return result.exit_code, [(x.code, x.key) for x in f.errors]

    assert verdict(f"max_bytes = {size}\n") == (EXIT_OK, [])
    assert verdict(f"max_bytes = {size - 1}\n") == (EXIT_FAILED, [("max_size", None)])
    assert verdict('max_size = "1KB"\n')[1] == [("max_size", None)]
    assert verdict('max_size = "10 MiB"\n') == (EXIT_OK, [])

    assert verdict('required_blocks = ["double.7", "single.3"]\n') == (EXIT_OK, [])
    code, errors = verdict('required_blocks = "double.7,double.12"\n')
    assert (code, errors) == (EXIT_FAILED, [("block_missing", None)])

    assert verdict('allowed_blocks = "double,single.0-5"\n') == (EXIT_OK, [])
    assert verdict('allowed_blocks = ["double"]\n') == (EXIT_FAILED, [("block_not_allowed", None)])

    assert verdict('required_metadata = ["modelspec.trigger_phrase"]\n') == (EXIT_OK, [])
    assert verdict('required_metadata = ["modelspec.title", "ss_output_name"]\n') == (
        EXIT_FAILED,
        [("metadata_missing", "modelspec.title"), ("metadata_missing", "ss_output_name")],
    )

    result = run_check(
        [tmp_path / "loras"],
        write_policy(tmp_path / "p.toml", 'allowed_blocks = "double"\n'),
    )
    message = result.files[0].errors[0].message
    assert "blocks single.3 are not allowed" in message
    assert "--drop single.3" in message


def test_policy_failure_and_unreadable_file_exit_3(tmp_path: Path) -> None:
    synth(tmp_path / "big.safetensors", blocks=("double.0",))
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00")
    policy = parse_policy({"max_bytes": 10})
    result = run_check([tmp_path], policy)
    assert [f.status for f in result.files] == ["fail", "unreadable"]
    assert result.exit_code == EXIT_UNREADABLE


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("max_bites = 5\n", "unknown policy key 'max_bites'"),
        ('[[slim]]\nfile = "a"\nfull = "b"\nfoo = 1\n', "unknown policy key 'foo' in [[slim]]"),
        ('[[slim]]\nfile = "a"\n', "[[slim]] needs full"),
        ('allowed_blocks = "double.40"\n', "double block index 40 is out of range"),
        ('max_size = "5 parsecs"\n', "cannot read size '5 parsecs'"),
        ('max_size = "5MB"\nmax_bytes = 5\n', "not both"),
        ("max_bytes = -1\n", "non-negative integer"),
        ("min_ssim = 2\n", "from 0 to 1"),
        ("require_verified = 1\n", "true or false"),
        ("required_metadata = [1]\n", "list of key names"),
        ("max_bytes = \n", "not valid TOML"),
    ],
)
def test_bad_policy_is_a_usage_error(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    with pytest.raises(UsageError) as info:
        load_policy(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)
    assert info.value.exit_code == 2


def test_parse_size() -> None:
    assert parse_size("50MB") == 50_000_000
    assert parse_size("1.5 GiB") == 1610612736
    assert parse_size("1200") == 1200
    assert parse_size("2k") == 2000
    with pytest.raises(UsageError):
        parse_size("MB")


def test_missing_policy_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="policy file not found"):
        load_policy(tmp_path / "none.toml")


# ---------------------------------------------------------------------------
# Verified slim files


def make_slim(
    folder: Path,
    full: Path,
    *,
    passed: bool = True,
    against: Path | None = None,
    min_ssim: float = 0.95,
) -> Path:
    record = {
        "full_sha256": file_sha256(against or full),
        "min_ssim": min_ssim,
        "passed": passed,
        "worst_ssim": 0.993 if passed else 0.71,
        "model": "tiny",
        "prompts": ["a cat"],
        "seeds": [0],
    }
    out = folder / full.name.replace(".safetensors", ".slim.safetensors")
    slim_lora(
        full,
        {"double.0", "double.1"},
        output=out,
        extra_metadata={"lora_prune.verification": json.dumps(record)},
    )
    return out


@pytest.fixture
def slim_repo(tmp_path: Path) -> tuple[Path, Path, Path]:
    full = synth(
        tmp_path / "loras" / "style.safetensors", blocks=("double.0", "double.1", "single.0")
    )
    slim = make_slim(tmp_path / "loras", full)
    return tmp_path, full, slim


def test_verified_slim_passes(slim_repo: tuple[Path, Path, Path]) -> None:
    root, full, slim = slim_repo
    policy = parse_policy({"require_verified": True, "min_ssim": 0.9})
    result = run_check([root], policy)
    by_name = {f.path.name: f for f in result.files}
    assert result.exit_code == EXIT_OK
    s = by_name[slim.name]
    assert s.status == "pass" and s.full_file == full
    assert [x.code for x in s.findings] == ["verified"]
    assert by_name[full.name].findings == []  # a full file is not a slim file

    # Only the slim file given (as pre-commit does): its full file is found beside it.
    result = run_check([slim], policy)
    assert result.exit_code == EXIT_OK and result.files[0].full_file == full

    # Published elsewhere under another name: the full file is found by its SHA-256.
    moved = root / "dist" / "style-small.safetensors"
    moved.parent.mkdir()
    slim.rename(moved)
    result = run_check([root / "dist", root / "loras", moved], policy)
    assert [f.path for f in result.files] == [moved, full]  # each file once
    assert result.exit_code == EXIT_OK and result.files[0].full_file == full


def test_slim_whose_source_does_not_match_fails(slim_repo: tuple[Path, Path, Path]) -> None:
    root, full, slim = slim_repo
    other = synth(
        root / "other" / "retrained.safetensors",
        seed=7,
        blocks=("double.0", "double.1", "single.0"),
    )
    policy = write_policy(
        root / "lora-policy.toml",
        '[[slim]]\nfile = "loras/style.slim.safetensors"\nfull = "other/retrained.safetensors"\n',
    )
    result = run_check([root], policy)
    s = next(f for f in result.files if f.path == slim)
    assert s.status == "fail" and result.exit_code == EXIT_FAILED
    assert [x.code for x in s.errors] == ["verification_mismatch"]
    assert s.full_file == other

    # The full file retrained in place after slimming: the slim is stale.
    synth(full, seed=9, blocks=("double.0", "double.1", "single.0"))
    result = run_check([root / "loras"], parse_policy({"require_verified": True}))
    s = next(f for f in result.files if f.path == slim)
    assert [x.code for x in s.errors] == ["verification_mismatch"]


def test_slim_verification_problems(tmp_path: Path) -> None:
    blocks = ("double.0", "double.1", "single.0")
    full = synth(tmp_path / "a" / "style.safetensors", blocks=blocks)
    failed = make_slim(tmp_path / "a", full, passed=False)
    weak_dir = tmp_path / "b"
    weak_full = synth(weak_dir / "w.safetensors", blocks=blocks, seed=3)
    weak = make_slim(weak_dir, weak_full, min_ssim=0.5)
    unverified_dir = tmp_path / "c"
    u_full = synth(unverified_dir / "u.safetensors", blocks=blocks, seed=4)
    unverified = slim_lora(
        u_full, {"double.0"}, output=unverified_dir / "u.slim.safetensors"
    ).output
    lost_dir = tmp_path / "d"
    lost_full = synth(lost_dir / "l.safetensors", blocks=blocks, seed=5)
    lost = make_slim(lost_dir, lost_full)
    lost_full.unlink()

    policy = parse_policy({"require_verified": True, "min_ssim": 0.9})
    by_path = {f.path: f for f in run_check([tmp_path], policy).files}
    assert [x.code for x in by_path[failed].errors] == ["verification_failed"]
    assert [x.code for x in by_path[weak].errors] == ["verification_too_weak"]
    assert [x.code for x in by_path[unverified].errors] == ["not_verified"]
    assert by_path[lost].status == "pass"
    assert [x.code for x in by_path[lost].warnings] == ["full_not_found"]

    # Without the policy rule a recorded failure is only a warning.
    by_path = {f.path: f for f in run_check([tmp_path]).files}
    assert by_path[failed].status == "pass"
    assert [x.code for x in by_path[failed].warnings] == ["verification_failed"]
    assert by_path[unverified].findings == []


def test_slim_not_a_subset(tmp_path: Path) -> None:
    full = synth(tmp_path / "style.safetensors", blocks=("double.0", "double.1"))
    slim = make_slim(tmp_path, full)
    key = "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight"
    poke(slim, key, struct.pack("<f", 123.0))
    # The recorded hashes still match: only the tensor's values differ.
    (_, g) = sorted(
        run_check([tmp_path], parse_policy({"require_verified": True})).files,
        key=lambda r: r.path.name,
    )
    assert g.path == slim
    assert [(x.code, x.key) for x in g.errors] == [("not_subset", key)]


@dataclass
class Outcome:
    passed: bool
    worst_ssim: float
    min_ssim: float | None
    kept_share: float | None = None
    min_kept: float = 0.9


def test_reverify_is_called_with_slim_and_full(slim_repo: tuple[Path, Path, Path]) -> None:
    root, full, slim = slim_repo
    calls: list[tuple[Path, Path]] = []

    def good(s: Path, f: Path) -> Outcome:
        calls.append((s, f))
        return Outcome(True, 0.97, 0.95, 0.96)

    def bad(s: Path, f: Path) -> Outcome:
        return Outcome(False, 0.80, 0.95, 0.25)

    result = run_check([root], None, reverify=good)
    assert calls == [(slim, full)]
    s = next(f for f in result.files if f.path == slim)
    assert s.status == "pass" and "reverified" in [x.code for x in s.findings]

    result = run_check([root], None, reverify=bad)
    s = next(f for f in result.files if f.path == slim)
    assert [x.code for x in s.errors] == ["reverify_failed"]
    assert (
        "keeps at worst 25.0% of the LoRA's effect (needs 90% on every image), worst SSIM 0.8000"
        in s.errors[0].message
    )

    # Re-rendering is the proof: a slim file without a record passes when it renders alike.
    bare = slim_lora(full, {"double.0"}, output=root / "loras" / "bare.slim.safetensors").output
    result = run_check([bare], parse_policy({"require_verified": True}), reverify=good)
    assert result.files[0].status == "pass"
    assert [x.code for x in result.files[0].findings] == ["reverified"]
    result = run_check([bare], parse_policy({"min_ssim": 0.99}), reverify=good)
    assert [x.code for x in result.files[0].errors] == ["verification_too_weak"]

    full.unlink()
    result = run_check([slim], None, reverify=good)
    assert [x.code for x in result.files[0].errors] == ["reverify_impossible"]


def test_policy_names_missing_slim(tmp_path: Path) -> None:
    policy = parse_policy(
        {"slim": [{"file": "gone.safetensors", "full": "x.safetensors"}]}, base=tmp_path
    )
    with pytest.raises(UsageError, match="names a slim file that does not exist"):
        run_check([tmp_path], policy)


# ---------------------------------------------------------------------------
# Packaging: no torch, pre-commit hook definition, docs


def test_check_runs_without_torch(tmp_path: Path) -> None:
    good = synth(tmp_path / "good.safetensors", blocks=("double.0", "single.0"))
    code = (
        "import sys\n"
        "for name in ('torch', 'diffusers', 'transformers'):\n"
        "    sys.modules[name] = None\n"
        "from pathlib import Path\n"
        "from lora_prune.check import run_check, render_json\n"
        f"result = run_check([Path({str(good)!r})])\n"
        "print(result.exit_code, result.files[0].status)\n"
        "render_json(result)\n"
        "assert 'torch' not in [m for m in sys.modules if sys.modules[m] is not None]\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["0", "pass"]


def test_pre_commit_hook_definition() -> None:
    import re

    text = (ROOT / ".pre-commit-hooks.yaml").read_text()
    assert re.search(r"^- id: lora-prune-check$", text, re.M)
    assert re.search(r"^  entry: lora-prune check$", text, re.M)
    assert re.search(r"^  language: python$", text, re.M)
    files = re.search(r"^  files: '(.+)'$", text, re.M)
    assert files is not None
    pattern = re.compile(files.group(1))
    for name in ("a/b.safetensors", "x.ckpt", "x.pt", "x.pth", "x.bin"):
        assert pattern.search(name), name
    assert not pattern.search("README.md")


def test_docs_policy_example_loads(tmp_path: Path) -> None:
    """The policy example in docs/ci.md is a valid policy."""
    doc = (ROOT / "docs" / "ci.md").read_text()
    start = doc.index("```toml\n") + len("```toml\n")
    example = doc[start : doc.index("```", start)]
    (tmp_path / "loras").mkdir()
    policy = write_policy(tmp_path / "lora-policy.toml", example)
    assert policy.max_bytes is not None and policy.require_verified
    assert policy.slim and policy.slim[0].file.parent == tmp_path / "loras"
    assert "lora-prune check . --policy lora-policy.toml --format github" in doc
    assert "pip install lora-prune" in doc


def test_no_zip_false_positive(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "images.zip", "w") as z:
        z.writestr("a.png", b"\x89PNG")
    (tmp_path / "data.raw").write_bytes(b"\x80\x02" + b"\x00" * 6 + b"{")
    assert run_check([tmp_path]).files == []


def test_folder_that_cannot_be_listed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:

    synth(tmp_path / "a" / "good.safetensors", blocks=("double.0",))
    real_walk = os.walk
    locked = tmp_path / "a" / "locked"

    def walk(top: str, onerror: object = None) -> object:
        assert callable(onerror)
        # As os.walk reports a folder it may not scandir (tests run as root here).
        onerror(PermissionError(13, "Permission denied", str(locked)))
        return real_walk(top)

    monkeypatch.setattr("lora_prune.check.scan.os.walk", walk)
    result = run_check([tmp_path])
    assert [(f.path, f.status) for f in result.files] == [
        (locked, "unreadable"),
        (tmp_path / "a" / "good.safetensors", "pass"),
    ]
    assert result.files[0].errors[0].message == (
        "cannot list folder (Permission denied), check its permissions"
    )
    assert result.exit_code == EXIT_UNREADABLE


def test_tucker_mid_of_another_rank_chains_through_mid(tensor_file: TensorFile) -> None:
    # up [32, 2] @ mid [2, 4] @ down [4, 32] multiplies: up and down need not share a rank.
    path = tensor_file(
        {
            f"{PROJ}.lora_down.weight": np.ones((4, 32)),
            f"{PROJ}.lora_mid.weight": np.ones((2, 4)),
            f"{PROJ}.lora_up.weight": np.ones((32, 2)),
        },
        name="mid.safetensors",
    )
    (f,) = run_check([path]).files
    assert [x.code for x in f.errors] == []
    assert f.status == "pass"


def test_tucker_mid_that_does_not_fit_down_is_a_rank_mismatch(tensor_file: TensorFile) -> None:
    path = tensor_file(
        {
            f"{PROJ}.lora_down.weight": np.ones((4, 32)),
            f"{PROJ}.lora_mid.weight": np.ones((2, 3)),
            f"{PROJ}.lora_up.weight": np.ones((32, 2)),
        },
        name="mid.safetensors",
    )
    (f,) = run_check([path]).files
    (finding,) = f.errors
    assert (finding.code, finding.key) == ("rank_mismatch", f"{PROJ}.lora_down.weight")
    assert "4 rows ([4, 32])" in finding.message and "3 columns ([2, 3])" in finding.message
