"""Retraining recipes: the settings that train only a keep set in the main FLUX.1 trainers.

``analyze`` suggests the blocks worth keeping; retraining only those blocks at a
higher rank is what the block guides recommend. :func:`recipes_for` writes, for
one keep set, the setting each trainer reads, checked against its own
documentation or, where the documentation is silent, the code that reads it:

kohya sd-scripts (``networks/lora_flux.py``)
    kohya-ss/sd-scripts ``docs/flux_train_network.md`` section 6.4 "Block
    Selection for Training": ``train_double_block_indices`` and
    ``train_single_block_indices`` in ``--network_args``, 0-based indices as
    ``0,1,4-5,7``, ``all`` or ``none``. A list that is left out trains every
    block of its kind (``networks/lora_flux.py`` ``create_network`` only
    filters a kind whose list is given), so both are always written. Section 6.3:
    ``in_dims=[img_in,time_in,vector_in,guidance_in,txt_in]`` gives the input
    layers' ranks (0 or absent: not trained). No option reaches the final
    layer: the LoRA targets only ``DoubleStreamBlock``/``SingleStreamBlock``
    and the five ``in_dims`` layers. Section 6.6: CLIP-L trains unless
    ``--network_train_unet_only``; T5-XXL needs ``train_t5xxl=True`` and CLIP-L
    then trains too.
ai-toolkit (ostris/ai-toolkit)
    ``README.md`` "Training Specific Layers": ``network: network_kwargs:
    only_if_contains:`` a list of substrings of diffusers module names such as
    ``"transformer.single_transformer_blocks.7.proj_out"``. The README does not
    say that FLUX.1 LoRAs skip every layer outside the blocks unless
    ``network: transformer_only: false`` (``toolkit/config_modules.py``
    ``NetworkConfig``, default ``True``; ``toolkit/lora_special.py`` skips
    names without ``transformer_blocks``), so the recipe sets it when the input
    or final layers are kept. Text encoders: the FLUX example config
    (``config/examples/train_lora_flux_24gb.yaml``) says
    ``train_text_encoder: false  # probably won't work with flux``.
OneTrainer (Nerogar/OneTrainer)
    ``layer_filter`` (comma-separated), ``layer_filter_preset`` (``custom`` for
    one's own list) and ``layer_filter_regex`` in the training config
    (``modules/util/config/TrainConfig.py``; the UI's tooltip in
    ``modules/ui/BaseTrainingTabView.py``: "Comma-separated list of diffusion
    layers to train. Regular expressions (if toggled) are supported"). Patterns
    are matched (``modules/util/ModuleFilter.py``: substring, or ``re.search``)
    against the transformer's own module names (``transformer_blocks.3.attn.to_q``,
    ``single_transformer_blocks.7.proj_out``; ``modules/module/LoRAModule.py``).
    A substring cannot tell ``transformer_blocks.3.`` from
    ``single_transformer_blocks.3.``, so the recipe uses regular expressions
    anchored at the name's start. Text encoders: ``text_encoder.train`` (CLIP-L)
    and ``text_encoder_2.train`` (T5-XXL) (``training_presets/Flux Dev.1/#flux
    LoRA.json``).

The documents were read at kohya-ss/sd-scripts 48d368f, ostris/ai-toolkit
27a03a9 and Nerogar/OneTrainer 23df383. OneTrainer's wiki was not available to
check; its code and UI tooltips were.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from .blocks import DOUBLE_BLOCKS, SINGLE_BLOCKS, block_kind, format_block_spec, sort_blocks

__all__ = ["DEFAULT_RANK", "Recipe", "recipes_for"]

#: The rank written into kohya's ``in_dims`` (the rank of its documented example command).
DEFAULT_RANK = 16

# The diffusers module names of the non-block layers (field guide, section 1).
_INPUT_MODULES = ("x_embedder", "context_embedder", "time_text_embed")
_FINAL_MODULES = ("norm_out", "proj_out")


@dataclass(frozen=True)
class Recipe:
    """One trainer's setting that trains only the keep set."""

    #: ``kohya sd-scripts``, ``ai-toolkit`` or ``OneTrainer``
    trainer: str
    #: where the text goes: a command line, a YAML config, a JSON config
    where: str
    #: the setting, ready to paste
    text: str
    #: what the trainer cannot restrict, or does besides; "" when nothing
    note: str
    #: the documents the syntax was checked against
    source: str


def _indices(blocks: list[str], kind: str) -> list[int]:
    return [int(b.split(".")[1]) for b in blocks if block_kind(b) == kind]


def _kohya_selection(blocks: list[str], kind: str, count: int) -> str:
    chosen = [b for b in blocks if block_kind(b) == kind]
    if not chosen:
        return "none"
    if len(chosen) == count:
        return "all"
    # format_block_spec already writes runs as "double.0-2,double.7"; kohya wants "0-2,7".
    return ",".join(p.split(".", 1)[1] for p in format_block_spec(chosen).split(","))


def _kohya(blocks: list[str], rank: int) -> Recipe:
    args = [
        f"train_double_block_indices={_kohya_selection(blocks, 'double', DOUBLE_BLOCKS)}",
        f"train_single_block_indices={_kohya_selection(blocks, 'single', SINGLE_BLOCKS)}",
    ]
    notes: list[str] = []
    if "input" in blocks:
        args.append(f"in_dims=[{','.join([str(rank)] * 5)}]")
        notes.append(
            f"in_dims gives img_in, time_in, vector_in, guidance_in, txt_in rank {rank}: "
            "set it to your --network_dim"
        )
    if "t5" in blocks:
        args.append("train_t5xxl=True")
        if "clip" not in blocks:
            notes.append("T5-XXL cannot train without CLIP-L: CLIP-L trains too")
    if "final" in blocks:
        notes.append("the final layer cannot be trained: no option reaches it")
    unet_only = "clip" not in blocks and "t5" not in blocks
    text = (
        ("--network_train_unet_only " if unet_only else "")
        + "--network_args "
        + " ".join(f'"{a}"' for a in args)
    )
    return Recipe(
        "kohya sd-scripts",
        "flux_train_network.py command line (--network_module networks.lora_flux)",
        text,
        "; ".join(notes),
        "kohya-ss/sd-scripts docs/flux_train_network.md (6.3, 6.4, 6.6); networks/lora_flux.py",
    )


def _ai_toolkit(blocks: list[str]) -> Recipe:
    names = [f"transformer.transformer_blocks.{i}." for i in _indices(blocks, "double")]
    names += [f"transformer.single_transformer_blocks.{i}." for i in _indices(blocks, "single")]
    if "input" in blocks:
        names += [f"transformer.{m}" for m in _INPUT_MODULES]
    if "final" in blocks:
        names += [f"transformer.{m}" for m in _FINAL_MODULES]
    lines = ["network:"]
    if "input" in blocks or "final" in blocks:
        lines.append("  transformer_only: false")
    # An empty list must stay a list: a bare "only_if_contains:" is null, which trains everything.
    lines += ["  network_kwargs:", "    only_if_contains:" + ("" if names else " []")]
    lines += [f'      - "{n}"' for n in names]
    notes = []
    if "clip" in blocks or "t5" in blocks:
        notes.append("text encoders are not trained for FLUX.1 (train_text_encoder: false)")
    return Recipe(
        "ai-toolkit",
        "the job's YAML config, under config: process:",
        "\n".join(lines),
        "; ".join(notes),
        "ostris/ai-toolkit README.md (Training Specific Layers); toolkit/config_modules.py "
        "(transformer_only); config/examples/train_lora_flux_24gb.yaml",
    )


def _alternation(indices: list[int]) -> str:
    # Whole indices only: "(1|10)" followed by "\\." cannot match block 100 or 11.
    return "(" + "|".join(str(i) for i in indices) + ")"


def _one_trainer(blocks: list[str]) -> Recipe:
    patterns = []
    double, single = _indices(blocks, "double"), _indices(blocks, "single")
    if double:
        patterns.append(rf"^transformer_blocks\.{_alternation(double)}\.")
    if single:
        patterns.append(rf"^single_transformer_blocks\.{_alternation(single)}\.")
    if "input" in blocks:
        patterns += [rf"^{m}\b" for m in _INPUT_MODULES]
    if "final" in blocks:
        patterns += [rf"^{m}\b" for m in _FINAL_MODULES]
    # An empty filter trains every layer; "^$" matches no module name (names are never empty).
    config: dict[str, object] = {
        "layer_filter": ",".join(patterns) or "^$",
        "layer_filter_preset": "custom",
        "layer_filter_regex": True,
    }
    if "clip" in blocks:
        config["text_encoder"] = {"train": True}
    if "t5" in blocks:
        config["text_encoder_2"] = {"train": True}
    text = json.dumps(config, indent=4)[2:-2]  # the entries, without the braces
    return Recipe(
        "OneTrainer",
        "the training config (JSON), or the Layer Filter field with Regex on",
        "\n".join(line[4:] for line in text.split("\n")),
        "",
        "Nerogar/OneTrainer modules/util/config/TrainConfig.py, modules/util/ModuleFilter.py, "
        "modules/ui/BaseTrainingTabView.py (wiki not checked)",
    )


def recipes_for(blocks: Iterable[str], *, rank: int = DEFAULT_RANK) -> list[Recipe]:
    """The settings that train only ``blocks`` in kohya sd-scripts, ai-toolkit and OneTrainer.

    Args:
        blocks: block ids (:mod:`lora_prune.blocks`); ``other`` is ignored.
        rank: the rank written where a trainer needs one per layer (kohya's ``in_dims``).

    Example::

        for r in recipes_for({"double.7", "single.20"}):
            print(r.trainer, r.text)
    """
    kept = [b for b in sort_blocks(blocks) if block_kind(b) != "other"]
    return [_kohya(kept, rank), _ai_toolkit(kept), _one_trainer(kept)]
