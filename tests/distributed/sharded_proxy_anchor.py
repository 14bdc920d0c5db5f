"""Worker side of ``tests/distributed/test_sharded_proxy_anchor.py``: :func:`mll.functional.sharded_proxy_anchor_loss`
on every rank of the shared gloo spawn (``tests/distributed/test_sharded.py::_worker``), and the global batches the test
recomputes the dense loss from."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from mll import functional as MF

D, C = 5, 7


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    split: dict[int, tuple[int, ...]]
    ranges: Optional[dict[int, tuple[tuple[int, int], ...]]] = None  # None: shard_bounds
    k: int = 1
    pooling: str = "max"
    chunk_size: Optional[int] = None
    alpha: float = 32.0
    delta: float = 0.1
    feature_grad_scale: Optional[float] = 1.0
    labels: str = "random"  # "random", "one" (every sample of one class), "edges" (first/last class of each block)


UNEVEN = {2: (4, 3), 3: (4, 3, 2)}
EMPTY_RANK = {2: (0, 5), 3: (4, 0, 3)}
CASES = [
    Case("uneven", UNEVEN),
    Case("empty-rank-batch", EMPTY_RANK, chunk_size=1),
    Case("permuted-blocks-one-empty", UNEVEN, ranges={2: ((0, 7), (7, 7)), 3: ((4, 7), (0, 0), (0, 4))}),
    Case("sub-centers-soft-pooling", EMPTY_RANK, k=3, pooling="soft", chunk_size=2, alpha=16.0, delta=0.3),
    Case("sub-centers-max", UNEVEN, k=2, labels="edges"),
    Case("one-class-in-the-batch", UNEVEN, labels="one"),
    Case("default-feature-grad-scale", UNEVEN, feature_grad_scale=None, alpha=64.0),
    Case("empty-global-batch", {2: (0, 0), 3: (0, 0, 0)}),
]


def ranges_of(case: Case, world: int) -> list[tuple[int, int]]:
    return list(case.ranges[world]) if case.ranges is not None else MF.shard_bounds(C, world)


def data(case: Case, world: int) -> dict[str, Any]:
    """The global batch (all ranks' rows in rank order) and all proxies, the same in every process."""
    g = torch.Generator().manual_seed(len(case.name) * 101 + world)
    n = sum(case.split[world])
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    w = torch.randn(C * case.k, D, generator=g, dtype=torch.float64)
    if case.labels == "one":
        y = torch.full((n,), 3)
    elif case.labels == "edges":
        edges = [v for a, b in ranges_of(case, world) if b > a for v in (a, b - 1)]
        y = torch.tensor([edges[i % len(edges)] for i in range(n)], dtype=torch.int64)
    else:
        y = torch.randint(0, C, (n,), generator=g)
    return {"x": x, "w": w, "y": y}


def rows(case: Case, world: int, rank: int) -> slice:
    start = sum(case.split[world][:rank])
    return slice(start, start + case.split[world][rank])


def options(case: Case) -> dict[str, Any]:
    return {"alpha": case.alpha, "delta": case.delta, "num_sub_centers": case.k, "pooling": case.pooling,
            "pooling_temperature": 0.2}  # fmt: skip


def run(rank: int, world: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for case in CASES:
        d = data(case, world)
        part = rows(case, world, rank)
        start, stop = ranges_of(case, world)[rank]
        x = d["x"][part].clone().requires_grad_(True)
        w = d["w"][start * case.k : stop * case.k].clone().requires_grad_(True)
        loss = MF.sharded_proxy_anchor_loss(
            x, w, d["y"][part], class_start=start, num_classes=C, chunk_size=case.chunk_size,
            feature_grad_scale=case.feature_grad_scale, **options(case),
        )  # fmt: skip
        grad_x, grad_w = torch.autograd.grad(loss, [x, w])
        out[case.name] = {"loss": loss.detach(), "grad_x": grad_x, "grad_w": grad_w}
    out["errors"] = run_errors(rank, world)
    return out


def run_errors(rank: int, world: int) -> dict[str, str]:
    """A bad label on rank 1 only, and an α that differs on rank 1: every rank raises the same error."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, D, generator=g, dtype=torch.float64)
    start, stop = MF.shard_bounds(C, world)[rank]
    w = torch.randn(stop - start, D, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 6, 2])
    attempts = {
        "bad-label": lambda: MF.sharded_proxy_anchor_loss(
            x, w, torch.tensor([0, 6, C]) if rank == 1 else y, class_start=start, num_classes=C
        ),
        "alpha-differs": lambda: MF.sharded_proxy_anchor_loss(
            x, w, y, class_start=start, num_classes=C, alpha=16.0 if rank == 1 else 32.0
        ),
        "soft-on-one": lambda: MF.sharded_proxy_anchor_loss(
            x, w, torch.full((3, C), 1 / C, dtype=torch.float64) if rank == 1 else y, class_start=start, num_classes=C
        ),
    }
    out = {}
    for name, attempt in attempts.items():
        try:
            attempt()
            out[name] = "no error"
        except (TypeError, ValueError) as error:
            out[name] = f"{type(error).__name__}: {error}"
    out["after"] = repr(float(MF.sharded_proxy_anchor_loss(x, w, y, class_start=start, num_classes=C)))
    return out
