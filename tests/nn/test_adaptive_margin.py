"""AdaM-Softmax (Liu et al., CVPR 2019; ``mll.AdaMSoftmax``) against an independent float64 NumPy reference
written from its paper (logits, loss with its regulariser, gradients), against its authors' code (FaceX-Zoo,
re-implemented here in plain torch from their equations), its margins' projection, and its errors."""

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
from tests.nn.regularized_heads import C, D, adam, batch, full_loss


@pytest.mark.parametrize("soft", [False, True])
def test_adam_matches_the_paper(soft) -> None:
    head = adam(dtype=torch.float64)
    x, y = batch(soft=soft)
    t = ref.as_np(y) if soft else ref.onehot(ref.as_np(y).astype(int), C)
    logits, loss = ref.adam_softmax(ref.as_np(x), ref.as_np(head.weight), ref.as_np(head.margin), t, 8.0, 3.0)
    np.testing.assert_allclose(ref.as_np(head(x, y)), logits, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(float(full_loss(head, x, y).detach()), loss, rtol=1e-12)
    np.testing.assert_allclose(float(head.loss(x, y, chunk_size=2).detach()), loss, rtol=1e-12)


def test_adam_margin_gradient_is_the_papers() -> None:
    """∂L/∂m_j = s·Σ_{i: y_i = j}(1 − p_ij)/N − λ/C: descent lowers a class's margin by its samples' error (the
    cross-entropy) and raises every margin by λ/C (the regulariser)."""
    head = adam(dtype=torch.float64)
    x, y = batch(n=7)
    loss = head.loss(x, y, chunk_size=2)
    (grad,) = torch.autograd.grad(loss, [head.margin])
    logits, _ = ref.adam_softmax(
        ref.as_np(x), ref.as_np(head.weight), ref.as_np(head.margin), ref.onehot(ref.as_np(y).astype(int), C), 8.0, 3.0
    )
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = np.full(C, -3.0 / C)
    for i, j in enumerate(ref.as_np(y).astype(int)):
        want[j] += 8.0 * (1 - p[i, j]) / len(y)
    np.testing.assert_allclose(ref.as_np(grad), want, rtol=1e-10, atol=1e-12)


def facex_adam_softmax(feats, labels, kernel, adam_, scale, lamda):
    """FaceX-Zoo ``head/AdaM_Softmax.py`` (commit 16b793a), its forward re-written from its equations: kernel is
    (d, C), normalised over dim 0; cosines clamped to [−1, 1]; margins clamped to [0, 1]; the target entry gets
    cos − m_y; everything times the scale; L_m = λ(1 − mean m)."""
    cos = torch.mm(F.normalize(feats), F.normalize(kernel, dim=0)).clamp(-1, 1)
    m = adam_[:, labels].view(-1, 1)
    target = torch.zeros_like(cos, dtype=torch.bool).scatter_(1, labels.view(-1, 1), True)
    out = torch.where(target, cos - m, cos) * scale
    return out, lamda * (1 - adam_.sum(1) / adam_.shape[1])


def test_adam_against_the_authors_code() -> None:
    head = adam(dtype=torch.float64)
    kernel = head.weight.detach().T.clone().requires_grad_(True)
    adam_ = head.margin.detach().view(1, C).clone().requires_grad_(True)
    x, y = batch(n=8)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    out, lm = facex_adam_softmax(xs[0], y, kernel, adam_, 8.0, 3.0)
    theirs = F.cross_entropy(out, y) + lm.sum()
    ours = head.loss(xs[1], y, chunk_size=2)
    torch.testing.assert_close(head(x, y), out.detach(), rtol=1e-12, atol=1e-12)
    # the authors' L_m is ours plus the constant λ (their "ensure the loss > 0"): the same gradients
    torch.testing.assert_close(ours + 3.0, theirs, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(ours, [xs[1], head.weight, head.margin])
    want = torch.autograd.grad(theirs, [xs[0], kernel, adam_])
    torch.testing.assert_close(got[0], want[0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[1], want[1].T, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got[2], want[2].view(C), rtol=1e-10, atol=1e-12)


def test_adam_projects_its_margins_each_training_step_only() -> None:
    head = adam(dtype=torch.float64)
    with torch.no_grad():
        head.margin.copy_(torch.tensor([-0.2, 0.3, 1.4, 1.0, 0.0], dtype=torch.float64))
    x, y = batch()
    head.eval()
    head(x, y)
    head.loss(x, y)
    assert head.margin[0] == -0.2 and head.margin[2] == 1.4  # eval: no projection
    head.train()
    first = F.cross_entropy(head(x, y), y)
    torch.testing.assert_close(head.margin.detach(), torch.tensor([0.0, 0.3, 1.0, 1.0, 0.0], dtype=torch.float64))
    # a second forward before backward: the projection (idempotent, on .data) leaves the first graph valid
    second = head.loss(x, y)
    (first + second).backward()
    assert torch.isfinite(head.margin.grad).all()


def test_adam_regularizer_and_reductions() -> None:
    head = adam(dtype=torch.float64)
    x, y = batch(n=6)
    reg = head.regularizer()
    torch.testing.assert_close(reg, -3.0 * head.margin.mean())
    (g,) = torch.autograd.grad(reg, [head.margin])
    torch.testing.assert_close(g, torch.full((C,), -3.0 / C, dtype=torch.float64))
    ce = F.cross_entropy(head(x, y), y, reduction="none").detach()
    rows = head.loss(x, y, reduction="none").detach()
    torch.testing.assert_close(rows, ce + reg.detach())
    torch.testing.assert_close(head.loss(x, y, reduction="sum").detach(), (ce + reg.detach()).sum())
    torch.testing.assert_close(head.loss(x, y).detach(), (ce + reg.detach()).mean())


@given(
    seed=st.integers(0, 2**16),
    j=st.integers(0, C - 1),
    bump=st.floats(0.01, 0.3),
)
def test_adam_loss_grows_with_a_class_margin(seed, j, bump) -> None:
    """A larger margin of a class that has samples makes the cross-entropy larger (the regulariser aside)."""
    head = adam(dtype=torch.float64)
    x, y = batch(n=6, seed=seed)
    y[0] = j
    with torch.no_grad():
        before = F.cross_entropy(head(x, y), y)
        head.margin[j] += bump * (1 - head.margin[j])
        after = F.cross_entropy(head(x, y), y)
    assert after > before


def test_adam_bad_arguments_name_themselves() -> None:
    with pytest.raises(ValueError, match=r"AdaM-Softmax margin must be a float or a tensor of shape \(5,\)"):
        mll.AdaMSoftmax(D, C, margin=torch.zeros(3))
    with pytest.raises(ValueError, match=r"AdaM-Softmax margin must be in \[0, 1\], but got 1.5"):
        mll.AdaMSoftmax(D, C, margin=1.5)
    with pytest.raises(ValueError, match=r"AdaM-Softmax lambda_ must be a finite float >= 0, but got -1"):
        mll.AdaMSoftmax(D, C, lambda_=-1)
    with pytest.raises(ValueError, match=r"margin must have shape \(C,\)"):
        MF.adaptive_margin_regularizer(torch.zeros(2, 3))
