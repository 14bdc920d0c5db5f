"""The margin families beyond CosFace/ArcFace: combined, SphereFace, CurricularFace, AdaFace, MagFace, ElasticFace,
per-class margins."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from mll import functional as MF
from mll.functional.feature_norm import _ada_value_and_slope
from mll.functional.margins import _arc_value_and_slope, _combined_value_and_slope
from tests import reference_papers as ref
from tests.conftest import ALL_DTYPES
from tests.functional.test_margins import batches

NORMS = torch.tensor([0.5, 5.0, 20.0, 35.0, 60.0, 150.0], dtype=torch.float64)


def _norms(n):
    return NORMS.repeat(n)[:n].clone()


# each family: (our function, its float64 reference, a hypothesis strategy for its hyper-parameters)
FAMILIES = {
    "combined": (
        lambda c, t, p, s: MF.combined_margin(c, t, *p, scale=s),
        lambda c, t, p, s, norms: ref.combined_margin(c, t, *p, s=s),
        st.tuples(st.floats(1.0, 4.0), st.floats(0.0, 1.5), st.floats(0.0, 0.9)),
    ),
    "sphere": (
        lambda c, t, p, s: MF.sphere_margin(c, t, p[0], lambda_=p[1], scale=s),
        lambda c, t, p, s, norms: ref.sphere_margin(c, t, p[0], p[1], s=s),
        st.tuples(st.floats(1.0, 6.0), st.floats(0.0, 20.0)),
    ),
    "ada": (
        lambda c, t, p, s: MF.ada_margin(c, t, _norms(c.shape[0]), p[0], mean=p[1], std=p[2], scale=s),
        lambda c, t, p, s, norms: ref.ada_margin(c, t, norms, p[0], p[1], p[2], s=s),
        st.tuples(st.floats(0.0, 1.0), st.floats(1.0, 50.0), st.floats(0.0, 30.0)),
    ),
    "mag": (
        lambda c, t, p, s: MF.mag_margin(c, t, _norms(c.shape[0]), margin_low=p[0], margin_high=p[1], scale=s),
        lambda c, t, p, s, norms: ref.mag_margin(c, t, norms, m_low=p[0], m_high=p[1], s=s),
        st.tuples(st.floats(0.0, 0.7), st.floats(0.7, 1.5)),
    ),
    "mag-easy": (
        lambda c, t, p, s: MF.mag_margin(
            c, t, _norms(c.shape[0]), margin_low=p[0], margin_high=p[1], easy_margin=True, scale=s
        ),
        lambda c, t, p, s, norms: ref.mag_margin(c, t, norms, m_low=p[0], m_high=p[1], s=s, easy=True),
        st.tuples(st.floats(0.0, 0.7), st.floats(0.7, 1.5)),
    ),
}


@pytest.mark.parametrize("kind", sorted(FAMILIES))
@given(batch=batches(), data=st.data(), s=st.floats(0.5, 64.0))
def test_matches_float64_reference(kind, batch, data, s) -> None:
    fn, reference, params = FAMILIES[kind]
    p = data.draw(params)
    cos, labels, soft = batch
    norms = _norms(cos.shape[0]).numpy()
    for target, t in ((labels, ref.onehot(labels.numpy(), cos.shape[-1])), (soft, soft.numpy())):
        expected = reference(cos.numpy(), t, p, s, norms)
        # sin θ is clamped to √ε = 1.5e-8 at |cos| = 1 exactly; arccos and atan2 differ by a few ulps elsewhere
        np.testing.assert_allclose(ref.as_np(fn(cos, target, p, s)), expected, rtol=1e-9, atol=1e-7 * s)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@given(batch=batches(), data=st.data())
def test_hard_and_one_hot_logits_agree_to_the_ulp(kind, dtype, batch, data) -> None:
    # Same formula on both paths; CPU kernels of atan2/cos/sin may round an element differently depending on
    # whether it falls in a vectorised block (N×C entries) or a scalar tail (N entries): a few ulps of the
    # float32 working precision at most. (ArcFace and CosFace use only correctly rounded ops: bit-identical.)
    fn, _, params = FAMILIES[kind]
    p = data.draw(params)
    cos, labels, _ = batch
    cos = cos.to(dtype)
    onehot = (torch.arange(cos.shape[-1]) == labels[:, None]).to(dtype)
    hard, soft = fn(cos, labels, p, 3.0), fn(cos, onehot, p, 3.0)
    eps = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32).eps
    rounding = torch.finfo(dtype).eps if dtype in (torch.float16, torch.bfloat16) else 0.0
    torch.testing.assert_close(hard, soft, rtol=8 * eps + rounding, atol=8 * eps * 3.0 * 8)


@pytest.mark.parametrize("kind", sorted(FAMILIES))
@given(batch=batches(), data=st.data())
def test_entries_without_a_target_are_untouched(kind, batch, data) -> None:
    fn, _, params = FAMILIES[kind]
    cos, labels, soft = batch
    soft = torch.where(soft > 0.3, soft, torch.zeros_like(soft))
    out = fn(cos, soft, data.draw(params), 2.0)
    assert torch.equal(out[soft == 0], cos[soft == 0] * 2.0)
    out = fn(cos, labels, data.draw(params), 2.0)
    off = torch.arange(cos.shape[-1]) != labels[:, None]
    assert torch.equal(out[off], cos[off] * 2.0)


THETAS = torch.linspace(0, math.pi, 3001, dtype=torch.float64)
ZEROS = torch.zeros(len(THETAS), dtype=torch.long)


def _target_curve(fn) -> torch.Tensor:
    cos = torch.cos(THETAS)[:, None].expand(-1, 2).contiguous()
    return fn(cos)[:, 0]


@given(st.floats(1.0, 6.0), st.floats(1.0, 6.0), st.floats(0.0, 1.5), st.floats(0.0, 0.9))
def test_combined_margin_is_monotone_and_below_the_cosine(m1a, m1b, m2, m3) -> None:
    lo, hi = sorted((m1a, m1b))
    psi_lo = _target_curve(lambda c: MF.combined_margin(c, ZEROS, lo, m2, m3))
    psi_hi = _target_curve(lambda c: MF.combined_margin(c, ZEROS, hi, m2, m3))
    psi_more = _target_curve(lambda c: MF.combined_margin(c, ZEROS, hi, min(m2 + 0.05, 1.55), min(m3 + 0.05, 0.99)))
    assert (psi_lo <= torch.cos(THETAS) + 1e-12).all()
    assert (psi_lo.diff() <= 1e-12).all(), "non-increasing in θ over [0, π], also past m1·θ + m2 = π"
    assert (psi_hi <= psi_lo + 1e-12).all() and (psi_more <= psi_hi + 1e-12).all(), "non-increasing in each margin"


def test_sphereface_is_the_papers_piecewise_psi() -> None:
    # Liu et al. Eq. 6 with m = 4: at θ = kπ/4 the value is (−1)^k − 2k
    theta = torch.arange(5, dtype=torch.float64) * math.pi / 4
    cos = torch.stack([torch.cos(theta), torch.zeros(5, dtype=torch.float64)], 1)
    out = MF.sphere_margin(cos, torch.zeros(5, dtype=torch.long), 4.0)[:, 0]
    torch.testing.assert_close(out, torch.tensor([1.0, -1.0, -3.0, -5.0, -7.0], dtype=torch.float64))
    naive = torch.cos(4 * THETAS)
    assert (naive.diff() > 0).any(), "the naive cos(mθ) is not monotone"
    assert (_target_curve(lambda c: MF.sphere_margin(c, ZEROS, 4.0)).diff() <= 1e-12).all()


def test_combined_margin_reduces_to_cosface_and_arcface() -> None:
    g = torch.Generator().manual_seed(0)
    cos = torch.rand(50, 6, generator=g, dtype=torch.float64) * 1.6 - 0.8
    y = torch.randint(0, 6, (50,), generator=g)
    torch.testing.assert_close(MF.combined_margin(cos, y, 1.0, 0.0, 0.35), MF.cos_margin(cos, y, 0.35))
    # ArcFace below π − m (past it the two use different monotone continuations)
    torch.testing.assert_close(MF.combined_margin(cos, y, 1.0, 0.5, 0.0), MF.arc_margin(cos, y, 0.5))
    assert torch.equal(MF.combined_margin(cos, y, 1.0, 0.0, 0.0), cos), "no margin: bit-identical"


#: cosines from −1 to 1, with the clamp's edges: exactly ±1, one float64 ulp inside, and 1 − 1e-8 (θ = 1.4e-4,
#: inside AdaFace's ε = 1e-3 clip)
EDGES = torch.cat(
    [
        torch.linspace(-1, 1, 801, dtype=torch.float64),
        torch.tensor([1 - 2**-53, -1 + 2**-52, 1 - 1e-8, -1 + 1e-8, 1 - 1e-12], dtype=torch.float64),
    ]
)


@given(st.floats(1.0, 4.0), st.floats(0.0, 1.5), st.floats(0.0, 1.0))
def test_combined_slope_is_the_derivative_of_the_value(m1, m2, w) -> None:
    c = EDGES.clone().requires_grad_(True)
    params = [torch.tensor(v, dtype=torch.float64) for v in (m1, m2, 0.1)]
    value, slope = _combined_value_and_slope(c, w, *params)
    (autograd,) = torch.autograd.grad(value.sum(), c)
    # where sin θ is clamped (|cos θ| within ε of 1) the slope is the derivative's limit instead (next test)
    free = (1 - c.detach()) * (1 + c.detach()) >= torch.finfo(torch.float64).eps
    torch.testing.assert_close(slope[free], autograd[free], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m", [2.0, 3.0, 4.0])
def test_sphereface_slope_at_cos_plus_minus_one_is_the_limit_m_squared(dtype, m) -> None:
    # ψ = (−1)^k cos(mθ) − 2k: dψ/dcos = (−1)^k m sin(mθ)/sin θ → m² as θ → 0 and θ → π (integer m)
    c = torch.tensor([1.0, -1.0], dtype=dtype)
    zero = torch.zeros((), dtype=dtype)
    _, slope = _combined_value_and_slope(c, 1.0, torch.tensor(m, dtype=dtype), zero, zero)
    torch.testing.assert_close(slope, torch.full_like(slope, m * m), rtol=1e-3, atol=1e-3)
    # and the slope is continuous into the clamp: at the float next to ±1 it is already close to m²
    near = torch.tensor([1 - torch.finfo(dtype).eps, -1 + torch.finfo(dtype).eps], dtype=dtype)
    _, slope_near = _combined_value_and_slope(near, 1.0, torch.tensor(m, dtype=dtype), zero, zero)
    torch.testing.assert_close(slope_near, torch.full_like(slope, m * m), rtol=2e-3, atol=2e-3)
    # through the public function and autograd: the target logit's gradient at θ = 0 and θ = π is s·m²
    cos = torch.tensor([[1.0, 0.0], [0.0, -1.0]], dtype=dtype, requires_grad=True)
    logits = MF.sphere_margin(cos, torch.tensor([0, 1]), m, scale=2.0)
    (grad,) = torch.autograd.grad(logits[0, 0] + logits[1, 1], cos)
    torch.testing.assert_close(grad[[0, 1], [0, 1]], torch.full((2,), 2 * m * m, dtype=dtype), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m2", [0.2, 0.5])
def test_combined_slope_at_cos_one_matches_arcface(dtype, m2) -> None:
    c = torch.tensor([1.0], dtype=dtype)
    zero, one = torch.zeros((), dtype=dtype), torch.ones((), dtype=dtype)
    _, slope = _combined_value_and_slope(c, 1.0, one, torch.tensor(m2, dtype=dtype), zero)
    _, arc_slope = _arc_value_and_slope(c, torch.tensor(m2, dtype=dtype), False)
    torch.testing.assert_close(slope, arc_slope, rtol=1e-3, atol=1e-3)


@given(st.floats(0.0, 1.0), st.floats(-1.0, 1.0))
def test_adaface_slope_is_the_derivative_of_the_value(m, quality) -> None:
    c = EDGES.clone().requires_grad_(True)
    params = [torch.tensor(m, dtype=torch.float64), torch.tensor(quality, dtype=torch.float64)]
    value, slope = _ada_value_and_slope(c, 1.0, *params)
    (autograd,) = torch.autograd.grad(value.sum(), c)
    torch.testing.assert_close(slope, autograd, rtol=1e-9, atol=1e-9)


def test_adaface_interpolates_between_arcface_cosface_and_the_easy_case() -> None:
    cos = torch.tensor([[0.3, 0.1], [0.6, 0.2], [0.9, -0.1]], dtype=torch.float64)
    y = torch.zeros(3, dtype=torch.long)
    mean, std, h, m = 20.0, 5.0, 0.333, 0.4
    low, middle, high = mean - 3 * std / h, mean, mean + 3 * std / h  # ẑ = −1, 0, +1 after the clip
    out = [
        MF.ada_margin(cos, y, torch.full((3,), n, dtype=torch.float64), m, mean=mean, std=std)[:, 0]
        for n in (low, middle, high)
    ]
    theta = torch.arccos(cos[:, 0])
    torch.testing.assert_close(out[0], torch.cos(theta + m))  # ArcFace
    torch.testing.assert_close(out[1], cos[:, 0] - m)  # CosFace
    torch.testing.assert_close(out[2], torch.cos(theta - m) - 2 * m)


def test_adaface_statistics_follow_the_ema() -> None:
    norms = torch.tensor([10.0, 20.0, 40.0])
    mean, std = MF.adaface_update(torch.tensor(20.0), torch.tensor(100.0), norms, decay=0.99)
    torch.testing.assert_close(mean, 0.99 * 20 + 0.01 * norms.mean())
    torch.testing.assert_close(std, 0.99 * 100 + 0.01 * norms.std())
    kept = MF.adaface_update(torch.tensor(20.0), torch.tensor(100.0), torch.tensor([7.0]))
    assert float(kept[1]) == 100.0 and math.isfinite(float(kept[0])), "one sample has no std: keep the old one"


def test_magface_margin_gradient_flows_through_the_norms() -> None:
    g = torch.Generator().manual_seed(2)
    cos = (torch.rand(5, 4, generator=g, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    norms = torch.tensor([15.0, 40.0, 70.0, 100.0, 105.0], dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0])
    soft = torch.softmax(torch.randn(5, 4, generator=g, dtype=torch.float64), -1)
    for target in (y, soft):
        assert torch.autograd.gradcheck(lambda c, n, t=target: MF.mag_margin(c, t, n, scale=3.0), (cos, norms))
    (grad,) = torch.autograd.grad(MF.mag_margin(cos, y, norms)[torch.arange(5), y].sum(), norms)
    assert (grad < 0).all(), "a larger magnitude means a larger margin: a lower target logit"


def test_magface_regularizer_is_the_papers_g() -> None:
    norms = torch.tensor([5.0, 10.0, 50.0, 110.0, 200.0], dtype=torch.float64, requires_grad=True)
    a = norms.detach().clamp(10, 110)
    torch.testing.assert_close(MF.magface_regularizer(norms), a / 110**2 + 1 / a)
    (grad,) = torch.autograd.grad(MF.magface_regularizer(norms).sum(), norms)
    assert (grad[1:3] < 0).all(), "decreasing inside [l_a, u_a]"
    assert grad[0] == 0 and grad[4] == 0 and abs(float(grad[3])) < 1e-15, "minimum at u_a, flat outside"


@given(batch=batches(), data=st.data(), s=st.floats(0.5, 64.0), t=st.floats(0.0, 1.0))
def test_curricular_matches_float64_reference(batch, data, s, t) -> None:
    cos, labels, _ = batch
    m = data.draw(st.floats(0.0, 1.5))
    expected = ref.curricular_margin(cos.numpy(), labels.numpy(), m, t, s)
    np.testing.assert_allclose(ref.as_np(MF.curricular_margin(cos, labels, m, t=t, scale=s)), expected,
                               rtol=1e-9, atol=1e-7 * s)  # fmt: skip


def test_curricular_gradcheck_and_update() -> None:
    g = torch.Generator().manual_seed(5)
    cos = (torch.rand(6, 5, generator=g, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    scale = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda c, s: MF.curricular_margin(c, y, 0.3, t=0.4, scale=s), (cos, scale))
    t = MF.curricular_update(torch.tensor(0.2), cos, y, decay=0.99)
    torch.testing.assert_close(t, 0.99 * 0.2 + 0.01 * cos.detach()[torch.arange(6), y].mean())
    empty = MF.curricular_update(torch.tensor(0.2), cos[:0], y[:0])
    assert float(empty) == pytest.approx(0.2)


def test_curricular_refuses_soft_targets() -> None:
    with pytest.raises(ValueError, match="CurricularFace needs class indices"):
        MF.curricular_margin(torch.rand(2, 3), torch.rand(2, 3), 0.5, t=0.0)


@pytest.mark.parametrize(
    "fn",
    [
        lambda c, t, m: MF.cos_margin(c, t, m, scale=2.0),
        lambda c, t, m: MF.arc_margin(c, t, m, scale=2.0),
        lambda c, t, m: MF.combined_margin(c, t, 1.2, m, 0.1, scale=2.0),
        lambda c, t, m: MF.ada_margin(c, t, torch.full(t.shape[:1], 35.0), m, mean=20.0, std=10.0, scale=2.0),
        lambda c, t, m: MF.curricular_margin(c, t, m, t=0.3, scale=2.0),
    ],
    ids=["cos", "arc", "combined", "ada", "curricular"],
)
def test_per_class_and_per_sample_margins_equal_a_loop(fn) -> None:
    g = torch.Generator().manual_seed(7)
    n, c = 8, 5
    cos = torch.rand(n, c, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, c, (n,), generator=g)
    per_class = torch.rand(c, generator=g, dtype=torch.float64) * 0.6
    per_sample = torch.rand(n, 1, generator=g, dtype=torch.float64) * 0.6
    looped_class = torch.cat([fn(cos[i : i + 1], y[i : i + 1], float(per_class[y[i]])) for i in range(n)])
    looped_sample = torch.cat([fn(cos[i : i + 1], y[i : i + 1], float(per_sample[i])) for i in range(n)])
    torch.testing.assert_close(fn(cos, y, per_class), looped_class, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(fn(cos, y, per_sample), looped_sample, rtol=1e-14, atol=1e-14)


def test_per_class_margins_with_soft_targets_weigh_each_class() -> None:
    g = torch.Generator().manual_seed(8)
    cos = torch.rand(4, 6, generator=g, dtype=torch.float64) * 2 - 1
    soft = torch.softmax(torch.randn(4, 6, generator=g, dtype=torch.float64), -1)
    m = torch.rand(6, generator=g, dtype=torch.float64)
    expected = ref.arc_margin(cos.numpy(), soft.numpy() * m.numpy(), 1.0)
    np.testing.assert_allclose(ref.as_np(MF.arc_margin(cos, soft, m)), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda c, y: MF.arc_margin(c, y, torch.full((4,), 0.5)), r"broadcasts to the logits' shape \(2, 5\)"),
        (lambda c, y: MF.arc_margin(c, y, torch.full((5,), 2.0)), r"ArcFace margin must be in \[0, 1.571\).*2 to 2"),
        (lambda c, y: MF.cos_margin(c, y, torch.tensor([0.1, 0.2, 0.3, 0.4, 1.5])), r"values from 0.1 to 1.5"),
        (lambda c, y: MF.combined_margin(c, y, 0.5), r"combined m1 must be in \[1, 10\)"),
        (lambda c, y: MF.combined_margin(c, y, 1.0, 0.2, -0.1), r"combined m3 must be in \[0, 1\)"),
        (lambda c, y: MF.sphere_margin(c, y, 4.0, lambda_=-1.0), r"lambda_ must be a finite float >= 0"),
        (lambda c, y: MF.ada_margin(c, y, torch.ones(3), mean=1.0, std=1.0), r"norms must have shape \(2\)"),
        (lambda c, y: MF.mag_margin(c, y, torch.ones(2), lower=10.0, upper=5.0), r"lower must be below upper"),
        (lambda c, y: MF.arc_margin(c, y, torch.tensor([1, 2, 3, 4, 5])), r"floating-point tensor"),
    ],
)
def test_bad_margins_raise_clear_errors(call, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        call(torch.rand(2, 5), torch.tensor([0, 3]))


@pytest.mark.parametrize("kind", ["combined", "sphere", "ada", "mag", "curricular"])
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_features_equal_or_opposite_to_a_weight_row_are_finite(kind, dtype) -> None:
    w = torch.randn(4, 8, dtype=dtype)
    x = torch.stack([w[0], -w[1], w[2] * 3, torch.zeros(8, dtype=dtype)]).requires_grad_(True)
    w.requires_grad_(True)
    y = torch.tensor([0, 1, 2, 3])
    cos = MF.cosine_logits(x, w)
    norms = x.norm(dim=-1)
    out = {
        "combined": lambda: MF.combined_margin(cos, y, 1.35, 0.25, 0.1, scale=30.0),
        "sphere": lambda: MF.sphere_margin(cos, y, 4.0, scale=30.0),
        "ada": lambda: MF.ada_margin(cos, y, norms, 0.4, mean=2.0, std=1.0, scale=30.0),
        "mag": lambda: MF.mag_margin(cos, y, norms, lower=0.5, upper=5.0, scale=30.0),
        "curricular": lambda: MF.curricular_margin(cos, y, 0.5, t=0.5, scale=30.0),
    }[kind]()
    assert out.dtype == dtype and torch.isfinite(out).all()
    F.cross_entropy(out.float(), y).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("soft", ["index", "dense", "sparse"])
@pytest.mark.parametrize("kind", ["combined", "sphere", "ada", "mag"])
def test_gradcheck(kind, soft, monkeypatch) -> None:
    import mll.functional.margin as margins

    g = torch.Generator().manual_seed(1)
    cos = (torch.rand(4, 5, generator=g, dtype=torch.float64) * 1.8 - 0.9).requires_grad_(True)
    labels = torch.tensor([0, 2, 4, 2])
    target = {
        "index": labels,
        "dense": torch.softmax(torch.randn(4, 5, generator=g, dtype=torch.float64), -1),
        "sparse": (0.7 * (torch.arange(5) == labels[:, None]) + 0.3 * (torch.arange(5) == 1)).double(),
    }[soft]
    monkeypatch.setattr(margins, "SPARSE_FRACTION", 1.0 if soft == "sparse" else 0.0)
    scale = torch.tensor(2.5, dtype=torch.float64, requires_grad=True)
    fn = FAMILIES[kind][0]
    params = {"combined": (1.3, 0.2, 0.1), "sphere": (2.5, 1.0), "ada": (0.4, 20.0, 10.0), "mag": (0.3, 0.9)}[kind]
    assert torch.autograd.gradcheck(lambda c, s: fn(c, target, params, s), (cos, scale))


@pytest.mark.slow
def test_vmap_and_compile_equal_eager() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 4, generator=g, dtype=torch.float64)
    ws = torch.randn(3, 6, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 6, (5,), generator=g)
    norms = x.norm(dim=-1) * 10
    per_class = torch.linspace(0.1, 0.5, 6, dtype=torch.float64)

    def heads(w):
        cos = MF.cosine_logits(x, w)
        return (
            MF.combined_margin(cos, y, 1.2, 0.3, per_class, scale=4.0),
            MF.sphere_margin(cos, y, 3.0, lambda_=2.0, scale=4.0),
            MF.ada_margin(cos, y, norms, per_class, mean=10.0, std=5.0, scale=4.0),
            MF.mag_margin(cos, y, norms, lower=5.0, upper=40.0, scale=4.0),
            MF.curricular_margin(cos, y, per_class, t=0.3, scale=4.0),
        )

    batched = torch.func.vmap(heads)(ws)
    looped = [torch.stack(out) for out in zip(*(heads(w) for w in ws))]
    compiled = torch.compile(heads, fullgraph=True, backend="aot_eager")(ws[0])
    for b, lo, co, eager in zip(batched, looped, compiled, heads(ws[0])):
        torch.testing.assert_close(b, lo, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(co, eager, rtol=1e-12, atol=1e-12)


def test_elastic_margins_are_seeded_normal_and_clipped() -> None:
    draw = MF.elastic_margins(0.5, 0.05, (200_000, 1), generator=torch.Generator().manual_seed(0))
    again = MF.elastic_margins(0.5, 0.05, (200_000, 1), generator=torch.Generator().manual_seed(0))
    assert torch.equal(draw, again)
    assert abs(float(draw.mean()) - 0.5) < 1e-3 and abs(float(draw.std()) - 0.05) < 1e-3
    wide = MF.elastic_margins(0.5, 1.0, (10_000,), bounds=(0.0, 1.0), generator=torch.Generator().manual_seed(1))
    assert float(wide.min()) == 0.0 and float(wide.max()) < 1.0
    per_class = MF.elastic_margins(torch.tensor([0.1, 0.9]), 0.0, (3, 1))
    torch.testing.assert_close(per_class, torch.tensor([[0.1, 0.9]] * 3))


def test_dynamic_margins_follow_the_formula() -> None:
    counts = torch.tensor([1, 4, 16, 256])
    raw = MF.dynamic_margins(counts, 0.2, 0.1, power=0.5, rescale=False)
    torch.testing.assert_close(raw, 0.2 * counts.float() ** -0.5 + 0.1)
    scaled = MF.dynamic_margins(counts)  # GLR 2020: n^(−1/4) min-max scaled to [b, a + b]
    w = counts.float() ** -0.25
    torch.testing.assert_close(scaled, 0.45 * (w - w.min()) / (w.max() - w.min()) + 0.05)
    assert float(scaled.max()) == pytest.approx(0.5) and float(scaled.min()) == pytest.approx(0.05)
    assert (scaled.diff() < 0).all(), "rarer classes get larger margins"
    torch.testing.assert_close(MF.dynamic_margins(torch.tensor([5, 5])), torch.tensor([0.05, 0.05]))
    with pytest.raises(ValueError, match="class_counts must all be >= 1"):
        MF.dynamic_margins(torch.tensor([0, 3]))


@given(batch=batches(), gamma=st.floats(0.01, 2.0), data=st.data())
def test_soft_pooling_lies_between_the_sub_centers_and_cools_to_max(batch, gamma, data) -> None:
    cos, _, _ = batch
    k = data.draw(st.integers(2, 4))
    x = torch.randn(cos.shape[0], 5, dtype=torch.float64)
    w = torch.randn(cos.shape[1] * k, 5, dtype=torch.float64)
    cos_k = MF.cosine_logits(x, w).unflatten(-1, (-1, k))
    soft = MF.cosine_logits(x, w, k, pooling="soft", pooling_temperature=gamma)
    np.testing.assert_allclose(ref.as_np(soft), ref.soft_pool(ref.as_np(cos_k), gamma), rtol=1e-12, atol=1e-12)
    assert (soft <= cos_k.amax(-1) + 1e-12).all() and (soft >= cos_k.amin(-1) - 1e-12).all()
    colder = MF.cosine_logits(x, w, k, pooling="soft", pooling_temperature=gamma / 2)
    assert (colder >= soft - 1e-12).all(), "a lower temperature moves the pool towards the max"


@pytest.mark.parametrize("kind", ["arc", "cos"])
@given(batch=batches(), seed=st.integers(0, 2**16), std=st.floats(0.0, 0.3))
def test_elastic_draws_feed_the_margin_as_per_sample_margins(kind, batch, seed, std) -> None:
    cos, labels, soft = batch
    mean, bounds = (0.5, (0.0, math.pi / 2)) if kind == "arc" else (0.35, (0.0, 1.0))
    draws = MF.elastic_margins(mean, std, (cos.shape[0], 1), bounds=bounds, dtype=torch.float64,
                               generator=torch.Generator().manual_seed(seed))  # fmt: skip
    assert (draws >= bounds[0]).all() and (draws < bounds[1]).all()
    for target, t in ((labels, ref.onehot(labels.numpy(), cos.shape[-1])), (soft, soft.numpy())):
        if kind == "arc":
            got, expected = MF.arc_margin(cos, target, draws), ref.arc_margin(cos.numpy(), t * draws.numpy(), 1.0)
        else:
            got, expected = MF.cos_margin(cos, target, draws), ref.cos_margin(cos.numpy(), t * draws.numpy(), 1.0)
        np.testing.assert_allclose(ref.as_np(got), expected, rtol=1e-9, atol=1e-7)
