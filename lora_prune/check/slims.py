"""Checking slim files against their provenance: the recorded verification and the full file.

A slim file (one with ``lora_prune.*`` provenance, see :mod:`lora_prune.provenance`)
names the full file it was cut from by SHA-256 and usually carries a verification
record. :func:`verify_slim` judges that record against the policy's thresholds,
finds the full file among the checked ones, proves the slim a byte-identical
subset of it and, with ``check --model``, re-renders it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import UnreadableFileError, UnsupportedLoraError
from ..provenance import (
    CRITERION,
    SOURCE_NAME_KEY,
    SOURCE_SHA_KEY,
    VERIFICATION_KEY,
    SubsetFault,
    VerificationRecord,
    resized_source,
    subset_differences,
)
from ..safetensors_io import SafetensorsHeader, file_sha256, read_header
from .lint import SHOW_KEYS
from .model import FileResult, Finding, Reverify, finding_from
from .policy import Policy
from .scan import is_regular

__all__ = ["Hashes", "is_slim", "recorded_verification_note", "verify_slim"]

_SUBSET_WHY: dict[SubsetFault, str] = {
    "missing": "is not in",
    "mismatch": "has another dtype or shape than in",
    "values": "has other values than in",
}


def is_slim(metadata: Mapping[str, str]) -> bool:
    """True for a file whose metadata carries lora-prune provenance."""
    return SOURCE_SHA_KEY in metadata or VERIFICATION_KEY in metadata


def _record_findings(record: VerificationRecord, policy: Policy | None) -> list[Finding]:
    """A recorded verification judged against the policy's thresholds."""
    out: list[Finding] = []
    if not record.passed:
        kept = record.kept_share
        worst = (
            f" (worst share of the effect kept {100 * kept:.1f}%)"
            if kept is not None
            else (f" (worst SSIM {record.worst_ssim:.4f})" if record.worst_ssim is not None else "")
        )
        out.append(
            Finding(
                "error",
                "verification_failed",
                f"the recorded verification failed{worst}: keep more blocks and verify again",
                VERIFICATION_KEY,
            )
        )
    if (
        policy is not None
        and policy.min_ssim is not None
        and (record.min_ssim is None or record.min_ssim < policy.min_ssim)
    ):
        used = "no SSIM floor" if record.min_ssim is None else f"min_ssim {record.min_ssim}"
        out.append(
            Finding(
                "error",
                "verification_too_weak",
                f"the verification used {used}, the policy needs at least "
                f"{policy.min_ssim}: verify again with --min-ssim {policy.min_ssim}",
                VERIFICATION_KEY,
            )
        )
    if policy is not None and policy.min_kept is not None:
        if record.criterion != CRITERION or record.min_kept is None:
            out.append(
                Finding(
                    "error",
                    "verification_too_weak",
                    "the verification did not judge the share of the LoRA's effect kept, "
                    f"the policy needs min_kept {policy.min_kept}: verify again with "
                    f"lora-prune verify --min-kept {policy.min_kept}",
                    VERIFICATION_KEY,
                )
            )
        elif record.min_kept < policy.min_kept or (
            record.kept_share is not None and record.kept_share < policy.min_kept
        ):
            found = (
                ""
                if record.kept_share is None
                else (f", worst share kept {100 * record.kept_share:.1f}%")
            )
            out.append(
                Finding(
                    "error",
                    "verification_too_weak",
                    f"the verification used min_kept {record.min_kept}{found}, the policy "
                    f"needs at least {policy.min_kept}: keep more blocks and verify again "
                    f"with --min-kept {policy.min_kept}",
                    VERIFICATION_KEY,
                )
            )
    return out


class Hashes:
    """File SHA-256s, computed once each and only when needed."""

    def __init__(self) -> None:
        self._cache: dict[str, str] = {}

    def __call__(self, path: Path) -> str:
        ident = os.path.realpath(path)
        if ident not in self._cache:
            self._cache[ident] = file_sha256(path)
        return self._cache[ident]


def _find_full(
    slim: Path,
    source_sha: str,
    source_name: str | None,
    checked: Sequence[Path],
    hashes: Hashes,
) -> Path | None:
    """The full file a slim file was cut from, or None when it cannot be found.

    The file with the recorded SHA-256 among the checked files and the slim's
    sibling named by its provenance; failing that, that sibling even though its
    SHA differs: a full file retrained after slimming leaves a stale slim,
    which the caller then reports.
    """
    sibling: Path | None = None
    if source_name and "/" not in source_name and "\\" not in source_name:
        sibling = slim.parent / source_name
    candidates = [sibling] if sibling is not None else []
    candidates += [p for p in checked if p.name == source_name]
    candidates += [p for p in checked if p.name != source_name]
    slim_id = os.path.realpath(slim)
    for candidate in candidates:
        if os.path.realpath(candidate) == slim_id or not is_regular(candidate):
            continue
        try:
            if hashes(candidate) == source_sha:
                return candidate
        except UnreadableFileError:
            continue
    if sibling is not None and os.path.realpath(sibling) != slim_id and is_regular(sibling):
        return sibling
    return None


def _full_unreadable(full: Path, exc: UnreadableFileError) -> Finding:
    return Finding(
        "error", "full_unreadable", f"the full file {str(full)!r} cannot be read: {exc.what}"
    )


def _subset_findings(slim: Path, slim_header: SafetensorsHeader, full: Path) -> list[Finding]:
    """Every tensor of the slim file must be in the full file, byte for byte."""
    try:
        full_header = read_header(full)
    except UnreadableFileError as exc:
        return [_full_unreadable(full, exc)]
    return [
        Finding(
            "error",
            "not_subset",
            f"tensor {diff.name!r} {_SUBSET_WHY[diff.fault]} the full file {str(full)!r}, "
            "so this is not a slim of it: slim the full file again",
            diff.name,
        )
        for diff in subset_differences(slim, slim_header, full, full_header, limit=SHOW_KEYS)
    ]


def _read_record(
    meta: Mapping[str, str], judge_record: bool
) -> tuple[VerificationRecord | None, list[Finding]]:
    raw = meta.get(VERIFICATION_KEY)
    if raw is None:
        if not judge_record:
            return None, []
        return None, [
            Finding(
                "error",
                "not_verified",
                f"slim file has no {VERIFICATION_KEY} record: slim --auto writes files with "
                "it (verify proves a file without changing it), or check --model re-renders it",
                VERIFICATION_KEY,
            )
        ]
    parsed = VerificationRecord.parse(raw)
    if isinstance(parsed, str):
        return None, [
            Finding(
                "error",
                "bad_verification",
                f"{VERIFICATION_KEY} {parsed}: write the slim file again with slim --auto, "
                "or check --model to re-render it",
                VERIFICATION_KEY,
            )
        ]
    return parsed, []


def _full_not_found(reverify: Reverify | None) -> list[Finding]:
    out = [
        Finding(
            "warning",
            "full_not_found",
            "the full file it was cut from is not among the checked files: only the "
            "recorded verification was checked (check the full file too, or name it "
            "in a [[slim]] table)",
        )
    ]
    if reverify is not None:
        out.append(
            Finding(
                "error",
                "reverify_impossible",
                "cannot re-render without the full file: add it to the checked "
                "paths or name it in a [[slim]] table",
            )
        )
    return out


def _identity_findings(
    record: VerificationRecord | None, source_sha: str | None, full: Path, full_sha: str
) -> list[Finding]:
    """Whether the full file found is the one the record and the provenance name."""
    out: list[Finding] = []
    if record is not None and record.full_sha256 != full_sha:
        out.append(
            Finding(
                "error",
                "verification_mismatch",
                f"the verification was made against a file with SHA-256 "
                f"{record.full_sha256[:12]}..., not {str(full)!r} ({full_sha[:12]}...): "
                "the full file changed or is another one; slim and verify again",
                VERIFICATION_KEY,
            )
        )
    if (
        source_sha is not None
        and source_sha != full_sha
        and (record is None or record.full_sha256 == full_sha)
    ):
        out.append(
            Finding(
                "error",
                "source_mismatch",
                f"the file was cut from a file with SHA-256 {source_sha[:12]}..., not "
                f"{str(full)!r} ({full_sha[:12]}...): slim the full file again",
                SOURCE_SHA_KEY,
            )
        )
    return out


def _reverify_findings(
    reverify: Reverify, path: Path, full: Path, policy: Policy | None
) -> list[Finding]:
    """Re-render the slim file against the full file (``check --model``) and judge it."""
    try:
        outcome = reverify(path, full)
    except (UnreadableFileError, UnsupportedLoraError) as exc:
        return [finding_from(exc, path)]
    out: list[Finding] = []
    if (
        policy is not None
        and policy.min_ssim is not None
        and (outcome.min_ssim is None or outcome.min_ssim < policy.min_ssim)
    ):
        out.append(
            Finding(
                "error",
                "verification_too_weak",
                f"re-rendering used min_ssim {outcome.min_ssim}, the policy needs "
                f"at least {policy.min_ssim}: pass --min-ssim {policy.min_ssim}",
            )
        )
    if policy is not None and policy.min_kept is not None and (outcome.min_kept < policy.min_kept):
        out.append(
            Finding(
                "error",
                "verification_too_weak",
                f"re-rendering used min_kept {outcome.min_kept}, the policy needs "
                f"at least {policy.min_kept}: pass --min-kept {policy.min_kept}",
            )
        )
    share = "n/a" if outcome.kept_share is None else f"{100 * outcome.kept_share:.1f}%"
    if outcome.passed:
        out.append(
            Finding(
                "info",
                "reverified",
                f"re-rendered: worst share of the effect kept {share} >= "
                f"{100 * outcome.min_kept:g}%, worst SSIM {outcome.worst_ssim:.4f}",
            )
        )
    else:
        out.append(
            Finding(
                "error",
                "reverify_failed",
                f"re-rendering keeps at worst {share} of the LoRA's effect "
                f"(needs {100 * outcome.min_kept:g}% on every image), worst SSIM "
                f"{outcome.worst_ssim:.4f}: keep more blocks and verify again",
            )
        )
    return out


def _verified_note(record: VerificationRecord, full: Path, resized: bool) -> Finding:
    if record.kept_share is not None:
        worst = f", worst share of the effect kept {100 * record.kept_share:.1f}%"
    elif record.worst_ssim is not None:
        worst = f" at worst SSIM {record.worst_ssim:.4f}"
    else:
        worst = ""
    what = "resize" if resized else "subset"
    return Finding("info", "verified", f"verified {what} of {str(full)!r}{worst}")


def _against_full(
    result: FileResult,
    header: SafetensorsHeader,
    full: Path,
    record: VerificationRecord | None,
    hashes: Hashes,
    mismatched: bool,
) -> tuple[list[Finding], bool]:
    """The full file's identity and the subset proof, and whether the full file was usable."""
    if not is_regular(full):
        return [
            Finding(
                "error",
                "full_missing",
                f"the full file {str(full)!r} named by the policy does not exist: "
                "fix the [[slim]] table",
            )
        ], False
    result.full_file = full
    try:
        full_sha = hashes(full)
    except UnreadableFileError as exc:
        return [_full_unreadable(full, exc)], False
    out = _identity_findings(record, header.metadata.get(SOURCE_SHA_KEY), full, full_sha)
    # Against another file than the recorded one, a tensor diff only repeats that;
    # a resize holds other tensors by design: its proof is the rendered record.
    if not out and not mismatched and resized_source(header.metadata) is None:
        out.extend(_subset_findings(result.path, header, full))
    return out, True


def verify_slim(
    result: FileResult,
    header: SafetensorsHeader,
    explicit_full: Path | None,
    policy: Policy | None,
    checked: Sequence[Path],
    hashes: Hashes,
    reverify: Reverify | None,
) -> list[Finding]:
    """Everything a slim file's provenance lets ``check`` prove, as findings."""
    path = result.path
    meta = header.metadata
    source_sha = meta.get(SOURCE_SHA_KEY)
    # With re-rendering (check --model) the render is the proof; the record's
    # verdict is then not judged, only which file it names.
    judge_record = reverify is None
    record, out = _read_record(meta, judge_record)
    if record is not None and judge_record:
        out.extend(_record_findings(record, policy))
    if record is not None and source_sha is not None and source_sha != record.full_sha256:
        out.append(
            Finding(
                "error",
                "source_mismatch",
                f"the verification was made against {record.full_sha256[:12]}..., "
                f"but the file was cut from {source_sha[:12]}...: verify it again",
                SOURCE_SHA_KEY,
            )
        )

    expected = record.full_sha256 if record is not None else source_sha
    full = explicit_full
    if full is None and expected is not None:
        full = _find_full(path, expected, meta.get(SOURCE_NAME_KEY), checked, hashes)
    if full is None:
        return out + _full_not_found(reverify)
    mismatched = any(f.code == "source_mismatch" for f in out)
    found, usable = _against_full(result, header, full, record, hashes, mismatched)
    out.extend(found)
    if not usable:
        return out
    if reverify is not None:
        out.extend(_reverify_findings(reverify, path, full, policy))
    if (
        judge_record
        and record is not None
        and record.passed
        and not any(f.level == "error" for f in out)
    ):
        out.append(_verified_note(record, full, resized_source(meta) is not None))
    return out


def recorded_verification_note(header: SafetensorsHeader) -> list[Finding]:
    """Without a policy rule, a recorded failure is still worth a warning."""
    raw = header.metadata.get(VERIFICATION_KEY)
    if raw is None:
        return []
    parsed = VerificationRecord.parse(raw)
    if isinstance(parsed, str):
        return [
            Finding("warning", "bad_verification", f"{VERIFICATION_KEY} {parsed}", VERIFICATION_KEY)
        ]
    if not parsed.passed:
        return [
            Finding(
                "warning",
                "verification_failed",
                "the recorded verification of this slim file failed",
                VERIFICATION_KEY,
            )
        ]
    return []
