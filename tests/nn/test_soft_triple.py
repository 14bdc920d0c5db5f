"""SoftTriple (Qian et al., ICCV 2019; ``mll.SoftTriple``) against an independent float64 NumPy reference written
from its paper, its authors' code (re-implemented in plain torch) and pytorch-metric-learning on the same weights;
the centre regulariser, its gradient and its merging of centres; its defaults and errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mll
from mll import functional as MF
from tests import reference_papers as ref
from tests.nn.regularized_heads import C, D, batch, full_loss


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_soft_triple_matches_the_paper(soft, k) -> None:
    head = mll.SoftTriple(D, C, k, margin=0.05, tau=0.5, pooling_temperature=0.2, dtype=torch.float64)
    x, y = batch(soft=soft)
    t = ref.as_np(y) if soft else ref.onehot(ref.as_np(y).astype(int), C)
    logits, loss = ref.soft_triple(ref.as_np(x), ref.as_np(head.weight), t, k, 20.0, 0.2, 0.05, 0.5)
    np.testing.assert_allclose(ref.as_np(head(x, y)), logits, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(float(full_loss(head, x, y).detach()), loss, rtol=1e-12)
    np.testing.assert_allclose(float(head.loss(x, y, chunk_size=2).detach()), loss, rtol=1e-12)
    np.testing.assert_allclose(ref.as_np(head.eval()(x)), logits + 20.0 * 0.05 * t, rtol=1e-12, atol=1e-12)


def test_soft_triple_defaults_are_the_authors() -> None:
    head = mll.SoftTriple(D, C)
    assert (head.num_sub_centers, float(head.scale), head.margin, head.tau) == (10, 20.0, 0.01, 0.2)
    assert (head.pooling, head.pooling_temperature) == ("soft", 0.1)


def idstcv_soft_triple(input, target, fc, la, gamma, tau, margin, c, k):
    """idstcv/SoftTriple ``loss/SoftTriple.py`` (commit cc1c32d), its forward re-written from its equations: fc is
    (d, C·K), centres normalised over dim 0; the input comes normalised from their network (``F.normalize`` in
    ``net/bninception.py``); softmax over each class's K similarities times 1/γ; CE of la·(S' − margin on the
    target); plus τ·Σ_{t<t'} sqrt(2 + 1e-5 − 2 w_t·w_t') / (C·K·(K − 1)) when τ > 0 and K > 1."""
    centers = F.normalize(fc, p=2, dim=0)
    sim = F.normalize(input).matmul(centers).reshape(-1, c, k)
    prob = F.softmax(sim * (1.0 / gamma), dim=2)
    sim_class = (prob * sim).sum(2)
    margin_m = torch.zeros_like(sim_class)
    margin_m[torch.arange(sim_class.shape[0]), target] = margin
    loss = F.cross_entropy(la * (sim_class - margin_m), target)
    pairs = torch.zeros(c * k, c * k, dtype=torch.bool)
    for i in range(c):
        for j in range(k):
            pairs[i * k + j, i * k + j + 1 : (i + 1) * k] = True
    sim_center = centers.t().matmul(centers)
    return loss + tau * torch.sqrt(2.0 + 1e-5 - 2.0 * sim_center[pairs]).sum() / (c * k * (k - 1.0))


def test_soft_triple_against_the_authors_code() -> None:
    head = mll.SoftTriple(D, C, 4, dtype=torch.float64)  # their train.py: λ = 20, γ = 0.1, τ = 0.2, δ = 0.01
    fc = head.weight.detach().T.clone().requires_grad_(True)
    x, y = batch(n=8)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    theirs = idstcv_soft_triple(xs[0], y, fc, 20.0, 0.1, 0.2, 0.01, C, 4)
    ours = head.loss(xs[1], y, chunk_size=2)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(ours, [xs[1], head.weight])
    want = torch.autograd.grad(theirs, [xs[0], fc])
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1].T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("k", [1, 4])
def test_soft_triple_against_pytorch_metric_learning(k) -> None:
    """pml's SoftTripleLoss is the classification part (it has no centre regulariser): equal to our loss without
    :meth:`regularizer`, in value and in the gradients of the features and the centres, on the same weights."""
    SoftTripleLoss = pytest.importorskip("pytorch_metric_learning.losses").SoftTripleLoss  # the bench extra

    head = mll.SoftTriple(D, C, k, dtype=torch.float64)
    theirs_fn = SoftTripleLoss(C, D, centers_per_class=k, la=20, gamma=0.1, margin=0.01)
    theirs_fn.fc.data = head.weight.detach().T.clone()
    x, y = batch(n=8)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ours = head.loss(xs[1], y, chunk_size=2) - head.regularizer()
    theirs = theirs_fn(xs[0], y)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(ours, [xs[1], head.weight])
    want = torch.autograd.grad(theirs, [xs[0], theirs_fn.fc])
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1].T, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_soft_triple_without_its_regularizer_is_pml_s_loss(chunk_size) -> None:
    """τ = 0: pml's SoftTripleLoss itself — ``loss()`` adds no term (``regularized`` is False) and the dense step
    needs no ``regularizer()``, which is a zero that still has a (zero) gradient."""
    SoftTripleLoss = pytest.importorskip("pytorch_metric_learning.losses").SoftTripleLoss  # the bench extra

    head = mll.SoftTriple(D, C, 4, tau=0.0, dtype=torch.float64)
    assert not head.regularized and mll.SoftTriple(D, C, 4).regularized and not mll.SoftTriple(D, C, 1).regularized
    theirs_fn = SoftTripleLoss(C, D, centers_per_class=4, la=20, gamma=0.1, margin=0.01)
    theirs_fn.fc.data = head.weight.detach().T.clone()
    x, y = batch(n=8)
    xs = [x.clone().requires_grad_(True) for _ in range(3)]
    theirs = theirs_fn(xs[0], y)
    ours = head.loss(xs[1], y, chunk_size=chunk_size)
    dense = F.cross_entropy(head(xs[2], y), y)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dense, theirs, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(ours, [xs[1], head.weight])
    want = torch.autograd.grad(theirs, [xs[0], theirs_fn.fc])
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1].T, rtol=1e-10, atol=1e-12)
    zero = head.regularizer()
    assert zero.item() == 0.0 and torch.equal(torch.autograd.grad(zero, head.weight)[0], torch.zeros_like(head.weight))
    head.tau = 0.2  # a later τ counts
    assert head.regularized and head.regularizer().item() > 0


def autograd_center_regularizer(w: torch.Tensor, k: int) -> torch.Tensor:
    """The regulariser in plain autograd (F.normalize, a Gram matrix per class, its upper triangle)."""
    w_hat = F.normalize(w).view(-1, k, w.shape[-1])
    gram = w_hat @ w_hat.transpose(1, 2)
    upper = torch.ones(k, k, dtype=torch.bool).triu(1)
    return torch.sqrt(2 + 1e-5 - 2 * gram[:, upper]).sum(-1)


@pytest.mark.parametrize("chunk", [1, 2, None])
def test_center_regularizer_is_the_papers_with_its_gradient(chunk) -> None:
    w = torch.randn(5 * 4, D, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda v: MF.soft_triple_regularizer(v, 4, chunk_size=chunk), (w.requires_grad_(),))
    w = w.detach().clone()
    w[5] = w[4] * 3  # two centres of class 1 coincide: the kink ε smooths (too curved there for finite differences)
    w[9] = 0.0  # a zero centre: ŵ = 0, as F.normalize makes it
    got = MF.soft_triple_regularizer(w, 4, chunk_size=chunk)
    np.testing.assert_allclose(ref.as_np(got), ref.center_regularizer(ref.as_np(w), 4), rtol=1e-12)
    ws = [w.clone().requires_grad_(True) for _ in range(2)]
    (g,) = torch.autograd.grad(MF.soft_triple_regularizer(ws[0], 4, chunk_size=chunk).sum(), ws[0])
    (want,) = torch.autograd.grad(autograd_center_regularizer(ws[1], 4).sum(), ws[1])
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-10)
    assert torch.equal(MF.soft_triple_regularizer(w, 1), torch.zeros(20, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_center_regularizer_is_finite_at_coinciding_centres_in_every_dtype(dtype) -> None:
    w = torch.randn(3, D).repeat(1, 2).view(6, D).to(dtype)  # every class's two centres coincide
    w.requires_grad_(True)
    r = MF.soft_triple_regularizer(w, 2)
    r.sum().backward()
    assert r.dtype == torch.float32 and torch.isfinite(r).all() and torch.isfinite(w.grad).all()
    torch.testing.assert_close(r, torch.full((3,), math.sqrt(1e-5)), rtol=1e-2, atol=1e-3)


def test_center_regularizer_merges_centres_and_distinct_centres_counts_them() -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(2 * 4, D, generator=g, dtype=torch.float64)
    w[1] = w[0] * 2 + 1e-4  # class 0: centres 0 and 1 coincide (within 1e-2), 2 and 3 apart
    w[6] = w[5]  # class 1: 5 and 6 coincide
    w[7] = w[4]  # and 7 with 4
    merged, counts = MF.soft_triple_distinct_centers(w, 4)
    assert merged.tolist() == [[False, True, False, False], [False, False, True, True]]
    assert counts.tolist() == [3, 2]
    # a gradient step on the regulariser alone moves every pair of a class's centres closer
    head = mll.SoftTriple(D, 2, 4, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(F.normalize(torch.randn(8, D, generator=g, dtype=torch.float64)))
    before = torch.cdist(head.weight.detach().view(2, 4, D), head.weight.detach().view(2, 4, D))
    head.regularizer().backward()
    with torch.no_grad():
        head.weight -= 0.05 * head.weight.grad / head.weight.grad.norm()
        moved = F.normalize(head.weight).view(2, 4, D)
    after = torch.cdist(moved, moved)
    upper = torch.ones(4, 4, dtype=torch.bool).triu(1)
    assert (after[:, upper] < before[:, upper]).all()
    assert head.distinct_centers().tolist() == [4, 4]


def test_soft_triple_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match=r"SoftTriple tau must be a finite float >= 0, but got -0.1"):
        mll.SoftTriple(D, C, tau=-0.1)
    with pytest.raises(ValueError, match=r"SoftTriple margin must be in \[0, 1\), but got 1.5"):
        mll.SoftTriple(D, C, margin=1.5)
    with pytest.raises(ValueError, match=r"weight must have shape \(num_classes \* num_sub_centers, d\)"):
        MF.soft_triple_regularizer(torch.zeros(7, D), 2)
    with pytest.raises(ValueError, match=r"max_distance must be a positive finite float"):
        MF.soft_triple_distinct_centers(torch.zeros(8, D), 2, max_distance=0)
