import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mll import functional as MF
from mll.functional.margins import _arc_value, _arc_value_and_slope
from tests import reference_papers as ref
from tests.conftest import ALL_DTYPES

ARC_MARGINS = st.floats(0.0, 1.5)
COS_MARGINS = st.floats(0.0, 0.99)


def arc(cos, target, m, s=1.0, easy=False):
    return MF.arc_margin(cos, target, m, easy_margin=easy, scale=s)


def cos_(cos, target, m, s=1.0, easy=False):
    return MF.cos_margin(cos, target, m, scale=s)


MARGINS = {"arc": (arc, ref.arc_margin, ARC_MARGINS), "cos": (cos_, ref.cos_margin, COS_MARGINS)}


@st.composite
def batches(draw):
    n = draw(st.integers(1, 6))
    c = draw(st.integers(2, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    cos = torch.rand(n, c, generator=g, dtype=torch.float64) * 2 - 1
    # adversarial entries: exactly ±1 and 0
    special = torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64)
    mask = torch.rand(n, c, generator=g) < 0.2
    cos = torch.where(mask, special[torch.randint(0, 3, (n, c), generator=g)], cos)
    labels = torch.randint(0, c, (n,), generator=g)
    soft = torch.rand(n, c, generator=g, dtype=torch.float64)
    soft = soft / soft.sum(-1, keepdim=True)
    return cos, labels, soft


@pytest.mark.parametrize("kind", ["arc", "cos"])
@pytest.mark.parametrize("easy", [False, True])
@given(batch=batches(), data=st.data(), s=st.floats(0.1, 64.0))
def test_matches_float64_reference(kind, easy, batch, data, s) -> None:
    fn, reference, margins = MARGINS[kind]
    m = data.draw(margins)
    cos, labels, soft = batch
    c = cos.shape[-1]
    for target, t in ((labels, ref.onehot(labels.numpy(), c)), (soft, soft.numpy())):
        expected = reference(cos.numpy(), t, m, s, easy) if kind == "arc" else reference(cos.numpy(), t, m, s)
        # at |cos| = 1 exactly sin θ is clamped to √ε = 1.5e-8, below the angular resolution of a cosine there
        np.testing.assert_allclose(ref.as_np(fn(cos, target, m, s, easy)), expected, rtol=1e-9, atol=2e-8 * s)


@pytest.mark.parametrize("kind", ["arc", "cos"])
@given(batch=batches(), data=st.data())
def test_hard_labels_equal_one_hot_soft_labels(kind, batch, data) -> None:
    fn, _, margins = MARGINS[kind]
    m = data.draw(margins)
    cos, labels, _ = batch
    cos = cos.clamp(-0.999, 0.999).requires_grad_(True)  # away from the clamp, where both gradients are 0·∞-free
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    onehot = (torch.arange(cos.shape[-1]) == labels[:, None]).double()
    weights = torch.randn(cos.shape, dtype=torch.float64)
    hard = fn(cos, labels, m, scale)
    soft = fn(cos, onehot, m, scale)
    torch.testing.assert_close(hard, soft, rtol=1e-14, atol=1e-14)
    g_hard = torch.autograd.grad((hard * weights).sum(), (cos, scale))
    g_soft = torch.autograd.grad((soft * weights).sum(), (cos, scale))
    for a, b in zip(g_hard, g_soft):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["arc", "cos"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@given(batch=batches(), data=st.data(), s=st.floats(0.5, 64.0))
def test_hard_and_one_hot_logits_are_bit_identical_in_every_dtype(kind, dtype, batch, data, s) -> None:
    fn, _, margins = MARGINS[kind]
    m = data.draw(margins)
    cos, labels, _ = batch
    cos = cos.to(dtype)
    onehot = (torch.arange(cos.shape[-1]) == labels[:, None]).to(dtype)
    assert torch.equal(fn(cos, labels, m, s), fn(cos, onehot, m, s))


@pytest.mark.parametrize("kind", ["arc", "cos"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("easy", [False, True])
def test_sparse_and_dense_soft_paths_agree(kind, dtype, easy, monkeypatch) -> None:
    import mll.functional.margin as margins

    fn = MARGINS[kind][0]
    g = torch.Generator().manual_seed(4)
    cos = (torch.rand(6, 9, generator=g) * 2 - 1).to(dtype)
    cos[0, :3] = torch.tensor([1.0, -1.0, 0.0], dtype=dtype)
    rows = torch.arange(6)
    lam = torch.rand(6, generator=g).to(dtype)
    soft = torch.zeros(6, 9, dtype=dtype)  # mixup: two classes per row, one row with a single class
    soft[rows, torch.randint(0, 9, (6,), generator=g)] += lam
    soft[rows, torch.tensor([0, 1, 2, 3, 4, 5])] += 1 - lam
    scale = torch.tensor(5.0, dtype=torch.float64 if dtype == torch.float64 else torch.float32, requires_grad=True)
    weights = torch.randn(6, 9, generator=g).to(dtype)
    results = []
    for fraction in (1.0, 0.0):  # always sparse, never sparse
        monkeypatch.setattr(margins, "SPARSE_FRACTION", fraction)
        c = cos.clone().requires_grad_(True)
        out = fn(c, soft, 0.4, scale, easy)
        results.append((out, *torch.autograd.grad((out * weights).float().sum(), (c, scale))))
    (sparse, *sparse_grads), (dense, *dense_grads) = results
    assert torch.equal(sparse, dense)
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {"rtol": 2e-2, "atol": 2e-2}
    for a, b in zip(sparse_grads, dense_grads):
        torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("kind", ["arc", "cos"])
@given(batch=batches(), data=st.data())
def test_only_target_logits_change(kind, batch, data) -> None:
    fn, _, margins = MARGINS[kind]
    cos, labels, _ = batch
    out = fn(cos, labels, data.draw(margins), 3.0)
    off_target = torch.arange(cos.shape[-1]) != labels[:, None]
    assert torch.equal(out[off_target], cos[off_target] * 3.0)


THETAS = torch.linspace(0, math.pi, 2001, dtype=torch.float64)


@pytest.mark.parametrize("kind", ["arc", "cos"])
@given(data=st.data())
def test_target_logit_is_below_cosine_and_monotone(kind, data) -> None:
    fn, _, margins = MARGINS[kind]
    m1, m2 = sorted((data.draw(margins), data.draw(margins)))
    cos = torch.cos(THETAS)[:, None].expand(-1, 2).contiguous()
    labels = torch.zeros(len(THETAS), dtype=torch.long)
    psi1, psi2 = fn(cos, labels, m1)[:, 0], fn(cos, labels, m2)[:, 0]
    assert (psi1 <= cos[:, 0] + 1e-15).all(), "a margin never raises the target logit"
    assert (psi2 <= psi1 + 1e-15).all(), "non-increasing in the margin"
    assert (psi1.diff() <= 1e-15).all(), "non-increasing in θ over [0, π]"


def test_arcface_fallback_past_pi_minus_m() -> None:
    m = 0.5
    theta = torch.tensor([math.pi - 0.3, math.pi], dtype=torch.float64)
    cos = torch.stack([torch.cos(theta), torch.zeros(2, dtype=torch.float64)], dim=1)
    out = MF.arc_margin(cos, torch.zeros(2, dtype=torch.long), m)[:, 0]
    torch.testing.assert_close(out, torch.cos(theta) - m * math.sin(m))


def test_easy_margin_passes_negative_cosines_through() -> None:
    cos = torch.tensor([[0.5, 0.1], [-0.5, 0.1]], dtype=torch.float64)
    out = MF.arc_margin(cos, torch.tensor([0, 0]), 0.5, easy_margin=True)
    torch.testing.assert_close(out[:, 0], torch.tensor([math.cos(math.acos(0.5) + 0.5), -0.5], dtype=torch.float64))


@given(st.floats(0.0, 1.5), st.booleans())
def test_arc_slope_is_the_derivative_of_the_value(m, easy) -> None:
    t = torch.cat([torch.linspace(-1, 1, 401, dtype=torch.float64), torch.tensor([1 - 2**-53, -1 + 2**-52]).double()])
    t.requires_grad_(True)
    value = _arc_value(t, m, easy)
    (autograd_slope,) = torch.autograd.grad(value.sum(), t)
    fused_value, fused_slope = _arc_value_and_slope(t.detach(), torch.tensor(m, dtype=t.dtype), easy)
    torch.testing.assert_close(fused_value, value.detach(), rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(fused_slope, autograd_slope, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", ["arc", "cos"])
@pytest.mark.parametrize("soft", ["index", "dense", "sparse"])
@pytest.mark.parametrize("easy", [False, True])
def test_gradcheck(kind, soft, easy, monkeypatch) -> None:
    import mll.functional.margin as margins

    fn = MARGINS[kind][0]
    g = torch.Generator().manual_seed(1)
    cos = (torch.rand(4, 5, generator=g, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    labels = torch.tensor([0, 2, 4, 2])
    target = {
        "index": labels,
        "dense": torch.softmax(torch.randn(4, 5, generator=g, dtype=torch.float64), -1),
        "sparse": 0.7 * (torch.arange(5) == labels[:, None]) + 0.3 * (torch.arange(5) == 1),
    }[soft].to(labels.dtype if soft == "index" else torch.float64)
    monkeypatch.setattr(margins, "SPARSE_FRACTION", 1.0 if soft == "sparse" else 0.0)
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, s: fn(c, target, 0.4, s, easy), (cos, scale))


def test_gradcheck_through_features_and_weights() -> None:
    x = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1, 0])
    assert torch.autograd.gradcheck(
        lambda a, b: F.cross_entropy(arc(MF.cosine_logits(a, b, 2), y, 0.5, 8.0), y), (x, w)
    )


@pytest.mark.parametrize("kind", ["arc", "cos"])
def test_double_backward_runs_and_keeps_first_order_gradients(kind) -> None:
    fn = MARGINS[kind][0]
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3])
    loss = F.cross_entropy(fn(MF.cosine_logits(x, w), y, 0.3, 6.0), y)
    (grad_x,) = torch.autograd.grad(loss, x, create_graph=True)
    (plain,) = torch.autograd.grad(F.cross_entropy(fn(MF.cosine_logits(x, w), y, 0.3, 6.0), y), x)
    torch.testing.assert_close(grad_x, plain)
    grad_x.pow(2).sum().backward()  # a gradient penalty through the head
    assert torch.isfinite(w.grad).all()


def test_scale_of_shape_one_gets_its_gradient() -> None:
    cos = torch.rand(3, 4, dtype=torch.float64) - 0.5
    scale = torch.tensor([3.0], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 2, 3])
    assert torch.autograd.gradcheck(lambda s: MF.arc_margin(cos, labels, 0.3, scale=s), (scale,))


@pytest.mark.parametrize("kind", ["arc", "cos"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("soft", [False, True])
def test_features_equal_or_opposite_to_a_weight_row_are_finite(kind, dtype, soft) -> None:
    w = torch.randn(4, 8, dtype=dtype)
    x = torch.stack([w[0], -w[1], w[2] * 3, torch.zeros(8, dtype=dtype)]).requires_grad_(True)
    w.requires_grad_(True)
    labels = torch.tensor([0, 1, 2, 3])
    target = (torch.arange(4) == labels[:, None]).to(dtype) if soft else labels
    cos = MF.cosine_logits(x, w)
    out = MARGINS[kind][0](cos, target, 0.5, 30.0)
    assert out.dtype == dtype and torch.isfinite(out).all()
    F.cross_entropy(out.float(), labels).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_trigonometry_runs_in_float32(dtype) -> None:
    cos = torch.tensor([[0.99951171875, 0.2]], dtype=dtype)  # close to 1: arccos in half would be coarse
    labels = torch.tensor([0])
    expected = ref.arc_margin(cos.double().numpy(), ref.onehot(labels.numpy(), 2), 0.5)
    out = MF.arc_margin(cos, labels, 0.5)
    np.testing.assert_allclose(ref.as_np(out), expected, rtol=torch.finfo(dtype).eps)


def test_inputs_are_not_modified() -> None:
    cos = torch.rand(3, 4)
    before = cos.clone()
    MF.arc_margin(cos, torch.tensor([0, 1, 2]), 0.5, scale=10.0)
    MF.cos_margin(cos, torch.softmax(torch.randn(3, 4), -1), 0.5)
    assert torch.equal(cos, before)


def test_leading_dimensions() -> None:
    cos = torch.rand(2, 3, 5, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 3))
    out = MF.arc_margin(cos, labels, 0.5)
    flat = MF.arc_margin(cos.reshape(6, 5), labels.reshape(6), 0.5)
    torch.testing.assert_close(out.reshape(6, 5), flat)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda c: MF.arc_margin(c, torch.tensor([0, 5]), 0.5), ValueError, r"class indices in \[0, 5\).*0 to 5"),
        (lambda c: MF.arc_margin(c, torch.tensor([-1, 0]), 0.5), ValueError, r"values from -1 to 0"),
        (lambda c: MF.cos_margin(c, torch.tensor([0, 1, 2]), 0.5), ValueError, r"shape \(2\).*got .* shape \(3\)"),
        (lambda c: MF.cos_margin(c, torch.rand(2, 4), 0.5), ValueError, r"soft targets of shape \(2, 5\).*\(2, 4\)"),
        (lambda c: MF.cos_margin(c, -torch.rand(2, 5), 0.5), ValueError, r"must be non-negative"),
        (
            lambda c: MF.cos_margin(c, torch.full((2, 5), float("nan")), 0.5),
            ValueError,
            r"non-negative and finite \(not NaN or inf\)",
        ),
        (lambda c: MF.cos_margin(c, torch.tensor([0, 1]), 0.5, scale=torch.ones(5)), ValueError, r"one-element"),
        (lambda c: MF.arc_margin(c.long(), torch.tensor([0, 1]), 0.5), TypeError, r"cosine must have a floating"),
        (lambda c: MF.arc_margin(c[0, 0], torch.tensor(0), 0.5), ValueError, r"cosine must have shape \(\*, C\)"),
        (lambda c: MF.arc_margin(c.tolist(), torch.tensor([0, 1]), 0.5), TypeError, r"cosine must be a torch.Tensor"),
        (lambda c: MF.cos_margin(c, torch.tensor([True, False]), 0.5), TypeError, r"got dtype torch.bool"),
        (lambda c: MF.cos_margin(c, [0, 1], 0.5), TypeError, r"target must be a torch.Tensor"),
        (lambda c: MF.cos_margin(c, torch.tensor([0, 1]), 1.0), ValueError, r"CosFace margin must be in \[0, 1\)"),
        (lambda c: MF.arc_margin(c, torch.tensor([0, 1]), -0.1), ValueError, r"ArcFace margin must be in \[0, 1.571\)"),
        (lambda c: MF.arc_margin(c, torch.tensor([0, 1]), 0.5, scale=0.0), ValueError, r"scale must be positive"),
        (
            lambda c: MF.arc_margin(c, torch.tensor([0, 1]), 0.5, scale=torch.tensor(-1.0)),
            ValueError,
            r"scale must be positive and finite, but got -1.0",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(call, error, match) -> None:
    with pytest.raises(error, match=match):
        call(torch.rand(2, 5))


def test_int32_labels_are_accepted() -> None:
    cos = torch.rand(2, 5)
    torch.testing.assert_close(
        MF.arc_margin(cos, torch.tensor([1, 3], dtype=torch.int32), 0.5), MF.arc_margin(cos, torch.tensor([1, 3]), 0.5)
    )
