"""pml's common options on ``mll.compat.pml``, side by side with pml 2.9: miners' ``indices_tuple`` (pairs and
triplets), regularizers (pml's objects and plain callables), reducers (pml's objects, plain callables), distances
and ``weight_init_func``."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import mll.compat.pml as M
from tests.compat.side_by_side import NAMES, assert_same, data, run, side_by_side

pml = pytest.importorskip("pytorch_metric_learning")
from pytorch_metric_learning import distances, miners, reducers, regularizers  # noqa: E402
from pytorch_metric_learning.utils import common_functions as c_f  # noqa: E402

C, D, N = 5, 6, 24


def _quick(values: list[str]) -> list[str]:
    return values


def _slow(values: list[str]) -> list[Any]:
    """The rest of a matrix: in CI's full run, not in the quick tier (``-m "not slow"``)."""
    return [pytest.param(value, marks=pytest.mark.slow) for value in values]


SIZES = {"num_classes": C, "embedding_size": D}


def _batch(dtype: torch.dtype = torch.float64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return data(N, D, C, dtype, seed)


MINERS = {
    "pairs": lambda: miners.MultiSimilarityMiner(epsilon=0.5),
    "triplets": lambda: miners.TripletMarginMiner(margin=0.5, type_of_triplets="all"),
    "batch hard": lambda: miners.BatchHardMiner(),
}


@pytest.mark.parametrize("miner", [*_quick(["pairs", "triplets"]), pytest.param("batch hard", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", NAMES)
def test_miner_tuples_weigh_the_samples_as_in_pml(name: str, miner: str) -> None:
    x, y = _batch()
    tuple_ = MINERS[miner]()(x, y)
    assert all(part.numel() > 0 for part in tuple_)
    ours, theirs = side_by_side(name, x, y, tuple_, kwargs=SIZES)
    assert_same(ours, theirs, 1e-12)
    plain, _ = side_by_side(name, x, y, kwargs=SIZES)
    # ProxyNCA weighs the anchors only, and batch-hard mining makes every sample an anchor once: weights all 1
    unchanged = name == "ProxyNCALoss" and miner == "batch hard"
    assert (ours.loss.item() == plain.loss.item()) == unchanged


@pytest.mark.parametrize("name", NAMES)
def test_a_tuple_of_empty_tensors_is_no_tuple(name: str) -> None:
    x, y = _batch()
    empty = torch.empty(0, dtype=torch.long)
    for tuple_ in ((empty,) * 3, (empty,) * 4):
        ours, theirs = side_by_side(name, x, y, tuple_, kwargs=SIZES)
        plain, _ = side_by_side(name, x, y, kwargs=SIZES)
        assert_same(ours, theirs, 1e-12)
        assert ours.loss.item() == plain.loss.item()


def _regularizer(kind: str, name: str) -> Any:
    if kind == "sparse centers":
        k = 3 if name == "SoftTripleLoss" else 1
        return regularizers.SparseCentersRegularizer(C, k) if k > 1 else regularizers.LpRegularizer()
    return {
        "lp": regularizers.LpRegularizer,
        "regular face": regularizers.RegularFaceRegularizer,
        "center invariant": regularizers.CenterInvariantRegularizer,
        "zero mean": regularizers.ZeroMeanRegularizer,
    }[kind]()


@pytest.mark.parametrize(
    "kind", [*_quick(["regular face", "sparse centers"]), *_slow(["lp", "center invariant", "zero mean"])]
)
@pytest.mark.parametrize("name", NAMES)
def test_pml_regularizer_objects(name: str, kind: str) -> None:
    """pml's regularizers are callables of the weights in pml's row layout; each, as weight and as embedding
    regularizer, with a weight, gives pml's loss and gradients."""
    x, y = _batch()
    options = {
        **SIZES,
        "weight_regularizer": _regularizer(kind, name),
        "weight_reg_weight": 0.3,
        "embedding_regularizer": regularizers.LpRegularizer(power=2),
        "embedding_reg_weight": 0.7,
    }
    if name == "SoftTripleLoss":
        options["centers_per_class"] = 3
    ours, theirs = side_by_side(name, x, y, kwargs=options)
    assert_same(ours, theirs, 1e-12)
    plain, _ = side_by_side(name, x, y, kwargs={k: v for k, v in options.items() if "reg" not in k})
    assert ours.loss.item() != plain.loss.item()


@pytest.mark.parametrize("name", NAMES)
def test_plain_callables_as_regularizers_and_reducers(name: str) -> None:
    x, y = _batch()
    options = {
        **SIZES,
        "weight_regularizer": lambda w: w.pow(2).sum(),
        "weight_reg_weight": 1e-2,
        "embedding_regularizer": lambda e: e.norm(dim=1).mean(),
    }
    ours, theirs = side_by_side(name, x, y, kwargs=options)
    assert_same(ours, theirs, 1e-12)
    if name == "ProxyAnchorLoss":
        return  # its reducer is its own (see test_proxy_anchor_takes_its_divisor_reducer_only)
    with_sum_reducer, theirs = side_by_side(name, x, y, kwargs={**SIZES, "reducer": reducers.SumReducer()})
    summing = getattr(M, name)(**SIZES, reducer=lambda losses: losses.sum()).double()
    summing.load_state_dict(theirs.module.state_dict())
    assert_same(run(summing, x, y), theirs, 1e-12)
    assert_same(with_sum_reducer, theirs, 1e-12)


REDUCERS = {
    "mean": lambda: reducers.MeanReducer(),
    "sum": lambda: reducers.SumReducer(),
    "avg non zero": lambda: reducers.AvgNonZeroReducer(),
    "threshold": lambda: reducers.ThresholdReducer(low=1.0),
    "class weighted": lambda: reducers.ClassWeightedReducer(torch.linspace(0.5, 2.0, C)),
    "per anchor": lambda: reducers.PerAnchorReducer(reducers.SumReducer()),
    "multiple": lambda: reducers.MultipleReducers({"loss": reducers.SumReducer()}),
}


@pytest.mark.parametrize(
    "reducer",
    [*_quick(["threshold", "multiple"]), *_slow(["mean", "sum", "avg non zero", "class weighted", "per anchor"])],
)
@pytest.mark.parametrize("name", sorted(set(NAMES) - {"ProxyAnchorLoss"}))
def test_pml_reducer_objects(name: str, reducer: str) -> None:
    """pml's reducers get the loss dictionaries pml builds (a copy per sub-loss with a regularizer)."""
    x, y = _batch()
    for extra in ({}, {"weight_regularizer": regularizers.LpRegularizer()}):
        ours, theirs = side_by_side(name, x, y, kwargs={**SIZES, "reducer": REDUCERS[reducer](), **extra})
        assert_same(ours, theirs, 1e-12)


@pytest.mark.parametrize("name", sorted(set(NAMES) - {"ProxyAnchorLoss"}))
def test_do_nothing_reducer_returns_pml_s_dictionary(name: str) -> None:
    x, y = _batch()
    ours, theirs = side_by_side(name, x, y, kwargs={**SIZES, "reducer": reducers.DoNothingReducer()}, backward=False)
    assert ours.loss.keys() == theirs.loss.keys() == {"loss"}
    mine, pmls = ours.loss["loss"], theirs.loss["loss"]
    assert mine["reduction_type"] == pmls["reduction_type"] == "element"
    assert torch.equal(mine["indices"], pmls["indices"])
    torch.testing.assert_close(mine["losses"], pmls["losses"], rtol=1e-12, atol=1e-12)


def test_proxy_anchor_takes_its_divisor_reducer_only() -> None:
    x, y = _batch()
    ours, theirs = side_by_side("ProxyAnchorLoss", x, y, kwargs={**SIZES, "reducer": reducers.DivisorReducer()})
    assert_same(ours, theirs, 1e-12)
    for reducer in (reducers.MeanReducer(), torch.sum):
        with pytest.raises(ValueError, match=r"ProxyAnchorLoss reducer must be None or pml's DivisorReducer\(\)"):
            M.ProxyAnchorLoss(C, D, reducer=reducer)


def test_distances_pml_computes_with() -> None:
    x, y = _batch()
    for name, distance in (
        ("ArcFaceLoss", distances.CosineSimilarity()),
        ("ProxyAnchorLoss", distances.CosineSimilarity()),
        ("SoftTripleLoss", distances.CosineSimilarity()),
        ("ProxyNCALoss", distances.LpDistance(power=2)),
        ("NormalizedSoftmaxLoss", distances.DotProductSimilarity()),
        ("NormalizedSoftmaxLoss", distances.DotProductSimilarity(normalize_embeddings=False)),
    ):
        ours, theirs = side_by_side(name, x, y, kwargs={**SIZES, "distance": distance})
        assert_same(ours, theirs, 1e-12)
        assert torch.allclose(ours.module.get_logits(x), theirs.module.get_logits(x), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("name", "distance"),
    [
        ("ArcFaceLoss", distances.LpDistance()),
        ("CosFaceLoss", distances.DotProductSimilarity()),
        ("ProxyNCALoss", distances.LpDistance()),
        ("ProxyNCALoss", distances.LpDistance(power=2, normalize_embeddings=False)),
        ("NormalizedSoftmaxLoss", distances.CosineSimilarity()),
        ("SoftTripleLoss", distances.SNRDistance()),
        ("ProxyAnchorLoss", distances.CosineSimilarity),
    ],
)
def test_other_distances_are_refused_by_name(name: str, distance: Any) -> None:
    with pytest.raises(ValueError, match=rf"{name} computes with pml's default distance only: distance must be None"):
        getattr(M, name)(**SIZES, distance=distance)


@pytest.mark.parametrize("name", NAMES)
def test_weight_init_func(name: str) -> None:
    init = c_f.TorchInitWrapper(torch.nn.init.xavier_uniform_)
    torch.manual_seed(1)
    theirs = getattr(pml.losses, name)(**SIZES, weight_init_func=init)
    torch.manual_seed(1)
    ours = getattr(M, name)(**SIZES, weight_init_func=init)
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value)
