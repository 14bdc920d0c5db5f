"""Independent float64 references for the metrics, written from their definitions with plain loops (numpy), and
embeddings whose cosines are exact in any summation order (so that ties are ties on every path)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def exact_embeddings(n: int, d: int, generator: torch.Generator, *, zero_rows: bool = True) -> Tensor:
    """Rows of ±1 on 1, 4 or 16 coordinates (norm 1, 2 or 4; some zero rows): the normalised entries are ±1, ±1/2,
    ±1/4 and every cosine is a sum of a few multiples of 1/16, exact in float32 whatever the order of the sum —
    and many cosines are equal."""
    counts = [c for c in (1, 4, 16) if c <= d] + ([0] if zero_rows else [])
    x = torch.zeros(n, d)
    for i in range(n):
        c = counts[int(torch.randint(len(counts), (1,), generator=generator))]
        where = torch.randperm(d, generator=generator)[:c]
        x[i, where] = torch.randint(0, 2, (c,), generator=generator).float() * 2 - 1
    return x


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.sqrt((x * x).sum(1, keepdims=True))
    return x / np.maximum(norm, 1e-12)


def ranking(query: Tensor, reference: Tensor | None, includes_query: bool = False) -> list[list[int]]:
    """Each query's references in order: cosine descending, equal cosines by index ascending; query i leaves out
    reference i in a self-search (``reference`` None) or when the reference includes the queries first."""
    q = _unit(query.double().numpy())
    r = q if reference is None else _unit(reference.double().numpy())
    skip_own = reference is None or includes_query
    out = []
    for i in range(q.shape[0]):
        sims = [float(np.dot(q[i], r[j])) for j in range(r.shape[0])]
        order = sorted(range(r.shape[0]), key=lambda j: (-sims[j], j))
        out.append([j for j in order if not (skip_own and j == i)])
    return out


def retrieval_reference(
    query: Tensor, query_labels: Tensor, reference: Tensor | None = None, reference_labels: Tensor | None = None,
    ks: tuple[int, ...] = (1,), includes_query: bool = False,
) -> dict[str, float]:  # fmt: skip
    """pml's definitions (``k="max_bin_count"``), one query at a time."""
    ql = query_labels.reshape(-1).tolist()
    rl = ql if reference_labels is None else reference_labels.reshape(-1).tolist()
    q = query.reshape(-1, query.shape[-1])
    r = None if reference is None else reference.reshape(-1, reference.shape[-1])
    orders = ranking(q, r, includes_query)
    self_search = reference is None or includes_query
    relevant = [sum(1 for label in rl if label == ql[i]) - self_search for i in range(len(ql))]
    depth = max(relevant)
    names = ["precision_at_1", "r_precision", "mean_average_precision_at_r", "mean_average_precision",
             "mean_reciprocal_rank", *(f"recall_at_{k}" for k in ks)]  # fmt: skip
    rows = []
    for i, order in enumerate(orders):
        big_r = relevant[i]
        if big_r == 0:
            continue
        rel = [rl[j] == ql[i] for j in order]
        precision = [sum(rel[: p + 1]) / (p + 1) for p in range(len(rel))]
        first = next((p for p in range(depth) if rel[p]), None)
        rows.append([
            float(rel[0]),
            sum(rel[:big_r]) / big_r,
            sum(precision[p] for p in range(big_r) if rel[p]) / big_r,
            sum(precision[p] for p in range(depth) if rel[p]) / big_r,
            0.0 if first is None else 1.0 / (first + 1),
            *(float(any(rel[:k])) for k in ks),
        ])  # fmt: skip
    if not rows:
        return dict.fromkeys(names, float("nan"))
    return {name: float(np.mean([row[c] for row in rows])) for c, name in enumerate(names)}
