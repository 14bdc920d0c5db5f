"""MV-Softmax (Wang et al., AAAI 2020; ``mll.functional.mv_margin``) against float64 references from the
paper, its slopes against autograd, gradcheck, chunked == dense, and its properties."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from mll import functional as MF
from mll.functional.mv_softmax import mv_family
from tests import reference_facex_zoo as zref
from tests import reference_papers as ref
from tests.conftest import ALL_DTYPES
from tests.functional.margin_checks import chunked_equals_dense, finite_at_the_edges
from tests.functional.test_margins import batches

MV_VARIANTS = [("cos", True), ("cos", False), ("arc", True), ("arc", False)]


MV_IDS = ["am-a", "am-f", "arc-a", "arc-f"]


def _mv(margin_type: str, adaptive: bool) -> Callable[..., torch.Tensor]:
    return lambda c, y, m, t, s=1.0: MF.mv_margin(c, y, m, t=t, margin_type=margin_type, adaptive=adaptive, scale=s)


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


@pytest.mark.parametrize(("margin_type", "adaptive"), MV_VARIANTS, ids=MV_IDS)
@pytest.mark.parametrize(("k", "pooling"), [(1, "max"), (3, "max"), (2, "soft")])
def test_mv_chunked_equals_dense(margin_type, adaptive, k, pooling) -> None:
    m = torch.linspace(0.1, 0.5, 6, dtype=torch.float64)
    chunked_equals_dense(
        mv_family(margin_type, adaptive)(m, 0.3),
        lambda c, y: _mv(margin_type, adaptive)(c, y, m, 0.3),
        k=k,
        pooling=pooling,
    )


@pytest.mark.parametrize(("margin_type", "adaptive"), MV_VARIANTS, ids=MV_IDS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_mv_features_equal_or_opposite_to_a_weight_row_are_finite(margin_type, adaptive, dtype) -> None:
    finite_at_the_edges(lambda c, y: _mv(margin_type, adaptive)(c, y, 0.5, 0.3, 30.0), dtype)


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
