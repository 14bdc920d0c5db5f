"""The ADAPTIVE family (AdaM-Softmax, Liu et al., CVPR 2019; ``mll.functional.adaptive_margin``): CosFace with
per-class margins and their gradient, ``torch.func`` and ``torch.compile``. The head's tests are in
``tests/nn/test_adaptive_margin.py``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mll import functional as MF

C = 5


def test_adaptive_margin_is_cosface_with_per_class_margins_and_their_gradient() -> None:
    cos = torch.rand(6, C, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, C, (6,))
    m = torch.linspace(0.0, 1.0, C, dtype=torch.float64).requires_grad_(True)
    logits = MF.adaptive_margin(cos, y, m, scale=3.0)
    onehot = F.one_hot(y, C).double()
    torch.testing.assert_close(logits, 3.0 * (cos - m * onehot), rtol=0, atol=0)
    (g,) = torch.autograd.grad(logits.sum(), m)
    torch.testing.assert_close(g, -3.0 * onehot.sum(0))
    with pytest.raises(ValueError, match=r"AdaM-Softmax margin must be in \[0, 1\]"):
        MF.adaptive_margin(cos, y, torch.full((C,), 1.5, dtype=torch.float64))
    torch.testing.assert_close(MF.adaptive_margin_regularizer(m, lambda_=10.0), -10.0 * m.mean())


def test_adaptive_margin_under_vmap_and_compile() -> None:
    cos = torch.rand(2, 4, C, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, C, (2, 4))
    m = torch.linspace(0.1, 0.5, C, dtype=torch.float64)

    def f(c, t):
        return MF.adaptive_margin(c, t, m, scale=2.0)

    looped = torch.stack([f(cos[i], y[i]) for i in range(2)])
    torch.testing.assert_close(torch.func.vmap(f)(cos, y), looped)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="aot_eager")(cos[0], y[0]), looped[0])
