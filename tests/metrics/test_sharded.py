"""sharded_retrieval_metrics on gloo worlds of 2 and 3 processes equals retrieval_metrics on the concatenated
reference in one process — exactly, on embeddings whose cosines are exact (ties included), and to rounding on
Gaussian ones — and bad input on one rank raises on every rank.

One spawn per world size runs every case; each rank saves what it got, and the tests compare here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
import torch.distributed as dist

from mll import metrics as M
from tests.conftest import run_world
from tests.metrics.reference import exact_embeddings

pytestmark = pytest.mark.slow

WORLDS = (2, 3)


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    self_search: bool = False
    exact: bool = True
    sizes: dict[int, tuple[int, ...]] = dataclasses.field(default_factory=lambda: {2: (13, 9), 3: (7, 0, 15)})
    queries: int = 17
    classes: int = 4
    query_block: int | None = None
    reference_block: int | None = None
    includes_query: bool = False  # the reference's first rows (spread over the first blocks) are the queries
    seed: int = 0


CASES = [
    Case("reference-blocks-one-empty"),
    Case("reference-small-blocks", query_block=3, reference_block=4, seed=1),
    Case("reference-gaussian", exact=False, seed=2),
    Case("reference-includes-the-queries", includes_query=True, seed=7),
    Case("reference-includes-the-queries-small-blocks", includes_query=True, query_block=4, reference_block=5, seed=8),
    Case("self-search", self_search=True, seed=3),
    Case("self-search-small-blocks", self_search=True, query_block=2, reference_block=3, seed=4),
    Case("self-search-one-class", self_search=True, classes=1, seed=5),
    Case("self-search-gaussian", self_search=True, exact=False, seed=6),
]


def data(case: Case, world: int) -> dict[str, Any]:
    """The whole problem, the same in every process: queries, and the reference split into the ranks' blocks."""
    g = torch.Generator().manual_seed(100 + case.seed)
    sizes = case.sizes[world]

    def embed(n: int) -> torch.Tensor:
        return exact_embeddings(n, 16, g) if case.exact else torch.randn(n, 16, generator=g, dtype=torch.float64)

    total = sum(sizes)
    reference, labels = embed(total), torch.randint(case.classes, (total,), generator=g)
    query, query_labels = embed(case.queries), torch.randint(case.classes, (case.queries,), generator=g)
    if case.includes_query:  # the first 17 of 22 rows: they span both blocks of world 2, and an empty one of world 3
        reference[: case.queries], labels[: case.queries] = query, query_labels
    blocks = list(torch.split(reference, list(sizes)))
    label_blocks = list(torch.split(labels, list(sizes)))
    return {"query": query, "query_labels": query_labels, "reference": reference, "reference_labels": labels,
            "blocks": blocks, "label_blocks": label_blocks}  # fmt: skip


def ks(case: Case) -> tuple[int, ...]:
    return (1, 5)


def run_case(case: Case, rank: int, world: int) -> dict[str, float]:
    d = data(case, world)
    options = {"recall_at_k": ks(case), "query_block": case.query_block, "reference_block": case.reference_block}
    if case.self_search:
        return M.sharded_retrieval_metrics(d["blocks"][rank], d["label_blocks"][rank], **options)
    return M.sharded_retrieval_metrics(d["query"], d["query_labels"], d["blocks"][rank], d["label_blocks"][rank],
                                       reference_includes_query=case.includes_query, **options)  # fmt: skip


def single_process(case: Case, world: int) -> dict[str, float]:
    d = data(case, world)
    if case.self_search:
        return M.retrieval_metrics(d["reference"], d["reference_labels"], recall_at_k=ks(case))
    return M.retrieval_metrics(d["query"], d["query_labels"], d["reference"], d["reference_labels"],
                               reference_includes_query=case.includes_query, recall_at_k=ks(case))  # fmt: skip


def run_errors(rank: int, world: int) -> dict[str, str]:
    """Each fault on one rank: every rank's error message (or 'no error')."""
    g = torch.Generator().manual_seed(5)  # the same queries on every rank (and each rank the same block)
    q, ql = torch.randn(6, 4, generator=g), torch.randint(0, 2, (6,), generator=g)
    r, rl = torch.randn(5, 4, generator=g), torch.randint(0, 2, (5,), generator=g)
    faults = {
        "nan-on-rank-1": lambda: M.sharded_retrieval_metrics(
            q, ql, torch.full((5, 4), float("nan")) if rank == 1 else r, rl, recall_at_k=(1,)),
        "other-queries-on-rank-0": lambda: M.sharded_retrieval_metrics(
            q + (rank == 0), ql, r, rl, recall_at_k=(1,)),
        "other-recall-on-last-rank": lambda: M.sharded_retrieval_metrics(
            q, ql, r, rl, recall_at_k=(1, 2) if rank == world - 1 else (1,)),
        "prefix-differs-on-rank-0": lambda: M.sharded_retrieval_metrics(
            q, ql, -q if rank == 0 else r, ql if rank == 0 else rl, reference_includes_query=True, recall_at_k=(1,)),
        "no-fault": lambda: M.sharded_retrieval_metrics(q, ql, r, rl, recall_at_k=(1,)),
        "empty-everywhere": lambda: M.sharded_retrieval_metrics(
            torch.zeros(0, 4), torch.zeros(0, dtype=torch.int64), recall_at_k=(1,)),
        "reference-only-on-rank-0": lambda: M.sharded_retrieval_metrics(
            q, ql, r if rank == 0 else None, rl if rank == 0 else None, recall_at_k=(1,)),
    }  # fmt: skip
    out = {}
    for name, call in faults.items():
        try:
            out[name] = f"no error: {call()}"
        except (ValueError, TypeError) as error:
            out[name] = f"{type(error).__name__}: {error}"
    return out


def _worker(rank: int, world: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}/store", rank=rank, world_size=world)
    try:
        results = {"cases": {case.name: run_case(case, rank, world) for case in CASES},
                   "errors": run_errors(rank, world)}  # fmt: skip
        torch.save(results, f"{path}/rank{rank}.pt")
        dist.barrier()  # no rank shuts its connections while another still works (gloo aborts on that)
    finally:
        dist.destroy_process_group()


_RESULTS: dict[int, list[dict[str, Any]]] = {}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory):
    """``spawned(world)``: every rank's results of this module's one run per world size."""

    def results(world: int) -> list[dict[str, Any]]:
        if world not in _RESULTS:
            _RESULTS[world] = run_world(_worker, world, tmp_path_factory.mktemp(f"metrics-world{world}"))
        return _RESULTS[world]

    return results


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_every_rank_returns_the_single_process_numbers(spawned, world: int, case: Case) -> None:
    want = single_process(case, world)
    for rank, result in enumerate(spawned(world)):
        got = result["cases"][case.name]
        if case.exact:
            assert got == want, (rank, got, want)
        else:
            assert got.keys() == want.keys()
            for key in want:
                assert got[key] == pytest.approx(want[key], abs=1e-12), (rank, key)


@pytest.mark.parametrize("world", WORLDS)
def test_bad_input_on_one_rank_raises_on_every_rank(spawned, world: int) -> None:
    errors = [result["errors"] for result in spawned(world)]
    assert errors[1]["nan-on-rank-1"].startswith("ValueError: reference has 5 row(s) with NaN or infinite values")
    for rank in set(range(world)) - {1}:
        assert errors[rank]["nan-on-rank-1"] == (
            "ValueError: sharded_retrieval_metrics: rank(s) [1] of the group refused their inputs (see the error there)"
        )
    for rank in range(world):
        assert "the ranks passed different queries" in errors[rank]["other-queries-on-rank-0"]
        assert "the ranks disagree on the options (recall_at_k" in errors[rank]["other-recall-on-last-rank"]
        assert "the ranks disagree on whether a reference is given" in errors[rank]["reference-only-on-rank-0"]
        want = ("ValueError: reference_includes_query=True: the first 6 rows of reference (and of reference_labels) "
                "must be the queries" if rank == 0 else "ValueError: sharded_retrieval_metrics: rank(s) [0] of the "
                "group refused their inputs (see the error there)")  # fmt: skip
        assert errors[rank]["prefix-differs-on-rank-0"].startswith(want)
        assert errors[rank]["no-fault"].startswith("no error: {'precision_at_1'")  # the control case runs
        assert errors[rank]["empty-everywhere"] == (
            "ValueError: sharded_retrieval_metrics: the set is empty on every rank"
        )
