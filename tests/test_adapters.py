"""The one home of adapter rules, provenance's subset proof, pickle names and guidance paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TensorFile

from lora_prune import errors, verify
from lora_prune.adapters import bias_rows, delta_io, factor_pairs, factor_problem, missing_factor
from lora_prune.errors import EXIT_UNSUPPORTED, NotASubsetError, UnsupportedLoraError
from lora_prune.families.flux1.keys import is_guidance_path
from lora_prune.lora import LoraModule, read_lora
from lora_prune.pickles import is_pickle_name, sniff_pickle
from lora_prune.provenance import check_subset, subset_differences
from lora_prune.safetensors_io import TensorInfo, read_header


def module(**shapes: tuple[int, ...]) -> LoraModule:
    tensors = {
        role: TensorInfo(f"m.{role}", "F32", shape, 0, 4 * int(np.prod(shape)))
        for role, shape in shapes.items()
    }
    return LoraModule("m", "double.0", "kohya", None, tensors)


def test_delta_io_of_each_adapter() -> None:
    assert delta_io(module(down=(4, 32), up=(48, 4))) == (32, 48)
    loha = module(hada_w1_a=(48, 2), hada_w1_b=(2, 32), hada_w2_a=(48, 2), hada_w2_b=(2, 32))
    assert delta_io(loha) == (32, 48)
    lokr = module(lokr_w1=(4, 2), lokr_w2_a=(12, 3), lokr_w2_b=(3, 16))
    assert factor_problem(lokr) is None
    assert delta_io(lokr) == (2 * 16, 4 * 12)
    assert delta_io(module(diff=(48, 32))) == (32, 48)
    assert delta_io(module(diff=(48,))) == (-1, 48)
    assert delta_io(module(up_bias=(48,))) is None
    assert bias_rows(module(up_bias=(48,))) == 48
    assert bias_rows(module(diff_b=(48, 1))) == -1
    assert bias_rows(module(down=(4, 32), up=(48, 4))) is None


def test_factor_pairs_chain_through_mid() -> None:
    assert factor_pairs(module(down=(4, 32), up=(48, 4))) == [("up", "down")]
    tucker = module(down=(4, 32), mid=(2, 4), up=(48, 2))
    assert factor_pairs(tucker) == [("up", "mid"), ("mid", "down")]
    assert factor_problem(tucker) is None
    assert factor_problem(module(down=(4, 32), mid=(2, 3), up=(48, 2))) == (
        "mid [2, 3] does not fit down [4, 32]"
    )


def test_missing_factor() -> None:
    assert missing_factor(module(down=(4, 32))) == ("down", "up")
    assert missing_factor(module(up=(48, 4))) == ("up", "down")
    assert missing_factor(module(down=(4, 32), up=(48, 4))) is None


def test_guidance_paths_in_both_namings() -> None:
    assert is_guidance_path("guidance_in.in_layer.weight")
    assert is_guidance_path("time_text_embed.guidance_embedder.linear_1")
    assert not is_guidance_path("time_text_embed.timestep_embedder.linear_1")
    assert not is_guidance_path("double_blocks.0.guidance_in")


def test_pickle_names_and_bytes(tmp_path: Path) -> None:
    assert is_pickle_name(Path("a.CKPT")) and not is_pickle_name(Path("a.safetensors"))
    raw = tmp_path / "weights.raw"
    raw.write_bytes(b"\x80\x04" + b"\x00" * 14)
    assert sniff_pickle(raw) == "pickle data (protocol 4)"
    raw.write_bytes(b"plain text file")
    assert sniff_pickle(raw) is None


PROJ = "lora_unet_double_blocks_0_img_attn_proj"
OTHER = "lora_unet_double_blocks_1_img_attn_proj"


def test_subset_differences_names_each_fault(tensor_file: TensorFile) -> None:
    full = tensor_file(
        {
            f"{PROJ}.lora_down.weight": np.ones((4, 32)),
            f"{PROJ}.lora_up.weight": np.ones((32, 4)),
            f"{OTHER}.lora_down.weight": np.ones((4, 32)),
        },
        name="full.safetensors",
    )
    slim = tensor_file(
        {
            f"{PROJ}.lora_down.weight": np.ones((4, 32)),
            f"{PROJ}.lora_up.weight": np.full((32, 4), 2.0),
            f"{OTHER}.lora_down.weight": np.ones((2, 64)),
            f"{OTHER}.lora_up.weight": np.ones((32, 4)),
        },
        name="slim.safetensors",
    )
    diffs = subset_differences(slim, read_header(slim), full, read_header(full))
    assert [(d.name, d.fault) for d in diffs] == [
        (f"{OTHER}.lora_down.weight", "mismatch"),
        (f"{OTHER}.lora_up.weight", "missing"),
        (f"{PROJ}.lora_up.weight", "values"),
    ]
    assert len(subset_differences(slim, read_header(slim), full, read_header(full), limit=1)) == 1
    assert subset_differences(full, read_header(full), full, read_header(full)) == []


def test_check_subset_raises_not_a_subset_from_the_error_tree(tensor_file: TensorFile) -> None:
    tensors = {
        f"{PROJ}.lora_down.weight": np.ones((4, 32)),
        f"{PROJ}.lora_up.weight": np.ones((32, 4)),
    }
    full = read_lora(tensor_file(tensors, name="full.safetensors"))
    tensors[f"{PROJ}.lora_up.weight"] = np.zeros((32, 4))
    slim = read_lora(tensor_file(tensors, name="slim.safetensors"))
    with pytest.raises(NotASubsetError) as info:
        check_subset(full, slim)
    assert info.value.what == "tensor values differ from the full file"
    assert info.value.exit_code == EXIT_UNSUPPORTED
    assert isinstance(info.value, UnsupportedLoraError)
    assert check_subset(full, full) == ["double.0"]
    # Still importable where it used to live.
    assert verify.NotASubsetError is errors.NotASubsetError
    assert verify.check_subset is check_subset
