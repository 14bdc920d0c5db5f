"""L-Softmax (Liu et al., ICML 2016; ``mll.LargeMarginSoftmax``) against an independent float64 NumPy reference
written from its paper and pytorch-metric-learning on the same weights; its target logit falls with the margin;
finite at zero features and weights; its errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import mll
from mll import functional as MF
from tests import reference_papers as ref
from tests.nn.regularized_heads import C, D, batch


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize(("m", "lam"), [(1.0, 0.0), (2.0, 0.0), (4.0, 0.0), (3.0, 5.0), (2.5, 1.0)])
def test_large_margin_matches_the_paper(soft, m, lam) -> None:
    head = mll.LargeMarginSoftmax(D, C, margin=m, lambda_=lam, scale=1.5, dtype=torch.float64)
    with torch.no_grad():
        head.weight.mul_(torch.linspace(0.5, 3.0, C, dtype=torch.float64)[:, None])  # classes of different norms
    x, y = batch(n=12, soft=soft)
    t = ref.as_np(y) if soft else ref.onehot(ref.as_np(y).astype(int), C)
    logits = ref.large_margin(ref.as_np(x), ref.as_np(head.weight), t, m, lam, 1.5)
    np.testing.assert_allclose(ref.as_np(head(x, y)), logits, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(ref.as_np(MF.large_margin_logits(x, head.weight, y, m, lambda_=lam, scale=1.5)), logits,
                               rtol=1e-11, atol=1e-11)  # fmt: skip
    np.testing.assert_allclose(float(head.loss(x, y, chunk_size=2).detach()), ref.cross_entropy(logits, t).mean(),
                               rtol=1e-11)  # fmt: skip


def test_large_margin_gradients_are_the_references() -> None:
    """Gradients through the norms too: against finite differences of the NumPy reference (central, float64)."""
    head = mll.LargeMarginSoftmax(D, C, margin=3.0, lambda_=0.5, dtype=torch.float64)
    x, y = batch(n=5)
    t = ref.onehot(ref.as_np(y).astype(int), C)
    xs = x.clone().requires_grad_(True)
    gx, gw = torch.autograd.grad(head.loss(xs, y, chunk_size=2), [xs, head.weight])

    def f(xv, wv):
        return ref.cross_entropy(ref.large_margin(xv, wv, t, 3.0, 0.5, 1.0), t).mean()

    xv, wv, h = ref.as_np(x), ref.as_np(head.weight), 1e-6
    for grad, arr, which in ((gx, xv, 0), (gw, wv, 1)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            args_p = (plus, wv) if which == 0 else (xv, plus)
            args_m = (minus, wv) if which == 0 else (xv, minus)
            num[idx] = (f(*args_p) - f(*args_m)) / (2 * h)
        np.testing.assert_allclose(ref.as_np(grad), num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_large_margin_against_pytorch_metric_learning(m) -> None:
    """pml's LargeMarginSoftmaxLoss called directly on the same weights: loss and gradients (features, weights)."""
    # pytorch-metric-learning comes with the bench extra
    LargeMarginSoftmaxLoss = pytest.importorskip("pytorch_metric_learning.losses").LargeMarginSoftmaxLoss

    head = mll.LargeMarginSoftmax(D, C, margin=float(m), scale=1.5, dtype=torch.float64)
    with torch.no_grad():
        head.weight.mul_(torch.linspace(0.5, 3.0, C, dtype=torch.float64)[:, None])
    theirs_fn = LargeMarginSoftmaxLoss(C, D, margin=m, scale=1.5)
    theirs_fn.W.data = head.weight.detach().T.clone()
    x, y = batch(n=16)
    xs = [x.clone().requires_grad_(True) for _ in range(3)]
    theirs = theirs_fn(xs[0], y)
    for ours, xo in ((head.loss(xs[1], y, chunk_size=2), xs[1]), (F.cross_entropy(head(xs[2], y), y), xs[2])):
        torch.testing.assert_close(ours, theirs, rtol=1e-11, atol=1e-11)
        got = torch.autograd.grad(ours, [xo, head.weight])
        want = torch.autograd.grad(theirs, [xs[0], theirs_fn.W], retain_graph=True)
        torch.testing.assert_close(got[0], want[0], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(got[1], want[1].T, rtol=1e-9, atol=1e-11)
    head.eval()
    torch.testing.assert_close(head(x), theirs_fn.get_logits(x), rtol=1e-12, atol=1e-12)


@given(seed=st.integers(0, 2**16), m=st.floats(1.0, 6.0), bump=st.floats(0.05, 2.0))
def test_large_margin_target_logit_falls_with_the_margin(seed, m, bump) -> None:
    """ψ is non-increasing in m at every angle: a larger margin never raises the target logit."""
    head = mll.LargeMarginSoftmax(D, C, margin=m, dtype=torch.float64)
    x, y = batch(n=6, seed=seed)
    low = head(x, y).gather(1, y[:, None])
    head.margin = min(m + bump, 9.9)
    high = head(x, y).gather(1, y[:, None])
    assert (high <= low + 1e-12).all()


def test_large_margin_has_no_sub_centers_and_names_bad_arguments() -> None:
    with pytest.raises(ValueError, match=r"LargeMarginSoftmax has one weight vector per class"):
        mll.LargeMarginSoftmax(D, C, 2)
    with pytest.raises(ValueError, match=r"L-Softmax margin must be in \[1, 10\), but got 0.5"):
        mll.LargeMarginSoftmax(D, C, margin=0.5)
    with pytest.raises(ValueError, match=r"L-Softmax lambda_ must be a finite float >= 0"):
        mll.LargeMarginSoftmax(D, C, lambda_=-1.0)


def test_large_margin_zero_features_and_weights_are_finite() -> None:
    head = mll.LargeMarginSoftmax(D, C, dtype=torch.float64)
    with torch.no_grad():
        head.weight[1] = 0.0
    x = torch.randn(3, D, dtype=torch.float64)
    x[0] = 0.0
    x.requires_grad_(True)
    y = torch.tensor([0, 1, 2])
    for loss in (head.loss(x, y), F.cross_entropy(head(x, y), y)):
        gx, gw = torch.autograd.grad(loss, [x, head.weight])
        assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gw).all()
    assert head(x, y)[0].abs().max() == 0 and head(x, y)[:, 1].abs().max() == 0
