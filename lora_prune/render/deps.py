"""The ``render`` extra (torch, diffusers, transformers) as seen from code that runs without it.

Render modules import torch at module level; callers that must work without the
extra (the CLI) call :func:`require_render` before importing them, so that a
missing package becomes a one-line :class:`MissingDependencyError` instead of a
traceback. :func:`free_gpu_bytes` answers ``doctor``'s one question of torch
(None where it is not installed). This module imports torch only inside that call.
"""

from __future__ import annotations

import importlib
import importlib.util
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
    missing = (exc.name or name) if isinstance(exc, ModuleNotFoundError) else None
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


def free_gpu_bytes() -> tuple[int, int] | None:
    """(free, total) bytes of the first CUDA device, or None without torch or a GPU."""
    if importlib.util.find_spec("torch") is None:
        return None
    import torch

    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return int(free), int(total)
