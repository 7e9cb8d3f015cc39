"""``lora-prune check``: lint LoRA files for CI and pre-commit, without torch.

:func:`run_check` walks the given paths and, for every ``.safetensors`` file,
runs the reader's integrity checks, recognises the FLUX.1 key format, scans
every float tensor for NaN/Inf (one tensor at a time), checks the rank and
alpha of every module, reports dtypes and the base model, and applies an
optional :class:`Policy` (size, blocks, metadata, verified slim files).
Pickle checkpoints in the tree are reported as unsafe and never loaded.

The result is data (:class:`CheckResult`); ``render_text``, ``render_json``,
``render_junit`` and ``render_github`` turn it into the four output formats,
so the CLI only parses arguments, calls :func:`run_check`, prints one
rendering and exits with :attr:`CheckResult.exit_code`.

The package's parts: :mod:`.model` (the result types), :mod:`.policy` (the
TOML policy), :mod:`.scan` (finding the files), :mod:`.lint` (one file's
content and the policy's rules), :mod:`.slims` (slim provenance), :mod:`.run`
(the driver) and :mod:`.outputs` (the four formats).
"""

from __future__ import annotations

from ..pickles import PICKLE_SUFFIXES
from ..units import parse_size
from .model import CheckResult, FileResult, Finding, Reverify, VerifyOutcome
from .outputs import (
    FORMATS,
    github_escape_data,
    github_escape_property,
    render,
    render_github,
    render_json,
    render_junit,
    render_text,
)
from .policy import POLICY_KEYS, Policy, SlimPair, load_policy, parse_policy
from .run import run_check

__all__ = [
    "FORMATS",
    "PICKLE_SUFFIXES",
    "POLICY_KEYS",
    "CheckResult",
    "FileResult",
    "Finding",
    "Policy",
    "Reverify",
    "SlimPair",
    "VerifyOutcome",
    "github_escape_data",
    "github_escape_property",
    "load_policy",
    "parse_policy",
    "parse_size",
    "render",
    "render_github",
    "render_json",
    "render_junit",
    "render_text",
    "run_check",
]
