"""Planning ``slim --auto --max-size``: which keep sets and ranks fit a size budget.

The render-free half of the budget search (the rendering is
:func:`lora_prune.render.workflows.auto_slim`'s): candidate files are the top-k
blocks of the ranking at a uniform rank, sized from the module shapes by
:func:`lora_prune.resize.resized_size`. The fewest top-ranked blocks that pass
the verdict at full rank (``k_pass``, from the plain ``slim --auto`` scan) bound
the search: a lower rank keeps less of each block, so fewer blocks than that are
not tried at any rank; per rank the most blocks that fit are tried, the most
effect that rank can keep under the budget.

A uniform rank wastes bytes where a block's product has a lower true rank and
starves a block that needs all of its own, so a few more candidates give each
module its own rank (:func:`allocate_ranks`). The rule is a water-filling of
the Frobenius energy: keeping rank k of a module keeps its k largest squared
singular values (Eckart-Young), each worth ``w_b * s_i^2 / E_b`` where ``E_b``
is the total energy of the module's block and ``w_b`` the block's influence
(its MSE in the ranking), so a block's share counts by how much the block
matters, not by its factors' scale. Starting from rank 1 everywhere, one more
rank at a time goes to the module with the most value per byte it adds, until
the budget is spent or no step that fits gains anything (a singular value
below :data:`NEGLIGIBLE` of the module's largest is noise, its rank is not
worth bytes). Singular values decrease, so each module's gains do too and the
greedy choice is the best energy per byte there is at every size (up to the
last, indivisible step). Modules alike get the same rank: ties go to the lower
current rank. Allocations are planned for the keep sets of ``k_pass`` blocks
and of the uniform candidates, and left out when a uniform candidate keeps
every block and module at least at that rank (it cannot keep less).
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from .blocks import format_block_spec, sort_blocks
from .errors import BudgetError
from .lora import LoraFile
from .resize import ModuleSpectrum, resized_size
from .units import human_bytes

__all__ = [
    "NEGLIGIBLE",
    "BudgetCandidate",
    "allocate_ranks",
    "budget_error",
    "budget_ranks",
    "plan_budget",
    "record_reserve",
]

#: A squared singular value below this share of the module's largest is numerical noise.
NEGLIGIBLE = 1e-10
#: Per-block allocations rendered at most (besides the uniform ranks).
MAX_ALLOCATIONS = 3


@dataclass
class BudgetCandidate:
    """One file tried: the top-k blocks at a rank (None: as stored), its size and verdict."""

    blocks: list[str]
    rank: int | None
    bytes: int
    #: the smallest share of the effect kept over images and distances (None: not rendered)
    kept_share: float | None = None
    passed: bool | None = None
    #: a per-module allocation (stem -> rank; modules not named stay as stored), else None
    ranks: dict[str, int] | None = None
    #: block -> (lowest, highest) rank of its modules, for the label of an allocation
    block_ranks: dict[str, tuple[int, int]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        if self.ranks is not None:
            return f"{format_block_spec(self.blocks)} at ranks {self.rank_spec}"
        at = "full rank" if self.rank is None else f"rank {self.rank}"
        return f"{format_block_spec(self.blocks)} at {at}"

    @property
    def rank_spec(self) -> str:
        """The allocation per block, compact: ``double.3@16,single.7@4-8``."""
        parts = []
        for block in sort_blocks(self.block_ranks):
            lo, hi = self.block_ranks[block]
            parts.append(f"{block}@{lo}" if lo == hi else f"{block}@{lo}-{hi}")
        return ",".join(parts)


def record_reserve(lora: LoraFile, images: int, blocks: Iterable[str] | None = None) -> int:
    """Bytes to keep free for the metadata written with a resized file (provenance, verification).

    Generous on purpose: the per-module ranks of a resize name each module it keeps
    once (those of ``blocks``; None: every module), the verification record holds
    a few shares per image.
    """
    kept = None if blocks is None else set(blocks)
    stems = [m.stem for m in lora.modules.values() if kept is None or m.block in kept]
    return 2048 + 384 * images + sum(len(stem) + 16 for stem in stems)


def budget_ranks(lora: LoraFile) -> list[int]:
    """The uniform ranks to try, highest first: half the LoRA's rank, a quarter, ..., 1."""
    top = max((m.rank or 0 for m in lora.modules.values()), default=0)
    ranks: list[int] = []
    r = top // 2
    while r >= 1:
        ranks.append(r)
        r //= 2
    return ranks


def allocate_ranks(
    modules: Sequence[ModuleSpectrum], budget: int, weights: Mapping[str, float] | None = None
) -> dict[str, int] | None:
    """Per module a rank (stem -> rank >= 1) whose factors take at most ``budget`` bytes.

    The water-filling of the module docstring: the factor bytes are
    ``sum(rank * bytes_per_rank)``; ``weights`` is block -> influence (missing:
    1.0). None when even rank 1 everywhere does not fit. Pure: no file is read.
    """
    left = budget - sum(m.bytes_per_rank for m in modules)
    if left < 0:
        return None
    ranks = {m.stem: 1 for m in modules}
    totals: dict[str, float] = {}
    for m in modules:
        totals[m.block] = totals.get(m.block, 0.0) + sum(m.energies)
    # (-value per byte, current rank, file order): the best step first, ties to the lower rank.
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        m = modules[i]
        k = ranks[m.stem]
        if k >= len(m.energies) or m.energies[k] <= NEGLIGIBLE * m.energies[0]:
            return
        weight = 1.0 if weights is None else weights.get(m.block, 1.0)
        value = weight * m.energies[k] / totals[m.block]
        heapq.heappush(heap, (-value / m.bytes_per_rank, k, i))

    for i in range(len(modules)):
        push(i)
    while heap:
        _, _, i = heapq.heappop(heap)
        m = modules[i]
        if m.bytes_per_rank > left:
            continue  # this module cannot grow; a cheaper one still may
        left -= m.bytes_per_rank
        ranks[m.stem] += 1
        push(i)
    return ranks


def plan_budget(
    lora: LoraFile,
    order: Sequence[str],
    k_pass: int,
    budget: int,
    spectra: Mapping[str, ModuleSpectrum] | None = None,
    weights: Mapping[str, float] | None = None,
) -> list[BudgetCandidate]:
    """Reduced-rank candidates under ``budget`` bytes: uniform ranks, highest first, then allocations.

    Per rank: the most top-ranked blocks (at least ``k_pass``) whose file fits;
    a rank where even ``k_pass`` blocks do not fit gives none. With ``spectra``
    (:func:`~lora_prune.resize.module_spectra` of the ranked blocks), up to
    :data:`MAX_ALLOCATIONS` per-module allocations follow (:func:`allocate_ranks`,
    ``weights`` the blocks' influence), for the keep sets of ``k_pass`` blocks
    and of the uniform candidates, each one that no uniform candidate dominates.
    """
    uniform = _uniform_candidates(lora, order, k_pass, budget)
    if spectra is None:
        return uniform
    allocated: list[BudgetCandidate] = []
    for k in dict.fromkeys([k_pass, *(len(c.blocks) for c in uniform)]):
        if len(allocated) == MAX_ALLOCATIONS:
            break
        candidate = _allocated_candidate(lora, order[:k], budget, spectra, weights)
        if candidate is None or any(
            _dominates(c, candidate, spectra) for c in [*uniform, *allocated]
        ):
            continue
        allocated.append(candidate)
    return uniform + allocated


def _allocated_candidate(
    lora: LoraFile,
    keep: Sequence[str],
    budget: int,
    spectra: Mapping[str, ModuleSpectrum],
    weights: Mapping[str, float] | None,
) -> BudgetCandidate | None:
    """The keep set at the ranks :func:`allocate_ranks` gives it under ``budget``, or None."""
    keep_set = set(keep)
    modules = [m for m in spectra.values() if m.block in keep_set]
    if not modules:
        return None
    factors_at_1 = sum(m.bytes_per_rank for m in modules)
    overhead = resized_size(lora, keep, {m.stem: 1 for m in modules}) - factors_at_1
    # The header grows a little with the ranks (digits of shapes and offsets): shrink and retry.
    for _ in range(4):
        ranks = allocate_ranks(modules, budget - overhead, weights)
        if ranks is None:
            return None
        size = resized_size(lora, keep, ranks)
        if size <= budget:
            block_ranks: dict[str, tuple[int, int]] = {}
            for m in modules:
                lo, hi = block_ranks.get(m.block, (ranks[m.stem], ranks[m.stem]))
                block_ranks[m.block] = (min(lo, ranks[m.stem]), max(hi, ranks[m.stem]))
            return BudgetCandidate(
                sort_blocks(keep), None, size, ranks=ranks, block_ranks=block_ranks
            )
        overhead += size - budget
    return None


def _dominates(
    a: BudgetCandidate, b: BudgetCandidate, spectra: Mapping[str, ModuleSpectrum]
) -> bool:
    """Whether ``a`` keeps every block of ``b`` and every module at least at ``b``'s rank."""
    if not set(b.blocks) <= set(a.blocks):
        return False
    for stem, k in (b.ranks or {}).items():
        most = len(spectra[stem].energies)
        if min(_rank_of(a, stem, most), most) < min(k, most):
            return False
    return True


def _rank_of(candidate: BudgetCandidate, stem: str, stored: int) -> int:
    if candidate.ranks is not None:
        return candidate.ranks.get(stem, stored)
    return stored if candidate.rank is None else candidate.rank


def _uniform_candidates(
    lora: LoraFile, order: Sequence[str], k_pass: int, budget: int
) -> list[BudgetCandidate]:
    """Per uniform rank, highest first: the most top-ranked blocks (>= ``k_pass``) that fit."""
    out: list[BudgetCandidate] = []
    for rank in budget_ranks(lora):
        best: BudgetCandidate | None = None
        for k in range(k_pass, len(order) + 1):
            size = resized_size(lora, order[:k], rank)
            if size > budget:
                break  # sizes only grow with k
            best = BudgetCandidate(sort_blocks(order[:k]), rank, size)
        if best is not None:
            out.append(best)
    return out


def budget_error(
    lora: LoraFile, budget: int, tried: Sequence[BudgetCandidate], smallest: BudgetCandidate
) -> BudgetError:
    """No file under the budget passes: say so, and the smallest size known to pass."""
    # The full-rank keep set (tried first) is no reduced-rank candidate.
    rendered = [c for c in tried if c.passed is not None and (c.rank, c.ranks) != (None, None)]
    what = (
        f"no keep set under {human_bytes(budget)} passes the verdict "
        f"({len(rendered)} reduced-rank candidate{'s' if len(rendered) != 1 else ''} tried)"
        if rendered
        else f"no keep set that can pass fits in {human_bytes(budget)}"
    )
    return BudgetError(
        what,
        lora.path,
        f"the smallest passing size found is {human_bytes(smallest.bytes)} "
        f"({smallest.label}): raise --max-size to at least that",
        tried=list(tried),
        smallest=smallest.bytes,
    )
