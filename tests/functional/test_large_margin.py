"""The LARGE_MARGIN family (L-Softmax, Liu et al., ICML 2016; ``mll.functional.large_margin_logits``): its value and
derivatives against autograd, the identity without a margin, the chunked loss against the dense logits, ``torch.func``
and ``torch.compile``. The head's tests are in ``tests/nn/test_large_margin.py``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mll import functional as MF
from mll.functional.large_margin import _large_margin_value_and_slope, large_margin

D, C = 6, 5


def _psi(cos: torch.Tensor, m: float, lam: float) -> torch.Tensor:
    """(λ cos θ + (−1)^k cos(mθ) − 2k)/(1 + λ) through acos, for autograd (k is piecewise constant)."""
    theta = torch.acos(cos)
    k = torch.floor(m * theta / math.pi).detach()
    return (lam * cos + (1 - 2 * torch.remainder(k, 2)) * torch.cos(m * theta) - 2 * k) / (1 + lam)


@given(
    c=st.floats(-0.99, 0.99), a=st.floats(0.1, 10.0), b=st.floats(0.1, 10.0), m=st.floats(1.0, 5.0),
    lam=st.floats(0.0, 5.0),
)  # fmt: skip
def test_large_margin_value_and_its_derivatives_are_autograds(c, a, b, m, lam) -> None:
    """value = ab·ψ(d/ab); the returned slope is ∂/∂d, and autograd through the value gives ∂/∂a and ∂/∂b."""
    d = torch.tensor(c * a * b, dtype=torch.float64, requires_grad=True)
    at = torch.tensor(a, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    want = at * bt * _psi(d / (at * bt), m, lam)
    want_grads = torch.autograd.grad(want, [d, at, bt])
    a2, b2 = at.detach().clone().requires_grad_(True), bt.detach().clone().requires_grad_(True)
    m_t, lam_t = torch.tensor(m, dtype=torch.float64), torch.tensor(lam, dtype=torch.float64)
    value, slope = _large_margin_value_and_slope(d.detach(), 1.0, a2, b2, m_t, lam_t)
    torch.testing.assert_close(value, want.detach(), rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(slope, want_grads[0], rtol=1e-7, atol=1e-9)
    got = torch.autograd.grad(value, [a2, b2])
    torch.testing.assert_close(got[0], want_grads[1], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(got[1], want_grads[2], rtol=1e-7, atol=1e-9)


def test_large_margin_without_a_margin_is_the_dot_product_exactly() -> None:
    d = torch.randn(50, dtype=torch.float64) * 3
    a, b = torch.rand(50, dtype=torch.float64) + 1, torch.rand(50, dtype=torch.float64) + 2
    for w, m in ((0.0, 4.0), (1.0, 1.0)):
        value, slope = _large_margin_value_and_slope(d, w, a, b, torch.tensor(m, dtype=torch.float64),
                                                     torch.tensor(0.0, dtype=torch.float64))  # fmt: skip
        assert torch.equal(value, d) and torch.equal(slope, torch.ones_like(d))


@pytest.mark.parametrize("soft", [False, True])
def test_large_margin_functional_chunked_loss_equals_the_dense_logits(soft) -> None:
    x = torch.randn(7, D, dtype=torch.float64) * 2
    w = torch.randn(C, D, dtype=torch.float64) * torch.linspace(0.5, 2, C, dtype=torch.float64)[:, None]
    y = torch.softmax(torch.randn(7, C, dtype=torch.float64), -1) if soft else torch.randint(0, C, (7,))
    m = torch.linspace(1.0, 4.0, C, dtype=torch.float64)  # per class
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ws = [w.clone().requires_grad_(True) for _ in range(2)]
    dense = F.cross_entropy(MF.large_margin_logits(xs[0], ws[0], y, m, lambda_=0.5, scale=2.0), y)
    chunked = MF.margin_cross_entropy(xs[1], ws[1], y, scale=2.0, margin=large_margin(xs[1], ws[1], m, 0.5),
                                      chunk_size=2, normalized=False)  # fmt: skip
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(chunked, [xs[1], ws[1]]), torch.autograd.grad(dense, [xs[0], ws[0]])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_large_margin_logits_under_vmap_grad_and_compile() -> None:
    x = torch.randn(2, 4, D, dtype=torch.float64)
    w = torch.randn(C, D, dtype=torch.float64)
    y = torch.randint(0, C, (2, 4))

    def f(xb, yb):
        return MF.large_margin_logits(xb, w, yb, 3.0)

    looped = torch.stack([f(x[i], y[i]) for i in range(2)])
    torch.testing.assert_close(torch.func.vmap(f)(x, y), looped, rtol=1e-12, atol=1e-12)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x[0], y[0]), looped[0], rtol=1e-12, atol=1e-12)
    g = torch.func.grad(lambda xb: F.cross_entropy(f(xb, y[0]), y[0]))(x[0])
    xr = x[0].clone().requires_grad_(True)
    (want,) = torch.autograd.grad(F.cross_entropy(f(xr, y[0]), y[0]), xr)
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)
