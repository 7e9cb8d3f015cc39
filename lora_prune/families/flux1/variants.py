"""Which FLUX.1 a LoRA or checkpoint is for: dev (it has a guidance embedder), schnell, Krea, Kontext.

Keys tell dev from schnell (only dev has the guidance embedder); the metadata
(``modelspec.architecture``, ``ss_base_model_version``) may name the model, and a
claim the keys contradict is a warning for ``check``. Krea (FLUX.1 Krea [dev]) and
Kontext (FLUX.1 Kontext [dev], an image editor) have dev's layout: only the
metadata or a checkpoint's file name can name them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ..base import ModuleLike
from .keys import is_guidance_path

#: The dev-layout models a name may give, by the word that names them.
_DEV_MODELS = (("kontext", "FLUX.1-Kontext-dev"), ("krea", "FLUX.1-Krea-dev"))
_FLUX2 = re.compile(r"flux[-_. ]?2")
_FLUX1 = re.compile(r"flux[-_. ]?1|^flux(\b|_)")


def _claim(metadata: Mapping[str, str]) -> tuple[str, str, str] | None:
    """(key, value, claimed base) from the metadata, or None when it names none."""
    for key in ("modelspec.architecture", "ss_base_model_version"):
        value = metadata.get(key, "").strip()
        if not value:
            continue
        low = value.lower()
        if _FLUX2.search(low):
            return key, value, "FLUX.2"
        if _FLUX1.search(low):
            named = next((m for word, m in _DEV_MODELS if word in low), None)
            if named is not None:
                return key, value, named
            if "schnell" in low:
                return key, value, "FLUX.1-schnell"
            if "dev" in low:
                return key, value, "FLUX.1-dev"
            return key, value, "FLUX.1"
        return key, value, value
    return None


def base_model(
    modules: Iterable[ModuleLike], metadata: Mapping[str, str]
) -> tuple[str, list[tuple[str, str]]]:
    """The FLUX.1 model a LoRA is for, and (metadata key, warning) for a claim its keys contradict."""
    guidance = any(m.target is not None and is_guidance_path(m.target.name) for m in modules)
    from_keys = "FLUX.1-dev" if guidance else "FLUX.1"
    claim = _claim(metadata)
    if claim is None:
        return from_keys, []
    key, value, claimed = claim
    if not claimed.startswith("FLUX.1"):
        return from_keys, [
            (
                key,
                f"metadata {key} = {value!r} names another base model, but the keys are "
                "FLUX.1 keys: fix the metadata",
            )
        ]
    if claimed == "FLUX.1-schnell" and guidance:
        return "FLUX.1-dev", [
            (
                key,
                f"metadata {key} = {value!r} says schnell, but the LoRA trains the guidance "
                "embedder, which only FLUX.1-dev has: fix the metadata",
            )
        ]
    return (claimed if claimed != "FLUX.1" else from_keys), []


def checkpoint_name(variant: str, file_name: str) -> str:
    """A transformer checkpoint's model: Krea or Kontext by its file name, else FLUX.1-dev/schnell."""
    low = file_name.lower()
    named = next((m for word, m in _DEV_MODELS if word in low), None)
    return named if variant == "dev" and named is not None else f"FLUX.1-{variant}"
