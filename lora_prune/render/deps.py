"""Check that the ``render`` extra (torch, diffusers, transformers) can be imported.

Render modules import torch at module level; callers that must work without the
extra (the CLI) call :func:`require_render` before importing them, so that a
missing package becomes a one-line :class:`MissingDependencyError` instead of a
traceback.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence

from ..errors import MissingDependencyError

# Import order matters: diffusers and transformers import torch themselves, so
# a missing torch is named as torch, not as whichever package hit it first.
RENDER_MODULES: tuple[str, ...] = ("torch", "diffusers", "transformers")

_FIX = (
    "install torch for your platform first (https://pytorch.org), "
    "then run pip install 'lora-prune[render]'"
)


_CONFLICT_FIX = (
    "pip check names the installed versions that conflict; "
    "pip install -U 'lora-prune[render]' installs ones that fit"
)


def _import_failure(name: str, exc: ImportError) -> MissingDependencyError:
    """What failed: the package itself is missing, a module it needs is, or it refused
    to import (diffusers checks the versions of peft and others it finds)."""
    missing = exc.name if isinstance(exc, ModuleNotFoundError) else None
    if missing is None and isinstance(exc, ModuleNotFoundError):
        missing = name
    if missing is not None:
        if missing.split(".")[0] == name:
            return MissingDependencyError(
                f"rendering needs {name}, which is not installed", name, _FIX
            )
        what = f"rendering needs {name}, which failed to import (missing {missing})"
        return MissingDependencyError(what, name, _FIX)
    reason = " ".join(str(exc).split())[:300] or type(exc).__name__
    what = f"rendering needs {name}, which is installed but failed to import ({reason})"
    return MissingDependencyError(what, name, _CONFLICT_FIX)


def require_render(modules: Sequence[str] = RENDER_MODULES) -> None:
    """Import the render dependencies (or only ``modules`` of them) or raise :class:`MissingDependencyError`.

    ``("torch",)`` is what computing cache keys needs: a cached rerun of
    ``analyze`` imports the rest only when something must render.

    The imports are really performed (a package can be found yet fail to
    import); after the first success they are cached by Python and cost nothing.
    """
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise _import_failure(name, exc) from exc
    if "transformers" not in modules:
        return
    # transformers warns at import time about optional image backends (torchvision)
    # that FLUX never uses; a CLI run should show our output, not that.
    transformers = importlib.import_module("transformers")
    transformers.logging.set_verbosity_error()
