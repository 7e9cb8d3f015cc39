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
    layers' ranks (0 or absent: not trained; ``create_network`` reads five
    integers, bracketed or not). The recipe writes the ranks the LoRA itself
    has on those layers (:func:`input_ranks`), so that the retrained input
    layers are what the original's were. No option reaches the final
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
    The wiki documents the list: its LoRA page, "Layer Preset: Selects which
    model layers to train. You can choose "custom" and specify your own, comma
    separated" (read in the copy aklevecz/onetrainer-docs f4e7641,
    ``src/content/docs/wiki/LoRA.md``), and its "Diffusion Models Overview"
    page (Jan 2025, read on github-wiki-see.page) gives "a working example of a
    custom layer set": ``down_blocks.1.attentions.0,down_blocks.1.attentions.1,...``,
    module-name parts joined by commas. Regular expressions are not in those
    pages (they came later: pull request #778, opened April 2025), nor in the
    wiki's Training page (July 2024); ``fetch github:Nerogar/OneTrainer.wiki``
    found no copy of the wiki's repository, and searching the stored pages for
    the wiki's layer filter found no newer version (the filter moved to the
    Training tab in September 2025, pull request #1001). Regular expressions
    are documented by the UI's tooltips only
    (``modules/ui/BaseTrainingTabView.py``: "Comma-separated list of diffusion
    layers to train. Regular expressions (if toggled) are supported"; the
    Regex toggle: "If enabled, layer filter patterns are interpreted as regular
    expressions. Otherwise, simple substring matching is used.") and the code:
    ``layer_filter``, ``layer_filter_preset`` and ``layer_filter_regex`` in the
    training config (``modules/util/config/TrainConfig.py``), each
    comma-separated pattern stripped and matched (``modules/util/ModuleFilter.py``:
    substring, or ``re.search``) against the transformer's own module names
    (``transformer_blocks.3.attn.to_q``, ``single_transformer_blocks.7.proj_out``;
    ``modules/module/LoRAModule.py``). A substring cannot tell
    ``transformer_blocks.3.`` from ``single_transformer_blocks.3.``, so the
    recipe uses regular expressions anchored at the name's start. Every
    pattern must match some module: ``LoRAModuleWrapper`` raises "no modules
    were matched by the custom filter(s)" otherwise, so a keep set without
    transformer layers sets ``transformer.train`` false instead of a filter
    that matches nothing. Text encoders: ``text_encoder.train`` (CLIP-L) and
    ``text_encoder_2.train`` (T5-XXL) (``training_presets/Flux Dev.1/#flux
    LoRA.json``, which also holds ``transformer.train``).

The documents were read at kohya-ss/sd-scripts 48d368f, ostris/ai-toolkit
27a03a9 and Nerogar/OneTrainer 23df383.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence

from ...blocks import block_kind, format_block_spec, sort_blocks
from ..base import ModuleLike, Recipe
from .blocks import DOUBLE_BLOCKS, SINGLE_BLOCKS

__all__ = ["DEFAULT_RANK", "input_ranks", "recipes_for"]

#: kohya's ``in_dims`` where no LoRA says better: the ``--network_dim=16`` of the
#: documented example command (``docs/flux_train_network.md``, section 4).
DEFAULT_RANK = 16

#: kohya's ``in_dims`` entries in its order (``networks/lora_flux.py``: "img, time,
#: vector, guidance, txt"), each with the diffusers module it trains (field guide, section 1).
_IN_DIMS_LAYERS = (
    ("img_in", "x_embedder"),
    ("time_in", "time_text_embed.timestep_embedder"),
    ("vector_in", "time_text_embed.text_embedder"),
    ("guidance_in", "time_text_embed.guidance_embedder"),
    ("txt_in", "context_embedder"),
)

# The diffusers module names of the non-block layers (field guide, section 1).
_INPUT_MODULES = ("x_embedder", "context_embedder", "time_text_embed")
_FINAL_MODULES = ("norm_out", "proj_out")


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


def input_ranks(modules: Iterable[ModuleLike]) -> tuple[int, ...]:
    """The ranks for kohya's ``in_dims``: the LoRA's own on FLUX.1's five input layers.

    In kohya's order (img_in, time_in, vector_in, guidance_in, txt_in): the
    highest rank of the LoRA's modules on each layer (time_in and the others
    are two Linears each, one ``in_dims`` entry), 0 where the LoRA has no
    module, so that the retrained input layers are the ones the LoRA had, at
    its ranks. A layer whose modules have no rank (full diffs), and every
    layer of a LoRA without input modules, gets the LoRA's most common rank
    (its network dim), or :data:`DEFAULT_RANK` when nothing has a rank.

    Example::

        recipes_for({"input", "double.7"}, input_ranks=input_ranks(lora.modules.values()))
    """
    modules = list(modules)
    ranks = [m.rank for m in modules if m.rank]
    fallback = Counter(ranks).most_common(1)[0][0] if ranks else DEFAULT_RANK
    seen = [False] * len(_IN_DIMS_LAYERS)
    best = [0] * len(_IN_DIMS_LAYERS)
    for module in modules:
        if module.block != "input" or module.target is None:
            continue
        for i, (_, layer) in enumerate(_IN_DIMS_LAYERS):
            if any(p == layer or p.startswith(layer + ".") for p in module.target.modules):
                seen[i] = True
                best[i] = max(best[i], module.rank or 0)
    if not any(seen):
        return (fallback,) * len(_IN_DIMS_LAYERS)
    return tuple(b or (fallback if s else 0) for s, b in zip(seen, best, strict=True))


def _kohya(blocks: list[str], in_dims: Sequence[int] | None) -> Recipe:
    args = [
        f"train_double_block_indices={_kohya_selection(blocks, 'double', DOUBLE_BLOCKS)}",
        f"train_single_block_indices={_kohya_selection(blocks, 'single', SINGLE_BLOCKS)}",
    ]
    notes: list[str] = []
    if "input" in blocks:
        dims = list(in_dims) if in_dims is not None else [DEFAULT_RANK] * len(_IN_DIMS_LAYERS)
        args.append(f"in_dims=[{','.join(str(r) for r in dims)}]")
        layers = ", ".join(name for name, _ in _IN_DIMS_LAYERS)
        if in_dims is None:
            notes.append(
                f"in_dims gives {layers} rank {DEFAULT_RANK}: set it to your --network_dim"
            )
        else:
            notes.append(f"in_dims gives {layers} the LoRA's ranks there (0: none, not trained)")
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
    config: dict[str, object] = {}
    note = ""
    if patterns:
        config["layer_filter"] = ",".join(patterns)
        config["layer_filter_preset"] = "custom"
        config["layer_filter_regex"] = True
    else:
        # An empty filter trains every layer, and one that matches nothing is refused.
        config["transformer"] = {"train": False}
        note = "the transformer's LoRA layers are still created and saved, untrained"
    if "clip" in blocks:
        config["text_encoder"] = {"train": True}
    if "t5" in blocks:
        config["text_encoder_2"] = {"train": True}
    text = json.dumps(config, indent=4)[2:-2]  # the entries, without the braces
    return Recipe(
        "OneTrainer",
        "the training config (JSON), or the Layer Filter field with Regex on",
        "\n".join(line[4:] for line in text.split("\n")),
        note,
        "Nerogar/OneTrainer wiki (LoRA: Layer Preset, custom, comma separated); "
        "modules/util/config/TrainConfig.py, modules/util/ModuleFilter.py, "
        "modules/module/LoRAModule.py, modules/ui/BaseTrainingTabView.py (the Regex toggle)",
    )


def recipes_for(blocks: Iterable[str], *, input_ranks: Sequence[int] | None = None) -> list[Recipe]:
    """The settings that train only ``blocks`` in kohya sd-scripts, ai-toolkit and OneTrainer.

    Args:
        blocks: block ids (:mod:`lora_prune.blocks`); ``other`` is ignored.
        input_ranks: kohya's five ``in_dims`` (img_in, time_in, vector_in,
            guidance_in, txt_in), as :func:`input_ranks` reads them from the
            LoRA; None writes :data:`DEFAULT_RANK` for each.

    Example::

        for r in recipes_for({"double.7", "single.20"}):
            print(r.trainer, r.text)
    """
    if input_ranks is not None and len(input_ranks) != len(_IN_DIMS_LAYERS):
        raise ValueError(f"in_dims has {len(_IN_DIMS_LAYERS)} entries, not {len(input_ranks)}")
    kept = [b for b in sort_blocks(blocks) if block_kind(b) != "other"]
    return [_kohya(kept, input_ranks), _ai_toolkit(kept), _one_trainer(kept)]
