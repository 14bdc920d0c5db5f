"""SoftTriple's centre regulariser (``mll.functional.soft_triple_regularizer``) under ``torch.func.grad`` and
its refusal of a double backward. The head's tests are in ``tests/nn/test_soft_triple.py``."""

from __future__ import annotations

import pytest
import torch

from mll import functional as MF

D = 6


def test_soft_triple_regularizer_under_func_grad() -> None:
    w = torch.randn(4 * 3, D, dtype=torch.float64)
    g = torch.func.grad(lambda v: MF.soft_triple_regularizer(v, 3).sum())(w)
    wr = w.clone().requires_grad_(True)
    (want,) = torch.autograd.grad(MF.soft_triple_regularizer(wr, 3).sum(), wr)
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-12)


def test_soft_triple_regularizer_refuses_a_double_backward() -> None:
    """The chunked form (a chunk size given, or more than 2^16 weight elements) gives first derivatives only."""
    w = torch.randn(4 * 3, D, dtype=torch.float64, requires_grad=True)
    r = MF.soft_triple_regularizer(w, 3, chunk_size=2).sum()
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(r, w, create_graph=True)
    big = torch.randn(1100 * 3, 20, requires_grad=True)  # 66,000 elements: chunked without a chunk size too
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(MF.soft_triple_regularizer(big, 3).sum(), big, create_graph=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_a_few_centres_take_autograds_operations_with_the_chunked_values_and_gradients(dtype) -> None:
    """Below 2^16 elements the regulariser is written in autograd's operations: the chunked Function's values and
    first derivatives, with a zero centre, two identical centres (the kink, floored at ε) and two opposite ones."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5 * 4, D, generator=g, dtype=torch.float64)
    w[1] = 0.0
    w[5] = w[4] * 3.0  # the same direction: distance sqrt(ε)
    w[10] = -w[9]
    w = w.to(dtype)
    upstream = torch.rand(5, generator=g, dtype=torch.float64)
    results = []
    for chunk in (None, 2):
        leaf = w.clone().requires_grad_(True)
        r = MF.soft_triple_regularizer(leaf, 4, chunk_size=chunk)
        (grad,) = torch.autograd.grad((r * upstream.to(r.dtype)).sum(), leaf)
        results.append((r, grad))
    (few, few_grad), (chunked, chunked_grad) = results
    exact = dtype == torch.float64
    torch.testing.assert_close(few, chunked, rtol=1e-12 if exact else 1e-5, atol=1e-12 if exact else 1e-5)
    scale = float(chunked_grad.abs().max())
    tol = 1e-11 * scale if exact else 1e-2 * scale
    torch.testing.assert_close(few_grad, chunked_grad, rtol=0, atol=tol)
    assert torch.isfinite(few_grad).all()


def test_a_few_centres_give_a_double_backward() -> None:
    w = torch.randn(3 * 4, D, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda v: MF.soft_triple_regularizer(v, 4), (w,))
    torch.autograd.gradgradcheck(lambda v: MF.soft_triple_regularizer(v, 4), (w,))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")  # torch.func.hessian's own, in torch 2.13
def test_a_few_centres_work_under_the_transforms_and_the_eager_form_matches_them() -> None:
    """The eager few-centre regulariser (one Function, closed-form backward) against the same maths under
    ``torch.func`` (autograd's operations there): values and gradients, batched by ``vmap``, and the Hessian in
    forward-over-reverse mode against autograd's double backward of the eager form."""
    g = torch.Generator().manual_seed(4)
    ws = torch.randn(3, 5 * 4, D, generator=g, dtype=torch.float64)
    ws[1, 2] = 0.0  # a zero centre
    batched = torch.func.vmap(lambda v: MF.soft_triple_regularizer(v, 4))(ws)
    grads = torch.func.vmap(torch.func.grad(lambda v: MF.soft_triple_regularizer(v, 4).sum()))(ws)
    for w, value, grad in zip(ws, batched, grads):
        leaf = w.clone().requires_grad_(True)
        eager = MF.soft_triple_regularizer(leaf, 4)
        torch.testing.assert_close(eager, value, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad(eager.sum(), leaf)[0], grad, rtol=1e-10, atol=1e-10)
    w = ws[0, :8].clone()  # two classes of four centres
    forward_mode = torch.func.hessian(lambda v: MF.soft_triple_regularizer(v, 4).sum())(w)
    leaf = w.clone().requires_grad_(True)
    (first,) = torch.autograd.grad(MF.soft_triple_regularizer(leaf, 4).sum(), leaf, create_graph=True)
    rows = [torch.autograd.grad(first.reshape(-1)[i], leaf, retain_graph=True)[0] for i in range(first.numel())]
    double_backward = torch.stack(rows).reshape(*w.shape, *w.shape)
    torch.testing.assert_close(forward_mode, double_backward, rtol=1e-9, atol=1e-9)
