import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mll import functional as MF
from tests import reference_papers as ref


@st.composite
def batches(draw):
    n = draw(st.integers(1, 8))
    c = draw(st.integers(2, 6))
    d = draw(st.integers(1, 5))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    means = torch.randn(c, d, generator=g, dtype=torch.float64)
    means[0] = 0  # a class never seen yet
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    labels = torch.randint(0, c, (n,), generator=g)
    soft = torch.rand(n, c, generator=g, dtype=torch.float64) * (torch.rand(n, c, generator=g) < 0.5)
    return means, x, labels, soft


@given(batches(), st.floats(0.0, 0.99))
def test_update_matches_reference(batch, alpha) -> None:
    means, x, labels, soft = batch
    c = means.shape[0]
    for target, t in ((labels, ref.onehot(labels.numpy(), c)), (soft, soft.numpy())):
        new = MF.ncm_update(means, x, target, alpha)
        np.testing.assert_allclose(
            new.numpy(), ref.ncm_update(means.numpy(), x.numpy(), t, alpha), rtol=1e-12, atol=1e-12
        )


@given(batches(), st.floats(0.0, 0.99))
def test_update_hard_equals_one_hot_and_leaves_absent_classes(batch, alpha) -> None:
    means, x, labels, _ = batch
    onehot = (torch.arange(means.shape[0]) == labels[:, None]).double()
    new = MF.ncm_update(means, x, labels, alpha)
    torch.testing.assert_close(new, MF.ncm_update(means, x, onehot, alpha))
    absent = torch.ones(means.shape[0], dtype=torch.bool)
    absent[labels] = False
    assert torch.equal(new[absent], means[absent])


def test_update_is_pure() -> None:
    means, x = torch.randn(3, 2), torch.randn(4, 2)
    before_means, before_x = means.clone(), x.clone()
    MF.ncm_update(means, x, torch.tensor([0, 1, 1, 2]), 0.9)
    assert torch.equal(means, before_means) and torch.equal(x, before_x)
    sums, counts = MF.ncm_batch_statistics(x, torch.tensor([0, 1, 1, 2]), 3)
    copies = sums.clone(), counts.clone()
    MF.ncm_update_from_statistics(means, sums, counts, 0.9)
    assert torch.equal(sums, copies[0]) and torch.equal(counts, copies[1]) and torch.equal(means, before_means)


def test_update_keeps_the_means_dtype() -> None:
    means = torch.zeros(3, 2, dtype=torch.float64)
    new = MF.ncm_update(means, torch.randn(4, 2, dtype=torch.bfloat16), torch.tensor([0, 1, 1, 2]), 0.5)
    assert new.dtype == torch.float64


@given(batches(), st.floats(0.1, 30.0))
def test_logits_match_reference_and_unseen_classes_are_finite(batch, s) -> None:
    means, x, _, _ = batch
    out = MF.ncm_logits(x, means, s)
    np.testing.assert_allclose(out.numpy(), s * ref.cosine(x.numpy(), means.numpy()), rtol=1e-12, atol=1e-12)
    assert (out[:, 0] == 0).all()


def test_bad_input() -> None:
    with pytest.raises(ValueError, match=r"input must have shape \(\*, 6\) to match means's in_features"):
        MF.ncm_logits(torch.randn(4, 5), torch.zeros(3, 6), 2.0)
    with pytest.raises(TypeError, match=r"means must have a floating-point dtype"):
        MF.ncm_logits(torch.randn(4, 5), torch.zeros(3, 5, dtype=torch.long), 2.0)
    with pytest.raises(
        ValueError, match=r"decay must be a float in \[0, 1\) \(the weight of the old value\), but got 1.0"
    ):
        MF.ncm_update(torch.zeros(3, 2), torch.randn(4, 2), torch.tensor([0, 1, 1, 2]), 1.0)
    with pytest.raises(ValueError, match=r"means must have shape \(C, d\).*means \(3, 2\) and input \(4, 5\)"):
        MF.ncm_update(torch.zeros(3, 2), torch.randn(4, 5), torch.tensor([0, 1, 1, 2]), 0.5)
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        MF.ncm_update(torch.zeros(3, 2), torch.randn(2, 2), torch.tensor([0, 3]), 0.5)
