"""Retrieval metrics of a reference set spread over the ranks of a ``torch.distributed`` group."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from mll.metrics import _checks as C
from mll.metrics import _distributed as D
from mll.metrics import _search as S
from mll.metrics.retrieval import _check_reference, _metrics, _Problem, check_query_prefix, retrieval_metrics

__all__ = ["sharded_retrieval_metrics"]


def sharded_retrieval_metrics(
    query: Tensor,
    query_labels: Tensor,
    reference: Optional[Tensor] = None,
    reference_labels: Optional[Tensor] = None,
    *,
    reference_includes_query: bool = False,
    group: Any = None,
    recall_at_k: Sequence[int] = (1, 2, 4, 8),
    query_block: Optional[int] = None,
    reference_block: Optional[int] = None,
    progress: Optional[bool] = None,
) -> dict[str, float]:
    """:func:`retrieval_metrics` of a reference set spread over the ranks of a ``torch.distributed`` group.

    Every rank of ``group`` calls it together. With ``reference`` given, every rank passes the same queries and its
    own block of the reference (blocks of any size, empty ones too); without, every rank passes its block of one
    labelled set and each sample searches all the others. The reference set is the ranks' blocks in rank order,
    so the numbers, ties included, are those of :func:`retrieval_metrics` on the concatenation in one process (up
    to rounding: a similarity computed in another block shape may differ in its last bit). Each rank computes its
    block's top-K, the ranks exchange ``N·K`` candidates per block of queries, and every rank returns the same
    dict. Bad input on one rank raises on every rank. Without an initialised process group it is
    :func:`retrieval_metrics`.

    Args:
        query (Tensor[*, d]): the queries, the same on every rank; or, without ``reference``, this rank's block of
            the set.
        query_labels (Tensor[*]): their labels.
        reference (Tensor[*, d], optional): this rank's block of the reference (it may be empty).
        reference_labels (Tensor[*], optional): its labels.
        reference_includes_query (bool): the first N rows of the whole reference (the ranks' blocks in rank order)
            are the queries, as in :func:`retrieval_metrics`.
        group: the process group (None: the default group).
        recall_at_k (sequence of int): as in :func:`retrieval_metrics`.
        query_block (int, optional): as in :func:`retrieval_metrics`.
        reference_block (int, optional): as in :func:`retrieval_metrics`.
        progress (bool, optional): as in :func:`retrieval_metrics`, on rank 0.

    Returns:
        the dict of :func:`retrieval_metrics`, on every rank.
    """
    world, rank = D.world_and_rank(group)
    if world == 1:
        return retrieval_metrics(
            query,
            query_labels,
            reference,
            reference_labels,
            reference_includes_query=reference_includes_query,
            recall_at_k=recall_at_k,
            query_block=query_block,
            reference_block=reference_block,
            progress=progress,
        )
    device = query.device if isinstance(query, Tensor) else torch.device("cpu")

    def check() -> tuple[Tensor, Tensor, Optional[Tensor], Optional[Tensor], tuple[int, ...]]:
        q = C.check_embeddings(query, "query", allow_empty=reference is None)
        ql = C.check_labels(query_labels, "query_labels", query.shape[:-1], "query")
        C.check_same_device(("query", q), ("query_labels", ql))
        r = rl = None
        if reference is not None or reference_labels is not None:
            r, rl = _check_reference(q, reference, reference_labels, allow_empty=True)
        for name, value in (("query_block", query_block), ("reference_block", reference_block)):
            C.check_positive_int(value, name, allow_none=True)
        return q, ql, r, rl, C.check_ks(recall_at_k, "recall_at_k")

    def summary(checked: tuple[Any, ...]) -> list[int]:
        q, ql, r, _, ks = checked
        options = _options_code(ks, query_block, reference_block, int(reference_includes_query))
        digest = [_digest(q), int(ql.sum()), int((ql * torch.arange(len(ql), device=ql.device)).sum())]
        return [q.shape[1], r is None, q.shape[0], _dtype_code(q, r), options, *(digest if r is not None else [])]

    def mismatch(table: Tensor) -> Optional[str]:
        names = [
            "the feature size d",
            "whether a reference is given",
            "",
            "the dtype",
            "the options (recall_at_k, query_block, reference_block, reference_includes_query)",
        ]
        for column, name in enumerate(names):
            if name and (table[:, column] != table[0, column]).any():
                return f"the ranks disagree on {name}: {table[:, column].tolist()}"
        if not table[0, 1] and (table[:, [2, 5, 6, 7]] != table[0, [2, 5, 6, 7]]).any():
            return (
                "the ranks passed different queries: with a reference, every rank passes the same queries and "
                "its own block of the reference"
            )
        return None

    q, ql, r, rl, ks = D.agree(check, summary, mismatch, "sharded_retrieval_metrics", device, group)
    dtype = S.similarity_dtype(q, r)
    block = q if r is None else r  # this rank's block of the reference
    sizes = [int(size) for size in D.all_gather_columns(torch.tensor([[block.shape[0]]], device=device), group)[0]]
    if sum(sizes) == 0:
        what = "the set" if r is None else "the reference"
        raise ValueError(f"sharded_retrieval_metrics: {what} is empty on every rank")
    start = sum(sizes[:rank])
    if r is None:  # one set spread over the ranks: every rank searches all of it with its block as the reference
        everyone, _ = D.all_gather_rows(S.normalized(q, dtype), group)
        labels, _ = D.all_gather_rows(ql, group)
        mine = everyone[start : start + sizes[rank]]
        problem = _Problem(everyone, labels, mine, ql, start, sum(sizes), -start, max(sizes))
    else:
        assert rl is not None
        problem = _Problem(S.normalized(q, dtype), ql, S.normalized(r, dtype), rl, start, sum(sizes), None, max(sizes))
    if reference_includes_query:
        D.agree(
            lambda: check_query_prefix(problem.query, problem.query_labels, problem.reference,
                                       problem.reference_labels, start, r is None, sum(sizes)),
            lambda _: [], lambda _: None, "sharded_retrieval_metrics", device, group,
        )  # fmt: skip
        problem.self_shift = -start
    return _metrics(problem, ks, "torch", query_block, reference_block, progress if rank == 0 else False, group)


def _digest(x: Tensor) -> int:
    """64 bits of a float64 sum of the rows weighted by their positions: equal on ranks that hold the same tensor."""
    weights = torch.arange(1, x.shape[0] + 1, dtype=torch.float64, device=x.device)
    value = (x.double().sum(1) * weights).sum()
    return int(value.view(torch.int64))


def _options_code(ks: tuple[int, ...], *blocks: Optional[int]) -> int:
    """A number equal on ranks given the same options (``hash`` of None differs between processes before 3.12)."""
    code = 0
    for value in (*ks, -1, *(b or 0 for b in blocks)):
        code = (code * 1_000_003 + value) % (2**61 - 1)
    return code


def _dtype_code(q: Tensor, r: Optional[Tensor]) -> int:
    return int(S.similarity_dtype(q, r) == torch.float64)
