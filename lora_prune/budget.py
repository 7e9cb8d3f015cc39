"""Planning ``slim --auto --max-size``: which keep sets and ranks fit a size budget.

The render-free half of the budget search (the rendering is
:func:`lora_prune.render.workflows.auto_slim`'s): candidate files are the top-k
blocks of the ranking at a uniform rank, sized from the module shapes by
:func:`lora_prune.resize.resized_size`. The fewest top-ranked blocks that pass
the verdict at full rank (``k_pass``, from the plain ``slim --auto`` scan) bound
the search: a lower rank keeps less of each block, so fewer blocks than that are
not tried at any rank; per rank the most blocks that fit are tried, the most
effect that rank can keep under the budget.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .blocks import format_block_spec, sort_blocks
from .errors import BudgetError
from .lora import LoraFile
from .resize import resized_size
from .stats import human_bytes

__all__ = ["BudgetCandidate", "budget_error", "budget_ranks", "plan_budget", "record_reserve"]


@dataclass
class BudgetCandidate:
    """One file tried: the top-k blocks at a rank (None: as stored), its size and verdict."""

    blocks: list[str]
    rank: int | None
    bytes: int
    #: the smallest share of the effect kept over images and distances (None: not rendered)
    kept_share: float | None = None
    passed: bool | None = None

    @property
    def label(self) -> str:
        at = "full rank" if self.rank is None else f"rank {self.rank}"
        return f"{format_block_spec(self.blocks)} at {at}"


def record_reserve(lora: LoraFile, images: int) -> int:
    """Bytes to keep free for the metadata written with the file (provenance, verification).

    Generous on purpose: the per-module ranks of a resize name every module once,
    the verification record holds a few shares per image.
    """
    return 2048 + 384 * images + sum(len(stem) + 16 for stem in lora.modules)


def budget_ranks(lora: LoraFile) -> list[int]:
    """The uniform ranks to try, highest first: half the LoRA's rank, a quarter, ..., 1."""
    top = max((m.rank or 0 for m in lora.modules.values()), default=0)
    ranks: list[int] = []
    r = top // 2
    while r >= 1:
        ranks.append(r)
        r //= 2
    return ranks


def plan_budget(
    lora: LoraFile, order: Sequence[str], k_pass: int, budget: int
) -> list[BudgetCandidate]:
    """Reduced-rank candidates under ``budget`` bytes, highest rank first.

    Per rank: the most top-ranked blocks (at least ``k_pass``) whose file fits;
    a rank where even ``k_pass`` blocks do not fit gives none.
    """
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
    rendered = [c for c in tried if c.passed is not None]
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
