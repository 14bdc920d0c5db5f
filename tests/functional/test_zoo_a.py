"""The zoo families of helper "a": MV-Softmax, NPCFace, ArcNegFace and Circle loss against float64 references from
the papers, their slopes against autograd, gradcheck, vmap and compile, chunked == dense, and their properties."""

from __future__ import annotations

import math
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st

from mll import functional as MF
from mll.functional.mv_softmax import mv_family
from tests import reference as ref
from tests import reference_zoo_a as zref
from tests.conftest import ALL_DTYPES
from tests.functional.test_margins import batches

MV_VARIANTS = [("cos", True), ("cos", False), ("arc", True), ("arc", False)]
MV_IDS = ["am-a", "am-f", "arc-a", "arc-f"]


def _mv(margin_type: str, adaptive: bool) -> Callable[..., torch.Tensor]:
    return lambda c, y, m, t, s=1.0: MF.mv_margin(c, y, m, t=t, margin_type=margin_type, adaptive=adaptive, scale=s)


# ------------------------------------------------------------------------------------------------ MV-Softmax


@pytest.mark.parametrize(("margin_type", "adaptive"), MV_VARIANTS, ids=MV_IDS)
@given(batch=batches(), m=st.floats(0.0, 0.9), t=st.floats(0.0, 1.5), s=st.floats(0.5, 64.0))
def test_mv_matches_float64_reference(margin_type, adaptive, batch, m, t, s) -> None:
    cos, labels, _ = batch
    # a non-target on the mis-classification boundary (cos θ_j = ψ(θ_y) up to rounding) may go either way
    rows = np.arange(len(labels))
    psi = zref.mv_softmax_ref(cos.numpy(), labels.numpy(), m, 0.0, margin_type, adaptive)[rows, labels]
    gap = np.abs(cos.numpy() - psi[:, None])
    gap[rows, labels] = np.inf
    assume(not np.any(gap < 1e-9))
    expected = zref.mv_softmax_ref(cos.numpy(), labels.numpy(), m, t, margin_type, adaptive, s)
    got = _mv(margin_type, adaptive)(cos, labels, m, t, s)
    np.testing.assert_allclose(ref.as_np(got), expected, rtol=1e-9, atol=1e-7 * s)


@pytest.mark.parametrize("family", [MF.MV_COS, MF.MV_COS_FIXED, MF.MV_ARC, MF.MV_ARC_FIXED], ids=MV_IDS)
def test_mv_slopes_are_the_autograd_derivatives(family) -> None:
    g = torch.Generator().manual_seed(4)
    cos = (torch.rand(64, 5, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    target = torch.rand(64, 1, generator=g, dtype=torch.float64) * 2 - 1
    m, t = torch.tensor(0.4, dtype=torch.float64), torch.tensor(0.3, dtype=torch.float64)
    value, slope = family.value_and_slope(cos, 1.0, m, t)
    (grad,) = torch.autograd.grad(value.sum(), cos)
    torch.testing.assert_close(slope, grad, rtol=1e-12, atol=1e-12)
    value, slope = family.negatives(cos, target, m, t)
    (grad,) = torch.autograd.grad(value.sum(), cos)
    torch.testing.assert_close(slope.expand_as(grad), grad, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("margin_type", "adaptive"), MV_VARIANTS, ids=MV_IDS)
def test_mv_gradcheck(margin_type, adaptive) -> None:
    g = torch.Generator().manual_seed(1)
    cos = (torch.rand(6, 5, generator=g, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    y = torch.tensor([0, 2, 4, 2, 1, 3])
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    fn = _mv(margin_type, adaptive)
    hard = fn(cos.detach(), y, 0.3, 0.4) != fn(cos.detach(), y, 0.3, 0.0)  # mis-classified entries: covered
    assert int(hard.sum()) >= 3
    assert torch.autograd.gradcheck(lambda c, s: fn(c, y, 0.3, 0.4, s), (cos, scale))


@given(batch=batches(), m=st.floats(0.0, 0.9), data=st.data())
def test_mv_with_t_zero_is_the_plain_margin_and_raises_only_the_mis_classified(batch, m, data) -> None:
    cos, labels, _ = batch
    t_lo, t_hi = sorted((data.draw(st.floats(0.0, 1.0)), data.draw(st.floats(0.0, 1.0))))
    for margin_type, adaptive in MV_VARIANTS:
        fn = _mv(margin_type, adaptive)
        plain = MF.cos_margin(cos, labels, m) if margin_type == "cos" else MF.arc_margin(cos, labels, m)
        assert torch.equal(fn(cos, labels, m, 0.0), plain)
        lo, hi = fn(cos, labels, m, t_lo), fn(cos, labels, m, t_hi)
        # up to rounding: at cos = −1 the adaptive re-weighting (t + 1)·cos + t is −1 for every t, ±1 ulp
        ulps = 4 * torch.finfo(cos.dtype).eps
        assert (lo >= plain - ulps).all() and (hi >= lo - ulps).all(), "non-decreasing in t, never below the plain"
        boundary = plain.gather(1, labels[:, None])
        untouched = (cos <= boundary) | (torch.arange(cos.shape[1]) == labels[:, None])
        assert torch.equal(hi[untouched], plain[untouched])


@pytest.mark.parametrize(("margin_type", "adaptive"), MV_VARIANTS, ids=MV_IDS)
def test_mv_per_class_and_per_sample_parameters_equal_a_loop(margin_type, adaptive) -> None:
    g = torch.Generator().manual_seed(7)
    cos = torch.rand(8, 5, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 5, (8,), generator=g)
    m_class, t_class = torch.rand(5, generator=g, dtype=torch.float64) * 0.6, torch.rand(5, generator=g).double()
    m_row, t_row = torch.rand(8, 1, generator=g, dtype=torch.float64) * 0.6, torch.rand(8, 1, generator=g).double()
    fn = _mv(margin_type, adaptive)
    for m, t, at in ((m_class, t_class, lambda p, i: float(p[y[i]])), (m_row, t_row, lambda p, i: float(p[i]))):
        looped = torch.cat([fn(cos[i : i + 1], y[i : i + 1], at(m, i), at(t, i)) for i in range(8)])
        torch.testing.assert_close(fn(cos, y, m, t), looped, rtol=1e-14, atol=1e-14)


def _chunked_equals_dense(margin: MF.Margin, dense: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
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


@pytest.mark.parametrize(("margin_type", "adaptive"), MV_VARIANTS, ids=MV_IDS)
@pytest.mark.parametrize(("k", "pooling"), [(1, "max"), (3, "max"), (2, "soft")])
def test_mv_chunked_equals_dense(margin_type, adaptive, k, pooling) -> None:
    m = torch.linspace(0.1, 0.5, 6, dtype=torch.float64)
    _chunked_equals_dense(
        mv_family(margin_type, adaptive)(m, 0.3),
        lambda c, y: _mv(margin_type, adaptive)(c, y, m, 0.3),
        k=k,
        pooling=pooling,
    )


@pytest.mark.parametrize(("margin_type", "adaptive"), MV_VARIANTS, ids=MV_IDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_mv_features_equal_or_opposite_to_a_weight_row_are_finite(margin_type, adaptive, dtype) -> None:
    _finite_at_the_edges(lambda c, y: _mv(margin_type, adaptive)(c, y, 0.5, 0.3, 30.0), dtype)


def _finite_at_the_edges(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], dtype: torch.dtype) -> None:
    w = torch.randn(4, 8, dtype=dtype)
    x = torch.stack([w[0], -w[1], w[2] * 3, torch.zeros(8, dtype=dtype)]).requires_grad_(True)
    w.requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3])
    out = fn(MF.cosine_logits(x, w), y)
    assert out.dtype == dtype and torch.isfinite(out).all()
    F.cross_entropy(out.float(), y).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_mv_errors_name_the_argument() -> None:
    cos, y = torch.rand(2, 5), torch.tensor([0, 3])
    with pytest.raises(ValueError, match="MV-Softmax needs class indices"):
        MF.mv_margin(cos, torch.rand(2, 5), 0.3)
    with pytest.raises(ValueError, match=r"margin_type must be 'cos' \(AM-Softmax\) or 'arc' \(ArcFace\), but got 'x'"):
        MF.mv_margin(cos, y, 0.3, margin_type="x")
    with pytest.raises(TypeError, match="MV-Softmax adaptive must be a bool"):
        MF.mv_margin(cos, y, 0.3, adaptive=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"MV-Softmax t must be in \[0, inf\), but got -0.1"):
        MF.mv_margin(cos, y, 0.3, t=-0.1)
    with pytest.raises(ValueError, match=r"MV-Softmax margin must be in \[0, 1\), but got 1.2"):
        MF.mv_margin(cos, y, 1.2)
    with pytest.raises(ValueError, match=r"MV-Softmax margin must be in \[0, 1.571\), but got 2.0"):
        MF.mv_margin(cos, y, 2.0, margin_type="arc")


# ------------------------------------------------------------------------------------------------ NPCFace


@given(
    batch=batches(),
    m=st.floats(0.0, 1.2),
    m0=st.floats(0.0, 0.7),
    share=st.floats(0.0, 1.0),
    t=st.floats(0.0, 2.0),
    a=st.floats(0.0, 0.5),
    s=st.floats(0.5, 64.0),
)
def test_npcface_matches_float64_reference(batch, m, m0, share, t, a, s) -> None:
    cos, labels, _ = batch
    m1 = share * m0
    # the hard-negative mask is discontinuous where a cosine equals the threshold cos(θ_y + m): two correct
    # roundings of the threshold (cos(θ + m) directly, or cos·cos m − sin·sin m) may classify such a tie differently
    for row, y in zip(cos.tolist(), labels.tolist()):
        threshold = zref._arc(row[y], m)
        assume(all(abs(c - threshold) > 1e-9 for j, c in enumerate(row) if j != y))
    expected = zref.npcface_ref(cos.numpy(), labels.numpy(), m, m0, m1, t, a, s)
    got = MF.npcface_margin(cos, labels, m, m0=m0, m1=m1, t=t, a=a, scale=s)
    np.testing.assert_allclose(ref.as_np(got), expected, rtol=1e-9, atol=1e-7 * s)


def test_npcface_slopes_are_the_autograd_derivatives() -> None:
    g = torch.Generator().manual_seed(4)
    cos = (torch.rand(64, 5, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    target = torch.rand(64, 1, generator=g, dtype=torch.float64) * 2 - 1
    params = [torch.tensor(v, dtype=torch.float64) for v in (0.5, 0.45, 1.1, 0.2)]
    for fn, args in ((MF.NPC.value_and_slope, (1.0, *params)), (MF.NPC.negatives, (target, *params))):
        value, slope = fn(cos, *args)
        (grad,) = torch.autograd.grad(value.sum(), cos)
        torch.testing.assert_close(slope.expand_as(grad), grad, rtol=1e-12, atol=1e-12)


def test_npcface_gradcheck_with_a_fixed_positive_margin() -> None:
    """With m1 = 0 the positive margin is the constant m0 and the logits' gradient is their exact derivative."""
    g = torch.Generator().manual_seed(1)
    cos = (torch.rand(6, 5, generator=g, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    y = torch.tensor([0, 2, 4, 2, 1, 3])
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    raised = MF.npcface_margin(cos.detach(), y, 0.5) != MF.npcface_margin(cos.detach(), y, 0.5, t=1.0, a=0.0)
    assert int(raised.sum()) >= 3 + len(y), "hard negatives, and targets whose margin grew with them"
    assert torch.autograd.gradcheck(lambda c, s: MF.npcface_margin(c, y, 0.5, m1=0.0, scale=s), (cos, scale))


def test_npcface_gradient_holds_the_positive_margin_constant() -> None:
    """m' is a statistic (the authors compute it under no_grad): the gradient is autograd's of an independent torch
    formula with m' detached — not gradcheck's finite differences, which would move m' with the negatives."""
    g = torch.Generator().manual_seed(6)
    cos = (torch.rand(8, 6, generator=g, dtype=torch.float64) * 1.6 - 0.8).requires_grad_(True)
    y = torch.randint(0, 6, (8,), generator=g)
    probe = torch.randn(8, 6, generator=g, dtype=torch.float64)
    (ours,) = torch.autograd.grad((MF.npcface_margin(cos, y, 0.5) * probe).sum(), cos)
    c = cos.detach().clone().requires_grad_(True)
    target = c.gather(1, y[:, None])
    hard = (c > torch.cos(torch.acos(target) + 0.5)) & (torch.arange(6) != y[:, None])
    positive = 0.4 + 0.2 * torch.where(hard, c, 0.0).sum(1, keepdim=True) / hard.sum(1, keepdim=True).clamp(min=1)
    logits = torch.where(hard, 1.1 * c + 0.2, c).scatter(
        1, y[:, None], torch.cos(torch.acos(target) + positive.detach())
    )
    (want,) = torch.autograd.grad((logits * probe).sum(), c)
    assert hard.any()
    torch.testing.assert_close(ours, want, rtol=1e-10, atol=1e-12)


@given(batch=batches(), m=st.floats(0.0, 1.2), m0=st.floats(0.0, 0.7))
def test_npcface_without_collaboration_is_arcface_and_harder_negatives_grow_the_margin(batch, m, m0) -> None:
    cos, labels, _ = batch
    plain = MF.npcface_margin(cos, labels, m, m0=m0, m1=0.0, t=1.0, a=0.0)
    torch.testing.assert_close(plain, MF.arc_margin(cos, labels, m0), rtol=0, atol=0)
    mean = MF.npcface_statistics(cos, labels, m)
    assert (mean.abs() <= 1).all()
    no_hard = (mean == 0).squeeze(-1)
    with_m1 = MF.npcface_margin(cos, labels, m, m0=m0, m1=m0 / 2, t=1.0, a=0.0)
    rows = torch.arange(len(labels))
    # the target logit moves with m' = m0 + m1·mean: down where the hard negatives' mean is positive
    moved = with_m1[rows, labels] - plain[rows, labels]
    assert (moved[(mean.squeeze(-1) > 0)] <= 1e-15).all() and (moved[no_hard] == 0).all()


@pytest.mark.parametrize(("k", "pooling"), [(1, "max"), (3, "max"), (2, "soft")])
def test_npcface_statistics_chunked_equal_the_dense_ones(k, pooling) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 4, 5, generator=g, dtype=torch.float64)
    w = torch.randn(7 * k, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 7, (3, 4), generator=g)
    m = torch.linspace(0.2, 0.9, 7, dtype=torch.float64)
    cos = MF.cosine_logits(x, w, k, pooling=pooling, pooling_temperature=0.2)
    dense = MF.npcface_statistics(cos, y, m)
    chunked = MF.npcface_statistics_chunked(
        x, w, y, m, num_sub_centers=k, pooling=pooling, pooling_temperature=0.2, chunk_size=2
    )
    assert dense.shape == (3, 4, 1) and (dense != 0).any()
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("k", "pooling"), [(1, "max"), (3, "max"), (2, "soft")])
def test_npcface_chunked_equals_dense(k, pooling) -> None:
    m = torch.linspace(0.3, 0.6, 6, dtype=torch.float64)
    g = torch.Generator().manual_seed(12)  # _chunked_equals_dense's batch: the same statistics
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    w = torch.randn(6 * k, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (7,), generator=g)
    mean = MF.npcface_statistics_chunked(x, w, y, m, num_sub_centers=k, pooling=pooling, pooling_temperature=0.2)
    _chunked_equals_dense(
        MF.NPC(m, 0.4 + 0.2 * mean, 1.1, 0.2), lambda c, y: MF.npcface_margin(c, y, m), k=k, pooling=pooling
    )


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_npcface_features_equal_or_opposite_to_a_weight_row_are_finite(dtype) -> None:
    _finite_at_the_edges(lambda c, y: MF.npcface_margin(c, y, 0.5, scale=30.0), dtype)


def test_npcface_errors_name_the_argument() -> None:
    cos, y = torch.rand(2, 5), torch.tensor([0, 3])
    with pytest.raises(ValueError, match="NPCFace needs class indices"):
        MF.npcface_margin(cos, torch.rand(2, 5))
    with pytest.raises(ValueError, match=r"NPCFace needs 0 <= m1 <= m0 and m0 \+ m1 < π/2 .* m0=0.4, m1=0.5"):
        MF.npcface_margin(cos, y, m1=0.5)
    with pytest.raises(ValueError, match=r"NPCFace m0 must be a finite float, but got nan"):
        MF.npcface_margin(cos, y, m0=float("nan"))
    with pytest.raises(ValueError, match=r"NPCFace margin must be in \[0, 1.571\), but got 1.6"):
        MF.npcface_margin(cos, y, 1.6)
    with pytest.raises(ValueError, match=r"NPCFace t must be in \[0, inf\), but got -1.0"):
        MF.npcface_margin(cos, y, t=-1.0)


# ------------------------------------------------------------------------------------------------ ArcNegFace


@given(
    batch=batches(), m=st.floats(0.0, 1.5), alpha=st.floats(0.0, 2.0), sigma=st.floats(0.1, 4.0), s=st.floats(0.5, 64)
)
def test_arcneg_matches_float64_reference(batch, m, alpha, sigma, s) -> None:
    cos, labels, _ = batch
    expected = zref.arcneg_ref(cos.numpy(), labels.numpy(), m, alpha, sigma, s)
    got = MF.arcneg_margin(cos, labels, m, alpha=alpha, sigma=sigma, scale=s)
    np.testing.assert_allclose(ref.as_np(got), expected, rtol=1e-9, atol=1e-7 * s)


def _psi(target: torch.Tensor, m: float) -> torch.Tensor:
    """ArcFace's target logit with InsightFace's fix, through arccos (independent of mll's)."""
    return torch.where(target > -math.cos(m), torch.cos(torch.acos(target) + m), target - m * math.sin(m))


def test_arcneg_slopes_are_autograd_with_the_weights_detached() -> None:
    g = torch.Generator().manual_seed(4)
    cos = (torch.rand(64, 5, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    target = torch.rand(64, 1, generator=g, dtype=torch.float64) * 2 - 1
    m, alpha, sigma = (torch.tensor(v, dtype=torch.float64) for v in (0.5, 1.2, 2.0))
    value, slope = MF.ARC_NEG.value_and_slope(cos, 1.0, m, alpha, sigma)
    (grad,) = torch.autograd.grad(value.sum(), cos)
    torch.testing.assert_close(slope, grad, rtol=1e-12, atol=1e-12)
    weight = (1.2 * torch.exp(-((cos - _psi(target, 0.5)) ** 2) / 2.0)).detach()
    (grad,) = torch.autograd.grad((weight * (cos + 1) - 1).sum(), cos)
    torch.testing.assert_close(MF.ARC_NEG.negatives(cos, target, m, alpha, sigma)[1], grad, rtol=1e-12, atol=1e-12)


def test_arcneg_gradient_is_the_authors_and_gradcheck_with_flat_weights() -> None:
    """With t_j detached the gradient is autograd's of the authors' formula (not gradcheck's); with σ → ∞ the weights
    are the constant α and gradcheck holds."""
    g = torch.Generator().manual_seed(1)
    cos = (torch.rand(6, 5, generator=g, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    y = torch.tensor([0, 2, 4, 2, 1, 3])
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, s: MF.arcneg_margin(c, y, 0.5, sigma=1e12, scale=s), (cos, scale))
    probe = torch.randn(6, 5, generator=g, dtype=torch.float64)
    (ours,) = torch.autograd.grad((MF.arcneg_margin(cos, y, 0.5) * probe).sum(), cos)
    c = cos.detach().clone().requires_grad_(True)
    psi = _psi(c.gather(1, y[:, None]), 0.5)
    weight = (1.2 * torch.exp(-((c - psi.detach()) ** 2) / 2.0)).detach()
    logits = torch.where(torch.arange(5) == y[:, None], psi, weight * (c + 1) - 1)
    (want,) = torch.autograd.grad((logits * probe).sum(), c)
    torch.testing.assert_close(ours, want, rtol=1e-10, atol=1e-12)


@given(batch=batches(), m=st.floats(0.0, 1.5))
def test_arcneg_weights_peak_at_the_target_logit(batch, m) -> None:
    """α = 1 and a flat Gaussian give ArcFace; every negative lies between α·e^{−g²/σ}·(cos + 1) − 1 and
    α·(cos + 1) − 1, g = 2 + m·sin m the largest |cos θ_j − ψ_y| (ψ_y >= −1 − m·sin m past π − m)."""
    cos, labels, _ = batch
    wide = MF.arcneg_margin(cos, labels, m, alpha=1.0, sigma=1e12)
    torch.testing.assert_close(wide, MF.arc_margin(cos, labels, m), rtol=0, atol=1e-10)
    out = MF.arcneg_margin(cos, labels, m, alpha=1.2, sigma=2.0)
    off = torch.arange(cos.shape[1]) != labels[:, None]
    assert (out[off] <= 1.2 * (cos[off] + 1) - 1 + 1e-12).all()
    assert (out[off] >= 1.2 * math.exp(-((2 + m * math.sin(m)) ** 2) / 2.0) * (cos[off] + 1) - 1 - 1e-12).all()


@pytest.mark.parametrize(("k", "pooling"), [(1, "max"), (3, "max"), (2, "soft")])
def test_arcneg_chunked_equals_dense(k, pooling) -> None:
    m = torch.linspace(0.2, 0.6, 6, dtype=torch.float64)
    _chunked_equals_dense(MF.ARC_NEG(m, 1.2, 2.0), lambda c, y: MF.arcneg_margin(c, y, m), k=k, pooling=pooling)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_arcneg_features_equal_or_opposite_to_a_weight_row_are_finite(dtype) -> None:
    _finite_at_the_edges(lambda c, y: MF.arcneg_margin(c, y, 0.5, scale=30.0), dtype)


def test_arcneg_errors_name_the_argument() -> None:
    cos, y = torch.rand(2, 5), torch.tensor([0, 3])
    with pytest.raises(ValueError, match="ArcNegFace needs class indices"):
        MF.arcneg_margin(cos, torch.rand(2, 5))
    with pytest.raises(ValueError, match=r"ArcNegFace sigma must be in \(0, inf\), but got 0.0"):
        MF.arcneg_margin(cos, y, sigma=0.0)
    with pytest.raises(ValueError, match=r"ArcNegFace alpha must be in \[0, inf\), but got -1.0"):
        MF.arcneg_margin(cos, y, alpha=-1.0)


# ------------------------------------------------------------------------------------------------ Circle loss


@pytest.mark.parametrize("detach", [True, False])
@given(batch=batches(), m=st.floats(0.0, 0.99), s=st.floats(0.5, 256.0))
def test_circle_matches_float64_reference(detach, batch, m, s) -> None:
    cos, labels, _ = batch
    expected = zref.circle_ref(cos.numpy(), labels.numpy(), m, s)
    got = MF.circle_margin(cos, labels, m, detach_weights=detach, scale=s)
    np.testing.assert_allclose(ref.as_np(got), expected, rtol=1e-12, atol=1e-12 * s)


def test_circle_slopes_detached_and_exact() -> None:
    """The exact family's slopes are autograd's; the detached one's are the α's, autograd's with α detached."""
    g = torch.Generator().manual_seed(4)
    cos = (torch.rand(64, 5, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    target = torch.rand(64, 1, generator=g, dtype=torch.float64) * 2 - 1
    m = torch.tensor(0.25, dtype=torch.float64)
    for fn, args in ((MF.CIRCLE_EXACT.value_and_slope, (1.0, m)), (MF.CIRCLE_EXACT.negatives, (target, m))):
        value, slope = fn(cos, *args)
        (grad,) = torch.autograd.grad(value.sum(), cos)
        torch.testing.assert_close(slope, grad, rtol=1e-12, atol=1e-12)
    c = cos.detach()
    torch.testing.assert_close(MF.CIRCLE.value_and_slope(cos, 1.0, m)[1], (1.25 - c).clamp(min=0))
    torch.testing.assert_close(MF.CIRCLE.negatives(cos, target, m)[1], (c + 0.25).clamp(min=0))


def test_circle_gradcheck_exact_and_the_detached_gradient() -> None:
    g = torch.Generator().manual_seed(1)
    cos = (torch.rand(6, 5, generator=g, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    y = torch.tensor([0, 2, 4, 2, 1, 3])
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    exact = lambda c, s: MF.circle_margin(c, y, 0.25, detach_weights=False, scale=s)  # noqa: E731
    assert torch.autograd.gradcheck(exact, (cos, scale))
    probe = torch.randn(6, 5, generator=g, dtype=torch.float64)
    (ours,) = torch.autograd.grad((MF.circle_margin(cos, y, 0.25, scale=scale) * probe).sum(), cos)
    c = cos.detach().clone().requires_grad_(True)
    alpha_p, alpha_n = (1.25 - c.detach()).clamp(min=0), (c.detach() + 0.25).clamp(min=0)
    logits = torch.where(torch.arange(5) == y[:, None], alpha_p * (c - 0.75), alpha_n * (c - 0.25)) * 2.5
    (want,) = torch.autograd.grad((logits * probe).sum(), c)
    torch.testing.assert_close(ours, want, rtol=1e-12, atol=1e-12)


@given(batch=batches(), m=st.floats(0.0, 0.99))
def test_circle_decision_boundary_is_the_papers_circle(batch, m) -> None:
    """Target and non-target logits are equal exactly on the circle (s_n − 0)² + (s_p − 1)² = 2m² (the paper's
    Eq. 8), where both α's are positive: the sign of their difference is the side of the circle."""
    cos, labels, _ = batch
    out = MF.circle_margin(cos, labels, m)
    rows = torch.arange(len(labels))
    s_p = cos[rows, labels][:, None]
    z_p = out[rows, labels][:, None]
    active = (cos > -m) & (torch.arange(cos.shape[1]) != labels[:, None])
    radius = cos**2 + (s_p - 1) ** 2 - 2 * m**2  # > 0: outside the circle, the non-target wins
    gap = out - z_p
    assert ((gap > 1e-12) <= (radius > -1e-9))[active].all() and ((gap < -1e-12) <= (radius < 1e-9))[active].all()


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize(("k", "pooling"), [(1, "max"), (3, "max"), (2, "soft")])
def test_circle_chunked_equals_dense(detach, k, pooling) -> None:
    m = torch.linspace(0.1, 0.4, 6, dtype=torch.float64)
    family = MF.CIRCLE if detach else MF.CIRCLE_EXACT
    dense = lambda c, y: MF.circle_margin(c, y, m, detach_weights=detach)  # noqa: E731
    _chunked_equals_dense(family(m), dense, k=k, pooling=pooling)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_circle_features_equal_or_opposite_to_a_weight_row_are_finite(detach, dtype) -> None:
    _finite_at_the_edges(lambda c, y: MF.circle_margin(c, y, 0.25, detach_weights=detach, scale=30.0), dtype)


def test_circle_errors_name_the_argument() -> None:
    cos, y = torch.rand(2, 5), torch.tensor([0, 3])
    with pytest.raises(ValueError, match="Circle loss needs class indices"):
        MF.circle_margin(cos, torch.rand(2, 5))
    with pytest.raises(ValueError, match=r"Circle loss margin must be in \[0, 1\), but got 1.5"):
        MF.circle_margin(cos, y, 1.5)
    with pytest.raises(TypeError, match="Circle loss detach_weights must be a bool"):
        MF.circle_margin(cos, y, detach_weights="yes")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ transforms

_TRANSFORMED: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
    "mv-am-a": lambda c, y: MF.mv_margin(c, y, 0.35, t=0.2, scale=3.0),
    "mv-arc-f": lambda c, y: MF.mv_margin(c, y, 0.5, t=0.2, margin_type="arc", adaptive=False, scale=3.0),
    "npcface": lambda c, y: MF.npcface_margin(c, y, 0.5, scale=3.0),
    "arcneg": lambda c, y: MF.arcneg_margin(c, y, 0.5, scale=3.0),
    "circle": lambda c, y: MF.circle_margin(c, y, 0.25, scale=64.0),
    "circle-exact": lambda c, y: MF.circle_margin(c, y, 0.25, detach_weights=False, scale=64.0),
}


@pytest.mark.parametrize("name", _TRANSFORMED)
def test_vmap_and_compile_equal_eager(name) -> None:
    g = torch.Generator().manual_seed(9)
    cos = torch.rand(2, 5, 6, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 6, (2, 5), generator=g)
    fn = _TRANSFORMED[name]
    looped = torch.stack([fn(cos[i], y[i]) for i in range(2)])
    torch.testing.assert_close(torch.func.vmap(fn)(cos, y), looped, rtol=1e-12, atol=1e-12)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(cos[0], y[0]), looped[0], rtol=1e-12, atol=1e-12)
    grad = torch.func.grad(lambda c: F.cross_entropy(fn(c, y[0]), y[0]))(cos[0])
    c = cos[0].clone().requires_grad_(True)
    (want,) = torch.autograd.grad(F.cross_entropy(fn(c, y[0]), y[0]), c)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)


def test_the_default_scale_solves_for_the_target_margin() -> None:
    assert MF.heuristic_scale(1000, MF.MV_COS(0.35, 0.2)) == pytest.approx(MF.heuristic_scale(1000, MF.COS(0.35)))
    assert MF.heuristic_scale(1000, MF.MV_ARC(0.5, 0.2)) == pytest.approx(MF.heuristic_scale(1000, MF.ARC(0.5)))
    assert math.isfinite(MF.heuristic_scale(10, MF.MV_ARC_FIXED(0.5, 1.0)))
    assert MF.heuristic_scale(1000, MF.NPC(0.5, 0.4, 1.1, 0.2)) == pytest.approx(MF.heuristic_scale(1000, MF.ARC(0.4)))
