"""retrieval_metrics against pytorch-metric-learning's AccuracyCalculator (cosine similarity, k="max_bin_count").

pml ranks with ``torch.topk`` over each row of its similarity matrix, whose order among equal similarities is
unspecified; on embeddings without ties the two agree to float rounding. Where there are ties, pml is given a
neighbour function that ranks with a stable sort (equal similarities by index, as mll does), and then every key
agrees exactly: the definitions are the same, only pml's tie order is not defined.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mll import metrics as M
from tests.metrics.reference import exact_embeddings

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning.distances import CosineSimilarity  # noqa: E402
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator  # noqa: E402
from pytorch_metric_learning.utils.inference import CustomKNN, return_results  # noqa: E402

KEYS = ("precision_at_1", "r_precision", "mean_average_precision_at_r", "mean_average_precision",
        "mean_reciprocal_rank")  # fmt: skip


def stable_knn(query, k, reference, ref_includes_query=False):
    """pml's CustomKNN(CosineSimilarity()) with a stable sort in place of torch.topk (and pml's own removal of the
    query from its neighbours)."""
    k = k + 1 if ref_includes_query else k
    sims = CosineSimilarity()(query, reference)
    values, indices = sims.sort(dim=1, descending=True, stable=True)
    return return_results(values[:, :k], indices[:, :k], ref_includes_query)


def calculator(knn_func) -> AccuracyCalculator:
    return AccuracyCalculator(include=KEYS, k="max_bin_count", knn_func=knn_func, device=torch.device("cpu"))


def clustered(n: int, d: int, classes: int, seed: int, spread: float = 1.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Samples around one random centre per class: the shape of a trained embedding (precision@1 well above chance)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, d, generator=g)
    labels = torch.randint(classes, (n,), generator=g)
    return centres[labels] + spread * torch.randn(n, d, generator=g), labels


def differences(mine: dict[str, float], theirs: dict[str, float]) -> dict[str, float]:
    return {key: abs(mine[key] - theirs[key]) for key in KEYS}


@pytest.mark.parametrize("self_search", [True, False])
def test_equals_pml_on_a_realistic_embedding(self_search: bool) -> None:
    # 2000 samples of 100 classes (some of one or two samples), d = 64, float32: pml as a user calls it
    x, y = clustered(2000, 64, 100, seed=0)
    if self_search:
        mine, theirs = M.retrieval_metrics(x, y), calculator(CustomKNN(CosineSimilarity())).get_accuracy(x, y)
    else:
        q, ql, r, rl = x[:500], y[:500], x[500:], y[500:]
        mine = M.retrieval_metrics(q, ql, r, rl)
        theirs = calculator(CustomKNN(CosineSimilarity())).get_accuracy(q, ql, r, rl)
    assert 0.3 < theirs["precision_at_1"] < 0.99  # a realistic case, neither chance nor perfect
    # the ranks agree; what differs is float rounding: pml averages its reciprocal ranks in float32
    assert max(differences(mine, theirs).values()) < 1e-6, differences(mine, theirs)


@pytest.mark.filterwarnings("ignore:no query has a reference of its label")
@given(
    st.integers(0, 2**31 - 1),
    st.integers(2, 40),
    st.integers(1, 40),
    st.integers(1, 8),
    st.sampled_from(["self", "reference", "reference including the queries"]),
    st.sampled_from([1, 4, 16]),
)
def test_equals_pml_with_ties_when_pml_breaks_them_by_index(
    seed: int, n: int, m: int, classes: int, layout: str, d: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    q, ql = exact_embeddings(n, d, g), torch.randint(classes, (n,), generator=g)
    r = rl = None
    if layout != "self":
        r, rl = exact_embeddings(m, d, g), torch.randint(classes, (m,), generator=g)
    includes = layout == "reference including the queries"
    if includes:
        assert r is not None and rl is not None
        r, rl = torch.cat([q, r]), torch.cat([ql, rl])
    mine = M.retrieval_metrics(q, ql, r, rl, reference_includes_query=includes, recall_at_k=(1,))
    theirs = calculator(stable_knn).get_accuracy(q, ql, r, rl, ref_includes_query=includes)
    if math.isnan(mine["precision_at_1"]):  # no query has a relevant reference: pml returns NaN too (and warns)
        assert all(math.isnan(theirs[key]) for key in KEYS)
        return
    diff = differences(mine, theirs)
    assert max(diff.values()) < 1e-6, (diff, mine, theirs)
    assert mine["recall_at_1"] == mine["precision_at_1"]
