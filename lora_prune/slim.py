"""Write a LoRA that keeps only chosen blocks, byte-identical for what it keeps.

:func:`slim_lora` copies the kept tensors' raw bytes (same keys, same dtypes),
carries the metadata over with stale hashes recomputed and diffusers' adapter
metadata narrowed to what remains, adds provenance, writes atomically and
re-reads the result before it replaces anything.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._version import __version__
from .blocks import OTHER, BlockLayout, BlockSpec, format_block_spec, resolve_blocks, sort_blocks
from .boundedjson import JsonLimitError, loads_bounded
from .errors import OutputError, OutputExistsError, UsageError
from .families import Family
from .fileio import refuse_overwrite
from .lora import (
    LoraFile,
    LoraModule,
    PatternError,
    compile_peft_pattern,
    parse_lora_header,
    read_lora,
)
from .markers import check_pinned_kept
from .provenance import (
    DROPPED_BLOCKS_KEY,
    KEPT_BLOCKS_KEY,
    LEGACY_HASH_KEY,
    MODEL_HASH_KEY,
    MODELSPEC_HASH_KEY,
    SOURCE_NAME_KEY,
    SOURCE_SHA_KEY,
    VERSION_KEY,
)
from .safetensors_io import (
    SafetensorsReader,
    TensorEntry,
    TensorInfo,
    build_header,
    file_sha256,
    read_header,
    write_safetensors,
)

__all__ = [
    "SlimPlan",
    "SlimResult",
    "plan_slim",
    "slim_lora",
]

# kohya's legacy hash: SHA-256 of 64 KiB at offset 1 MiB of the file, first 8 hex digits.
_LEGACY_OFFSET = 0x100000
_LEGACY_LENGTH = 0x10000


@dataclass
class SlimPlan:
    """Which modules a keep set retains, and what the result will weigh."""

    kept: list[LoraModule]
    dropped: list[LoraModule]
    kept_blocks: list[str]
    dropped_blocks: list[str]
    #: requested blocks the LoRA does not contain
    absent: list[str]

    @property
    def kept_bytes(self) -> int:
        return sum(m.nbytes for m in self.kept)

    @property
    def kept_tensors(self) -> list[TensorInfo]:
        return [t for m in self.kept for t in m.tensors.values()]


@dataclass
class SlimResult:
    """What :func:`slim_lora` wrote: the output, the blocks kept and dropped, and its size."""

    source: Path
    output: Path
    kept_blocks: list[str]
    dropped_blocks: list[str]
    absent: list[str]
    bytes_before: int
    bytes_after: int
    tensors_before: int
    tensors_after: int
    metadata: dict[str, str] = field(default_factory=dict)


def plan_slim(lora: LoraFile, keep: Iterable[str]) -> SlimPlan:
    """Split the LoRA's modules into kept and dropped for a set of block ids.

    Args:
        lora: a file from :func:`~lora_prune.lora.read_lora`.
        keep: block ids to keep (e.g. from :func:`~lora_prune.blocks.parse_block_spec`).

    Example::

        plan = plan_slim(read_lora("my_lora.safetensors"), {"double.7", "single.20"})
        print(plan.kept_blocks, plan.kept_bytes)
    """
    keep_set = set(keep)
    kept = [m for m in lora.modules.values() if m.block in keep_set]
    dropped = [m for m in lora.modules.values() if m.block not in keep_set]
    present = set(lora.blocks)
    return SlimPlan(
        kept=kept,
        dropped=dropped,
        kept_blocks=sort_blocks(m.block for m in kept),
        dropped_blocks=sort_blocks(m.block for m in dropped),
        absent=sort_blocks(keep_set - present - {OTHER}),
    )


def keep_size(lora: LoraFile, blocks: Sequence[str]) -> int:
    """The size of the file ``slim --keep blocks`` would write (header included)."""
    if not blocks:
        return 0
    plan = plan_slim(lora, blocks)
    # The header lists every kept tensor; slim adds a few provenance keys on top.
    entries = [TensorEntry(t.name, t.dtype, t.shape, bytes) for t in plan.kept_tensors]
    header, _ = build_header(entries, lora.metadata)
    return plan.kept_bytes + len(header)


def _resolve_keep(
    lora: LoraFile,
    keep_blocks: Iterable[str] | BlockSpec | None,
    drop_blocks: Iterable[str] | BlockSpec | None,
) -> set[str]:
    """The keep set from ``--keep`` or ``--drop`` (exactly one of them)."""
    keep = resolve_blocks(keep_blocks, lora.family.blocks)
    drop = resolve_blocks(drop_blocks, lora.family.blocks)
    if (keep is None) == (drop is None):
        raise UsageError(
            "give exactly one of --keep and --drop", None, "see lora-prune slim --help"
        )
    if keep is not None:
        keep_set = set(keep)
        # "all" means every tensor: with --allow-unknown, also those of block 'other'.
        if keep_set >= set(lora.family.blocks.ids):
            keep_set.add(OTHER)
        return keep_set
    assert drop is not None
    return set(lora.blocks) - set(drop)


def default_output(source: Path, suffix: str = ".slim") -> Path:
    """``<stem><suffix>.safetensors`` beside the input."""
    name = source.name
    stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else source.stem
    return source.with_name(f"{stem}{suffix}.safetensors")


def check_output_path(source: Path, output: Path, *, force: bool) -> None:
    """Refuse to replace the input (also through links) or an existing file without force."""
    if output.is_dir():
        raise UsageError("the output is a folder", output, "give a file name with -o")
    refuse_overwrite([source], [output])
    if (output.exists() or output.is_symlink()) and not force:
        raise OutputExistsError("the output exists", output, "pass --force to replace it")
    if not output.parent.exists():
        raise UsageError("the output folder does not exist", output.parent, "create it first")


def adapter_config(raw: str) -> dict[str, Any] | None:
    """diffusers' ``lora_adapter_metadata`` as a dict, or None where it is none (left as is)."""
    try:
        config = loads_bounded(raw)
    except JsonLimitError:
        return None
    return config if isinstance(config, dict) else None


def _narrow_adapter_metadata(raw: str, kept: list[LoraModule]) -> str:
    """diffusers' ``lora_adapter_metadata`` with target modules/patterns cut to what remains."""
    config = adapter_config(raw)
    if config is None:
        return raw
    names = [m.target.name for m in kept if m.target is not None]

    def remains(pattern: str) -> bool:
        return any(n == pattern or n.endswith("." + pattern) for n in names)

    def pattern_remains(pattern: str) -> bool:
        # read_lora already refused patterns outside the subset compile_peft_pattern runs.
        try:
            compiled = compile_peft_pattern(pattern)
        except PatternError:
            return True
        return any(compiled.matches(n) for n in names)

    for key, value in list(config.items()):
        if key.endswith("target_modules") and isinstance(value, list):
            config[key] = [v for v in value if isinstance(v, str) and remains(v)]
        elif key.endswith(("rank_pattern", "alpha_pattern")) and isinstance(value, dict):
            config[key] = {k: v for k, v in value.items() if pattern_remains(k)}
    return json.dumps(config, sort_keys=True)


@dataclass
class Digests:
    data_sha256: str
    legacy: str


def digest_entries(entries: list[TensorEntry], ss_metadata: Mapping[str, str]) -> Digests:
    """One pass over the entries' bytes, in the order the writer lays them out.

    Gives the data-section SHA-256 (kohya's ``sshs_model_hash``, and the SAI
    ``modelspec.hash_sha256``), kohya's legacy hash of the file as kohya would
    save it (only ss_* metadata) and a digest per tensor to check the output by.
    """
    ss_header, ordered = build_header(entries, ss_metadata)
    data_hash = hashlib.sha256()
    legacy = hashlib.sha256()
    position = len(ss_header)
    window_end = _LEGACY_OFFSET + _LEGACY_LENGTH

    def feed_legacy(chunk: bytes, start: int) -> None:
        lo = max(_LEGACY_OFFSET, start)
        hi = min(window_end, start + len(chunk))
        if lo < hi:
            legacy.update(chunk[lo - start : hi - start])

    feed_legacy(ss_header, 0)
    for entry, _nbytes in ordered:
        data = entry.data()
        data_hash.update(data)
        feed_legacy(data, position)
        position += len(data)
    return Digests(data_hash.hexdigest(), legacy.hexdigest()[:8])


def refreshed_metadata(
    lora: LoraFile, digests: Digests, kept: list[LoraModule], drop: Iterable[str] = ()
) -> dict[str, str]:
    """The input's metadata with the file hashes recomputed, minus ``drop``.

    The one place where a written LoRA's trainer hashes (kohya, SAI) are
    refreshed and diffusers' adapter metadata is narrowed to the ``kept``
    modules; ``slim`` and ``resize`` add their own provenance on top.
    """
    meta = {k: v for k, v in lora.metadata.items() if k not in set(drop)}
    if MODEL_HASH_KEY in meta:
        meta[MODEL_HASH_KEY] = digests.data_sha256
    if LEGACY_HASH_KEY in meta:
        meta[LEGACY_HASH_KEY] = digests.legacy
    if MODELSPEC_HASH_KEY in meta:
        meta[MODELSPEC_HASH_KEY] = "0x" + digests.data_sha256
    if "lora_adapter_metadata" in meta:
        meta["lora_adapter_metadata"] = _narrow_adapter_metadata(
            meta["lora_adapter_metadata"], kept
        )
    meta[VERSION_KEY] = __version__
    return meta


def build_metadata(
    lora: LoraFile,
    plan: SlimPlan,
    source_sha256: str,
    digests: Digests,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The output's metadata: the input's, refreshed, plus provenance."""
    meta = refreshed_metadata(lora, digests, plan.kept)
    meta[SOURCE_SHA_KEY] = source_sha256
    meta[SOURCE_NAME_KEY] = lora.path.name
    meta[KEPT_BLOCKS_KEY] = format_block_spec(plan.kept_blocks)
    meta[DROPPED_BLOCKS_KEY] = format_block_spec(plan.dropped_blocks)
    if extra:
        meta.update(extra)
    return meta


def open_source(source: str | Path | LoraFile, allow_unknown: bool) -> LoraFile:
    """The LoRA to write from: ``source`` itself, or read from its path."""
    if isinstance(source, LoraFile):
        return source
    return read_lora(source, allow_unknown=allow_unknown)


def check_block_ids(ids: Iterable[str], option: str, layout: BlockLayout) -> None:
    """Refuse block ids that name no block of ``layout`` (``option``: where the user gave them)."""
    unknown = set(ids) - set(layout.ids) - {OTHER}
    if unknown:
        raise UsageError(
            f"unknown block ids {sorted(unknown)}",
            option,
            f"{layout.family}'s blocks are {format_block_spec(layout.ids)}",
        )


def write_checked(
    dest: Path,
    family: Family,
    blocks: list[str],
    entries: list[TensorEntry],
    ss_metadata: Mapping[str, str],
    metadata_of: Callable[[Digests], dict[str, str]],
) -> dict[str, str]:
    """Write ``entries`` to ``dest`` atomically, checked by :func:`output_checker`.

    ``metadata_of`` builds the file's metadata from the entries' digests; the
    metadata written is returned.
    """
    digests = digest_entries(entries, ss_metadata)
    metadata = metadata_of(digests)
    check = output_checker(family, blocks, entries, digests, metadata, dest)
    write_safetensors(dest, entries, metadata, check=check)
    return metadata


def output_checker(
    family: Family,
    blocks: list[str],
    entries: list[TensorEntry],
    digests: Digests,
    metadata: dict[str, str],
    dest: Path,
) -> Callable[[Path], None]:
    """Re-read the written temp file and compare it with the plan before it replaces ``dest``.

    The data section's SHA-256 and every tensor's place in it are compared, which
    proves each tensor byte-identical to what ``entries`` gave with one hash
    pass; the file must parse as a LoRA of ``family`` holding exactly ``blocks``.
    """
    _, layout = build_header(entries, None)
    expected: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    offset = 0
    for entry, nbytes in layout:
        expected[entry.name] = (entry.dtype, entry.shape, offset, offset + nbytes)
        offset += nbytes

    def check(tmp: Path) -> None:
        header = read_header(tmp)
        got = {
            n: (t.dtype, t.shape, t.begin - header.data_offset, t.end - header.data_offset)
            for n, t in header.tensors.items()
        }
        if got != expected:
            raise OutputError(
                "the written file lists other tensors than planned", dest, "report this bug"
            )
        if header.metadata != metadata:
            raise OutputError(
                "the written metadata differs from what was planned", dest, "report this bug"
            )
        digest = hashlib.sha256()
        with open(tmp, "rb") as f:
            f.seek(header.data_offset)
            while chunk := f.read(1 << 20):
                digest.update(chunk)
        if digest.hexdigest() != digests.data_sha256:
            raise OutputError(
                "the written data does not read back identical", dest, "check the disk and retry"
            )
        modules = parse_lora_header(header, allow_unknown=OTHER in blocks, family=family).modules
        if sort_blocks(m.block for m in modules.values()) != blocks:
            raise OutputError(
                "the written file holds other blocks than planned", dest, "report this bug"
            )

    return check


def slim_lora(
    source: str | Path | LoraFile,
    keep: Iterable[str] | BlockSpec | None = None,
    *,
    drop: Iterable[str] | BlockSpec | None = None,
    output: str | Path | None = None,
    force: bool = False,
    extra_metadata: Mapping[str, str] | None = None,
    allow_unknown: bool = False,
    source_sha256: str | None = None,
) -> SlimResult:
    """Write a LoRA keeping only the blocks in ``keep`` (or all but ``drop``).

    Every kept tensor is byte-identical to the input; the output is written to a
    temp file, re-read and checked, then renamed into place. Keys of block
    ``other`` (with ``allow_unknown``) are kept only when ``other`` is kept.

    Args:
        source: the full LoRA, as a path or a :class:`~lora_prune.lora.LoraFile`.
        keep: block ids (or a :class:`~lora_prune.blocks.BlockSpec`) to keep; or None
            with ``drop``.
        drop: block ids or spec to drop (everything else is kept).
        output: where to write; None is ``<stem>.slim.safetensors`` beside the source.
        force: replace an existing output (never the source itself).
        extra_metadata: more ``__metadata__`` entries (e.g. a verification record).
        allow_unknown: as for :func:`~lora_prune.lora.read_lora`.
        source_sha256: the source file's sha256 when this command hashed it
            already (``slim --auto`` does, for its cache keys); None hashes it.

    Example::

        result = slim_lora("my_lora.safetensors", ["double.7", "single.20"],
                           output="small.safetensors")
        print(result.kept_blocks, result.output)
    """
    lora = open_source(source, allow_unknown)
    keep_set = _resolve_keep(lora, keep, drop)
    check_block_ids(keep_set, "--keep", lora.family.blocks)
    check_pinned_kept(lora, keep_set)
    plan = plan_slim(lora, keep_set)
    if not plan.kept:
        raise UsageError(
            "the keep set leaves no tensors",
            lora.path,
            f"the LoRA has blocks {format_block_spec(lora.blocks)}; keep at least one",
        )
    out_path = Path(output) if output is not None else default_output(lora.path)
    check_output_path(lora.path, out_path, force=force)

    source_sha = file_sha256(lora.path) if source_sha256 is None else source_sha256
    with SafetensorsReader(lora.path, lora.header) as reader:
        infos = sorted(plan.kept_tensors, key=lambda t: t.begin)
        entries = [
            TensorEntry(t.name, t.dtype, t.shape, functools.partial(reader.read_bytes, t.name))
            for t in infos
        ]
        ss_meta = {k: v for k, v in lora.metadata.items() if k.startswith("ss_")}
        metadata = write_checked(
            out_path,
            lora.family,
            plan.kept_blocks,
            entries,
            ss_meta,
            lambda digests: build_metadata(lora, plan, source_sha, digests, extra_metadata),
        )
    return SlimResult(
        source=lora.path,
        output=out_path,
        kept_blocks=plan.kept_blocks,
        dropped_blocks=plan.dropped_blocks,
        absent=plan.absent,
        bytes_before=lora.header.file_size,
        bytes_after=out_path.stat().st_size,
        tensors_before=len(lora.header.tensors),
        tensors_after=len(entries),
        metadata=metadata,
    )
