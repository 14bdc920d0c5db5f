import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mll import functional as MF
from tests import reference_papers as ref
from tests.conftest import ALL_DTYPES


@st.composite
def problems(draw, max_lead=2):
    lead = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=max_lead)))
    d = draw(st.integers(1, 8))
    c = draw(st.integers(2, 7))
    k = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    w = torch.randn(c * k, d, generator=g, dtype=torch.float64)
    return x, w, k


@given(problems())
def test_matches_float64_reference(problem) -> None:
    x, w, k = problem
    out = MF.cosine_logits(x, w, k)
    assert out.shape == (*x.shape[:-1], w.shape[0] // k)
    np.testing.assert_allclose(ref.as_np(out), ref.cosine(ref.as_np(x), ref.as_np(w), k), rtol=1e-12, atol=1e-12)


@given(problems(), st.data())
def test_invariant_to_feature_and_weight_norms(problem, data) -> None:
    x, w, k = problem
    fx = torch.tensor(data.draw(st.lists(st.floats(1e-3, 1e3), min_size=x[..., 0].numel(), max_size=x[..., 0].numel())))
    fw = torch.tensor(data.draw(st.lists(st.floats(1e-3, 1e3), min_size=w.shape[0], max_size=w.shape[0])))
    scaled = MF.cosine_logits(x * fx.double().reshape(*x.shape[:-1], 1), w * fw.double()[:, None], k)
    torch.testing.assert_close(scaled, MF.cosine_logits(x, w, k), rtol=1e-12, atol=1e-12)


@given(problems(), st.integers(0, 2**16))
def test_equivariant_to_class_permutation(problem, seed) -> None:
    x, w, k = problem
    c = w.shape[0] // k
    perm = torch.randperm(c, generator=torch.Generator().manual_seed(seed))
    w_perm = w.reshape(c, k, -1)[perm].reshape(c * k, -1)  # classes move as blocks of K sub-centers
    torch.testing.assert_close(MF.cosine_logits(x, w_perm, k), MF.cosine_logits(x, w, k)[..., perm])


@given(problems())
def test_one_sub_center_is_the_plain_normalised_gemm(problem) -> None:
    x, w, _ = problem
    torch.testing.assert_close(MF.cosine_logits(x, w, 1), F.linear(F.normalize(x, dim=-1), F.normalize(w, dim=-1)))


@given(problems())
def test_identical_sub_centers_equal_one(problem) -> None:
    x, w, k = problem
    repeated = w.repeat_interleave(3, dim=0)  # every class' rows copied 3 times, in the c*K + k layout
    torch.testing.assert_close(MF.cosine_logits(x, repeated, 3 * k), MF.cosine_logits(x, w, k))


def test_sub_center_pooling_takes_the_closest_sub_center() -> None:
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # class 0: e1, e2; class 1: -e1, -e2
    x = torch.tensor([[0.0, 2.0]])
    torch.testing.assert_close(MF.cosine_logits(x, w, 2), torch.tensor([[1.0, 0.0]]))


def test_gradcheck() -> None:
    x = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.randn(8, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: MF.cosine_logits(a, b, 2), (x, w))


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_zero_vectors_give_zeros_and_finite_gradients(dtype) -> None:
    x = torch.zeros(2, 4, dtype=dtype)
    x[1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    x.requires_grad_(True)
    w = torch.randn(3, 4, dtype=dtype, requires_grad=True)
    out = MF.cosine_logits(x, w)
    assert (out[0] == 0).all()
    assert torch.isfinite(out).all()
    (out * 30).sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_dtype_follows_input(dtype) -> None:
    x, w = torch.randn(2, 4, dtype=dtype), torch.randn(3, 4, dtype=dtype)
    out = MF.cosine_logits(x, w)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), MF.cosine_logits(x.double(), w.double()), atol=2e-2, rtol=0)


def test_normalize_is_pure_and_unit_norm() -> None:
    x = torch.randn(5, 3) * 100
    before = x.clone()
    out = MF.normalize(x)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(5))
    assert torch.equal(x, before)


@pytest.mark.parametrize(
    ("x_shape", "w_shape", "k", "match"),
    [
        ((4, 5), (6, 3), 1, r"input must have shape \(\*, 3\).*got \(4, 5\)"),
        ((4, 5), (6, 5, 1), 1, r"weight must have shape .*got \(6, 5, 1\)"),
        ((4, 5), (7, 5), 2, r"7 rows, which is not a multiple of num_sub_centers=2"),
        ((4, 5), (6, 5), 0, r"num_sub_centers must be an integer >= 1, but got 0"),
    ],
)
def test_bad_shapes_name_the_argument(x_shape, w_shape, k, match) -> None:
    with pytest.raises(ValueError, match=match):
        MF.cosine_logits(torch.randn(x_shape), torch.randn(w_shape), k)


def test_bad_dtypes_name_the_argument() -> None:
    with pytest.raises(TypeError, match=r"input must have a floating-point dtype, but got torch\.int64"):
        MF.cosine_logits(torch.ones(2, 3, dtype=torch.long), torch.randn(4, 3))
    with pytest.raises(TypeError, match=r"same dtype outside autocast, but got torch\.float64 and torch\.float32"):
        MF.cosine_logits(torch.randn(2, 3, dtype=torch.float64), torch.randn(4, 3))
