"""Checks the margin families' tests share: the chunked loss against the dense logits, and finite values and
gradients where the features equal or oppose a weight row."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from mll import functional as MF


def chunked_equals_dense(margin: MF.Margin, dense: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                         k: int = 1, pooling: str = "max") -> None:  # fmt: skip
    """``margin_cross_entropy`` in chunks of 2 classes == the cross-entropy of the dense logits: value and
    gradients of the features, the weights and the scale, float64."""
    g = torch.Generator().manual_seed(12)
    n, d, c = 7, 5, 6
    x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c * k, d, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, c, (n,), generator=g)
    scale = torch.tensor(6.0, dtype=torch.float64, requires_grad=True)
    tau = 0.2
    chunked = MF.margin_cross_entropy(
        x, w, y, scale=scale, margin=margin, num_sub_centers=k, pooling=pooling, pooling_temperature=tau, chunk_size=2
    )
    cos = MF.cosine_logits(x, w, k, pooling=pooling, pooling_temperature=tau)
    want = F.cross_entropy(dense(cos, y) * scale, y)
    torch.testing.assert_close(chunked, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(chunked, (x, w, scale)), torch.autograd.grad(want, (x, w, scale))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def finite_at_the_edges(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], dtype: torch.dtype) -> None:
    w = torch.randn(4, 8, dtype=dtype)
    x = torch.stack([w[0], -w[1], w[2] * 3, torch.zeros(8, dtype=dtype)]).requires_grad_(True)
    w.requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3])
    out = fn(MF.cosine_logits(x, w), y)
    assert out.dtype == dtype and torch.isfinite(out).all()
    F.cross_entropy(out.float(), y).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
