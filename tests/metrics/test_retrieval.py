"""Retrieval metrics against the float64 brute-force reference of tests/metrics/reference.py, blocked against
unblocked, inputs of every shape and dtype, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mll import metrics as M
from tests.metrics.reference import exact_embeddings, ranking, retrieval_reference

KEYS = ["precision_at_1", "r_precision", "mean_average_precision_at_r", "mean_average_precision",
        "mean_reciprocal_rank"]  # fmt: skip


def assert_same(got: dict[str, float], want: dict[str, float], tol: float = 1e-12) -> None:
    assert got.keys() == want.keys()
    for key in want:
        if math.isnan(want[key]):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(want[key], abs=tol, rel=0), (key, got[key], want[key])


@st.composite
def labelled_sets(draw: st.DrawFn, exact: bool = True) -> dict:
    """Queries (and maybe a reference) with labels from few classes: singletons, one class, duplicates, ties."""
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    d = draw(st.sampled_from([1, 4, 16]))
    classes = draw(st.integers(1, 6))
    n = draw(st.integers(1, 24))
    self_search = draw(st.booleans())
    m = n if self_search else draw(st.integers(1, 24))

    def embed(rows: int) -> torch.Tensor:
        return exact_embeddings(rows, d, g) if exact else torch.randn(rows, d, generator=g, dtype=torch.float64)

    q, ql = embed(n), torch.randint(classes, (n,), generator=g)
    r, rl = (None, None) if self_search else (embed(m), torch.randint(classes, (m,), generator=g))
    includes = not self_search and draw(st.booleans())  # pml's ref_includes_query: the queries come first
    if includes:
        assert r is not None and rl is not None
        r, rl = torch.cat([q, r]), torch.cat([ql, rl])
        m += n
    visible = m - (self_search or includes)
    if visible < 1:  # a self-search of one sample: nothing to rank
        r, rl, includes = embed(1), torch.randint(classes, (1,), generator=g), False
        visible = 1
    ks = tuple(sorted(set(draw(st.lists(st.integers(1, visible), min_size=1, max_size=3)))))
    return {"query": q, "query_labels": ql, "reference": r, "reference_labels": rl, "ks": ks, "includes": includes}


def run(case: dict, **options) -> dict[str, float]:
    return M.retrieval_metrics(case["query"], case["query_labels"], case["reference"], case["reference_labels"],
                               reference_includes_query=case["includes"], recall_at_k=case["ks"],
                               **options)  # fmt: skip


def reference_of(case: dict) -> dict[str, float]:
    return retrieval_reference(case["query"], case["query_labels"], case["reference"], case["reference_labels"],
                               case["ks"], case["includes"])  # fmt: skip


@pytest.mark.filterwarnings("ignore:no query has a reference of its label")
@given(labelled_sets(exact=True))
def test_equals_the_reference_with_ties_duplicates_and_singletons(case: dict) -> None:
    assert_same(run(case), reference_of(case))


@pytest.mark.filterwarnings("ignore:no query has a reference of its label")
@given(labelled_sets(exact=False))
def test_equals_the_reference_on_float64_embeddings(case: dict) -> None:
    assert_same(run(case), reference_of(case))


@pytest.mark.filterwarnings("ignore:no query has a reference of its label")
@given(labelled_sets(exact=True), st.integers(1, 24), st.integers(1, 24))
def test_blocks_of_any_size_give_the_same_numbers(case: dict, query_block: int, reference_block: int) -> None:
    assert_same(run(case, query_block=query_block, reference_block=reference_block), run(case))


@given(labelled_sets(exact=True), st.integers(1, 24), st.integers(1, 24))
def test_nearest_neighbors_are_a_stable_sort_of_each_row(case: dict, query_block: int, reference_block: int) -> None:
    q, r = case["query"], case["reference"]
    visible = len(ranking(q, r)[0])
    k = min(visible, 1 + query_block % visible)
    values, indices = M.nearest_neighbors(q, r, k, query_block=query_block, reference_block=reference_block)
    want = torch.tensor([order[:k] for order in ranking(q, r)])
    assert torch.equal(indices, want)
    rows = torch.nn.functional.normalize(q.double(), dim=1)
    cols = rows if r is None else torch.nn.functional.normalize(r.double(), dim=1)
    torch.testing.assert_close(values.double(), (rows[:, None] * cols[want]).sum(-1), rtol=0, atol=1e-6)


def test_a_tie_at_the_cut_keeps_the_lower_indices() -> None:
    # 300 copies of one direction (labels 0, 1, 0, 1, ...) behind 3 copies of the query of class 1: torch.topk
    # alone keeps an unspecified subset of the copies
    direction = torch.tensor([[1.0, 0.0]])
    reference = torch.cat([direction.expand(3, 2), torch.tensor([[1.0, 1.0]]).expand(300, 2)])
    labels = torch.cat([torch.tensor([1, 1, 1]), torch.arange(300) % 2])
    _, indices = M.nearest_neighbors(direction, reference, 10)
    assert indices.tolist() == [[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
    got = M.retrieval_metrics(direction, torch.tensor([0]), reference, labels, recall_at_k=(1, 4))
    # R = 150: the copies 3, 5, 7, ... are relevant, so rel = 0, 0, 0, 1, 0, 1, 0, ...
    assert got["recall_at_1"] == 0.0 and got["recall_at_4"] == 1.0
    assert got["mean_reciprocal_rank"] == 0.25
    assert got["r_precision"] == pytest.approx(74 / 150)


def test_known_embeddings() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    perfect = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    got = M.retrieval_metrics(perfect, labels, recall_at_k=(1, 3))
    assert got == {**dict.fromkeys(KEYS, 1.0), "recall_at_1": 1.0, "recall_at_3": 1.0}
    swapped = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])  # every nearest neighbour is wrong
    got = M.retrieval_metrics(swapped, labels, recall_at_k=(1, 3))
    assert got["precision_at_1"] == 0.0 and got["mean_average_precision_at_r"] == 0.0 and got["recall_at_3"] == 1.0
    # MAP@R scores only the first R neighbours: orders (hit, miss), (hit, miss), (miss, hit) for the three class-0
    # queries give 1/2, 1/2 and 0; the lone class-1 sample has R = 0 and is not a query
    mixed = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.9, 0.44]])
    got = M.retrieval_metrics(mixed, torch.tensor([0, 0, 0, 1]), recall_at_k=(1,))
    assert got["mean_average_precision_at_r"] == pytest.approx((0.5 + 0.5 + 0.25) / 3)
    # K = max R = 2 = every query's R: pml's MAP (k="max_bin_count") is then MAP@R
    assert got["mean_average_precision"] == got["mean_average_precision_at_r"]


def test_one_class_and_self_exclusion() -> None:
    x = torch.randn(7, 3)
    got = M.retrieval_metrics(x, torch.zeros(7, dtype=torch.int64), recall_at_k=(1, 6))
    assert all(value == 1.0 for value in got.values())
    # samples 0 and 1 identical (labels 4 and 5), sample 2 orthogonal (label 4): sample 0 would be its own nearest
    # neighbour (a tie with sample 1, won by the lower index) if it could see itself; it sees sample 1 first
    x = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    got = M.retrieval_metrics(x, torch.tensor([4, 5, 4]), recall_at_k=(1,))
    assert got["precision_at_1"] == 0.5  # queries 0 (miss: sample 1) and 2 (hit: sample 0); 1 has no relevant


def test_no_query_with_a_relevant_reference_gives_nan_and_a_warning() -> None:
    with pytest.warns(UserWarning, match="no query has a reference of its label"):
        got = M.retrieval_metrics(torch.randn(5, 3), torch.arange(5), recall_at_k=(2,))
    assert all(math.isnan(v) for v in got.values()) and "recall_at_2" in got


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_any_leading_shape_dtype_layout_and_label_dtype(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 6, 10, generator=g).to(dtype)
    y = torch.randint(0, 5, (4, 6), generator=g)
    upcast = x.reshape(24, 10).to(torch.float64 if dtype == torch.float64 else torch.float32)
    flat = M.retrieval_metrics(upcast, y.reshape(24))
    assert M.retrieval_metrics(x, y.int()) == flat  # half precision is upcast to float32 exactly
    wide = torch.randn(24, 20, generator=g).to(dtype)
    wide[:, ::2] = x.reshape(24, 10)
    assert M.retrieval_metrics(wide[:, ::2], y.reshape(24).to(torch.int16)) == flat  # non-contiguous


def test_reference_of_another_shape_and_the_progress_bar(capsys: pytest.CaptureFixture[str]) -> None:
    q, r = torch.randn(3, 2, 8), torch.randn(5, 4, 8)
    ql, rl = torch.randint(0, 3, (3, 2)), torch.randint(0, 3, (5, 4))
    got = M.retrieval_metrics(q, ql, r, rl, recall_at_k=(1, 20), progress=True)
    assert "query" in capsys.readouterr().err  # tqdm's bar, on stderr
    assert_same(got, retrieval_reference(q, ql, r, rl, (1, 20)))
    M.retrieval_metrics(q, ql, r, rl, recall_at_k=(1,), progress=False)
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: M.retrieval_metrics(torch.randn(0, 4), torch.zeros(0, dtype=torch.int64)), ValueError,
         r"query is empty \(shape \(0, 4\)\)"),
        (lambda: M.retrieval_metrics(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64), torch.randn(0, 4),
                                     torch.zeros(0, dtype=torch.int64)), ValueError, "reference is empty"),
        (lambda: M.retrieval_metrics(torch.randn(3, 4), torch.zeros(2, dtype=torch.int64)), ValueError,
         r"query_labels must have shape \(3\), one label per row of query, but got shape \(2\)"),
        (lambda: M.retrieval_metrics(torch.randn(3, 4), torch.zeros(3)), TypeError,
         "query_labels must have an integer dtype"),
        (lambda: M.retrieval_metrics(torch.randn(3, 4).int(), torch.zeros(3, dtype=torch.int64)), TypeError,
         "query must have a floating-point dtype"),
        (lambda: M.retrieval_metrics([[1.0]], torch.zeros(1, dtype=torch.int64)), TypeError,
         "query must be a torch.Tensor"),
        (lambda: M.retrieval_metrics(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64), recall_at_k=(0,)),
         ValueError, "recall_at_k must hold integers >= 1, but got 0"),
        (lambda: M.retrieval_metrics(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64), recall_at_k=()),
         ValueError, "recall_at_k must be a non-empty sequence"),
        (lambda: M.retrieval_metrics(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64), recall_at_k=(1, 3)),
         ValueError, r"recall_at_k holds k = 3, but each query can see only 2 reference\(s\)"),
        (lambda: M.retrieval_metrics(torch.randn(1, 4), torch.zeros(1, dtype=torch.int64), recall_at_k=(1,)),
         ValueError, r"each query can see only 0 reference\(s\)"),
        (lambda: M.retrieval_metrics(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64), torch.randn(3, 4)),
         ValueError, "reference was given without reference_labels"),
        (lambda: M.retrieval_metrics(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64), None,
                                     torch.zeros(3, dtype=torch.int64)), ValueError,
         "reference_labels was given without reference"),
        (lambda: M.retrieval_metrics(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64), torch.randn(3, 5),
                                     torch.zeros(3, dtype=torch.int64)), ValueError,
         r"reference must have the queries' feature size d = 4, but got shape \(3, 5\)"),
        (lambda: M.retrieval_metrics(torch.tensor([[1.0, math.nan], [0.0, 1.0]]), torch.zeros(2, dtype=torch.int64),
                                     recall_at_k=(1,)), ValueError,
         r"query has 1 row\(s\) with NaN or infinite values \(first: row 0"),
        (lambda: M.retrieval_metrics(torch.randn(3, 0), torch.zeros(3, dtype=torch.int64)), ValueError,
         r"query must have shape \(\*, d\) with d >= 1 features, but got shape \(3, 0\)"),
        (lambda: M.retrieval_metrics(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64), backend="annoy"),
         ValueError, "backend must be 'torch' or 'faiss', but got 'annoy'"),
        (lambda: M.retrieval_metrics(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64), query_block=0),
         ValueError, "query_block must be None or an integer >= 1, but got 0"),
        (lambda: M.retrieval_metrics(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64),
                                     reference_includes_query=True), ValueError,
         "reference_includes_query=True needs a reference"),
        (lambda: M.retrieval_metrics(torch.randn(3, 4), torch.zeros(3, dtype=torch.int64), torch.randn(2, 4),
                                     torch.zeros(2, dtype=torch.int64), reference_includes_query=True), ValueError,
         "the reference has 2 rows, fewer than the 3 queries"),
        (lambda: M.retrieval_metrics(torch.ones(3, 4), torch.zeros(3, dtype=torch.int64), torch.ones(5, 4),
                                     torch.tensor([0, 0, 1, 0, 0]), reference_includes_query=True), ValueError,
         r"the first 3 rows of reference \(and of reference_labels\) must be the queries"),
        (lambda: M.nearest_neighbors(torch.randn(3, 4), torch.randn(2, 4), 3), ValueError,
         "k must be at most 2, the references each query can see, but got 3"),
        (lambda: M.nearest_neighbors(torch.randn(3, 4), None, 0), ValueError, "k must be an integer >= 1, but got 0"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_with_a_clear_error(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()


@pytest.mark.filterwarnings("ignore:no query has a reference of its label")
@given(labelled_sets(exact=True), st.integers(1, 24))
def test_the_faiss_backend_gives_the_torch_numbers_ties_included(case: dict, query_block: int) -> None:
    pytest.importorskip("faiss")
    assert_same(run(case, backend="faiss", query_block=query_block), run(case))


def test_the_faiss_backend_without_faiss_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    real_import = builtins.__import__

    def no_faiss(name: str, *args, **kwargs):  # type: ignore[no-untyped-def]
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_faiss)
    with pytest.raises(ImportError, match=r"backend='faiss' needs faiss: pip install faiss-cpu"):
        M.retrieval_metrics(torch.randn(5, 3), torch.zeros(5, dtype=torch.int64), recall_at_k=(1,), backend="faiss")
