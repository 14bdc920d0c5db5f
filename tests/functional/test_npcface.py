"""NPCFace (Zeng et al., 2020; ``mll.functional.npcface_margin``) against float64 references from the paper,
its slopes against autograd, gradcheck, its statistics chunked == dense, chunked == dense, and its properties."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from mll import functional as MF
from tests import reference_facex_zoo as zref
from tests import reference_papers as ref
from tests.conftest import ALL_DTYPES
from tests.functional.margin_checks import chunked_equals_dense, finite_at_the_edges
from tests.functional.test_margins import batches


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
    g = torch.Generator().manual_seed(12)  # chunked_equals_dense's batch: the same statistics
    x = torch.randn(7, 5, generator=g, dtype=torch.float64)
    w = torch.randn(6 * k, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (7,), generator=g)
    mean = MF.npcface_statistics_chunked(x, w, y, m, num_sub_centers=k, pooling=pooling, pooling_temperature=0.2)
    chunked_equals_dense(
        MF.NPC(m, 0.4 + 0.2 * mean, 1.1, 0.2), lambda c, y: MF.npcface_margin(c, y, m), k=k, pooling=pooling
    )


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_npcface_features_equal_or_opposite_to_a_weight_row_are_finite(dtype) -> None:
    finite_at_the_edges(lambda c, y: MF.npcface_margin(c, y, 0.5, scale=30.0), dtype)


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
