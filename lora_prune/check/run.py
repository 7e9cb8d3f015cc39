"""The ``check`` driver: every file found, every check, one :class:`~.model.CheckResult`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..errors import UnreadableFileError, UsageError
from ..lora import LoraFile
from ..pickles import is_pickle_name, sniff_pickle
from ..safetensors_io import SafetensorsHeader
from .lint import check_safetensors, policy_findings
from .model import CheckResult, FileResult, Finding, Reverify, finding_from
from .policy import Policy, SlimPair
from .scan import candidates, is_regular, unsafe_result
from .slims import Hashes, is_slim, recorded_verification_note, verify_slim

__all__ = ["SAFETENSORS_SUFFIX", "run_check"]

SAFETENSORS_SUFFIX = ".safetensors"

_Parsed = tuple[FileResult, SafetensorsHeader, LoraFile | None]


def _policy_slims(policy: Policy | None) -> dict[str, SlimPair]:
    """The policy's ``[[slim]]`` pairs by the slim file's real path; a missing slim is an error."""
    pairs: dict[str, SlimPair] = {}
    for entry in policy.slim if policy is not None else ():
        if not is_regular(entry.file):
            raise UsageError(
                "the policy names a slim file that does not exist",
                f"{policy.source if policy and policy.source else 'policy'}: "
                f"[[slim]] file = {str(entry.file)!r}",
                "fix the path or remove the [[slim]] table",
            )
        pairs[os.path.realpath(entry.file)] = entry
    return pairs


def _check_files(paths: Sequence[str | Path]) -> tuple[list[FileResult], list[_Parsed]]:
    """A result per file found, and the readable safetensors files among them."""
    results: list[FileResult] = []
    parsed: list[_Parsed] = []
    for path, explicit, error in candidates(paths):
        if error is not None:
            reason = error.strerror or error.__class__.__name__
            finding = Finding(
                "error", "unreadable", f"cannot list folder ({reason}), check its permissions"
            )
            results.append(FileResult(path, "unreadable", [finding]))
            continue
        if is_pickle_name(path):
            results.append(unsafe_result(path, sniff_pickle(path) if is_regular(path) else None))
            continue
        if path.suffix.lower() != SAFETENSORS_SUFFIX and not explicit:
            sniffed = sniff_pickle(path) if is_regular(path) else None
            if sniffed is not None:
                results.append(unsafe_result(path, sniffed))
            continue
        result, header, lora = check_safetensors(path)
        results.append(result)
        if header is not None:
            parsed.append((result, header, lora))
    return results, parsed


def run_check(
    paths: Sequence[str | Path],
    policy: Policy | None = None,
    reverify: Reverify | None = None,
) -> CheckResult:
    """Check every LoRA file under ``paths`` (files or folders, recursively).

    ``.safetensors`` files get every check; pickle checkpoints (by extension,
    or by their bytes for other files in a folder) are reported as unsafe and
    never loaded. A file given explicitly is checked as safetensors whatever
    its name. ``reverify(slim, full)`` re-renders a slim file against its full
    file (``check --model``). A missing path or a policy that names a missing
    slim file raises :class:`UsageError`.

    Args:
        paths: files and folders to check.
        policy: the repository's rules (:func:`load_policy`); None checks
            integrity and content only.
        reverify: re-renders a slim file against its full file; None trusts
            the verification record in the slim file's metadata.

    Example::

        result = run_check([Path("loras")], load_policy("lora-policy.toml"))
        print(render_text(result))
        raise SystemExit(result.exit_code)
    """
    slim_pairs = _policy_slims(policy)
    results, parsed = _check_files(paths)
    hashes = Hashes()
    checked = [r.path for r, _, _ in parsed]
    wanted = reverify is not None or (policy is not None and policy.require_verified)
    for result, header, lora in parsed:
        if policy is not None:
            result.findings.extend(policy_findings(policy, header, lora))
        pair = slim_pairs.get(os.path.realpath(result.path))
        slim = pair is not None or is_slim(header.metadata)
        if slim and (wanted or pair is not None):
            try:
                result.findings.extend(
                    verify_slim(
                        result,
                        header,
                        pair.full if pair else None,
                        policy,
                        checked,
                        hashes,
                        reverify,
                    )
                )
            except UnreadableFileError as exc:
                result.findings.append(finding_from(exc, result.path))
        elif slim:
            result.findings.extend(recorded_verification_note(header))

    for result in results:
        if result.status == "pass" and result.errors:
            result.status = "fail"
    return CheckResult(results, policy.source if policy is not None else None)
