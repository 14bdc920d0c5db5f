"""Zoo heads of issue #14, part b: AdaM-Softmax, L-Softmax and SoftTriple.

Each head against an independent float64 NumPy reference written from its paper (logits, loss with its
regulariser, gradients by finite differences of that reference), against its authors' code (re-implemented here in
plain torch from their equations, or pytorch-metric-learning called directly on the same weights), and through the
battery the other heads run in ``tests/nn/test_heads.py`` (eval without labels, state, transforms, dtypes).
``loss()`` == dense cross-entropy with every option is in ``tests/nn/test_loss.py``; the sharded forms in
``tests/distributed/sharded_heads.py``.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import mll
from mll import functional as MF

D, C = 6, 5


# ---------------------------------------------------------------------------------------------- NumPy references


def _np(t: Any) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def _normalize(a: np.ndarray) -> np.ndarray:
    norm = np.sqrt((a * a).sum(-1, keepdims=True))
    return np.divide(a, norm, out=np.zeros_like(a), where=norm > 0)


def _onehot(y: np.ndarray, c: int) -> np.ndarray:
    return (np.arange(c) == y[:, None]).astype(np.float64)


def _cross_entropy(logits: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy with (soft) targets ``t``, log-sum-exp by hand."""
    top = logits.max(1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(1))
    return lse * t.sum(1) - (t * logits).sum(1)


def ref_adam(x, w, margins, t, s, lam):
    """AdaptiveFace: s(cos θ_j − m_j t_j) and the loss mean(CE) − λ/C Σ m_j."""
    cos = _normalize(x) @ _normalize(w).T
    logits = s * (cos - margins[None, :] * t)
    return logits, _cross_entropy(logits, t).mean() - lam * margins.mean()


def _soft_pool(cos_k: np.ndarray, k: int, gamma: float) -> np.ndarray:
    """SoftTriple's relaxed similarity: Σ_k softmax_k(cos/γ)·cos over each class's K centres (a loop over classes)."""
    n, ck = cos_k.shape
    out = np.zeros((n, ck // k))
    for c in range(ck // k):
        block = cos_k[:, c * k : (c + 1) * k]
        p = np.exp((block - block.max(1, keepdims=True)) / gamma)
        out[:, c] = (p / p.sum(1, keepdims=True) * block).sum(1)
    return out


def ref_center_regularizer(w: np.ndarray, k: int, eps: float = 1e-5) -> np.ndarray:
    """Σ_{t<t'} sqrt(2 + ε − 2 ŵ_t·ŵ_t') per class, two loops."""
    w = _normalize(w)
    out = np.zeros(w.shape[0] // k)
    for c in range(len(out)):
        for t in range(k):
            for u in range(t + 1, k):
                out[c] += math.sqrt(2 + eps - 2 * float(w[c * k + t] @ w[c * k + u]))
    return out


def ref_soft_triple(x, w, t, k, lam, gamma, delta, tau):
    """SoftTriple: λ(S' − δ t) and the loss mean(CE) + τ ΣR/(C K (K − 1))."""
    s_prime = _soft_pool(_normalize(x) @ _normalize(w).T, k, gamma)
    logits = lam * (s_prime - delta * t)
    c = s_prime.shape[1]
    reg = tau * ref_center_regularizer(w, k).sum() / (c * k * (k - 1)) if k > 1 else 0.0
    return logits, _cross_entropy(logits, t).mean() + reg


def ref_large_margin(x, w, t, m, lam, s):
    """L-Softmax: ‖w_j‖‖x‖cos θ_j, and at a target ‖w_y‖‖x‖(λ cos θ + ψ(θ))/(1 + λ), ψ(θ) = (−1)^k cos(mθ) − 2k
    on [kπ/m, (k+1)π/m] (k found by a loop); soft targets t give the margin 1 + (m − 1)t."""
    norms = np.sqrt((x * x).sum(1))[:, None] * np.sqrt((w * w).sum(1))[None, :]
    cos = np.clip((x @ w.T) / norms, -1, 1)
    logits = norms * cos
    for i in range(x.shape[0]):
        for j in range(w.shape[0]):
            if t[i, j] == 0:
                continue
            mm = 1 + (m - 1) * t[i, j]
            theta = math.acos(cos[i, j])
            k = 0
            while theta > (k + 1) * math.pi / mm:
                k += 1
            psi = (-1) ** k * math.cos(mm * theta) - 2 * k
            logits[i, j] = norms[i, j] * (lam * cos[i, j] + psi) / (1 + lam)
    return s * logits


# ---------------------------------------------------------------------------------------------- the heads


def adam(**kw: Any) -> mll.AdaMSoftmax:
    kw.setdefault("scale", 8.0)
    return mll.AdaMSoftmax(D, C, margin=torch.linspace(0.1, 0.5, C), lambda_=3.0, **kw)


def soft_triple(**kw: Any) -> mll.SoftTriple:
    return mll.SoftTriple(D, C, 3, margin=0.05, tau=0.5, pooling_temperature=0.2, **kw)


def large_margin(**kw: Any) -> mll.LargeMarginSoftmax:
    return mll.LargeMarginSoftmax(D, C, margin=3.0, lambda_=0.5, scale=1.5, **kw)


#: name -> constructor (dense head)
ZOO: dict[str, Callable[..., torch.nn.Module]] = {
    "AdaMSoftmax": adam,
    "SoftTriple": soft_triple,
    "LargeMarginSoftmax": large_margin,
}


def regularizer(head: torch.nn.Module) -> Any:
    """What the head's loss() adds to the cross-entropy (0 when nothing)."""
    return head.regularizer() if hasattr(head, "regularizer") else 0.0


def batch(n: int = 4, dtype: torch.dtype = torch.float64, soft: bool = False, seed: int = 0) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(n, D, generator=g, dtype=dtype)
    if soft:
        return x, torch.softmax(torch.randn(n, C, generator=g, dtype=dtype), -1)
    return x, torch.randint(0, C, (n,), generator=g)


def full_loss(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The dense path's objective: cross-entropy of the logits plus the head's regulariser."""
    return F.cross_entropy(head(x, y), y) + regularizer(head)


# ---------------------------------------------------------------------------------------------- AdaM-Softmax


@pytest.mark.parametrize("soft", [False, True])
def test_adam_matches_the_paper(soft) -> None:
    head = adam(dtype=torch.float64)
    x, y = batch(soft=soft)
    t = _np(y) if soft else _onehot(_np(y).astype(int), C)
    logits, loss = ref_adam(_np(x), _np(head.weight), _np(head.margin), t, 8.0, 3.0)
    np.testing.assert_allclose(_np(head(x, y)), logits, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(float(full_loss(head, x, y).detach()), loss, rtol=1e-12)
    np.testing.assert_allclose(float(head.loss(x, y, chunk_size=2).detach()), loss, rtol=1e-12)


def test_adam_margin_gradient_is_the_papers() -> None:
    """∂L/∂m_j = s·Σ_{i: y_i = j}(1 − p_ij)/N − λ/C: descent lowers a class's margin by its samples' error (the
    cross-entropy) and raises every margin by λ/C (the regulariser)."""
    head = adam(dtype=torch.float64)
    x, y = batch(n=7)
    loss = head.loss(x, y, chunk_size=2)
    (grad,) = torch.autograd.grad(loss, [head.margin])
    logits, _ = ref_adam(_np(x), _np(head.weight), _np(head.margin), _onehot(_np(y).astype(int), C), 8.0, 3.0)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    want = np.full(C, -3.0 / C)
    for i, j in enumerate(_np(y).astype(int)):
        want[j] += 8.0 * (1 - p[i, j]) / len(y)
    np.testing.assert_allclose(_np(grad), want, rtol=1e-10, atol=1e-12)


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


# ---------------------------------------------------------------------------------------------- SoftTriple


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("k", [1, 3])
def test_soft_triple_matches_the_paper(soft, k) -> None:
    head = mll.SoftTriple(D, C, k, margin=0.05, tau=0.5, pooling_temperature=0.2, dtype=torch.float64)
    x, y = batch(soft=soft)
    t = _np(y) if soft else _onehot(_np(y).astype(int), C)
    logits, loss = ref_soft_triple(_np(x), _np(head.weight), t, k, 20.0, 0.2, 0.05, 0.5)
    np.testing.assert_allclose(_np(head(x, y)), logits, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(float(full_loss(head, x, y).detach()), loss, rtol=1e-12)
    np.testing.assert_allclose(float(head.loss(x, y, chunk_size=2).detach()), loss, rtol=1e-12)
    np.testing.assert_allclose(_np(head.eval()(x)), logits + 20.0 * 0.05 * t, rtol=1e-12, atol=1e-12)


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
    np.testing.assert_allclose(_np(got), ref_center_regularizer(_np(w), 4), rtol=1e-12)
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


# ---------------------------------------------------------------------------------------------- L-Softmax


@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize(("m", "lam"), [(1.0, 0.0), (2.0, 0.0), (4.0, 0.0), (3.0, 5.0), (2.5, 1.0)])
def test_large_margin_matches_the_paper(soft, m, lam) -> None:
    head = mll.LargeMarginSoftmax(D, C, margin=m, lambda_=lam, scale=1.5, dtype=torch.float64)
    with torch.no_grad():
        head.weight.mul_(torch.linspace(0.5, 3.0, C, dtype=torch.float64)[:, None])  # classes of different norms
    x, y = batch(n=12, soft=soft)
    t = _np(y) if soft else _onehot(_np(y).astype(int), C)
    logits = ref_large_margin(_np(x), _np(head.weight), t, m, lam, 1.5)
    np.testing.assert_allclose(_np(head(x, y)), logits, rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(_np(MF.large_margin_logits(x, head.weight, y, m, lambda_=lam, scale=1.5)), logits,
                               rtol=1e-11, atol=1e-11)  # fmt: skip
    np.testing.assert_allclose(float(head.loss(x, y, chunk_size=2).detach()), _cross_entropy(logits, t).mean(),
                               rtol=1e-11)  # fmt: skip


def test_large_margin_gradients_are_the_references() -> None:
    """Gradients through the norms too: against finite differences of the NumPy reference (central, float64)."""
    head = mll.LargeMarginSoftmax(D, C, margin=3.0, lambda_=0.5, dtype=torch.float64)
    x, y = batch(n=5)
    t = _onehot(_np(y).astype(int), C)
    xs = x.clone().requires_grad_(True)
    gx, gw = torch.autograd.grad(head.loss(xs, y, chunk_size=2), [xs, head.weight])

    def f(xv, wv):
        return _cross_entropy(ref_large_margin(xv, wv, t, 3.0, 0.5, 1.0), t).mean()

    xv, wv, h = _np(x), _np(head.weight), 1e-6
    for grad, arr, which in ((gx, xv, 0), (gw, wv, 1)):
        num = np.zeros_like(arr)
        for idx in np.ndindex(arr.shape):
            plus, minus = arr.copy(), arr.copy()
            plus[idx] += h
            minus[idx] -= h
            args_p = (plus, wv) if which == 0 else (xv, plus)
            args_m = (minus, wv) if which == 0 else (xv, minus)
            num[idx] = (f(*args_p) - f(*args_m)) / (2 * h)
        np.testing.assert_allclose(_np(grad), num, rtol=1e-6, atol=1e-8)


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
    with pytest.raises(ValueError, match=r"SphereFace lambda_ must be a finite float >= 0"):
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


# ---------------------------------------------------------------------------------------------- every head here


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("soft", [False, True])
def test_gradcheck_dense_training_step(name, soft) -> None:
    head = ZOO[name](dtype=torch.float64)
    x, y = batch(soft=soft)
    names = [n for n, p in head.named_parameters() if p.requires_grad]
    params = [p.detach().clone().requires_grad_(True) for n, p in head.named_parameters() if p.requires_grad]

    def f(x, *ps):
        return F.cross_entropy(torch.func.functional_call(head, dict(zip(names, ps)), (x, y)), y)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), *params))


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("target", ["indices", "soft"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_equals_dense(name, target, reduction) -> None:
    head = ZOO[name](dtype=torch.float64)
    twin = copy.deepcopy(head)
    x, y = batch(n=6, soft=target == "soft")
    given_, dense_y = y, y
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    got = head.loss(xs[0], given_, reduction=reduction, chunk_size=2)
    ce = F.cross_entropy(twin(xs[1], dense_y), dense_y, reduction="none")
    rows = ce + regularizer(twin)
    want = rows if reduction == "none" else (rows.sum() if reduction == "sum" else rows.mean())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    ps = [p for p in head.parameters() if p.requires_grad]
    qs = [p for p in twin.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(got.sum(), [xs[0], *ps]), torch.autograd.grad(want.sum(), [xs[1], *qs])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ZOO)
def test_hard_labels_equal_one_hot_soft_labels(name) -> None:
    head = ZOO[name](dtype=torch.float64)
    x, y = batch()
    onehot = F.one_hot(y, C).double()
    torch.testing.assert_close(head(x, y), head(x, onehot), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.loss(x, y), head.loss(x, onehot), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ZOO)
def test_eval_mode_needs_no_labels_and_changes_nothing(name) -> None:
    head = ZOO[name]().eval()
    x, y = batch(dtype=torch.float32)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    out = head(x)
    torch.testing.assert_close(head(x, y), out)
    torch.testing.assert_close(out, eval_logits(head, x))
    for k, v in head.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match=rf"{name} needs labels in training mode"):
        head.train()(x)


def eval_logits(head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(head, mll.LargeMarginSoftmax):  # the margin-free logits it trains (documented)
        return x @ head.weight.T * head.scale
    return MF.cosine_logits(x, head.weight, head.num_sub_centers, pooling=head.pooling,
                            pooling_temperature=head.pooling_temperature) * head.scale  # fmt: skip


@pytest.mark.parametrize("name", ZOO)
def test_state_dict_functional_call_and_leading_dims(name) -> None:
    head, fresh = ZOO[name](), ZOO[name]()
    with torch.no_grad():
        fresh.weight.normal_()
    x, y = batch(dtype=torch.float32)
    head.loss(x, y).backward()
    fresh.load_state_dict(head.state_dict())
    torch.testing.assert_close(fresh(x, y), head(x, y))
    state = {**dict(fresh.named_parameters()), **dict(fresh.named_buffers())}
    other = ZOO[name]()
    torch.testing.assert_close(torch.func.functional_call(other, state, (x, y)), head(x, y))
    x3, y3 = torch.randn(2, 3, D), torch.randint(0, C, (2, 3))
    torch.testing.assert_close(head(x3, y3).reshape(6, C), head(x3.reshape(6, D), y3.reshape(6)))
    torch.testing.assert_close(head.loss(x3, y3, reduction="none").reshape(6), head.loss(x3.reshape(6, D),
                               y3.reshape(6), reduction="none"))  # fmt: skip


@pytest.mark.parametrize("name", ZOO)
def test_compile_and_func_grad_equal_eager(name) -> None:
    head = ZOO[name](dtype=torch.float64)
    x, y = batch()
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, y), head(x, y), rtol=1e-12, atol=1e-12)
    names = [n for n, p in head.named_parameters() if p.requires_grad]
    params = {n: p.detach().clone() for n, p in head.named_parameters() if p.requires_grad}

    def f(ps):
        return F.cross_entropy(torch.func.functional_call(head, ps, (x, y)), y)

    grads = torch.func.grad(f)(params)
    want = torch.autograd.grad(f({n: p.requires_grad_(True) for n, p in params.items()}), list(params.values()))
    for n, g in zip(names, want):
        torch.testing.assert_close(grads[n], g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_at_cos_plus_minus_one(name, dtype) -> None:
    head = ZOO[name](dtype=dtype)
    k = head.num_sub_centers
    with torch.no_grad():
        head.weight[k : 2 * k] = head.weight[k]
    w = head.weight.detach()
    x = torch.stack([w[0], -w[k], torch.zeros(D, dtype=dtype)]).requires_grad_(True)
    y = torch.tensor([0, 1, 2])
    out = head(x, y)
    F.cross_entropy(out.float(), y).backward()
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    x.grad = None
    loss = head.loss(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in head.parameters())


@pytest.mark.parametrize("name", ZOO)
def test_bf16_autocast_keeps_dtypes_and_is_near_float32(name) -> None:
    heads = [ZOO[name]() for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    x, y = batch(n=8, dtype=torch.float32)
    xs = [x.clone().requires_grad_(True) for _ in heads]
    want = heads[0].loss(xs[0], y)
    dtypes = {k: v.dtype for k, v in heads[1].state_dict().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = heads[1].loss(xs[1], y)
        dense = F.cross_entropy(heads[1](x, y).float(), y) + regularizer(heads[1])
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got, want.detach(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(dense, want.detach(), rtol=3e-2, atol=3e-2)
    got.backward()
    assert {k: v.dtype for k, v in heads[1].state_dict().items()} == dtypes
    assert all(
        p.grad is None or (p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()) for p in heads[1].parameters()
    )


@pytest.mark.parametrize("name", ZOO)
def test_bad_labels_and_features_name_the_argument(name) -> None:
    head = ZOO[name]()
    x, _ = batch(dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"labels must hold class indices in \[0, {C}\)"):
        head(x, torch.tensor([0, 1, 2, C]))
    with pytest.raises(ValueError, match=rf"labels must hold class indices in \[0, {C}\)"):
        head.loss(x, torch.tensor([0, 1, 2, C]))
    with pytest.raises(ValueError, match=rf"input must have shape \(\*, {D}\)"):
        head(torch.randn(4, D + 1), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("name", ZOO)
def test_sharded_world_of_one_and_blocks(name) -> None:
    head = ZOO[name](dtype=torch.float64)
    sharded = getattr(mll, "Sharded" + name)
    shard = sharded.from_dense(copy.deepcopy(head))
    x, y = batch(n=6)
    torch.testing.assert_close(shard.loss(x, y), head.loss(x, y), rtol=1e-12, atol=1e-12)
    blocks = [sharded.from_dense(head, class_range=r) for r in ((0, 2), (2, C))]
    merged = mll.nn.dense_state_dict([b.state_dict() for b in blocks])
    assert all(torch.equal(merged[k], v) for k, v in head.state_dict().items())
    assert "class_range=[2, 5)" in repr(blocks[1])


def test_every_zoo_head_is_exported_with_its_sharded_form() -> None:
    for name in ZOO:
        assert name in mll.__all__ and f"Sharded{name}" in mll.__all__
        assert getattr(mll, f"Sharded{name}").dense is getattr(mll, name)


def test_math_constant_names() -> None:
    assert MF.ADAPTIVE.title == "AdaM-Softmax" and math.isclose(MF.ADAPTIVE.target_logit(0.0, 0.3), 0.7)
