"""Verification metrics against an independent reference of InsightFace's protocols, written here from their
definitions with NumPy and scikit-learn: LFW's 10-fold accuracy (``eval/verification.py``: KFold without shuffle,
thresholds 0..3.99 step 0.01 on ``2 − 2 cos``, a pair accepted when its distance is below the threshold, the first
best threshold), IJB's TAR at FAR (``eval_ijbc.py``: sklearn's roc_curve, the point of nearest FPR, the highest TPR
among equals), and the EER and AUC of that curve."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mll import metrics as M

sklearn_metrics = pytest.importorskip("sklearn.metrics")
from sklearn.model_selection import KFold  # noqa: E402


def lfw_reference(scores: np.ndarray, same: np.ndarray, folds: int) -> tuple[float, float]:
    distance = 2.0 - 2.0 * scores
    thresholds = np.arange(0, 4, 0.01)
    indices = np.arange(len(scores))
    splits = KFold(n_splits=folds, shuffle=False).split(indices) if folds > 1 else [(indices, indices)]

    def accuracy(threshold: float, rows: np.ndarray) -> float:
        accepted = distance[rows] < threshold
        right = np.sum(accepted & same[rows]) + np.sum(~accepted & ~same[rows])
        return float(right) / len(rows)

    results = []
    for train, test in splits:
        best = int(np.argmax([accuracy(t, train) for t in thresholds]))
        results.append(accuracy(thresholds[best], test))
    return float(np.mean(results)), float(np.std(results))


def ijb_reference(scores: np.ndarray, same: np.ndarray, targets: tuple[float, ...]) -> dict[str, float]:
    fpr, tpr, _ = sklearn_metrics.roc_curve(same, scores)
    out = {"auc": float(sklearn_metrics.auc(fpr, tpr))}
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    for far in targets:
        _, index = min(zip(abs(fpr - far), range(len(fpr))))
        out[f"tar_at_far_{far:.0e}"] = float(tpr[index])
    return out


def eer_reference(scores: np.ndarray, same: np.ndarray) -> float:
    """Walk the ROC's segments and solve fpr = 1 − tpr on the first one that reaches it."""
    fpr, tpr, _ = sklearn_metrics.roc_curve(same, scores, drop_intermediate=False)
    for (a, c), (b, e) in zip(zip(fpr[:-1], tpr[:-1]), zip(fpr[1:], tpr[1:])):
        if b + e - 1 >= 0:
            if b + e - 1 == 0:
                return float(b)
            t = (1 - a - c) / ((b - a) + (e - c))
            return float(a + t * (b - a))
    raise AssertionError("the ROC never reached fpr = 1 - tpr")


def check_against_insightface(scores: np.ndarray, same: np.ndarray, folds: int = 10) -> dict[str, float]:
    got = M.verification_metrics(torch.from_numpy(scores), torch.from_numpy(same), num_folds=folds)
    accuracy, std = lfw_reference(scores, same, folds)
    want = {"accuracy": accuracy, "accuracy_std": std, **ijb_reference(scores, same, M.FAR_TARGETS)}
    want["eer"] = eer_reference(scores, same)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-12, rel=0), (key, got[key], want[key])
    return got


def realistic_pairs(genuine: int, impostor: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    scores = np.concatenate([rng.normal(0.55, 0.15, genuine), rng.normal(0.05, 0.1, impostor)]).clip(-1, 1)
    same = np.concatenate([np.ones(genuine, bool), np.zeros(impostor, bool)])
    order = rng.permutation(len(scores))
    return scores[order], same[order]


def test_equals_insightface_on_lfw_sized_pairs() -> None:
    scores, same = realistic_pairs(3000, 3000, seed=0)  # LFW: 6000 pairs, half genuine
    got = check_against_insightface(scores, same)
    assert 0.9 < got["accuracy"] < 1.0 and 0.0 < got["eer"] < 0.1


def test_equals_insightface_with_many_impostors() -> None:
    scores, same = realistic_pairs(2000, 100_000, seed=1)  # FARs down to 1e-5 have points of their own
    got = check_against_insightface(scores, same)
    assert got["tar_at_far_1e-06"] <= got["tar_at_far_1e-04"] <= got["tar_at_far_1e-01"]


@given(
    st.integers(0, 2**31 - 1),
    st.integers(2, 60),
    st.sampled_from([1, 2, 3, 10]),
    st.sampled_from([None, 2, 8]),
    st.floats(0.05, 0.95),
)
def test_equals_insightface_on_any_pairs_with_ties(seed: int, n: int, folds: int, levels, genuine_rate: float) -> None:
    rng = np.random.default_rng(seed)
    same = rng.random(n) < genuine_rate
    same[0], same[1] = True, False  # both kinds occur
    raw = rng.uniform(-1, 1, n) + same * 0.5
    scores = raw.clip(-1, 1) if levels is None else np.round(raw.clip(-1, 1) * levels) / levels  # ties when levels
    check_against_insightface(scores, same, folds=min(folds, n))


def test_roc_curve_equals_sklearn() -> None:
    rng = np.random.default_rng(3)
    scores, same = np.round(rng.normal(size=500), 1), rng.random(500) < 0.3
    fpr, tpr, thresholds = M.roc_curve(torch.from_numpy(scores).float(), torch.from_numpy(same).int())
    want = sklearn_metrics.roc_curve(same, scores.astype(np.float32).astype(np.float64))
    for got, expected in zip((fpr, tpr, thresholds), want):
        np.testing.assert_array_equal(got.numpy(), expected)


def test_pair_cosines_and_the_lfw_layout() -> None:
    g = torch.Generator().manual_seed(0)
    e = torch.randn(40, 8, generator=g, dtype=torch.float64)
    unit = e / e.norm(dim=1, keepdim=True)
    want = (unit[0::2] * unit[1::2]).sum(1)
    torch.testing.assert_close(M.pair_cosines(e[0::2], e[1::2]), want, rtol=0, atol=1e-15)
    pairs = torch.tensor([[0, 3], [5, 5], [19, 0]])
    got = M.pair_cosines(e[:20], e[20:].reshape(2, 10, 8), pairs)  # leading dimensions are flattened
    torch.testing.assert_close(got, (unit[pairs[:, 0]] * unit[20 + pairs[:, 1]]).sum(1), rtol=0, atol=1e-15)
    assert M.pair_cosines(e[:3].half(), e[3:6].bfloat16()).dtype == torch.float32
    same = torch.arange(20) % 2 == 0
    scores = M.pair_cosines(e[0::2], e[1::2])
    assert M.pair_verification_metrics(e[0::2], e[1::2], same, num_folds=5) == M.verification_metrics(
        scores, same, num_folds=5
    )


def test_plot_roc_draws_one_curve(tmp_path) -> None:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    scores, same = realistic_pairs(100, 900, seed=4)
    ax = M.plot_roc(torch.from_numpy(scores), torch.from_numpy(same), label="ArcFace")
    (line,) = ax.get_lines()
    fpr, _, _ = M.roc_curve(torch.from_numpy(scores), torch.from_numpy(same))
    assert len(line.get_xdata()) == len(fpr) and ax.get_xscale() == "log"
    assert ax.get_legend().get_texts()[0].get_text().startswith("ArcFace (AUC 0.9")
    ax.figure.savefig(tmp_path / "roc.png")


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: M.verification_metrics(torch.rand(5), torch.ones(5, dtype=torch.bool)), ValueError,
         "same must mark both genuine .* but got 5 genuine of 5 pairs"),
        (lambda: M.verification_metrics(torch.rand(0), torch.ones(0, dtype=torch.bool)), ValueError,
         "but got 0 genuine of 0 pairs"),
        (lambda: M.verification_metrics(torch.rand(5), torch.ones(4, dtype=torch.bool)), ValueError,
         r"same must have the shape of scores \(5\), one per pair, but got shape \(4\)"),
        (lambda: M.verification_metrics(torch.rand(5), torch.rand(5)), TypeError, "same must be a bool"),
        (lambda: M.verification_metrics(torch.arange(5), torch.arange(5) % 2), TypeError,
         "scores must be a floating-point torch.Tensor"),
        (lambda: M.verification_metrics(torch.rand(4), torch.tensor([0, 1, 2, 1])), ValueError,
         "same must hold only True/False"),
        (lambda: M.verification_metrics(torch.tensor([0.1, math.nan, 0.3]), torch.tensor([True, False, True])),
         ValueError, r"scores has 1 NaN or infinite value\(s\)"),
        (lambda: M.verification_metrics(torch.rand(6), torch.arange(6) % 2 == 0), ValueError,
         r"num_folds must be at most the number of pairs \(6\), but got 10"),
        (lambda: M.verification_metrics(torch.rand(6), torch.arange(6) % 2 == 0, num_folds=0), ValueError,
         "num_folds must be an integer >= 1, but got 0"),
        (lambda: M.verification_metrics(torch.rand(20), torch.arange(20) % 2 == 0, far_targets=(0.0,)), ValueError,
         r"far_targets must be a non-empty sequence of rates in \(0, 1\]"),
        (lambda: M.pair_cosines(torch.randn(3, 4), torch.randn(2, 4)), ValueError,
         "first and second must have as many rows without pairs, but got 3 and 2"),
        (lambda: M.pair_cosines(torch.randn(3, 4), torch.randn(3, 5)), ValueError,
         "first and second must have one feature size d, but got 4 and 5"),
        (lambda: M.pair_cosines(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([[0, 3]])), ValueError,
         r"pairs index second out of range: its indices must be in \[0, 3\)"),
        (lambda: M.pair_cosines(torch.randn(3, 4), torch.randn(3, 4), torch.tensor([0, 1])), ValueError,
         r"pairs must be an integer tensor of shape \(P, 2\), but got \(2\) torch.int64"),
        (lambda: M.pair_verification_metrics(torch.randn(3, 4), torch.randn(3, 4), torch.ones(2, dtype=torch.bool)),
         ValueError, r"same must hold one value per pair \(3\), but got \(2\)"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_with_a_clear_error(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()
