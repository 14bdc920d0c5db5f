"""The row normalisation's backward folded in place (``mll/functional/_engine/normalization.py``) and the dense
cosines' two backward forms: in place for eager first derivatives, out of place (differentiable) otherwise."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mll import functional as MF
from mll.functional._engine import normalization
from mll.functional._engine.normalization import fold_normalization_


def _reference(d: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """The gradient of L = Σ D·normalize(w) with respect to w, by autograd through F.normalize, where D = the raw
    rows' gradient times ‖w‖ (the cosine's fold hands ``D = ∂L/∂ŵ · inv``)."""
    w = w.clone().requires_grad_(True)
    w_hat = F.normalize(w, dim=-1, eps=eps)
    inv = 1 / torch.linalg.vector_norm(w.detach(), dim=-1).clamp(min=eps)
    (w_hat * (d / inv[:, None])).sum().backward()
    return w.grad


@given(
    rows=st.integers(0, 40),
    width=st.integers(1, 9),
    block=st.integers(1, 64),
    zeros=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_fold_matches_autograd_through_normalize(rows, width, block, zeros, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, width, generator=g, dtype=torch.float64)
    w[: min(zeros, rows)] = 0.0  # rows at ‖w‖ ≤ ε: the normalisation is w/ε there, D passes as it is
    d = torch.randn(rows, width, generator=g, dtype=torch.float64)
    eps = 1e-12
    norms = torch.linalg.vector_norm(w, dim=-1)
    inv = norms.clamp(min=eps).reciprocal()
    old = normalization.BLOCK_ELEMENTS
    normalization.BLOCK_ELEMENTS = block  # several blocks, a last partial one, blocks of one row
    try:
        out = fold_normalization_(d.clone(), w, inv, norms > eps)
    finally:
        normalization.BLOCK_ELEMENTS = old
    torch.testing.assert_close(out, _reference(d, w, eps), rtol=1e-12, atol=1e-12)


def test_fold_writes_into_its_argument_only() -> None:
    w, d = torch.randn(5, 3), torch.randn(5, 3)
    w0, d_in = w.clone(), d.clone()
    inv = torch.linalg.vector_norm(w, dim=-1).reciprocal()
    out = fold_normalization_(d_in, w, inv, torch.ones(5, dtype=torch.bool))
    assert out is d_in and not torch.equal(d_in, d)
    assert torch.equal(w, w0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_cosine_in_place_backward_equals_the_differentiable_one(dtype) -> None:
    """Eager first derivatives take the in-place fold; ``create_graph=True`` the differentiable form: same numbers,
    including zero rows and more rows than one block."""
    g = torch.Generator().manual_seed(0)
    rows = normalization.BLOCK_ELEMENTS // 16 + 37  # d = 16: more than one block
    w = torch.randn(rows, 16, generator=g, dtype=dtype)
    w[3] = 0.0
    x = torch.randn(6, 16, generator=g, dtype=dtype)
    up = torch.randn(6, rows, generator=g, dtype=dtype)
    grads = []
    for create_graph in (False, True):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        out = MF.cosine_logits(xi, wi)
        grads.append(torch.autograd.grad(out, (xi, wi), up, create_graph=create_graph))
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b.detach(), **tol)
    # and both equal autograd through the normalised copy of the weights
    xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    expected = torch.autograd.grad(F.linear(F.normalize(xi, dim=-1), F.normalize(wi, dim=-1)), (xi, wi), up)
    for a, b in zip(grads[0], expected):
        torch.testing.assert_close(a, b, **tol)
