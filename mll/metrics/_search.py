"""The engine of :mod:`mll.metrics`: an exact top-k over a gallery walked in blocks, ties broken by index.

For every block of queries the gallery (references, or class weights) is walked in blocks of columns; each block
of scores ``(Bq, Br)`` gives its k best columns, merged into a running top-k — so no ``N×M`` score matrix ever
exists, only one ``Bq×Br`` block (sized from a memory budget) and ``Bq×k`` candidates. When a whole gallery row fits
the budget, one block spans the gallery and the walk is one GEMM and one ``torch.topk`` per block of queries.

Ties. ``torch.topk`` does not say which of several equal scores it keeps or in what order (on the CPU it depends on
the row length and on k). The engine's answer is defined instead: the order is by score, descending, and among equal
scores by gallery index, ascending — the order of a stable descending sort of the whole row. Each selection takes
``k + 1`` scores; when the k-th and the (k+1)-th are equal the tie straddles the cut, and only those rows are
re-selected by a stable sort (exact, slower; rare on real embeddings, common on duplicated ones).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "PAD_INDEX",
    "Progress",
    "normalized",
    "order_ties",
    "plan_blocks",
    "search",
    "select_topk",
    "similarity_dtype",
    "sort_by_score_then_index",
]

#: score-block bytes per block on a CPU, and on an accelerator
BLOCK_BYTES = 256 << 20
ACCELERATOR_BLOCK_BYTES = 1 << 30
#: the fewest query rows per block before the gallery is split into column blocks (a GEMM of fewer rows is slower)
MIN_QUERY_BLOCK = 256
#: bytes per query row per candidate: the running top-k, the block's, their concatenation and the metrics' temporaries
CANDIDATE_BYTES = 64
#: candidate bytes (scores and indices) gathered over blocks of queries before the per-query bookkeeping runs
BATCH_BYTES = 16 << 20
#: the index of padding candidates (score -inf): after every real index, so a real score wins a tie against it
PAD_INDEX = 2**62

ScoreBlock = Callable[[int, int, int, int, Optional[Tensor]], Tensor]


def similarity_dtype(*tensors: Optional[Tensor]) -> torch.dtype:
    """Scores are computed in float64 when any input is float64, else in float32 (half precision is upcast: a
    float16 GEMM on the CPU is slow, and its ties would be common)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def normalized(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x / max(‖x‖, 1e-12)`` in ``dtype``: zero rows stay zero (cosine 0 with everything)."""
    return F.normalize(x.to(dtype), dim=-1, eps=1e-12)


def block_budget(device: torch.device) -> int:
    return BLOCK_BYTES if device.type == "cpu" else ACCELERATOR_BLOCK_BYTES


def plan_blocks(
    n: int, m: int, k: int, elem_bytes: int, budget: int, query_block: Optional[int], reference_block: Optional[int]
) -> tuple[int, int]:
    """Rows and columns of a score block: a whole gallery row when the block's rows (``query_block``, else at least
    :data:`MIN_QUERY_BLOCK`) of such rows fit the budget, else as many columns as fit (never fewer than ``k + 1``)."""
    m = max(m, 1)
    if reference_block is None:
        rows = min(n, MIN_QUERY_BLOCK) if query_block is None else min(n, query_block)
        full_row = elem_bytes * m + CANDIDATE_BYTES * (k + 1)
        if budget // full_row >= rows:
            reference_block = m
        else:
            per_row = budget // rows - CANDIDATE_BYTES * (k + 1)
            reference_block = min(m, max(k + 1, per_row // elem_bytes))
    if query_block is None:
        row = elem_bytes * reference_block + CANDIDATE_BYTES * (k + 1)
        query_block = max(1, budget // row)
    return min(n, query_block), min(m, reference_block)


def sort_by_score_then_index(values: Tensor, indices: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Each row ordered by score, descending, and equal scores by index, ascending; also the columns taken."""
    by_index, order = indices.sort(dim=1)
    values, second = values.gather(1, order).sort(dim=1, descending=True, stable=True)
    return values, by_index.gather(1, second), order.gather(1, second)


def select_topk(values: Tensor, indices: Optional[Tensor], k: int) -> tuple[Tensor, Tensor]:
    """The k best of each row of ``values`` (``W > k`` columns) as a set, ties at the cut taken by lower index.

    Args:
        values (Tensor[B, W]): scores.
        indices (Tensor[B, W], optional): the gallery index of each score; None: the columns are in index order.
        k (int): how many to keep.

    Returns:
        ``(values, columns)``, each ``(B, k)``: the scores kept and their columns in ``values``, in no particular
        order among equal scores.
    """
    top, column = values.topk(k + 1, dim=1)
    kept, column = top[:, :k], column[:, :k]
    straddles = (top[:, k - 1] == top[:, k]).nonzero().flatten()  # one host read per selection
    if straddles.numel():
        row_values, by_index = values[straddles], None
        if indices is not None:
            by_index = indices[straddles].sort(dim=1).indices
            row_values = row_values.gather(1, by_index)
        row_values, order = row_values.sort(dim=1, descending=True, stable=True)
        order = order[:, :k]
        kept, column = kept.clone(), column.clone()
        kept[straddles] = row_values[:, :k]
        column[straddles] = order if by_index is None else by_index.gather(1, order)
    return kept, column


def order_ties(values: Tensor, indices: Tensor, payload: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Rows already ordered by score, descending: equal scores put in index order (only the rows that have any);
    ``payload`` (same shape, e.g. the neighbours' labels) follows. Returns ``(values, indices, payload)`` (``payload``
    is ``indices`` when None)."""
    payload = indices if payload is None else payload
    if values.shape[1] < 2:
        return values, indices, payload
    tied = (values[:, 1:] == values[:, :-1]).any(1).nonzero().flatten()
    if tied.numel():
        values, indices, payload = values.clone(), indices.clone(), payload.clone()
        values[tied], new_indices, order = sort_by_score_then_index(values[tied], indices[tied])
        payload[tied] = payload[tied].gather(1, order)
        indices[tied] = new_indices
    return values, indices, payload


def _merge(
    running: Optional[tuple[Tensor, Tensor, bool]], values: Tensor, indices: Tensor, ordered: bool, k: int
) -> tuple[Tensor, Tensor, bool]:
    """The running top-k with a block's candidates merged in; the flag says whether it is ordered by score."""
    if running is None:
        return values, indices, ordered
    values, indices = torch.cat([running[0], values], dim=1), torch.cat([running[1], indices], dim=1)
    if values.shape[1] <= k:
        return values, indices, False
    values, column = select_topk(values, indices, k)
    return values, indices.gather(1, column), True


def search(
    score_block: ScoreBlock,
    n: int,
    m: int,
    k: int,
    *,
    query_block: int,
    reference_block: int,
    dtype: torch.dtype,
    device: torch.device,
    self_shift: Optional[int] = None,
    progress: Optional[Progress] = None,
    buffered: bool = True,
) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    """The top k of every query row over ``m`` gallery columns, block by block.

    Args:
        score_block: ``score_block(q0, q1, r0, r1, out)`` returns the scores ``(q1 - q0, r1 - r0)`` of queries
            ``[q0, q1)`` against gallery columns ``[r0, r1)``; it may write them into ``out`` (a buffer of that shape,
            reused across blocks) and return it.
        n, m: queries and gallery columns (``m`` may be 0: every candidate is padding).
        k (int): candidates per query (``>= 1``).
        self_shift (int, optional): query ``i`` never selects gallery column ``i + self_shift`` (its own row).
        buffered (bool): offer ``score_block`` one reused buffer (False: it allocates its own, ``out`` is None).

    Yields:
        ``(q0, q1, values, indices)`` for consecutive runs of queries (several blocks, about :data:`BATCH_BYTES` of
        candidates: the bookkeeping runs once per batch, not per block): ``(q1 - q0, k)`` scores ordered by score,
        descending, then index, ascending; past the gallery's size (or past the columns a query may select) the
        rows are padded with ``(-inf, PAD_INDEX)``.
    """
    buffer = torch.empty(query_block * reference_block, dtype=dtype, device=device) if m and buffered else None
    pending: list[tuple[Tensor, Tensor]] = []
    first = 0
    for q0 in range(0, n, query_block):
        q1 = min(n, q0 + query_block)
        running: Optional[tuple[Tensor, Tensor, bool]] = None
        for r0 in range(0, m, reference_block):
            r1 = min(m, r0 + reference_block)
            out = None if buffer is None else buffer[: (q1 - q0) * (r1 - r0)].view(q1 - q0, r1 - r0)
            scores = score_block(q0, q1, r0, r1, out)
            if self_shift is not None:
                scores.diagonal(q0 + self_shift - r0).fill_(-math.inf)
            if r1 - r0 > k:
                values, column = select_topk(scores, None, k)
                running = _merge(running, values, column + r0, True, k)
            else:  # the block is a candidate set already (copied: the buffer is reused)
                indices = torch.arange(r0, r1, device=device).expand(q1 - q0, r1 - r0)
                running = _merge(running, scores.clone(), indices, False, k)
        if running is None or running[0].shape[1] < k:
            width = 0 if running is None else running[0].shape[1]
            pad_values = torch.full((q1 - q0, k - width), -math.inf, dtype=dtype, device=device)
            pad_indices = torch.full((q1 - q0, k - width), PAD_INDEX, dtype=torch.int64, device=device)
            running = _merge(running, pad_values, pad_indices, False, k)
        values, indices, ordered = running
        if not ordered:  # a gallery of at most k columns: a full sort (small)
            values, indices, _ = sort_by_score_then_index(values, indices)
        pending.append((values, indices))
        if progress is not None:
            progress.update(q1 - q0)
        if (q1 - first) * k * 12 >= BATCH_BYTES or q1 == n:
            values, indices, _ = order_ties(torch.cat([v for v, _ in pending]), torch.cat([i for _, i in pending]))
            yield first, q1, values, indices
            pending, first = [], q1


class Progress:
    """A tqdm bar over the queries, shown only once a run has lasted ``delay`` seconds (and only where tqdm is
    installed); ``enabled=False`` shows none, ``True`` shows it from the start."""

    def __init__(self, total: int, enabled: Optional[bool], desc: str, delay: float = 2.0) -> None:
        self.bar: Any = None
        if enabled is False:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self.bar = tqdm(total=total, desc=desc, unit="query", delay=0.0 if enabled else delay, leave=False)

    def update(self, count: int) -> None:
        if self.bar is not None:
            self.bar.update(count)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
