"""Circle loss in its classification form (Sun et al., CVPR 2020; ``mll.functional.circle_margin``) against
float64 references from the paper, its slopes, gradcheck, chunked == dense, and its decision boundary."""

from __future__ import annotations

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
    chunked_equals_dense(family(m), dense, k=k, pooling=pooling)


@pytest.mark.parametrize("detach", [True, False])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_circle_features_equal_or_opposite_to_a_weight_row_are_finite(detach, dtype) -> None:
    finite_at_the_edges(lambda c, y: MF.circle_margin(c, y, 0.25, detach_weights=detach, scale=30.0), dtype)


def test_circle_errors_name_the_argument() -> None:
    cos, y = torch.rand(2, 5), torch.tensor([0, 3])
    with pytest.raises(ValueError, match="Circle loss needs class indices"):
        MF.circle_margin(cos, torch.rand(2, 5))
    with pytest.raises(ValueError, match=r"Circle loss margin must be in \[0, 1\), but got 1.5"):
        MF.circle_margin(cos, y, 1.5)
    with pytest.raises(TypeError, match="Circle loss detach_weights must be a bool"):
        MF.circle_margin(cos, y, detach_weights="yes")  # type: ignore[arg-type]
