"""The optional faiss backend of the neighbour search: ``faiss.IndexFlatIP`` (exact inner products, float32, on the
CPU), its candidates re-ordered by the engine's rule — equal similarities by index — and the rows whose tie at the
k-th neighbour may reach past faiss's candidates recomputed by the torch engine."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Optional

import torch
from torch import Tensor

from mll.metrics import _search as S

__all__ = ["faiss_search"]


def _faiss() -> Any:
    try:
        import faiss
    except ImportError as error:
        raise ImportError("backend='faiss' needs faiss: pip install faiss-cpu (or use backend='torch')") from error
    return faiss


def faiss_search(
    qn: Tensor, rn: Tensor, k: int, self_shift: Optional[int], query_block: int, reference_block: int,
    progress: Optional[S.Progress],
) -> Iterator[tuple[int, int, Tensor, Tensor]]:  # fmt: skip
    """:func:`mll.metrics._search.search` with faiss finding the candidates (same arguments and results)."""
    faiss = _faiss()
    n, m = qn.shape[0], rn.shape[0]
    index = faiss.IndexFlatIP(rn.shape[1])
    index.add(rn.detach().float().cpu().contiguous().numpy())
    width = min(m, k + 1 + (self_shift is not None))  # one past k (a tie at the cut), one more for the query itself
    for q0 in range(0, n, query_block):
        q1 = min(n, q0 + query_block)
        found, ids = index.search(qn[q0:q1].detach().float().cpu().contiguous().numpy(), width)
        values = torch.from_numpy(found).to(device=qn.device, dtype=qn.dtype)
        indices = torch.from_numpy(ids).to(device=qn.device, dtype=torch.int64)
        if self_shift is not None:
            own = torch.arange(q0, q1, device=qn.device)[:, None] + self_shift
            values = values.masked_fill(indices == own, -math.inf)
        # faiss orders by similarity only: a stable sort puts equal similarities in index order
        values, indices, _ = S.sort_by_score_then_index(values, indices)
        # the k-th equal to the last real candidate: more of that similarity may lie beyond what faiss returned
        last_real = values.masked_fill(values == -math.inf, math.inf).amin(1)
        unsure = values[:, k - 1] == last_real
        values, indices = values[:, :k], indices[:, :k]
        if width < m:
            rows = unsure.nonzero().flatten()
            if rows.numel():
                values[rows], indices[rows] = _exact_rows(qn, rn, q0 + rows, k, self_shift, reference_block)
        if progress is not None:
            progress.update(q1 - q0)
        yield q0, q1, values, indices


def _exact_rows(
    qn: Tensor, rn: Tensor, rows: Tensor, k: int, self_shift: Optional[int], reference_block: int
) -> tuple[Tensor, Tensor]:
    """The torch engine's top k for the queries ``rows`` (each is its own block, so its own index is excluded)."""
    queries = qn[rows]
    out_values, out_indices = [], []
    for position, row in enumerate(rows.tolist()):
        shift = None if self_shift is None else row + self_shift

        def scores(q0: int, q1: int, r0: int, r1: int, out: Optional[Tensor], at: int = position) -> Tensor:
            return torch.mm(queries[at : at + 1], rn[r0:r1].T, out=out)

        for _, _, values, indices in S.search(scores, 1, rn.shape[0], k, query_block=1,
                                              reference_block=reference_block, dtype=qn.dtype, device=qn.device,
                                              self_shift=shift):  # fmt: skip
            out_values.append(values)
            out_indices.append(indices)
    return torch.cat(out_values), torch.cat(out_indices)
