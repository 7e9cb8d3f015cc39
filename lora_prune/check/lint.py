"""What ``check`` says about one safetensors file's content, and the policy's rules on it.

:func:`check_safetensors` reads the header, recognises the key format, checks
every module's factor shapes and alpha (the rules of :mod:`lora_prune.adapters`),
names the base model, and scans every float tensor for NaN/Inf, one tensor at a
time. :func:`policy_findings` applies a :class:`~.policy.Policy`'s size, block
and metadata rules.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np

from ..adapters import ALPHA_LIMIT, LOW_RANK_ADAPTERS, factor_pairs, factor_problem, missing_factor
from ..blocks import OTHER, format_block_spec, sort_blocks
from ..errors import (
    UnknownKeysError,
    UnreadableFileError,
    UnsupportedLoraError,
    WrongBaseModelError,
)
from ..lora import LoraFile, LoraModule, read_lora
from ..safetensors_io import SafetensorsHeader, SafetensorsReader, read_header
from .model import FileResult, Finding, finding_from, number_text
from .policy import Policy
from .scan import unreadable_result

__all__ = ["SHOW_KEYS", "check_safetensors", "policy_findings"]

_FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
#: How many keys (or tensors) one file's findings name at most.
SHOW_KEYS = 5


def _scan_values(reader: SafetensorsReader, header: SafetensorsHeader) -> list[Finding]:
    """NaN/Inf per float tensor, read one at a time in file order."""
    out: list[Finding] = []
    for info in sorted(header.tensors.values(), key=lambda t: t.begin):
        if info.dtype not in _FLOAT_DTYPES or info.numel == 0:
            continue
        values = reader.read_array(info.name)
        finite = np.isfinite(values)
        if bool(finite.all()):
            continue
        nan = int(np.count_nonzero(np.isnan(values)))
        inf = int(values.size - np.count_nonzero(finite)) - nan
        parts = [f"{n} {label}" for n, label in ((nan, "NaN"), (inf, "Inf")) if n]
        out.append(
            Finding(
                "error",
                "nonfinite",
                f"{' and '.join(parts)} of {values.size} values in tensor {info.name!r}, "
                "the LoRA is broken (a diverged training run or a bad conversion): "
                "retrain or re-export it",
                info.name,
            )
        )
    return out


def _shape_findings(module: LoraModule) -> list[Finding]:
    """Factors that do not multiply, named by the tensor at fault."""
    out: list[Finding] = []
    t = module.tensors
    for left, right in factor_pairs(module):
        a, b = t[left], t[right]
        if len(a.shape) < 2 or len(b.shape) < 2:
            bad = a if len(a.shape) < 2 else b
            out.append(
                Finding(
                    "error",
                    "bad_shape",
                    f"tensor {bad.name!r} has shape {list(bad.shape)}, a factor needs "
                    "at least 2 dimensions: re-export the LoRA",
                    bad.name,
                )
            )
        elif a.shape[1] != b.shape[0]:
            out.append(
                Finding(
                    "error",
                    "rank_mismatch",
                    f"rank mismatch in module {module.stem!r}: {b.name!r} has "
                    f"{b.shape[0]} rows ({list(b.shape)}) but {a.name!r} has {a.shape[1]} "
                    f"columns ({list(a.shape)}), the factors do not multiply: "
                    "re-export the LoRA",
                    b.name,
                )
            )
    if not out:
        problem = factor_problem(module)
        if problem is not None:
            out.append(
                Finding(
                    "error",
                    "bad_shape",
                    f"module {module.stem!r}: {problem}: re-export the LoRA",
                    module.keys[0] if module.keys else None,
                )
            )
    return out


def _module_findings(module: LoraModule) -> list[Finding]:
    out: list[Finding] = []
    t = module.tensors
    missing = missing_factor(module) if module.adapter == "lora" else None
    if missing is not None:
        have, lacking = missing
        out.append(
            Finding(
                "error",
                "missing_factor",
                f"module {module.stem!r} has a {have} tensor but no {lacking} tensor, "
                "the file is incomplete: re-export the LoRA",
                t[have].name,
            )
        )
    out.extend(_shape_findings(module))
    alpha = module.alpha
    if alpha is not None and not (math.isfinite(alpha) and 0 < alpha <= ALPHA_LIMIT):
        info = t.get("alpha")
        out.append(
            Finding(
                "error",
                "bad_alpha",
                f"alpha of module {module.stem!r} is {alpha!r}, expected a finite "
                f"positive number up to {ALPHA_LIMIT:g}: fix or re-export the LoRA",
                info.name if info is not None else None,
            )
        )
    if module.adapter == "unsupported":
        out.append(
            Finding(
                "warning",
                "unsupported_adapter",
                f"module {module.stem!r} is an adapter type (OFT/GLoRA) that lora-prune "
                "cannot render or slim-verify",
                module.keys[0] if module.keys else None,
            )
        )
    return out


def _base_model(lora: LoraFile) -> tuple[str, list[Finding]]:
    """The base model the LoRA is for, as its family reads keys and metadata, and any warnings."""
    name, warnings = lora.family.base_model(lora.modules.values(), lora.metadata)
    return name or lora.family.display, [
        Finding("warning", "base_model_mismatch", text, key) for key, text in warnings
    ]


def _consistency(lora: LoraFile, result: FileResult) -> None:
    ranks: Counter[int] = Counter()
    alphas: Counter[float] = Counter()
    for module in lora.modules.values():
        result.findings.extend(_module_findings(module))
        if module.rank is not None and module.adapter in LOW_RANK_ADAPTERS:
            ranks[module.rank] += 1
        if module.alpha is not None:
            alphas[module.alpha] += 1
    result.ranks = dict(sorted(ranks.items()))
    result.alphas = dict(sorted(alphas.items(), key=lambda kv: number_text(kv[0])))
    if len(ranks) > 1:
        spread = ", ".join(f"rank {r} x{n}" for r, n in result.ranks.items())
        result.findings.append(
            Finding("warning", "mixed_ranks", f"modules have different ranks: {spread}")
        )


def _read_parsed(path: Path, result: FileResult) -> LoraFile | None:
    """Parse the LoRA; unknown keys become a finding and parsing goes on without them."""
    try:
        return read_lora(path)
    except WrongBaseModelError as exc:
        result.base_model = exc.base_model
        result.findings.append(finding_from(exc, path))
        return None
    except UnknownKeysError as exc:
        if not exc.keys:
            result.findings.append(finding_from(exc, path))
            return None
        try:
            lora = read_lora(path, allow_unknown=True)
        except UnsupportedLoraError:
            lora = None
        if lora is not None and all(b == OTHER for b in lora.blocks):
            # Every key unknown: a model checkpoint or another file, not a LoRA of any
            # format; one finding says so instead of one per key.
            result.findings.append(
                Finding(
                    "error",
                    "not_a_lora",
                    f"none of its {len(lora.header.tensors)} keys is a FLUX.1 LoRA key (e.g. "
                    f"{exc.keys[0]!r}): not a LoRA, perhaps a model checkpoint",
                    exc.keys[0],
                )
            )
            return None
        # One finding per key shown (annotations point at keys); the summary only for the rest.
        for key in exc.keys[:SHOW_KEYS]:
            result.findings.append(
                Finding("error", "unknown_key", f"key {key!r} matches no FLUX.1 LoRA format", key)
            )
        if len(exc.keys) > SHOW_KEYS:
            rest = len(exc.keys) - SHOW_KEYS
            result.findings.append(
                Finding("error", "unknown_keys", f"and {rest} more keys that match no format")
            )
        return lora
    except UnsupportedLoraError as exc:
        result.findings.append(finding_from(exc, path))
        return None


def check_safetensors(path: Path) -> tuple[FileResult, SafetensorsHeader | None, LoraFile | None]:
    try:
        header = read_header(path)
    except UnreadableFileError as exc:
        return unreadable_result(path, exc), None, None
    result = FileResult(path, "pass")
    result.bytes = header.file_size
    result.tensors = len(header.tensors)
    result.dtypes = dict(sorted(Counter(t.dtype for t in header.tensors.values()).items()))
    try:
        lora = _read_parsed(path, result)
        if lora is not None:
            result.format = lora.format
            result.blocks = [b for b in lora.blocks if b != OTHER]
            base, notes = _base_model(lora)
            result.base_model = base
            result.findings.extend(notes)
            _consistency(lora, result)
        with SafetensorsReader(path, header) as reader:
            result.findings.extend(_scan_values(reader, header))
    except UnreadableFileError as exc:
        return unreadable_result(path, exc), None, None
    return result, header, lora


def policy_findings(
    policy: Policy, header: SafetensorsHeader, lora: LoraFile | None
) -> list[Finding]:
    out: list[Finding] = []
    if policy.max_bytes is not None and header.file_size > policy.max_bytes:
        out.append(
            Finding(
                "error",
                "max_size",
                f"file is {header.file_size:,} bytes, over the policy's maximum of "
                f"{policy.max_bytes:,}: slim it (lora-prune slim) or raise max_size",
            )
        )
    if lora is not None:
        present = set(lora.blocks) - {OTHER}
        allowed = policy.allowed_in(lora.family.blocks)
        if allowed is not None:
            extra = sort_blocks(present - allowed)
            if extra:
                out.append(
                    Finding(
                        "error",
                        "block_not_allowed",
                        f"blocks {format_block_spec(extra)} are not allowed by the policy "
                        f"(allowed: {format_block_spec(allowed) or 'none'}): drop them "
                        f"with lora-prune slim --drop {format_block_spec(extra)}",
                    )
                )
        missing = sort_blocks(policy.required_in(lora.family.blocks) - present)
        if missing:
            out.append(
                Finding(
                    "error",
                    "block_missing",
                    f"required blocks {format_block_spec(missing)} are missing "
                    f"(the file has {format_block_spec(present) or 'none'}): keep them when "
                    "slimming or change required_blocks",
                )
            )
    for key in policy.required_metadata:
        value = header.metadata.get(key)
        if value is None or not value.strip():
            state = "missing" if value is None else "empty"
            out.append(
                Finding(
                    "error",
                    "metadata_missing",
                    f"required metadata key {key!r} is {state}: add it to the file's "
                    "__metadata__ (your trainer's metadata options set it)",
                    key,
                )
            )
    return out
