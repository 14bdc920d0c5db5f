"""``mll.CircleLoss`` against FaceX-Zoo's forward pass on the same weights, its defaults and errors. The shared
batteries run it too (``tests/nn/test_heads.py``, ``tests/nn/test_loss.py``, ``tests/distributed/sharded_heads.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mll
from tests import reference_facex_zoo as zref
from tests.nn.against_authors import C, D, compare


def test_circle_loss_equals_facex_zoo() -> None:
    """FaceX-Zoo's CircleLoss (m = 0.25, γ = 256, α's from the detached cosines) on the same weights, everywhere."""
    head = mll.CircleLoss(D, C, dtype=torch.float64)
    g = torch.Generator().manual_seed(8)
    y = torch.randint(0, C, (40,), generator=g)
    x = torch.randn(40, D, generator=g, dtype=torch.float64)
    x[:10] = x[:10] * 0.2 + F.normalize(head.weight.detach()[y[:10]], dim=-1)  # some targets near their optimum
    x.requires_grad_(True)
    compare(head(x, y), zref.circle_facex(x, head.weight, y), x, head.weight, y)
    loss, want = head.loss(x, y, chunk_size=2), F.cross_entropy(zref.circle_facex(x, head.weight, y), y)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    for g_ours, g_theirs in zip(
        torch.autograd.grad(loss, (x, head.weight)), torch.autograd.grad(want, (x, head.weight))
    ):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)


def test_circle_loss_module_defaults_and_errors() -> None:
    head = mll.CircleLoss(D, C)
    assert float(head.scale) == 256.0 and "margin=0.25, detach_weights=True" in repr(head)
    with pytest.raises(ValueError, match=r"CircleLoss has no default scale .* pass scale=, e.g. 256"):
        mll.CircleLoss(D, C, scale=None)
    with pytest.raises(ValueError, match=r"Circle loss margin must be in \[0, 1\), but got 1.0"):
        mll.CircleLoss(D, C, margin=1.0)
    with pytest.raises(ValueError, match="CircleLoss needs class indices"):
        mll.CircleLoss(D, C)(torch.randn(2, D), torch.rand(2, C))
