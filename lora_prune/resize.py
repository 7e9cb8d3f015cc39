"""Lower the rank of a LoRA's modules by the exact SVD of each low-rank product.

:func:`resize_lora` writes, per plain LoRA module (``up [out, r]``, ``down [r, in]``,
optional alpha; modules on fused projections are such modules too), the best rank-k
approximation of ``scale * up @ down`` (Eckart-Young), with k a fixed rank or
the smallest rank that keeps a share of the Frobenius energy (the sum of
squared singular values). The SVD is computed from the factors alone, never
from the ``out x in`` product: an orthonormal basis of each factor from its
``r x r`` Gram matrix, then the SVD of the small ``r x r`` core ``R_up @ R_down.T``
(see :func:`factor_svd`).

The new factors are split evenly, ``up = Q_up U_k sqrt(S_k)`` and ``down =
sqrt(S_k) V_k^T Q_down^T``, and hold the product *without* its scale: alpha is
rewritten to ``scale * k`` so that ``alpha / rank`` stays what it was (the
factors also absorb the rounding of alpha to its stored dtype, so the scale
is exact). Keys, dtypes and every tensor not resized stay byte-identical;
modules that are not plain low-rank (LoHa, LoKr, full diffs, DoRA, Tucker
LoCon, bias or norm deltas) are kept as they are and named in the result.
Torch-free: numpy only, one module in memory at a time.

About 680 lines: the SVD, rank choice, alpha rewriting in every stored dtype,
PEFT rank/alpha patterns, kohya metadata and the per-module spectra of
``slim --max-size`` are one rewrite of the same modules; the writing itself
is slim's (:func:`~lora_prune.slim.write_checked`).
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from .adapters import UNRENDERABLE_ROLES, alpha_problem, factor_problem
from .blocks import (
    BlockLayout,
    BlockSpec,
    format_block_spec,
    parse_block_spec,
    resolve_blocks,
    sort_blocks,
)
from .errors import UnsupportedAdapterError, UsageError
from .lora import LoraFile, LoraModule
from .markers import check_pinned_kept
from .provenance import (
    RESIZED_RANKS_KEY,
    SOURCE_NAME_KEY,
    SOURCE_SHA_KEY,
    VERIFICATION_KEY,
)
from .safetensors_io import (
    DTYPE_ITEMSIZE,
    ENCODABLE_DTYPES,
    SafetensorsReader,
    TensorEntry,
    build_header,
    decode_array,
    encode_array,
    file_sha256,
)
from .settings import check_number
from .slim import (
    Digests,
    adapter_config,
    check_block_ids,
    check_output_path,
    default_output,
    open_source,
    refreshed_metadata,
    write_checked,
)

__all__ = [
    "ModuleResize",
    "ModuleSpectrum",
    "ResizeResult",
    "factor_svd",
    "is_rank",
    "module_spectra",
    "resize_lora",
    "resized_ranks",
    "resized_size",
    "rotated_factors",
    "why_kept",
]

Array = npt.NDArray[np.float64]

#: Roles a plain LoRA module may have; anything else keeps the module as it is.
_PLAIN_ROLES = frozenset({"down", "up", "alpha", "up_bias"})
_INT_DTYPES = {"I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1", "U8": "u1"}
#: Inherited keys that describe the input's bytes, not the resized file's:
#: a slim's source (``check`` would prove the resized tensors part of it) and
#: its verification record (it proved other tensors).
_STALE_KEYS = (SOURCE_SHA_KEY, SOURCE_NAME_KEY, VERIFICATION_KEY)
#: kohya's resize_lora.py writes this for ss_network_dim/alpha when ranks differ per module.
_DYNAMIC = "Dynamic"


@dataclass(frozen=True)
class ModuleResize:
    """One plain LoRA module's rank before and after, and the share of its energy kept."""

    stem: str
    block: str
    rank_before: int
    rank_after: int
    #: sum of the kept squared singular values over all of them (1.0 when unchanged)
    energy_kept: float

    @property
    def changed(self) -> bool:
        return self.rank_after != self.rank_before


@dataclass
class ResizeResult:
    """What :func:`resize_lora` wrote: per-module ranks, the modules kept as they were, sizes."""

    source: Path
    output: Path
    #: every plain LoRA module of the chosen blocks, in file order
    modules: list[ModuleResize]
    #: stem -> why it was kept as it is (not a plain low-rank module)
    kept_as_is: dict[str, str]
    bytes_before: int
    bytes_after: int
    metadata: dict[str, str] = field(default_factory=dict)
    #: the entries of ``block_ranks`` that name none of the LoRA's blocks (they changed nothing)
    unmatched: tuple[str, ...] = ()

    @property
    def resized(self) -> list[ModuleResize]:
        return [m for m in self.modules if m.changed]


@dataclass(frozen=True)
class BlockRanks:
    """Ranks per block, as ``resize --ranks`` gives them: ``SPEC=RANK`` entries, in order.

    A SPEC is a block spec as ``slim --keep`` takes it, so it may hold commas itself
    (``double.0-2,double.7=32``: the parts before an ``=`` belong to its SPEC); a
    later entry overrides an earlier one.
    """

    #: (spec as written, rank); the specs are read against the LoRA's family (:meth:`resolve`)
    entries: tuple[tuple[str, int], ...]
    option: str = "--ranks"

    @classmethod
    def parse(cls, text: str, option: str = "--ranks") -> BlockRanks:
        entries: list[tuple[str, int]] = []
        parts: list[str] = []
        example = f"e.g. {option} double.0-7=32,single=8,input=16"
        for piece in text.split(","):
            head, eq, number = piece.partition("=")
            parts.append(head)
            if not eq:
                continue
            spec = ",".join(parts).strip()
            parts = []
            digits = number.strip()
            if not digits.isascii() or not digits.isdigit() or not is_rank(int(digits)):
                raise UsageError(
                    f"the rank {digits!r} of {spec!r} is not an integer >= 1", option, example
                )
            if not spec.strip(" ,"):
                raise UsageError("empty block spec", option, f"write SPEC=RANK, {example}")
            entries.append((spec, int(digits)))
        rest = ",".join(parts).strip()
        if rest or not entries:
            what = f"{rest!r} has no rank" if rest else f"{option} names no block"
            raise UsageError(what, option, f"write SPEC=RANK, {example}")
        return cls(tuple(entries), option)

    def resolve(self, layout: BlockLayout) -> list[tuple[str, frozenset[str], int]]:
        """(spec, its block ids in ``layout``, rank) per entry; a bad spec is a usage error."""
        out = []
        for spec, rank in self.entries:
            try:
                blocks = parse_block_spec(spec, layout)
            except UsageError as exc:
                raise UsageError(exc.what, self.option, exc.fix) from exc
            out.append((spec, blocks, rank))
        return out

    def mapping(self, lora: LoraFile, default: int | None = None) -> dict[str, int]:
        """Block id -> rank: ``default`` for the LoRA's blocks no entry names (None: as stored)."""
        ranks = dict.fromkeys(lora.blocks, default) if default is not None else {}
        for _, blocks, k in self.resolve(lora.family.blocks):
            ranks.update(dict.fromkeys(blocks, k))
        return ranks

    def unmatched(self, lora: LoraFile) -> tuple[str, ...]:
        """The entries' specs that name none of ``lora``'s blocks."""
        have = set(lora.blocks)
        return tuple(s for s, blocks, _ in self.resolve(lora.family.blocks) if not blocks & have)


def factor_svd(up: Array, down: Array) -> tuple[Array, Array, Array, Array, Array]:
    """The SVD of ``up @ down`` from its factors: ``(q_up, u, s, vt, q_down)``.

    ``up @ down == q_up @ u @ diag(s) @ vt @ q_down.T`` with ``q_up``, ``q_down``
    orthonormal columns and ``u, s, vt`` the SVD of the core ``r_up @ r_down.T``,
    at most ``r x r``. No array larger than the factors and that core is formed.
    """
    q_up, r_up = _basis(up)
    q_down, r_down = _basis(down.T)
    u, s, vt = np.linalg.svd(r_up @ r_down.T, full_matrices=False)
    # Empty directions were dropped from the bases: pad with zero singular values
    # back to the stored rank, so that a rank at or above it keeps the module as it is.
    pad = up.shape[1] - s.shape[0]
    if pad > 0:
        s = np.concatenate([s, np.zeros(pad)])
        u = np.pad(u, ((0, 0), (0, pad)))
        vt = np.pad(vt, ((0, pad), (0, 0)))
    return q_up, u, s, vt, q_down


def rotated_factors(up: Array, down: Array) -> tuple[Array, Array, Array]:
    """``(up', down', s)``: the same product ``up' @ down' == up @ down``, in its SVD basis.

    Column i of ``up'`` and row i of ``down'`` carry singular value ``s[i]``
    (descending), split evenly as ``sqrt(s)`` on each side, so the first k
    columns and rows are the best rank-k approximation (Eckart-Young): the
    factors :func:`resize_lora` writes, and what the render engine truncates
    per image to render rank candidates without writing them.
    """
    q_up, u, s, vt, q_down = factor_svd(up, down)
    root = np.sqrt(s)
    return (q_up @ u) * root, (root[:, None] * vt) @ q_down.T, s


#: Directions of a factor whose squared singular value is below this share of
#: the largest carry no representable energy (float64 Gram matrices): dropped.
_GRAM_RTOL = 1e-12


def _basis(a: Array) -> tuple[Array, Array]:
    """``a == q @ r`` with ``q`` orthonormal columns, from the ``r x r`` Gram matrix.

    An eigendecomposition of ``a.T @ a`` instead of a QR of ``a``: the same
    factorisation for every direction that carries energy, ~13x faster on a
    FLUX.1 factor of its largest layer, rank 64 (12 ms against 160 ms), since the
    only pass over ``a`` is two matrix products. Rank-deficient factors (the
    planted ranks of a padded LoRA) lose their empty directions.
    """
    lam, w = np.linalg.eigh(a.T @ a)
    keep = lam > max(float(lam.max(initial=0.0)), 0.0) * _GRAM_RTOL
    lam, w = lam[keep], w[:, keep]
    root = np.sqrt(lam)
    return a @ (w / root), (w * root).T


def choose_rank(s: Array, *, rank: int | None, energy: float | None) -> tuple[int, float]:
    """(k, share of the energy kept): ``rank`` capped at len(s), or the smallest k keeping ``energy``."""
    power = np.square(s)
    cumulative = np.cumsum(power)
    total = float(cumulative[-1]) if len(s) else 0.0
    if rank is not None:
        k = min(rank, len(s))
    elif total == 0.0:
        k = 1  # a zero delta: keep one (zero) component, a factor cannot be empty
    else:
        assert energy is not None
        k = min(int(np.searchsorted(cumulative, energy * total, side="left")) + 1, len(s))
    kept = float(cumulative[k - 1]) / total if total > 0 else 1.0
    return k, min(kept, 1.0)


def why_kept(module: LoraModule) -> str | None:
    """Why the module is not resized, or None for a plain LoRA module resize can rewrite."""
    adapter = module.adapter
    if adapter != "lora":
        return f"{adapter} adapter" if adapter != "full" else "full weight delta"
    roles = set(module.tensors)
    if not {"down", "up"} <= roles:
        return "bias delta only" if "up_bias" in roles else "a factor is missing"
    extra = sorted(roles - _PLAIN_ROLES)
    if extra:
        return ", ".join(UNRENDERABLE_ROLES.get(r, r) for r in extra)
    problem = factor_problem(module) or alpha_problem(module)
    if problem:
        return problem
    for role in ("down", "up"):
        dtype = module.tensors[role].dtype
        if dtype not in (*ENCODABLE_DTYPES, "F64"):
            return f"{role} is {dtype}, not a float dtype resize writes"
    alpha = module.tensors.get("alpha")
    if alpha is not None and alpha.dtype not in (*ENCODABLE_DTYPES, "F64", *_INT_DTYPES):
        return f"alpha is {alpha.dtype}"
    return None


def _module_rank(module: LoraModule, ranks: Mapping[str, int]) -> int | None:
    """The module's entry in a per-module/per-block rank mapping: its stem's, else its block's."""
    return ranks.get(module.stem, ranks.get(module.block))


def _rank_cap(module: LoraModule) -> int:
    """The most rank the module's product can have: its SVD has min(r, out, in) values."""
    up, down = module.tensors["up"].shape, module.tensors["down"].shape
    return min(down[0], up[0], math.prod(down[1:]))


def _new_rank(module: LoraModule, rank: int | Mapping[str, int] | None) -> int | None:
    """The rank ``resize --rank rank`` gives the module; None where it stays as it is."""
    if isinstance(rank, Mapping):
        rank = _module_rank(module, rank)
    if rank is None or why_kept(module) is not None:
        return None
    k = min(rank, _rank_cap(module))
    return k if k < module.tensors["down"].shape[0] else None


def resized_ranks(
    lora: LoraFile, keep: Iterable[str], rank: int | Mapping[str, int] | None
) -> dict[str, int]:
    """Stem -> new rank of every module of the blocks ``keep`` that ``resize --rank rank`` lowers.

    ``rank`` as for :func:`resized_size`; the modules left out keep their stored rank.
    """
    keep_set = set(keep)
    out: dict[str, int] = {}
    for module in lora.modules.values():
        k = _new_rank(module, rank) if module.block in keep_set else None
        if k is not None:
            out[module.stem] = k
    return out


def resized_size(lora: LoraFile, keep: Iterable[str], rank: int | Mapping[str, int] | None) -> int:
    """Bytes of the tensors and header of ``resize --rank rank`` keeping the blocks ``keep``.

    Computed from the module shapes, without reading or rendering anything
    (``rank`` None: the blocks at their stored rank, as ``slim`` writes them; a
    mapping: per module stem or block id, as :func:`resize_lora`'s ``ranks``).
    Metadata added on writing (provenance, a verification record) is not counted.
    """
    keep_set = set(keep)
    entries: list[TensorEntry] = []
    for module in lora.modules.values():
        if module.block not in keep_set:
            continue
        k = _new_rank(module, rank)
        for role, info in module.tensors.items():
            shape = info.shape
            if k is not None and role == "up":
                shape = (shape[0], k, *shape[2:])
            elif k is not None and role == "down":
                shape = (k, *shape[1:])
            entries.append(TensorEntry(info.name, info.dtype, shape, bytes))
    if not entries:
        return 0
    header, layout = build_header(entries, lora.metadata)
    return len(header) + sum(nbytes for _, nbytes in layout)


@dataclass(frozen=True)
class ModuleSpectrum:
    """A plain LoRA module's singular values and what each unit of rank costs in the file."""

    stem: str
    block: str
    #: squared singular values of ``scale * up @ down``, descending (len: the most rank it can have)
    energies: tuple[float, ...]
    #: bytes one more rank adds: a column of ``up`` and a row of ``down``
    bytes_per_rank: int


def module_spectra(lora: LoraFile, keep: Iterable[str]) -> dict[str, ModuleSpectrum]:
    """Per plain LoRA module of the blocks ``keep`` (stem -> spectrum), from :func:`factor_svd`.

    Reads one module's factors at a time; modules resize keeps as they are are left out.
    """
    keep_set = set(keep)
    out: dict[str, ModuleSpectrum] = {}
    with SafetensorsReader(lora.path, lora.header) as reader:
        for module in lora.modules.values():
            if module.block not in keep_set or why_kept(module) is not None:
                continue
            up, down = _factors(module, reader)
            s = factor_svd(up, down)[2] * abs(module.scale)
            up_info, down_info = module.tensors["up"], module.tensors["down"]
            per_rank = up_info.shape[0] * DTYPE_ITEMSIZE[up_info.dtype]
            per_rank += math.prod(down_info.shape[1:]) * DTYPE_ITEMSIZE[down_info.dtype]
            energies = tuple(float(x) for x in np.square(s))
            out[module.stem] = ModuleSpectrum(module.stem, module.block, energies, per_rank)
    return out


def _factors(module: LoraModule, reader: SafetensorsReader) -> tuple[Array, Array]:
    """The module's ``up [out, r]`` and ``down [r, in]`` as float64 matrices."""
    up_info, down_info = module.tensors["up"], module.tensors["down"]
    r = down_info.shape[0]
    up = reader.read_array(up_info.name).astype(np.float64).reshape(up_info.shape[0], r)
    down = reader.read_array(down_info.name).astype(np.float64).reshape(r, -1)
    return up, down


def _encode(values: npt.ArrayLike, dtype: str) -> bytes:
    if dtype == "F64":
        return np.asarray(values, dtype="<f8").tobytes()
    if dtype in _INT_DTYPES:
        return np.asarray(values, dtype=_INT_DTYPES[dtype]).tobytes()
    return encode_array(values, dtype)


def _stored_alpha(target: float, dtype: str, shape: tuple[int, ...]) -> tuple[bytes, float] | None:
    """``target`` as the alpha tensor stores it, and the value read back; None if it rounds to 0."""
    value: float = float(round(target)) if dtype in _INT_DTYPES else target
    raw = _encode(np.full(shape, value), dtype)
    stored = float(decode_array(raw, dtype, shape).reshape(-1)[0])
    return (raw, stored) if stored != 0.0 and math.isfinite(stored) else None


@dataclass
class _Rewrite:
    """New tensors of one module, spooled: role -> (key, dtype, shape, offset, nbytes)."""

    tensors: dict[str, tuple[str, str, tuple[int, ...], int, int]]
    alpha: float | None


class _Spool:
    """New tensor bytes parked in an anonymous temp file until the writer streams them.

    The output's header (shapes) and hashes must be known before its data is
    written, and the ranks only after each module's SVD: the spool keeps one
    module in memory at a time instead of the whole resized file.
    """

    def __init__(self, folder: Path) -> None:
        # Beside the output (not /tmp, often RAM); deleted by the OS when closed.
        self.file: IO[bytes] = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115 - closed by __exit__
        self.size = 0

    def __enter__(self) -> _Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.file.close()

    def put(self, data: bytes) -> tuple[int, int]:
        self.file.seek(self.size)
        self.file.write(data)
        start, self.size = self.size, self.size + len(data)
        return start, len(data)

    def get(self, start: int, nbytes: int) -> bytes:
        self.file.seek(start)
        return self.file.read(nbytes)


def _resize_module(
    module: LoraModule,
    reader: SafetensorsReader,
    spool: _Spool,
    *,
    rank: int | None,
    energy: float | None,
) -> tuple[ModuleResize, _Rewrite | None]:
    """The module's new rank, and its rewritten tensors (None when it stays as it is)."""
    up_info, down_info = module.tensors["up"], module.tensors["down"]
    r = down_info.shape[0]
    up, down = _factors(module, reader)
    rotated_up, rotated_down, s = rotated_factors(up, down)
    k, kept = choose_rank(s, rank=rank, energy=energy)
    # Past min(r, out, in) the singular values are padding zeros: no bytes for them.
    k = min(k, _rank_cap(module))
    same = ModuleResize(module.stem, module.block, r, r, 1.0)
    if k >= r:
        return same, None
    tensors: dict[str, tuple[str, str, tuple[int, ...], int, int]] = {}
    absorb = 1.0
    new_alpha: float | None = None
    alpha_info = module.tensors.get("alpha")
    if alpha_info is not None:
        stored = _stored_alpha(module.scale * k, alpha_info.dtype, alpha_info.shape)
        if stored is None:  # an integer alpha that rounds to 0 cannot keep the scale
            return same, None
        raw, new_alpha = stored
        # The stored alpha is the target rounded to its dtype: the factors carry the rest.
        absorb = module.scale * k / new_alpha
        start, n = spool.put(raw)
        tensors["alpha"] = (alpha_info.name, alpha_info.dtype, alpha_info.shape, start, n)
    root = math.sqrt(absorb)
    new_up = rotated_up[:, :k] * root
    new_down = rotated_down[:k] * root
    for role, values, info in (("up", new_up, up_info), ("down", new_down, down_info)):
        shape = (info.shape[0], k, *info.shape[2:]) if role == "up" else (k, *info.shape[1:])
        start, n = spool.put(_encode(values.reshape(shape), info.dtype))
        tensors[role] = (info.name, info.dtype, shape, start, n)
    return ModuleResize(module.stem, module.block, r, k, kept), _Rewrite(tensors, new_alpha)


def _number(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def _kohya_dims(meta: dict[str, str], ranks: list[int], alphas: list[float | None]) -> None:
    """ss_network_dim/alpha as kohya's resize_lora.py writes them: the value, or "Dynamic"."""
    if "ss_network_dim" in meta and ranks:
        meta["ss_network_dim"] = str(ranks[0]) if len(set(ranks)) == 1 else _DYNAMIC
    if "ss_network_alpha" in meta and alphas and None not in alphas:
        values = {a for a in alphas if a is not None}
        meta["ss_network_alpha"] = _number(values.pop()) if len(values) == 1 else _DYNAMIC


def _repattern(raw: str, changes: dict[str, tuple[int, float]]) -> str:
    """diffusers' ``lora_adapter_metadata`` with per-module rank/alpha patterns for ``changes``.

    diffusers builds PEFT layers of the configured rank, so a resized module needs
    its own ``rank_pattern`` entry (and ``alpha_pattern``, so that the scale stays);
    PEFT takes the first matching pattern, so these go first.
    """
    config = adapter_config(raw)
    if config is None:
        return raw
    for name in ("rank_pattern", "alpha_pattern"):
        key = f"transformer.{name}" if "transformer.r" in config else name
        old = config.get(key)
        old_items = old if isinstance(old, dict) else {}
        index = 0 if name == "rank_pattern" else 1
        new = {module: value[index] for module, value in changes.items()}
        config[key] = {**new, **{k: v for k, v in old_items.items() if k not in new}}
    return json.dumps(config, sort_keys=True)


def _peft_changes(lora: LoraFile, ranks: dict[str, int]) -> dict[str, tuple[int, float]]:
    """For modules whose alpha comes from the PEFT metadata: name -> (new rank, new alpha)."""
    config = lora.peft_config or {}
    rslora = config.get("transformer.use_rslora", config.get("use_rslora")) is True
    out: dict[str, tuple[int, float]] = {}
    for stem, k in ranks.items():
        module = lora.modules[stem]
        if "alpha" in module.tensors or module.alpha is None or module.target is None:
            continue
        if module.target.model != "transformer":
            continue
        alpha = module.scale * (math.sqrt(k) if rslora else k)
        out[module.target.name] = (k, alpha)
    return out


def _check_request(rank: int | None, energy: float | None, ranks: Mapping[str, int] | None) -> None:
    if sum(x is not None for x in (rank, energy, ranks)) != 1:
        raise UsageError(
            "give --rank and/or --ranks, or --energy", None, "see lora-prune resize --help"
        )
    if rank is not None and not is_rank(rank):
        raise UsageError(f"--rank {rank} is not an integer >= 1", "--rank", "use e.g. --rank 16")
    for name, k in (ranks or {}).items():
        if not is_rank(k):
            raise UsageError(f"the rank {k!r} is not an integer >= 1", name, "give ranks >= 1")
    if energy is not None:
        check_number(energy, "--energy", 0.0, 1.0, fix="use e.g. --energy 0.95", lo_open=True)


def is_rank(k: object) -> bool:
    """Whether ``k`` is a rank a module can have: an integer >= 1 (not a bool)."""
    return isinstance(k, int) and not isinstance(k, bool) and k >= 1


def resize_lora(
    source: str | Path | LoraFile,
    output: str | Path | None = None,
    *,
    rank: int | None = None,
    energy: float | None = None,
    ranks: Mapping[str, int] | None = None,
    block_ranks: BlockRanks | None = None,
    blocks: Iterable[str] | BlockSpec | None = None,
    keep: Iterable[str] | None = None,
    force: bool = False,
    allow_unknown: bool = False,
    extra_metadata: Mapping[str, str] | None = None,
    source_sha256: str | None = None,
    allow_unchanged: bool = False,
) -> ResizeResult:
    """Write a LoRA whose plain LoRA modules have a lower rank: exact SVD, truncated.

    Give exactly one of ``rank`` (a fixed rank; modules at or below it stay as
    they are), ``energy`` (per module, the smallest rank keeping that share
    of the product's squared Frobenius norm) and ``ranks`` (per module: its
    stem's entry, else its block's; modules in neither stay as they are). A module whose rank does not
    change is copied byte for byte; so are modules outside ``blocks`` and those
    that are not plain low-rank (named in :attr:`ResizeResult.kept_as_is`).
    The output is written to a temp file, re-read and checked, then renamed.

    Args:
        source: the LoRA, as a path or a :class:`~lora_prune.lora.LoraFile`.
        output: where to write; None is ``<stem>.resized.safetensors`` beside the source.
        rank: the new rank, an integer >= 1.
        energy: the share of each module's energy to keep, in (0, 1].
        ranks: module stem or block id -> rank, as ``slim --auto --max-size``
            allocates them (:func:`~lora_prune.budget.allocate_ranks`).
        block_ranks: ranks per block as ``--ranks`` gives them; ``rank`` is then the
            rank of the blocks it does not name (None: they stay as stored).
        blocks: block ids to resize (e.g. from :func:`~lora_prune.blocks.parse_block_spec`);
            None resizes every block.
        keep: block ids to keep, the others are left out as ``slim --keep`` does
            (``slim --auto --max-size`` slims and resizes in one pass, so that the
            provenance names the full file); None keeps every block.
        force: replace an existing output (never the source itself).
        allow_unknown: as for :func:`~lora_prune.lora.read_lora`.
        extra_metadata: more ``__metadata__`` entries (e.g. a verification record).
        source_sha256: the source file's sha256 when the caller hashed it already.
        allow_unchanged: write the (byte-identical) copy even when no module's rank
            changes; by default that is an error saying why (no plain module:
            :class:`~lora_prune.errors.UnsupportedAdapterError`; every rank at or below
            the one asked for: :class:`~lora_prune.errors.UsageError`) and nothing is written.

    Example::

        result = resize_lora("my_lora.safetensors", "r16.safetensors", rank=16)
        print(len(result.resized), result.bytes_after, result.kept_as_is)
    """
    if block_ranks is None:
        _check_request(rank, energy, ranks)
    elif energy is not None or ranks is not None:
        raise UsageError(
            "--ranks and --energy do not combine", "--ranks", "give --ranks with or without --rank"
        )
    elif rank is not None:
        _check_request(rank, None, None)
    lora = open_source(source, allow_unknown)
    unmatched: tuple[str, ...] = ()
    if block_ranks is not None:
        # --rank is the default of the blocks --ranks does not name.
        ranks, rank, unmatched = block_ranks.mapping(lora, rank), None, block_ranks.unmatched(lora)
    chosen = resolve_blocks(blocks, lora.family.blocks)
    if chosen is not None:
        check_block_ids(chosen, "--blocks", lora.family.blocks)
    kept = _kept_modules(lora, keep)
    out_path = Path(output) if output is not None else default_output(lora.path, ".resized")
    check_output_path(lora.path, out_path, force=force)

    source_sha = file_sha256(lora.path) if source_sha256 is None else source_sha256
    with SafetensorsReader(lora.path, lora.header) as reader, _Spool(out_path.parent) as spool:
        results, kept_as_is, rewrites = _resize_modules(
            kept, chosen, reader, spool, rank=ranks if ranks is not None else rank, energy=energy
        )
        if keep is None and not allow_unchanged:
            _refuse_nothing_to_do(lora, results, kept_as_is, rank, energy)
        entries = _entries(kept, reader, spool, rewrites)
        ss_meta = _ss_metadata(lora, kept, results, rewrites)
        settings = _settings_record(
            lora, kept, source_sha, rank=rank, energy=energy, ranks=ranks, chosen=chosen,
            slimmed=keep is not None,
        )  # fmt: skip
        metadata = write_checked(
            out_path,
            lora.family,
            sort_blocks({m.block for m in kept}),
            entries,
            ss_meta,
            lambda digests: {
                **_metadata(lora, kept, results, ss_meta, digests, settings),
                **(extra_metadata or {}),
            },
        )
    return ResizeResult(
        source=lora.path,
        output=out_path,
        modules=results,
        kept_as_is=kept_as_is,
        bytes_before=lora.header.file_size,
        bytes_after=out_path.stat().st_size,
        metadata=metadata,
        unmatched=unmatched,
    )


def _refuse_nothing_to_do(
    lora: LoraFile,
    results: list[ModuleResize],
    kept_as_is: Mapping[str, str],
    rank: int | None,
    energy: float | None,
) -> None:
    """A resize that would change no module writes no copy: it says why instead."""
    if any(m.changed for m in results):
        return
    if not results:
        raise UnsupportedAdapterError(
            f"nothing to resize: none of the {len(kept_as_is)} modules is a plain low-rank "
            "LoRA module (resize lowers the rank of up/down factor pairs)",
            lora.path,
            "slim drops whole blocks of any adapter type; LoHa/LoKr/full modules keep their size",
        )
    highest = max(m.rank_before for m in results)
    asked = (
        f"--rank {rank}" if rank is not None else "--energy" if energy is not None else "--ranks"
    )
    raise UsageError(
        f"nothing to resize: {asked} changes no module (the highest rank is {highest})",
        lora.path,
        f"give a rank below {highest}"
        if rank is not None
        else "ask for less energy or lower ranks",
    )


def _settings_record(
    lora: LoraFile,
    kept: list[LoraModule],
    source_sha: str,
    *,
    rank: int | None,
    energy: float | None,
    ranks: Mapping[str, int] | None,
    chosen: frozenset[str] | None,
    slimmed: bool,
) -> dict[str, Any]:
    """What the resize was asked to do, for the ``resized_ranks`` provenance record."""
    settings: dict[str, Any] = {
        "rank": rank,
        "energy": energy,
        "ranks": dict(sorted(ranks.items())) if ranks is not None else None,
        "blocks": format_block_spec(sort_blocks(chosen)) if chosen is not None else None,
        "source_sha256": source_sha,
        "source_name": lora.path.name,
    }
    if slimmed:
        settings["kept_blocks"] = format_block_spec(sort_blocks(m.block for m in kept))
    return settings


def _kept_modules(lora: LoraFile, keep: Iterable[str] | None) -> list[LoraModule]:
    """The modules of the blocks in ``keep`` (every module for None), in file order."""
    if keep is None:
        return list(lora.modules.values())
    keep_set = set(keep)
    check_block_ids(keep_set, "--keep", lora.family.blocks)
    check_pinned_kept(lora, keep_set)
    kept = [m for m in lora.modules.values() if m.block in keep_set]
    if not kept:
        raise UsageError(
            "the keep set leaves no tensors",
            lora.path,
            f"the LoRA has blocks {format_block_spec(lora.blocks)}; keep at least one",
        )
    return kept


def _resize_modules(
    modules: list[LoraModule],
    chosen: frozenset[str] | None,
    reader: SafetensorsReader,
    spool: _Spool,
    *,
    rank: int | Mapping[str, int] | None,
    energy: float | None,
) -> tuple[list[ModuleResize], dict[str, str], dict[str, _Rewrite]]:
    """Resize each chosen plain module into ``spool``; the others, with why, are kept as is."""
    results: list[ModuleResize] = []
    kept_as_is: dict[str, str] = {}
    rewrites: dict[str, _Rewrite] = {}
    for module in modules:
        if chosen is not None and module.block not in chosen:
            continue
        why = why_kept(module)
        if why is not None:
            kept_as_is[module.stem] = why
            continue
        k = _module_rank(module, rank) if isinstance(rank, Mapping) else rank
        if isinstance(rank, Mapping) and k is None:
            r = module.tensors["down"].shape[0]
            results.append(ModuleResize(module.stem, module.block, r, r, 1.0))
            continue
        done, rewrite = _resize_module(module, reader, spool, rank=k, energy=energy)
        results.append(done)
        if rewrite is not None:
            rewrites[module.stem] = rewrite
    return results, kept_as_is, rewrites


def _entries(
    modules: list[LoraModule],
    reader: SafetensorsReader,
    spool: _Spool,
    rewrites: dict[str, _Rewrite],
) -> list[TensorEntry]:
    """Every tensor of the kept modules, in the input's order: rewritten ones from the spool."""
    new: dict[str, tuple[str, tuple[int, ...], int, int]] = {
        key: (dtype, shape, start, n)
        for rewrite in rewrites.values()
        for key, dtype, shape, start, n in rewrite.tensors.values()
    }
    entries = []
    infos = [t for m in modules for t in m.tensors.values()]
    for info in sorted(infos, key=lambda t: t.begin):
        if info.name in new:
            dtype, shape, start, n = new[info.name]
            assert n == math.prod(shape) * DTYPE_ITEMSIZE[dtype]
            entries.append(
                TensorEntry(info.name, dtype, shape, functools.partial(spool.get, start, n))
            )
        else:
            read = functools.partial(reader.read_bytes, info.name)
            entries.append(TensorEntry(info.name, info.dtype, info.shape, read))
    return entries


def _ss_metadata(
    lora: LoraFile,
    kept: list[LoraModule],
    results: list[ModuleResize],
    rewrites: dict[str, _Rewrite],
) -> dict[str, str]:
    """The output's kohya ss_* metadata (which kohya's legacy hash covers)."""
    meta = {k: v for k, v in lora.metadata.items() if k.startswith("ss_")}
    new_rank = {m.stem: m.rank_after for m in results}
    ranked = [m for m in kept if m.rank]
    ranks = [new_rank.get(m.stem, m.rank or 0) for m in ranked]
    alphas = [rewrites[m.stem].alpha if m.stem in rewrites else m.alpha for m in ranked]
    _kohya_dims(meta, ranks, alphas)
    return meta


def _metadata(
    lora: LoraFile,
    kept: list[LoraModule],
    results: list[ModuleResize],
    ss_meta: dict[str, str],
    digests: Digests,
    settings: dict[str, Any],
) -> dict[str, str]:
    """The input's metadata, refreshed, with the resize's provenance."""
    meta = refreshed_metadata(lora, digests, kept, drop=_STALE_KEYS)
    meta.update(ss_meta)
    changed = {m.stem: m.rank_after for m in results if m.changed}
    peft = _peft_changes(lora, changed)
    if peft and "lora_adapter_metadata" in meta:
        meta["lora_adapter_metadata"] = _repattern(meta["lora_adapter_metadata"], peft)
    meta[RESIZED_RANKS_KEY] = json.dumps(
        {
            **settings,
            "modules": {m.stem: [m.rank_before, m.rank_after] for m in results if m.changed},
        },
        sort_keys=True,
    )
    return meta
