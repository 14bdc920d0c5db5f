"""The zoo heads of helper "a" as modules: against the authors' forward passes on the same weights (logits, loss,
gradients), each documented difference shown where it applies, and what is specific to each module.

The shared batteries run them too: ``tests/nn/test_heads.py`` (module == functional, eval, state, autocast, half
precision at cos = ±1, gradcheck), ``tests/nn/test_loss.py`` (``loss()`` == dense cross-entropy, every option) and
``tests/distributed/sharded_heads.py`` (sharded == dense on 2 and 3 processes).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mll
from tests import reference_zoo_a as zref

D, C, N = 8, 6, 12


def _aligned(weight: torch.Tensor, labels: torch.Tensor, noise: float, seed: int = 100) -> torch.Tensor:
    """Features near their class weights (noise relative to the weight's norm): targets with a large cosine."""
    g = torch.Generator().manual_seed(seed)  # not the stream of the weights (the tests seed the global one with 0)
    w = F.normalize(weight.detach(), dim=-1)[labels]
    return (w + noise * torch.randn(w.shape, generator=g, dtype=w.dtype)).requires_grad_(True)


def _compare(ours: torch.Tensor, theirs: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> None:
    """Logits, the cross-entropy and its gradients in the features and the weights agree in float64."""
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    a, b = F.cross_entropy(ours, y), F.cross_entropy(theirs, y)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for g_ours, g_theirs in zip(torch.autograd.grad(a, (x, weight)), torch.autograd.grad(b, (x, weight))):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)


# ------------------------------------------------------------------------------------------------ MV-Softmax


@pytest.mark.parametrize("is_am", [True, False])
def test_mv_softmax_equals_facex_zoo_where_the_target_is_easy(is_am) -> None:
    """FaceX-Zoo's MV_Softmax (adaptive, mv_weight = 1 + t) on the same weights, for targets whose cosine is above
    the margin (AM) or positive (Arc), where its conditional margin applies."""
    margin = 0.35 if is_am else 0.5
    head = mll.MVSoftmax(D, C, scale=32.0, margin=margin, t=0.12, margin_type="cos" if is_am else "arc",
                         dtype=torch.float64)  # fmt: skip
    y = torch.arange(N) % C
    x = _aligned(head.weight, y, 0.25)
    assert (F.normalize(x) @ F.normalize(head.weight).t()).gather(1, y[:, None]).min() > (margin if is_am else 0)
    theirs = zref.mv_softmax_facex(x, head.weight, y, is_am=is_am, margin=margin, mv_weight=1.12, scale=32.0)
    ours = head(x, y)
    assert (theirs != 32.0 * (F.normalize(x) @ F.normalize(head.weight).t())).sum() > N, "some logits are raised"
    _compare(ours, theirs, x, head.weight, y)


@pytest.mark.parametrize("fc_type", ["MV-AM", "MV-Arc"])
@pytest.mark.parametrize("easy_margin", [False, True])
def test_mv_softmax_equals_the_paper_authors_code(fc_type, easy_margin) -> None:
    """xiaoboCASIA/SV-X-Softmax ``fc_layers.py``: with ``easy_margin=False`` everywhere the arc has no wrap-around
    (θ_y < π − m); with their default ``easy_margin=True`` where the target cosine is positive."""
    head = mll.MVSoftmax(D, C, scale=32.0, margin=0.35, t=0.2, margin_type="cos" if fc_type == "MV-AM" else "arc",
                         dtype=torch.float64)  # fmt: skip
    y = torch.arange(N) % C
    x = _aligned(head.weight, y, 0.4 if easy_margin else 1.5, seed=103)
    cos_y = (F.normalize(x) @ F.normalize(head.weight).t()).gather(1, y[:, None])
    assert cos_y.min() > (0 if easy_margin else -math.cos(0.35))
    theirs = zref.mv_softmax_svx(x, head.weight, y, fc_type=fc_type, margin=0.35, t=0.2, scale=32.0,
                                 easy_margin=easy_margin)  # fmt: skip
    _compare(head(x, y), theirs, x, head.weight, y)


def test_mv_softmax_differs_from_facex_zoo_only_by_its_conditional_margins() -> None:
    """The documented differences: FaceX-Zoo keeps the plain target cosine where cos θ_y <= m (AM) or <= 0 (Arc);
    mll applies the paper's ψ everywhere (ArcFace's with the fix past π − m). Nothing else differs."""
    for is_am, margin in ((True, 0.35), (False, 0.5)):
        head = mll.MVSoftmax(D, C, scale=1.0, margin=margin, margin_type="cos" if is_am else "arc", t=0.12,
                             dtype=torch.float64)  # fmt: skip
        g = torch.Generator().manual_seed(5)
        x = torch.randn(200, D, generator=g, dtype=torch.float64)
        y = torch.randint(0, C, (200,), generator=g)
        cos = F.normalize(x) @ F.normalize(head.weight.detach()).t()
        cos_y = cos.gather(1, y[:, None])
        theirs = zref.mv_softmax_facex(x, head.weight.detach(), y, is_am=is_am, margin=margin, mv_weight=1.12,
                                       scale=1.0)  # fmt: skip
        ours = head(x, y).detach()
        differ = (ours - theirs).abs() > 1e-12
        conditional = cos_y <= (margin if is_am else 0.0)
        target = torch.arange(C) == y[:, None]
        assert differ.any() and torch.equal(differ, conditional & target)


def test_mv_softmax_module_defaults_and_errors() -> None:
    assert mll.MVSoftmax(D, C).margin == 0.35 and mll.MVSoftmax(D, C, margin_type="arc").margin == 0.5
    text = repr(mll.MVSoftmax(D, C, t=0.3, adaptive=False))
    assert "t=0.3, margin_type='cos', adaptive=False" in text
    with pytest.raises(ValueError, match=r"MV-Softmax margin must be in \[0, 1\), but got 1.2"):
        mll.MVSoftmax(D, C, margin=1.2)
    with pytest.raises(ValueError, match=r"MV-Softmax t must be in \[0, inf\), but got -1.0"):
        mll.MVSoftmax(D, C, t=-1.0)
    with pytest.raises(ValueError, match=r"margin_type must be 'cos' \(AM-Softmax\) or 'arc'"):
        mll.MVSoftmax(D, C, margin_type="sphere")
    with pytest.raises(ValueError, match="MVSoftmax needs class indices"):
        mll.MVSoftmax(D, C)(torch.randn(2, D), torch.rand(2, C))
    per_class = mll.MVSoftmax(D, C, t=torch.linspace(0, 1, C), margin=torch.full((C,), 0.2))
    assert set(dict(per_class.named_buffers())) >= {"t", "margin"}


# ------------------------------------------------------------------------------------------------ NPCFace


def test_npcface_equals_facex_zoo_where_the_target_is_positive() -> None:
    """FaceX-Zoo's NPCFace (its constants: m = 0.5, m0 = 0.4, m1 = 0.2, t = 1.1, a = 0.2, s = 64) on the same
    weights, for targets with a positive cosine, where its conditional margin applies."""
    head = mll.NPCFace(D, C, scale=64.0, dtype=torch.float64)
    y = torch.arange(N) % C
    x = _aligned(head.weight, y, 0.35)
    cos = F.normalize(x) @ F.normalize(head.weight).t()
    assert cos.gather(1, y[:, None]).min() > 0
    theirs = zref.npcface_facex(x, head.weight, y)
    assert (theirs != 64.0 * cos).sum() > N, "some negatives are hard"
    _compare(head(x, y), theirs, x, head.weight, y)
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


# ------------------------------------------------------------------------------------------------ ArcNegFace


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
    _compare(head(x, y), theirs, x, head.weight, y)
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


# ------------------------------------------------------------------------------------------------ Circle loss


def test_circle_loss_equals_facex_zoo() -> None:
    """FaceX-Zoo's CircleLoss (m = 0.25, γ = 256, α's from the detached cosines) on the same weights, everywhere."""
    head = mll.CircleLoss(D, C, dtype=torch.float64)
    g = torch.Generator().manual_seed(8)
    y = torch.randint(0, C, (40,), generator=g)
    x = torch.randn(40, D, generator=g, dtype=torch.float64)
    x[:10] = x[:10] * 0.2 + F.normalize(head.weight.detach()[y[:10]], dim=-1)  # some targets near their optimum
    x.requires_grad_(True)
    _compare(head(x, y), zref.circle_facex(x, head.weight, y), x, head.weight, y)
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
