"""The one exception tree of lora-prune, and the exit codes the CLI maps it to.

Every error a user can cause derives from :class:`LoraPruneError` and renders as
one line ``<what>, <which file/key>, <what to do>``; the CLI prints it as
``error: <line>`` and exits with the class's ``exit_code``:

==== =====================================================================
code meaning
==== =====================================================================
0    success
1    a verification or policy check ran and failed (``verify``, ``check``),
     or ``slim --auto --max-size`` found no file under the budget that passes
     (:class:`BudgetError`, which names the smallest size found to pass)
2    usage: a bad option or block spec (click's own usage errors too), an
     output that exists, writing over an input or into a folder that holds
     one (:class:`UsageError`)
3    unreadable or unsafe file: pickle, LFS pointer, HTML page, truncated or
     corrupt safetensors, a folder where a file is needed
     (:class:`UnreadableFileError`)
4    readable but unsupported: not a FLUX.1 LoRA, unknown keys, block index
     out of range, LoRA does not fit the model, unsupported adapter type,
     a "slim" file that is not whole blocks of the full file
     (:class:`UnsupportedLoraError`, :class:`NotASubsetError`)
5    an optional dependency is missing (:class:`MissingDependencyError`)
6    an output could not be written (:class:`OutputError`)
7    the LoRA has no measurable effect on a verification image, so nothing
     can be proved there (:class:`NoEffectError`)
130  interrupted (Ctrl-C)
==== =====================================================================

``check`` reports per file instead of stopping at the first error: there a
LoRA for another base model is a failed check (1), and 3 wins over 1.

Library code raises these and never prints or exits; wrapping foreign
exceptions (``OSError``, safetensors' ``SafetensorError``, JSON errors) into
this tree happens at the boundary where they occur.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "EXIT_FAILED",
    "EXIT_INTERRUPTED",
    "EXIT_MISSING_DEPENDENCY",
    "EXIT_NO_EFFECT",
    "EXIT_OK",
    "EXIT_OUTPUT",
    "EXIT_UNREADABLE",
    "EXIT_UNSUPPORTED",
    "EXIT_USAGE",
    "BlockIndexError",
    "BlockSpecError",
    "BudgetError",
    "CorruptFileError",
    "IncompleteFileError",
    "LoraPruneError",
    "MissingDependencyError",
    "ModelMismatchError",
    "NoEffectError",
    "NotASubsetError",
    "NotSafetensorsError",
    "OutputError",
    "OutputExistsError",
    "SameFileError",
    "UnknownKeysError",
    "UnreadableFileError",
    "UnsafeFileError",
    "UnsupportedAdapterError",
    "UnsupportedLoraError",
    "UsageError",
    "WrongBaseModelError",
]

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_UNREADABLE = 3
EXIT_UNSUPPORTED = 4
EXIT_MISSING_DEPENDENCY = 5
EXIT_OUTPUT = 6
EXIT_NO_EFFECT = 7
EXIT_INTERRUPTED = 130


class LoraPruneError(Exception):
    """Base of every error a user can cause.

    ``what`` says what went wrong, ``where`` names the file or key, ``fix`` says
    what to do. ``str(err)`` joins the three into the one-line message.
    """

    exit_code: int = EXIT_FAILED

    def __init__(self, what: str, where: str | Path | None = None, fix: str | None = None):
        self.what = what
        self.where = str(where) if where is not None else None
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = [self.what]
        if self.where:
            parts.append(self.where)
        if self.fix:
            parts.append(self.fix)
        # One line always: a newline in a file name or key must not split it.
        return ", ".join(parts).replace("\n", " ")

    def __str__(self) -> str:
        return self.message


class UsageError(LoraPruneError):
    """A bad option, block spec or output path given by the user."""

    exit_code = EXIT_USAGE


class BlockSpecError(UsageError):
    """A block spec (``--keep``/``--drop``/``--blocks``) that cannot be parsed."""


class OutputExistsError(UsageError):
    """The output exists and ``--force`` was not given."""


class SameFileError(UsageError):
    """The output would replace an input file (also through links)."""


class UnreadableFileError(LoraPruneError):
    """A file that cannot be read as a safetensors file."""

    exit_code = EXIT_UNREADABLE


class UnsafeFileError(UnreadableFileError):
    """A pickle-based file (``.pt``, ``.ckpt``, ``.bin``): never loaded."""


class NotSafetensorsError(UnreadableFileError):
    """Something that is not a safetensors file: LFS pointer, HTML page, empty file."""


class IncompleteFileError(UnreadableFileError):
    """A truncated file, usually an interrupted download."""


class CorruptFileError(UnreadableFileError):
    """A safetensors file whose header or data is inconsistent."""


class UnsupportedLoraError(LoraPruneError):
    """A readable file that is not a FLUX.1 LoRA this tool can handle."""

    exit_code = EXIT_UNSUPPORTED


class UnknownKeysError(UnsupportedLoraError):
    """Keys that match no FLUX.1 LoRA grammar."""

    def __init__(
        self, what: str, where: str | Path | None, fix: str | None, keys: list[str]
    ) -> None:
        self.keys = keys
        super().__init__(what, where, fix)


class WrongBaseModelError(UnsupportedLoraError):
    """A LoRA for another base model (SD1.5, SDXL, SD3, FLUX.2, ...)."""

    def __init__(
        self, what: str, where: str | Path | None, fix: str | None, base_model: str
    ) -> None:
        self.base_model = base_model
        super().__init__(what, where, fix)


class BlockIndexError(UnsupportedLoraError):
    """A block index outside FLUX.1's 0..18 double / 0..37 single blocks."""


class ModelMismatchError(UnsupportedLoraError):
    """A LoRA module that finds no target, or a target of another shape, in the model."""


class UnsupportedAdapterError(UnsupportedLoraError):
    """An adapter type (OFT, GLoRA, ...) the engine cannot apply yet."""


class NotASubsetError(UnsupportedLoraError):
    """A slim file that is not made of whole, byte-identical blocks of the full file (exit 4)."""


class BudgetError(LoraPruneError):
    """No keep set and rank under a size budget passes the verdict (exit 1).

    ``tried`` holds the candidates rendered (:class:`lora_prune.budget.BudgetCandidate`),
    ``smallest`` the bytes of the smallest file found to pass.
    """

    def __init__(
        self,
        what: str,
        where: str | Path | None,
        fix: str | None,
        *,
        tried: Sequence[object],
        smallest: int,
    ) -> None:
        self.tried = list(tried)
        self.smallest = smallest
        super().__init__(what, where, fix)


class MissingDependencyError(LoraPruneError):
    """An optional dependency (the ``render`` extra) is not installed."""

    exit_code = EXIT_MISSING_DEPENDENCY


class OutputError(LoraPruneError):
    """An output file could not be written or did not read back correctly."""

    exit_code = EXIT_OUTPUT


class NoEffectError(LoraPruneError):
    """The LoRA leaves an image unchanged (within render noise): nothing can be proved on it."""

    exit_code = EXIT_NO_EFFECT
