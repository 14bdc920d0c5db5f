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
    w = torch.randn(4 * 3, D, dtype=torch.float64, requires_grad=True)
    r = MF.soft_triple_regularizer(w, 3).sum()
    with pytest.raises(RuntimeError, match="first derivatives only"):
        torch.autograd.grad(r, w, create_graph=True)
