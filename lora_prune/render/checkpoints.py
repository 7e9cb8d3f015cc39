"""What every loader of FLUX.1 checkpoint files here shares, below all of them.

The component configs shipped in ``lora_prune/configs`` (the tiny model takes
its scheduler from there, single files their transformer, VAE and text
encoder configs), the wrapper prefix of a full ComfyUI/A1111 checkpoint's
transformer keys, and the one line of a library's error that a
:class:`~lora_prune.errors.LoraPruneError` quotes. Imports neither torch nor
diffusers.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

__all__ = ["first_line", "shipped_config", "shipped_transformer_config", "strip_prefix"]

# Full ComfyUI/A1111 checkpoints nest the transformer under one of these; the
# other prefixes (VAE, text encoders) are not ours to load.
_CHECKPOINT_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "transformer.")


def shipped_config(name: str) -> dict[str, Any]:
    """A FLUX.1 component config shipped in ``lora_prune/configs`` (a fresh copy)."""
    text = (resources.files("lora_prune") / "configs" / name).read_text(encoding="utf-8")
    config: dict[str, Any] = json.loads(text)
    return config


def shipped_transformer_config(guidance: bool) -> dict[str, Any]:
    """FLUX.1-dev's (``guidance=True``) or FLUX.1-schnell's transformer config."""
    return shipped_config(
        "flux1-dev-transformer.json" if guidance else "flux1-schnell-transformer.json"
    )


def strip_prefix(keys: list[str]) -> tuple[str, list[str]]:
    """The wrapper prefix of a full checkpoint's transformer keys and those keys."""
    for prefix in _CHECKPOINT_PREFIXES:
        inner = [k for k in keys if k.startswith(prefix)]
        if inner:
            return prefix, inner
    return "", keys


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (its type's name when it has none)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
