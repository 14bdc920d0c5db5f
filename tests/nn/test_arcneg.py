"""``mll.ArcNegFace`` against FaceX-Zoo's forward pass on the same weights, its defaults and errors. The shared
batteries run it too (``tests/nn/test_heads.py``, ``tests/nn/test_loss.py``, ``tests/distributed/sharded_heads.py``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mll
from tests import reference_facex_zoo as zref
from tests.nn.against_authors import C, D, compare


def test_arcneg_face_equals_facex_zoo() -> None:
    """FaceX-Zoo's ArcNegFace (m = 0.5, α = 1.2, σ = 2, s = 64) on the same weights: everywhere, the fix past π − m
    included (theirs has it too); targets away from cos = ±1, where their arccos has an infinite derivative."""
    head = mll.ArcNegFace(D, C, scale=64.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    y = torch.randint(0, C, (40,), generator=g)
    x = torch.randn(40, D, generator=g, dtype=torch.float64)
    x[:8] = 0.2 * x[:8] - F.normalize(head.weight.detach()[y[:8]], dim=-1)  # targets near θ = π
    x.requires_grad_(True)
    cos_y = (F.normalize(x) @ F.normalize(head.weight).t()).gather(1, y[:, None])
    assert cos_y.min() < -math.cos(0.5) < cos_y.max(), "targets on both sides of π − m"
    theirs = zref.arcneg_facex(x, head.weight, y)
    compare(head(x, y), theirs, x, head.weight, y)
    loss, want = head.loss(x, y, chunk_size=2), F.cross_entropy(zref.arcneg_facex(x, head.weight, y), y)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    for g_ours, g_theirs in zip(
        torch.autograd.grad(loss, (x, head.weight)), torch.autograd.grad(want, (x, head.weight))
    ):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)


def test_arcneg_face_module_defaults_and_errors() -> None:
    assert "margin=0.5, alpha=1.2, sigma=2.0" in repr(mll.ArcNegFace(D, C))
    with pytest.raises(ValueError, match=r"ArcNegFace sigma must be in \(0, inf\), but got 0"):
        mll.ArcNegFace(D, C, sigma=0)
    with pytest.raises(ValueError, match=r"ArcNegFace margin must be in \[0, 1.571\), but got 2.0"):
        mll.ArcNegFace(D, C, margin=2.0)
    with pytest.raises(ValueError, match="ArcNegFace needs class indices"):
        mll.ArcNegFace(D, C)(torch.randn(2, D), torch.rand(2, C))
