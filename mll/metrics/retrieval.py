r"""Retrieval metrics at any gallery size: pytorch-metric-learning's definitions, computed over blocks.

Every query ranks the references by cosine similarity. With R the number of references that share the query's
label (the query itself excluded), rel_i = 1 when the i-th nearest shares it, and P(i) = (1/i) Σ_{j ≤ i} rel_j:

- ``precision_at_1`` = rel_1;
- ``r_precision`` = (1/R) Σ_{i ≤ R} rel_i;
- ``mean_average_precision_at_r`` = (1/R) Σ_{i ≤ R} P(i)·rel_i (Musgrave, Belongie & Lim, "A Metric Learning
  Reality Check", ECCV 2020, https://arxiv.org/abs/2003.08505);
- ``mean_average_precision`` = (1/R) Σ_{i ≤ K} P(i)·rel_i, with K = max over the queries of R (pml's
  ``k="max_bin_count"``: the average precision of the first K neighbours, over R);
- ``mean_reciprocal_rank`` = 1/i for the first i ≤ K with rel_i = 1, else 0;
- ``recall_at_{k}`` = 1 when some i ≤ k has rel_i = 1 (the retrieval papers' Recall@K), else 0;

each averaged over the queries with R ≥ 1 — a query whose label no reference shares (a class of one sample in a
self-search) is left out, as pml leaves it out; with no such query every metric is NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

import torch
from torch import Tensor

from mll.metrics import _checks as C
from mll.metrics import _distributed as D
from mll.metrics import _search as S

__all__ = ["nearest_neighbors", "retrieval_metrics"]

Backend = Literal["torch", "faiss"]
KEYS = (
    "precision_at_1",
    "r_precision",
    "mean_average_precision_at_r",
    "mean_average_precision",
    "mean_reciprocal_rank",
)


@dataclass
class _Problem:
    """One search: queries against a (local block of the) reference, normalised, with the options checked."""

    query: Tensor  # (N, d) normalised, every query of the search
    query_labels: Tensor  # (N,) int64
    reference: Tensor  # (M_local, d) normalised
    reference_labels: Tensor  # (M_local,)
    start: int  # the global index of reference row 0
    total: int  # references in the whole (sharded) set
    self_shift: Optional[int]  # query i is reference i + self_shift (a self-search), or None
    largest_block: int  # the most references any rank holds


def retrieval_metrics(
    query: Tensor,
    query_labels: Tensor,
    reference: Optional[Tensor] = None,
    reference_labels: Optional[Tensor] = None,
    *,
    reference_includes_query: bool = False,
    recall_at_k: Sequence[int] = (1, 2, 4, 8),
    backend: Backend = "torch",
    query_block: Optional[int] = None,
    reference_block: Optional[int] = None,
    progress: Optional[bool] = None,
) -> dict[str, float]:
    r"""Precision@1, R-precision, MAP@R, MAP, MRR and Recall@k of a labelled embedding (see the module notes).

    The same numbers as pytorch-metric-learning's ``AccuracyCalculator(k="max_bin_count")`` with cosine
    similarity, without its ``N×M`` similarity matrix: the references are walked in blocks with a running top-K,
    so memory is one block of scores (256 MiB on a CPU, 1 GiB on an accelerator), the normalised embeddings and
    about 16 MB of candidates at a time.
    Ties between equal similarities go to the lower reference index (pml's order at a tie is ``torch.topk``'s,
    which is unspecified; see ``docs/metrics.md``).

    .. math:: \mathrm{MAP@R} = \frac{1}{|Q|} \sum_{q \in Q} \frac{1}{R_q} \sum_{i=1}^{R_q} P_q(i)\, \mathrm{rel}_q(i)

    Args:
        query (Tensor[*, d]): query embeddings (float16, bfloat16, float32 or float64; rows of NaN or inf are
            refused). Similarities are computed in float64 if an input is float64, else in float32.
        query_labels (Tensor[*]): integer class labels, one per query.
        reference (Tensor[*, d], optional): the gallery; None: each query searches the other queries (never itself).
        reference_labels (Tensor[*], optional): the gallery's labels, given with ``reference``.
        reference_includes_query (bool): the first N rows of ``reference`` are the N queries (and the first N
            labels theirs), as pml's ``ref_includes_query``: query i never retrieves reference i.
        recall_at_k (sequence of int): the k of the ``recall_at_{k}`` keys; each at most the number of references
            a query can see.
        backend (str): ``"torch"`` (exact, the default) or ``"faiss"`` (``faiss.IndexFlatIP`` on float32, where
            ``faiss`` is installed; its ties are resolved as the torch backend's).
        query_block (int, optional): the score block's rows (default: from the memory budget).
        reference_block (int, optional): the score block's columns (default: a whole reference row when it fits the
            budget).
        progress (bool, optional): a tqdm bar over the queries; None shows one only once the search has lasted two
            seconds (and only where tqdm is installed).

    Returns:
        dict of floats: ``precision_at_1``, ``r_precision``, ``mean_average_precision_at_r``,
        ``mean_average_precision``, ``mean_reciprocal_rank`` and ``recall_at_{k}`` for each k.
    """
    problem = _local_problem(
        query, query_labels, reference, reference_labels, recall_at_k, backend, query_block, reference_block
    )
    if reference_includes_query:
        check_query_prefix(problem.query, problem.query_labels, problem.reference, problem.reference_labels, 0,
                           reference is None)  # fmt: skip
        problem.self_shift = 0
    return _metrics(
        problem, C.check_ks(recall_at_k, "recall_at_k"), backend, query_block, reference_block, progress, group=None
    )


def nearest_neighbors(
    query: Tensor,
    reference: Optional[Tensor] = None,
    k: int = 1,
    *,
    query_block: Optional[int] = None,
    reference_block: Optional[int] = None,
    progress: Optional[bool] = None,
) -> tuple[Tensor, Tensor]:
    r"""The k most cosine-similar references of every query, exactly, walking the references in blocks.

    .. math:: \mathrm{nn}_k(q) = \text{the first } k \text{ of the } j \text{ sorted by }
              \big(-\langle \hat q, \hat r_j \rangle,\ j\big)

    Ordered by similarity, descending, and equal similarities by reference index, ascending (a stable descending
    sort of each row of the similarity matrix, which is never formed).

    Args:
        query (Tensor[*, d]): queries.
        reference (Tensor[M, d], optional): the gallery (any leading shape, flattened); None: each query searches
            the other queries, never itself.
        k (int): neighbours per query, at most the number of references a query can see.
        query_block (int, optional): as in :func:`retrieval_metrics`.
        reference_block (int, optional): as in :func:`retrieval_metrics`.
        progress (bool, optional): as in :func:`retrieval_metrics`.

    Returns:
        ``(similarities, indices)``, each of shape ``(*, k)``: float64 for float64 inputs, else float32; int64 indices
        into the flattened reference.
    """
    q = C.check_embeddings(query, "query")
    r = q if reference is None else _check_reference(q, reference, None)[0]
    C.check_positive_int(k, "k")
    visible = r.shape[0] - (reference is None)
    if k > visible:
        raise ValueError(f"k must be at most {visible}, the references each query can see, but got {k}")
    dtype = S.similarity_dtype(q, r)
    qn = S.normalized(q, dtype)
    rn = qn if reference is None else S.normalized(r, dtype)
    n = qn.shape[0]
    values, indices = (
        torch.empty(n, k, dtype=dtype, device=q.device),
        torch.empty(n, k, dtype=torch.int64, device=q.device),
    )
    problem = _Problem(
        qn, torch.empty(0), rn, torch.empty(0), 0, rn.shape[0], 0 if reference is None else None, rn.shape[0]
    )
    for q0, q1, v, i in _search(problem, k, "torch", query_block, reference_block, progress, "neighbours"):
        values[q0:q1], indices[q0:q1] = v, i
    return values.reshape(*query.shape[:-1], k), indices.reshape(*query.shape[:-1], k)


def check_query_prefix(
    qn: Tensor, ql: Tensor, rn: Tensor, rl: Tensor, start: int, self_search: bool, total: Optional[int] = None
) -> None:
    """``reference_includes_query``: reference rows ``[start, start + len(rn))`` that fall among the first N (the
    queries) must hold the queries and their labels (normalised embeddings to float rounding, labels exactly)."""
    if self_search:
        raise ValueError("reference_includes_query=True needs a reference (without one, each query already "
                         "searches the other queries, never itself)")  # fmt: skip
    n, total = qn.shape[0], rn.shape[0] if total is None else total
    if total < n:
        raise ValueError(f"reference_includes_query=True: the reference has {total} rows, fewer than the {n} queries")
    stop = min(n, start + rn.shape[0])
    if stop > start:
        mine, theirs = slice(0, stop - start), slice(start, stop)
        if not (torch.equal(rl[mine], ql[theirs]) and torch.allclose(rn[mine], qn[theirs], rtol=1e-5, atol=1e-6)):
            raise ValueError(
                f"reference_includes_query=True: the first {n} rows of reference (and of reference_labels) must be "
                "the queries (and their labels), as pml's ref_includes_query"
            )


def _check_reference(
    q: Tensor, reference: object, reference_labels: object, *, allow_empty: bool = False
) -> tuple[Tensor, Optional[Tensor]]:
    if reference is None:
        raise ValueError(
            "reference_labels was given without reference: pass both, or neither (each query then searches the "
            "other queries)"
        )
    r = C.check_embeddings(reference, "reference", allow_empty=allow_empty)
    assert isinstance(reference, Tensor)
    if r.shape[1] != q.shape[1]:
        raise ValueError(
            f"reference must have the queries' feature size d = {q.shape[1]}, but got shape "
            f"{C.shape_str(reference.shape)}"
        )
    C.check_same_device(("query", q), ("reference", r))
    rl = None
    if reference_labels is not None:
        rl = C.check_labels(reference_labels, "reference_labels", reference.shape[:-1], "reference")
        C.check_same_device(("reference", r), ("reference_labels", rl))
    return r, rl


def _local_problem(
    query: Tensor,
    query_labels: Tensor,
    reference: Optional[Tensor],
    reference_labels: Optional[Tensor],
    recall_at_k: object,
    backend: object,
    query_block: object,
    reference_block: object,
) -> _Problem:
    q = C.check_embeddings(query, "query")
    ql = C.check_labels(query_labels, "query_labels", query.shape[:-1], "query")
    C.check_same_device(("query", q), ("query_labels", ql))
    if reference is None and reference_labels is None:
        r, rl = q, ql
    else:
        r, rl_or_none = _check_reference(q, reference, reference_labels)
        if rl_or_none is None:
            raise ValueError("reference was given without reference_labels: pass both, or neither")
        rl = rl_or_none
    C.check_ks(recall_at_k, "recall_at_k")
    if backend not in ("torch", "faiss"):
        raise ValueError(f"backend must be 'torch' or 'faiss', but got {backend!r}")
    for name, value in (("query_block", query_block), ("reference_block", reference_block)):
        C.check_positive_int(value, name, allow_none=True)
    dtype = S.similarity_dtype(q, r)
    qn = S.normalized(q, dtype)
    rn = qn if reference is None else S.normalized(r, dtype)
    return _Problem(qn, ql, rn, rl, 0, rn.shape[0], 0 if reference is None else None, rn.shape[0])


def _relevant_counts(problem: _Problem, group: Any) -> Tensor:
    """R per query: the references (all ranks') sharing its label, itself excluded."""
    labels, counts = torch.unique(problem.reference_labels, return_counts=True)
    local = torch.zeros_like(problem.query_labels)
    if len(labels):
        at = torch.searchsorted(labels, problem.query_labels).clamp(max=len(labels) - 1)
        local = torch.where(labels[at] == problem.query_labels, counts[at], 0)
    D.all_reduce(local, group)
    return local - int(problem.self_shift is not None)


def _search(
    problem: _Problem,
    k: int,
    backend: str,
    query_block: Optional[int],
    reference_block: Optional[int],
    progress: Optional[bool],
    desc: str,
) -> Iterator[tuple[int, int, Tensor, Tensor]]:
    qn, rn = problem.query, problem.reference
    n, m = qn.shape[0], rn.shape[0]
    bq, br = S.plan_blocks(
        n, problem.largest_block, k, qn.element_size(), S.block_budget(qn.device), query_block, reference_block
    )

    def scores(q0: int, q1: int, r0: int, r1: int, out: Optional[Tensor]) -> Tensor:
        return torch.mm(qn[q0:q1], rn[r0:r1].T, out=out)

    bar = S.Progress(n, progress, desc)
    try:
        if backend == "faiss":
            from mll.metrics._faiss import faiss_search

            yield from faiss_search(qn, rn, k, problem.self_shift, bq, br, bar)
        else:
            yield from S.search(
                scores,
                n,
                m,
                k,
                query_block=bq,
                reference_block=br,
                dtype=qn.dtype,
                device=qn.device,
                self_shift=problem.self_shift,
                progress=bar,
            )
    finally:
        bar.close()


def _metrics(
    problem: _Problem,
    ks: tuple[int, ...],
    backend: str,
    query_block: Optional[int],
    reference_block: Optional[int],
    progress: Optional[bool],
    group: Any,
) -> dict[str, float]:
    visible = problem.total - (problem.self_shift is not None)
    if ks[-1] > visible:
        raise ValueError(
            f"recall_at_k holds k = {ks[-1]}, but each query can see only {visible} reference(s): pass k <= {visible}"
        )
    relevant = _relevant_counts(problem, group)
    depth = int(relevant.max())  # pml's k = "max_bin_count": the neighbours MAP and MRR look at
    names = [*KEYS, *(f"recall_at_{k}" for k in ks)]
    if depth == 0:
        warnings.warn("no query has a reference of its label: every retrieval metric is NaN", stacklevel=3)
        return dict.fromkeys(names, float("nan"))
    k = max(depth, ks[-1])
    world, _ = D.world_and_rank(group)
    sums = torch.zeros(len(names), dtype=torch.float64, device=problem.query.device)
    for q0, q1, values, indices in _search(problem, k, backend, query_block, reference_block, progress, "retrieval"):
        labels = _labels_of(problem, indices)
        if world > 1:
            labels = _merge_ranks(
                values, torch.where(indices == S.PAD_INDEX, indices, indices + problem.start), labels, k, group
            )
        sums += _block_sums(labels, problem.query_labels[q0:q1], relevant[q0:q1], depth, ks)
    counted = int((relevant > 0).sum())
    return {name: float(total) / counted for name, total in zip(names, sums.tolist())}


def _labels_of(problem: _Problem, indices: Tensor) -> Tensor:
    m = problem.reference_labels.shape[0]
    if m == 0:
        return torch.full_like(indices, -1)
    return problem.reference_labels[indices.clamp(max=m - 1)]  # padding is never among the k kept in the end


def _merge_ranks(values: Tensor, indices: Tensor, labels: Tensor, k: int, group: Any) -> Tensor:
    """The k best of every rank's k candidates (ties by global index), as labels."""
    values, indices = D.all_gather_columns(values, group), D.all_gather_columns(indices, group)
    labels = D.all_gather_columns(labels, group)
    values, column = S.select_topk(values, indices, k)
    return S.order_ties(values, indices.gather(1, column), labels.gather(1, column))[2]


def _block_sums(labels: Tensor, query_labels: Tensor, relevant: Tensor, depth: int, ks: tuple[int, ...]) -> Tensor:
    """Each metric summed over the queries with R >= 1; ``labels`` (B, k): the neighbours' labels in order.

    A handful of passes over the (B, k) candidates: hits_i = Σ_{j ≤ i} rel_j, then the running sum of
    P(i)·rel_i = hits_i·rel_i / i, read at i = R (MAP@R) and i = K (MAP); R-precision is hits_R / R, the first
    relevant position is the number of leading zeros of hits.
    """
    rel = labels == query_labels[:, None]
    hits = rel.cumsum(1)
    rank = torch.arange(1, rel.shape[1] + 1, dtype=torch.float64, device=rel.device)
    running_ap = torch.where(rel, hits / rank, 0.0).cumsum(1)
    counted = relevant > 0
    r = relevant.clamp(min=1)
    at_r = (r - 1).clamp(max=rel.shape[1] - 1)[:, None]
    r = r.to(torch.float64)
    leading_misses = (hits[:, :depth] == 0).sum(1)
    values = [
        rel[:, 0].to(torch.float64),
        hits.gather(1, at_r)[:, 0] / r,
        running_ap.gather(1, at_r)[:, 0] / r,
        running_ap[:, depth - 1] / r,
        torch.where(leading_misses < depth, 1.0 / (leading_misses + 1).to(torch.float64), 0.0),
        *((hits[:, k - 1] > 0).to(torch.float64) for k in ks),
    ]
    return torch.where(counted, torch.stack(values), 0.0).sum(1)
