"""What the render engine needs to know about speed-ups applied to the transformer.

Two kinds. ``torch.compile`` of the transformer's repeated blocks (regional
compilation) is compatible with the engine when its hooks are masked (see
:mod:`lora_prune.render.hooks`): :func:`compile_blocks` applies it and
:func:`uncompile` takes it off again. Step caches (first-block cache, TeaCache-like
MagCache, FasterCache, pyramid attention broadcast, TaylorSeer, ...) skip or
reuse transformer blocks between denoising steps, which replaces exactly the
block contributions a sweep measures: :func:`step_cache` names one so the
engine can refuse.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["compile_blocks", "step_cache", "uncompile"]

# The compiled block lists still out, and dynamo's hook-guard setting before the first.
_open_compiles: list[list[torch.nn.Module]] = []
_saved_hook_guards: list[bool] = []

# diffusers.hooks registry names of hooks that skip or reuse block outputs across steps
# (diffusers 0.42: first_block_cache, faster_cache, mag_cache, pyramid_attention_broadcast,
# taylorseer_cache, sea_cache, text_kv_cache, layer_skip).
_STEP_CACHE_HOOKS = (
    "fbc_",
    "faster_cache",
    "mag_cache",
    "pyramid_attention_broadcast",
    "taylorseer",
    "sea_cache",
    "text_kv_cache",
    "layer_skip",
)


def step_cache(transformer: torch.nn.Module) -> str | None:
    """The name of a step cache enabled on ``transformer``, or None.

    ``enable_cache`` records its config; the ``apply_*`` functions only register
    hooks in diffusers' per-module hook registry, so both are looked at.
    """
    config = getattr(transformer, "_cache_config", None)
    if config is not None:
        return type(config).__name__
    for name, module in transformer.named_modules():
        hooks = getattr(getattr(module, "_diffusers_hook", None), "hooks", None)
        if not isinstance(hooks, dict):
            continue
        for hook in hooks:
            if isinstance(hook, str) and hook.startswith(_STEP_CACHE_HOOKS):
                return f"{hook} on {name or 'the transformer'}"
    return None


def compile_blocks(transformer: torch.nn.Module, **options: Any) -> list[torch.nn.Module]:
    """``torch.compile`` each repeated block of ``transformer``; the blocks compiled.

    diffusers' regional compilation (``compile_repeated_blocks``) where the model
    declares its repeated blocks, else every module of its two FLUX.1 block lists.
    Hooks registered on the blocks' submodules are traced into the compiled code.
    """
    # Dynamo skips guards on module hooks by default, so the code traced for a block
    # without LoRA hooks would be reused for one with hooks (all blocks share one
    # forward): the LoRA would silently vanish from every block after the first step.
    # The setting is process-wide: uncompile() puts it back once no engine needs it.
    if not _open_compiles:
        _saved_hook_guards[:] = [bool(torch._dynamo.config.skip_nnmodule_hook_guards)]
    torch._dynamo.config.skip_nnmodule_hook_guards = False
    repeated = getattr(transformer, "_repeated_blocks", None)
    regional = getattr(transformer, "compile_repeated_blocks", None)
    blocks: list[torch.nn.Module] = []
    if repeated and callable(regional):
        regional(**options)
        blocks = [m for m in transformer.modules() if type(m).__name__ in repeated]
    else:
        # A diffusers transformer keeps its blocks in ModuleLists, whatever the model.
        for child in transformer.children():
            if isinstance(child, torch.nn.ModuleList):
                blocks.extend(child)
        for block in blocks:
            block.compile(**options)
    _open_compiles.append(blocks)
    return blocks


def uncompile(blocks: list[torch.nn.Module]) -> None:
    """Run ``blocks`` eagerly again, as before :func:`compile_blocks` (and its dynamo setting)."""
    for block in blocks:
        # nn.Module.compile() only sets this; clearing it restores the eager call.
        block._compiled_call_impl = None
    for i, compiled in enumerate(_open_compiles):
        if compiled is blocks:
            del _open_compiles[i]
            if not _open_compiles and _saved_hook_guards:
                torch._dynamo.config.skip_nnmodule_hook_guards = _saved_hook_guards.pop()
            break
