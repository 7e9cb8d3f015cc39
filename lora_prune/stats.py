"""Render-free statistics of a LoRA: sizes per block and weight-space influence.

The influence of a module is ``||scale * dW||_F`` where dW is its weight delta
(plus its bias delta, if any), computed by each adapter type's own math and
never by forming a full ``B @ A`` for low-rank factors: ``||B A||_F^2`` equals
``sum((B^T B) * (A A^T))`` over r x r Gram matrices. Tensors are read one module
at a time, so memory stays near the largest tensor.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .adapters import LOW_RANK_ADAPTERS, alpha_problem, factor_problem
from .blocks import block_order
from .errors import CorruptFileError
from .lora import LoraFile, LoraModule
from .provenance import KEPT_BLOCKS_KEY, SOURCE_SHA_KEY, VERIFICATION_KEY
from .safetensors_io import SafetensorsReader

#: Metadata keys shown in the inspect summary, in this order, when present.
SUMMARY_METADATA_KEYS = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
    "ss_base_model_version",
    "modelspec.architecture",
    "modelspec.title",
    "modelspec.trigger_phrase",
    KEPT_BLOCKS_KEY,
    SOURCE_SHA_KEY,
    VERIFICATION_KEY,
)


def _gram_norm_sq(up: np.ndarray, down: np.ndarray) -> float:
    """``||up @ down||_F^2`` through the smallest of its three dimensions.

    For rank r below both sides this uses r x r Gram matrices:
    ``sum((up^T up) * (down down^T))``. The Grams are the whole cost of ``inspect``
    (r x parameters multiply-adds), so they are taken in the factors' own float32,
    where BLAS runs twice as fast and no float64 copy of each factor is made; only
    the r x r results are widened. The relative error stays below 1e-6, far below
    what a preview needs. Values so large that float32 overflows are redone in
    float64. A rank above a side (a hostile 61 KB file can declare rank 30,720)
    would make the Grams far bigger than the factors: then the product itself is
    formed, in row chunks, and no array is larger than the factors.
    """
    u = up.reshape(up.shape[0], -1)
    d = down.reshape(down.shape[0], -1)
    rows, rank, cols = u.shape[0], u.shape[1], d.shape[1]
    if rank > min(rows, cols):
        return _product_norm_sq(
            lambda lo, hi: u[lo:hi].astype(np.float64) @ d.astype(np.float64), rows, cols
        )
    # NaN/Inf weights are check's to report; here they only make the norm NaN.
    with np.errstate(invalid="ignore", over="ignore"):
        gram_up = np.dot(u.T, u).astype(np.float64)
        gram_down = np.dot(d, d.T).astype(np.float64)
        if not (np.isfinite(gram_up).all() and np.isfinite(gram_down).all()):
            u64, d64 = u.astype(np.float64), d.astype(np.float64)
            gram_up, gram_down = u64.T @ u64, d64 @ d64.T
        return float(np.sum(gram_up * gram_down))


#: Elements of one row chunk of a product formed by _product_norm_sq (32 MiB of float64).
_CHUNK_ELEMENTS = 1 << 22


def _product_norm_sq(rows_of: Callable[[int, int], np.ndarray], rows: int, cols: int) -> float:
    """Sum of squares of a rows x cols product given by ``rows_of(lo, hi)``, chunk by chunk."""
    step = max(1, _CHUNK_ELEMENTS // max(cols, 1))
    total = 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        for lo in range(0, rows, step):
            block = rows_of(lo, min(rows, lo + step))
            total += float(np.sum(block * block))
    return total


def _khatri_rao_rows(a: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Row-wise Khatri-Rao product: row i is kron(a[i], c[i])."""
    out: np.ndarray = (a[:, :, None] * c[:, None, :]).reshape(a.shape[0], -1)
    return out


def _loha_norm_sq(w1a: np.ndarray, w1b: np.ndarray, w2a: np.ndarray, w2b: np.ndarray) -> float:
    """``||(w1a w1b) * (w2a w2b)||_F^2`` for LoHa's Hadamard product.

    (w1a w1b) * (w2a w2b) = U V with U = rowwise-kron(w1a, w2a) and
    V = columnwise-kron(w1b, w2b): a low-rank product of rank r1*r2. When r1*r2
    exceeds a side, U and V would outgrow the factors (and the file) by far, so
    the Hadamard product is formed in row chunks instead.
    """
    b1 = w1b.reshape(w1b.shape[0], -1).astype(np.float64)
    b2 = w2b.reshape(w2b.shape[0], -1).astype(np.float64)
    a1, a2 = w1a.astype(np.float64), w2a.astype(np.float64)
    rows, cols = a1.shape[0], b1.shape[1]
    if a1.shape[1] * a2.shape[1] > min(rows, cols):
        return _product_norm_sq(lambda lo, hi: (a1[lo:hi] @ b1) * (a2[lo:hi] @ b2), rows, cols)
    u = _khatri_rao_rows(a1, a2)
    v = _khatri_rao_rows(b1.T, b2.T).T
    return _gram_norm_sq(u, v)


def _factor_norm_sq(reader: SafetensorsReader, module: LoraModule, name: str) -> float:
    t = module.tensors
    if name in t:
        w = reader.read_array(t[name].name).astype(np.float64)
        return float(np.sum(w * w))
    a = reader.read_array(t[f"{name}_a"].name)
    b = reader.read_array(t[f"{name}_b"].name)
    return _gram_norm_sq(a, b)


def module_norm(reader: SafetensorsReader, module: LoraModule) -> float:
    """Frobenius norm of the module's scaled weight delta (and bias delta).

    Replacement tensors (``set_weight``) change weights to a value rather than by
    a delta; without the base model their change is unknown and counts as 0.
    """
    # Huge or non-finite weights are check's to report; here they only make the norm inf/NaN.
    with np.errstate(over="ignore", invalid="ignore"):
        return _module_norm(reader, module)


def _module_norm(reader: SafetensorsReader, module: LoraModule) -> float:
    problem = factor_problem(module) or alpha_problem(module)
    if problem is not None:
        # `lora-prune check` reports the same modules as findings; here the math cannot go on.
        raise CorruptFileError(
            f"module {module.stem!r}: {problem}",
            reader.path,
            "the LoRA is damaged: export it again (lora-prune check lists every such module)",
        )
    t = module.tensors
    adapter = module.adapter
    total = 0.0
    if adapter == "lora" and "down" in t and "up" in t:
        up = reader.read_array(t["up"].name)
        down = reader.read_array(t["down"].name)
        up = up.reshape(up.shape[0], -1)
        down = down.reshape(down.shape[0], -1)
        if "mid" in t:
            mid = reader.read_array(t["mid"].name)
            mid = mid.reshape(mid.shape[0], -1)
            # Fold mid into the side whose product is smaller: never larger than the factors.
            if up.shape[0] * mid.shape[1] <= mid.shape[0] * down.shape[1]:
                up = up @ mid
            else:
                down = mid @ down
        total += _gram_norm_sq(up, down)
    elif adapter == "loha":
        total += _loha_norm_sq(
            reader.read_array(t["hada_w1_a"].name),
            reader.read_array(t["hada_w1_b"].name),
            reader.read_array(t["hada_w2_a"].name),
            reader.read_array(t["hada_w2_b"].name),
        )
    elif adapter == "lokr":
        # ||kron(A, B)||_F = ||A||_F * ||B||_F
        total += _factor_norm_sq(reader, module, "lokr_w1") * _factor_norm_sq(
            reader, module, "lokr_w2"
        )
    for role in ("diff", "w_norm"):
        if role in t:
            w = reader.read_array(t[role].name).astype(np.float64)
            total += float(np.sum(w * w))
    scale_sq = module.scale * module.scale  # alpha_problem() keeps this finite
    total *= scale_sq
    # Bias deltas are added unscaled by ComfyUI (diff_b) and scaled by PEFT (lora_B.bias);
    # follow each.
    for role, scaled in (("up_bias", True), ("diff_b", False), ("b_norm", False)):
        if role in t:
            b = reader.read_array(t[role].name).astype(np.float64)
            total += float(np.sum(b * b)) * (scale_sq if scaled else 1.0)
    return float(np.sqrt(total))


def _finite(x: float) -> float | None:
    """JSON has no NaN/Infinity (NaN weights give a NaN norm): write null instead."""
    return x if math.isfinite(x) else None


@dataclass
class BlockStats:
    """One block's share of a LoRA: modules, tensors, parameters, bytes and weight-delta norm."""

    block: str
    modules: int
    tensors: int
    params: int
    bytes: int
    norm: float
    share_bytes: float = 0.0
    share_norm: float = 0.0


@dataclass
class LoraReport:
    """What ``inspect`` shows about a LoRA file."""

    path: str
    #: the model family the keys are for (``FLUX.1``)
    family: str
    format: str
    grammars: dict[str, int]
    file_bytes: int
    total_params: int
    total_bytes: int
    dtypes: dict[str, int]
    ranks: dict[int, int]
    alphas: dict[float, int]
    adapters: dict[str, int]
    text_encoders: list[str]
    metadata: dict[str, str]
    metadata_keys: int
    blocks: list[BlockStats] = field(default_factory=list)

    @property
    def total_norm(self) -> float:
        return sum(b.norm for b in self.blocks)

    def to_dict(self) -> dict[str, object]:
        return {
            "path": self.path,
            "family": self.family,
            "format": self.format,
            "grammars": self.grammars,
            "file_bytes": self.file_bytes,
            "total_params": self.total_params,
            "total_bytes": self.total_bytes,
            "total_norm": _finite(self.total_norm),
            "dtypes": self.dtypes,
            "ranks": {str(k): v for k, v in self.ranks.items()},
            "alphas": {repr(k): v for k, v in self.alphas.items()},
            "adapters": self.adapters,
            "text_encoders": self.text_encoders,
            "metadata": self.metadata,
            "metadata_keys": self.metadata_keys,
            "blocks": [
                {
                    "block": b.block,
                    "modules": b.modules,
                    "tensors": b.tensors,
                    "params": b.params,
                    "bytes": b.bytes,
                    "norm": _finite(b.norm),
                    "share_bytes": b.share_bytes,
                    "share_norm": _finite(b.share_norm),
                }
                for b in self.blocks
            ],
        }


SORT_KEYS = ("block", "size", "norm")


def block_stats(lora: LoraFile, *, with_norms: bool = True) -> list[BlockStats]:
    """Per-block sizes and influence, in model order."""
    if not with_norms:
        return _sum_blocks(lora, {})
    with SafetensorsReader(lora.path, lora.header) as reader:
        return _sum_blocks(lora, _module_norms(lora, reader))


def block_stats_and_sha256(lora: LoraFile) -> tuple[list[BlockStats], str]:
    """:func:`block_stats` and the file's SHA-256, from one read of the file's data.

    ``analyze`` needs both (the hash is part of every cache key, the norms go
    into the manifest); the modules are read in file order, so the hash comes
    from the same reads as the norms instead of a second pass over the file.
    """
    with SafetensorsReader(lora.path, lora.header, sha256=True) as reader:
        norms = _module_norms(lora, reader)
        return _sum_blocks(lora, norms), reader.sha256()


def _module_norms(lora: LoraFile, reader: SafetensorsReader) -> dict[str, float]:
    """Each module's norm (by its key in ``lora.modules``), its tensors read in the order they lie in the file."""
    modules = [(key, m) for key, m in lora.modules.items() if m.target is not None]
    modules.sort(key=lambda km: min((t.begin for t in km[1].tensors.values()), default=0))
    return {key: module_norm(reader, m) for key, m in modules}


def _sum_blocks(lora: LoraFile, norms: dict[str, float]) -> list[BlockStats]:
    by_block: dict[str, BlockStats] = {}
    # Summed in the modules' own order, so the norms do not depend on the read order.
    for key, module in lora.modules.items():
        stats = by_block.setdefault(module.block, BlockStats(module.block, 0, 0, 0, 0, 0.0))
        stats.modules += 1
        stats.tensors += len(module.tensors)
        stats.params += module.params
        stats.bytes += module.nbytes
        if key in norms:
            stats.norm += norms[key]
    out = sorted(by_block.values(), key=lambda b: block_order(b.block))
    total_bytes = sum(b.bytes for b in out) or 1
    total_norm = sum(b.norm for b in out)
    for b in out:
        b.share_bytes = b.bytes / total_bytes
        b.share_norm = b.norm / total_norm if total_norm > 0 else 0.0
    return out


def inspect_lora(lora: LoraFile, *, sort: str = SORT_KEYS[0]) -> LoraReport:
    """Summarise a LoRA: format, dtypes, ranks, alphas, metadata and per-block stats.

    Args:
        lora: a file from :func:`~lora_prune.lora.read_lora`; its tensors are
            read one at a time for the per-block norms.
        sort: order of ``blocks``: ``"block"`` (model order), ``"size"`` or
            ``"norm"`` (largest first).

    Example::

        report = inspect_lora(read_lora("my_lora.safetensors"), sort="norm")
        print([(b.block, b.norm) for b in report.blocks[:5]])
    """
    if sort not in SORT_KEYS:
        raise ValueError(f"sort must be one of {SORT_KEYS}")
    tensors = lora.header.tensors.values()
    dtypes = Counter(t.dtype for t in tensors)
    ranks: Counter[int] = Counter()
    alphas: Counter[float] = Counter()
    adapters: Counter[str] = Counter()
    for module in lora.modules.values():
        adapters[module.adapter] += 1
        if module.rank is not None and module.adapter in LOW_RANK_ADAPTERS:
            ranks[module.rank] += 1
        if module.alpha is not None:
            alphas[module.alpha] += 1
    blocks = block_stats(lora)
    if sort == "size":
        blocks.sort(key=lambda b: (-b.bytes, block_order(b.block)))
    elif sort == "norm":
        blocks.sort(key=lambda b: (-b.norm, block_order(b.block)))
    meta = lora.metadata
    return LoraReport(
        path=str(lora.path),
        family=lora.family.display,
        format=lora.format,
        grammars=dict(lora.grammars),
        file_bytes=lora.header.file_size,
        total_params=lora.total_params,
        total_bytes=lora.total_bytes,
        dtypes=dict(dtypes),
        ranks=dict(sorted(ranks.items())),
        alphas=dict(sorted(alphas.items())),
        adapters=dict(adapters),
        text_encoders=[b for b in lora.family.blocks.text_encoders if b in lora.blocks],
        metadata={k: meta[k] for k in SUMMARY_METADATA_KEYS if k in meta},
        metadata_keys=len(meta),
        blocks=blocks,
    )
