"""ArcNegFace (Liu et al., 2019; ``mll.functional.arcneg_margin``) against float64 references from the paper,
its slopes against autograd, the authors' gradient, chunked == dense, and its properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mll import functional as MF
from tests import reference_facex_zoo as zref
from tests import reference_papers as ref
from tests.conftest import ALL_DTYPES
from tests.functional.margin_checks import chunked_equals_dense, finite_at_the_edges
from tests.functional.test_margins import batches


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
    chunked_equals_dense(MF.ARC_NEG(m, 1.2, 2.0), lambda c, y: MF.arcneg_margin(c, y, m), k=k, pooling=pooling)


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_arcneg_features_equal_or_opposite_to_a_weight_row_are_finite(dtype) -> None:
    finite_at_the_edges(lambda c, y: MF.arcneg_margin(c, y, 0.5, scale=30.0), dtype)


def test_arcneg_errors_name_the_argument() -> None:
    cos, y = torch.rand(2, 5), torch.tensor([0, 3])
    with pytest.raises(ValueError, match="ArcNegFace needs class indices"):
        MF.arcneg_margin(cos, torch.rand(2, 5))
    with pytest.raises(ValueError, match=r"ArcNegFace sigma must be in \(0, inf\), but got 0.0"):
        MF.arcneg_margin(cos, y, sigma=0.0)
    with pytest.raises(ValueError, match=r"ArcNegFace alpha must be in \[0, inf\), but got -1.0"):
        MF.arcneg_margin(cos, y, alpha=-1.0)
