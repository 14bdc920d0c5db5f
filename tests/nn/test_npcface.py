"""``mll.NPCFace`` against FaceX-Zoo's forward pass on the same weights, the one documented difference where it
applies, its defaults and errors. The shared batteries run it too (``tests/nn/test_heads.py``,
``tests/nn/test_loss.py``, ``tests/distributed/sharded_heads.py``)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mll
from tests import reference_facex_zoo as zref
from tests.nn.against_authors import C, D, N, aligned, compare


def test_npcface_equals_facex_zoo_where_the_target_is_positive() -> None:
    """FaceX-Zoo's NPCFace (its constants: m = 0.5, m0 = 0.4, m1 = 0.2, t = 1.1, a = 0.2, s = 64) on the same
    weights, for targets with a positive cosine, where its conditional margin applies."""
    head = mll.NPCFace(D, C, scale=64.0, dtype=torch.float64)
    y = torch.arange(N) % C
    x = aligned(head.weight, y, 0.35)
    cos = F.normalize(x) @ F.normalize(head.weight).t()
    assert cos.gather(1, y[:, None]).min() > 0
    theirs = zref.npcface_facex(x, head.weight, y)
    assert (theirs != 64.0 * cos).sum() > N, "some negatives are hard"
    compare(head(x, y), theirs, x, head.weight, y)
    loss, want = head.loss(x, y), F.cross_entropy(zref.npcface_facex(x, head.weight, y), y)  # chunked, no state
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    for g_ours, g_theirs in zip(
        torch.autograd.grad(loss, (x, head.weight)), torch.autograd.grad(want, (x, head.weight))
    ):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)


def test_npcface_differs_from_facex_zoo_only_where_the_target_is_not_positive() -> None:
    head = mll.NPCFace(D, C, scale=1.0, dtype=torch.float64)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(200, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (200,), generator=g)
    cos_y = (F.normalize(x) @ F.normalize(head.weight.detach()).t()).gather(1, y[:, None])
    theirs = zref.npcface_facex(x, head.weight.detach(), y, scale=1.0)
    differ = (head(x, y).detach() - theirs).abs() > 1e-12
    assert differ.any() and torch.equal(differ, (cos_y <= 0) & (torch.arange(C) == y[:, None]))


def test_npcface_module_defaults_and_errors() -> None:
    text = repr(mll.NPCFace(D, C))
    assert "margin=0.5, m0=0.4, m1=0.2, t=1.1, a=0.2" in text
    with pytest.raises(ValueError, match=r"NPCFace needs 0 <= m1 <= m0"):
        mll.NPCFace(D, C, m0=0.1, m1=0.2)
    with pytest.raises(ValueError, match=r"NPCFace a must be in \[0, inf\), but got -0.5"):
        mll.NPCFace(D, C, a=-0.5)
    with pytest.raises(ValueError, match="NPCFace needs class indices"):
        mll.NPCFace(D, C)(torch.randn(2, D), torch.rand(2, C))
