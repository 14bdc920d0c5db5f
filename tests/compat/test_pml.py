"""``mll.compat.pml``'s nine losses equal pytorch-metric-learning's on the same weights: loss, gradients of the
embeddings and of the parameter, and ``get_logits``, over shapes, hyper-parameters and float32/float64 — on the
engine's one-block path and where it walks the classes in chunks. pml 2.9 runs beside them (the ``dev`` extra)."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mll.compat.pml as M
from mll import functional as MF
from tests.compat.side_by_side import NAMES, assert_same, data, pair, relative, side_by_side, tolerance

DTYPES = st.sampled_from([torch.float32, torch.float64])


def _options(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """Each loss's hyper-parameters over their whole valid range (pml's units)."""
    real = st.floats
    return {
        "ArcFaceLoss": st.fixed_dictionaries({"margin": real(0, 89), "scale": real(1, 64)}),
        "CosFaceLoss": st.fixed_dictionaries({"margin": real(0, 0.9), "scale": real(1, 64)}),
        "SubCenterArcFaceLoss": st.fixed_dictionaries(
            {"margin": real(0, 89), "scale": real(1, 64), "sub_centers": st.integers(1, 4)}
        ),
        "SphereFaceLoss": st.fixed_dictionaries({"margin": st.integers(1, 12), "scale": real(0.5, 4)}),
        "LargeMarginSoftmaxLoss": st.fixed_dictionaries({"margin": st.integers(1, 12), "scale": real(0.5, 4)}),
        "NormalizedSoftmaxLoss": st.fixed_dictionaries({"temperature": real(0.02, 1)}),
        "ProxyAnchorLoss": st.fixed_dictionaries({"margin": real(0, 0.5), "alpha": real(1, 64)}),
        "ProxyNCALoss": st.fixed_dictionaries({"softmax_scale": real(0.5, 20)}),
        "SoftTripleLoss": st.fixed_dictionaries(
            {"centers_per_class": st.integers(1, 5), "la": real(1, 30), "gamma": real(0.05, 1), "margin": real(0, 0.3)}
        ),
    }[name]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_equals_pml_at_its_defaults(name: str, dtype: torch.dtype) -> None:
    """The quick tier's check: pml's default hyper-parameters, one batch (the property test below is slow)."""
    x, y = data(16, 8, 6, dtype, seed=11)
    ours, theirs = side_by_side(name, x, y, seed=11, kwargs={"num_classes": 6, "embedding_size": 8})
    assert_same(ours, theirs, tolerance(dtype))
    assert relative(ours.module.get_logits(x), theirs.module.get_logits(x)) <= tolerance(dtype)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
@given(st.data())
def test_equals_pml_on_the_same_weights(name: str, draw: st.DataObject) -> None:
    dtype, seed = draw.draw(DTYPES), draw.draw(st.integers(0, 2**16))
    # at least 4 samples, so that the largest gradient is a poorly classified sample's: a well-classified one's is
    # a difference p − 1 of nearly equal numbers, whose rounding (of order ε·scale) is absolute, not relative
    n, d, c = draw.draw(st.integers(4, 24)), draw.draw(st.integers(2, 8)), draw.draw(st.integers(2, 12))
    options = {"num_classes": c, "embedding_size": d, **draw.draw(_options(name))}
    x, y = data(n, d, c, dtype, seed)
    ours, theirs = side_by_side(name, x, y, seed=seed, kwargs=options)
    if _ill_conditioned(ours.module, x, y):
        ours.grad_x = ours.grad_w = theirs.grad_x = theirs.grad_w = None
    assert_same(ours, theirs, tolerance(dtype))
    assert relative(ours.module.get_logits(x), theirs.module.get_logits(x)) <= tolerance(dtype)


def _ill_conditioned(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> bool:
    """Where pml's gradient is not pinned down to the tolerance: an ArcFace target within 0.8° of its weight (pml
    differentiates ``acos``, −1/√(1 − c·c), and 1 − c·c carries a relative rounding of ε/(1 − c²): up to 1e-9 in
    float64, see ``test_arcface_near_its_weight_pml_s_slope_rounds_the_engine_s_is_exact``), or, in float32, a
    class's two most similar sub-centers within rounding of each other (max pooling's gradient goes to either)."""
    if not hasattr(module, "sub_centers"):
        return False
    k = module.sub_centers
    w = module.W.detach().double()
    cos = (torch.nn.functional.normalize(x.double(), dim=1) @ torch.nn.functional.normalize(w, dim=0)).view(
        x.shape[0], -1, k
    )
    top = cos.topk(min(k, 2), dim=2).values
    tie = k > 1 and x.dtype == torch.float32 and bool(((top[..., 0] - top[..., 1]) < 1e-5).any())
    target = top[torch.arange(x.shape[0]), y, 0]
    return tie or bool((1 - target.abs() < 1e-4).any())


@pytest.mark.parametrize("name", NAMES)
def test_the_same_seed_gives_pml_s_initial_weights(name: str) -> None:
    """pml's default initialisation per loss (normal, kaiming_normal fan_out, kaiming_uniform a=√5), drawn in the
    same order: a run seeded as with pml starts from the same weights."""
    torch.manual_seed(3)
    theirs = getattr(pytest.importorskip("pytorch_metric_learning.losses"), name)(num_classes=6, embedding_size=4)
    torch.manual_seed(3)
    ours = getattr(M, name)(num_classes=6, embedding_size=4)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for key, value in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.slow
@pytest.mark.parametrize("name", ["ArcFaceLoss", "SubCenterArcFaceLoss", "SoftTripleLoss", "ProxyAnchorLoss"])
def test_equals_pml_where_the_engine_walks_the_classes_in_chunks(name: str) -> None:
    """N = 256 samples and C = 2500 classes: the engine's default chunk on the CPU is 2**18 / (N·K) ≤ 1024 classes,
    so the loss runs over several chunks (and, for the ≥ 16 MB of float64 logits with K = 4, recomputes them in
    backward)."""
    options: dict[str, Any] = {"num_classes": 2500, "embedding_size": 16}
    if name == "SubCenterArcFaceLoss":
        options["sub_centers"] = 4
    if name == "SoftTripleLoss":
        options["centers_per_class"] = 4
    x, y = data(256, 16, 2500, torch.float64, seed=1)
    ours, theirs = side_by_side(name, x, y, kwargs=options)
    assert_same(ours, theirs, 1e-12)


@pytest.mark.parametrize("margin", [0.0, 28.6, 60.0, 89.0])
def test_arcface_past_pi_minus_m_is_pml_s_fallback(margin: float) -> None:
    """Targets on both sides of θ = π − m (pml 2.9 uses cos θ − m·sin m past it, as mll.ArcFace)."""
    m = math.radians(margin)
    angles = torch.linspace(0.01, math.pi - 0.01, 40, dtype=torch.float64)
    ours, theirs = pair("ArcFaceLoss", num_classes=2, embedding_size=2)
    ours, theirs = ours.double(), theirs.double()
    theirs.W.data = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    ours.load_state_dict(theirs.state_dict())
    x = torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    y = torch.zeros(40, dtype=torch.long)
    assert relative(ours(x, y), theirs(x, y)) <= 1e-12
    assert (angles > math.pi - m).any() == (margin > 0)


@pytest.mark.parametrize("cos", [0.9999999613722278, 0.99999999, 0.9999999999])
def test_arcface_near_its_weight_pml_s_slope_rounds_the_engine_s_is_exact(cos: float) -> None:
    """Targets within 0.03° of their weight: ArcFace's slope ∂ψ/∂cos = cos m + cos θ·sin m /
    sin θ against 50 digits (mpmath). pml's (autograd through its ``acos``) rounds 1 − c·c and is off by more than
    1e-11 relative; the engine's, from (1 − c)(1 + c), is exact to 1e-15 — so the comparisons above leave such
    targets' gradients out."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 50
    degrees = 60.89219623944693
    _, theirs = pair("ArcFaceLoss", num_classes=2, embedding_size=2, margin=degrees)
    exact, m = mpmath.mpf(cos), mpmath.radians(mpmath.mpf(degrees))
    slope = float(mpmath.cos(m) + exact * mpmath.sin(m) / mpmath.sqrt(1 - exact * exact))
    c = torch.tensor([cos], dtype=torch.float64, requires_grad=True)
    theirs.modify_cosine_of_target_classes(c).sum().backward()
    _, ours = MF.ARC.value_and_slope(c.detach(), 1.0, torch.tensor(math.radians(degrees), dtype=torch.float64))
    assert abs(ours.item() - slope) <= 1e-15 * abs(slope)
    assert abs(c.grad.item() - slope) > 1e-11 * abs(slope)


def test_large_margin_beyond_mll_s_native_range() -> None:
    """pml's own tests use m = 10, past MF.LARGE_MARGIN's [1, 10): the compat family takes any integer m."""
    for name in ("LargeMarginSoftmaxLoss", "SphereFaceLoss"):
        x, y = data(30, 3, 5, torch.float64, seed=2, spread=10)
        ours, theirs = side_by_side(name, x, y, kwargs={"num_classes": 5, "embedding_size": 3, "margin": 10})
        assert_same(ours, theirs, 1e-12)


def test_large_margin_truncates_the_margin_as_pml() -> None:
    ours, theirs = pair("LargeMarginSoftmaxLoss", num_classes=5, embedding_size=3, margin=3.9)
    assert ours.margin == theirs.margin == 3
    x, y = data(10, 3, 5, torch.float32)
    assert relative(ours(x, y), theirs(x, y)) <= 2e-5


def test_the_multiple_angle_slope_is_the_derivative_of_its_value() -> None:
    """The family's slope ψ'(cos θ) (Chebyshev U) against central differences of its value, every k branch."""
    from functools import partial

    cos = torch.linspace(-0.999, 0.999, 301, dtype=torch.float64)
    one = torch.ones((), dtype=torch.float64)
    for m in (1, 2, 3, 4, 7, 12):
        family = M.multiple_angle_margin(m)
        value = partial(family.value_and_slope, w=1.0, norm_input=one, norm_weight=one)
        psi, slope = value(cos)
        h = 1e-6
        numeric = (value(cos + h)[0] - value(cos - h)[0]) / (2 * h)
        torch.testing.assert_close(slope, numeric, rtol=1e-6, atol=1e-6 * m * m)
        theta = torch.acos(cos)
        k = torch.floor(theta * m / math.pi)
        torch.testing.assert_close(psi, (-1) ** k * torch.cos(m * theta) - 2 * k, rtol=1e-12, atol=1e-10)


@pytest.mark.slow
@given(st.integers(0, 2**16), st.sampled_from([75.0, 60.0, 90.0, 180.0]), DTYPES)
def test_get_outliers_equals_pml(seed: int, threshold: float, dtype: torch.dtype) -> None:
    ours, theirs = pair("SubCenterArcFaceLoss", seed, num_classes=4, embedding_size=8, sub_centers=3)
    x, y = data(40, 8, 4, dtype, seed)
    present = torch.zeros(4, dtype=torch.bool)
    present[y] = True
    got, centers = ours.get_outliers(x, y, threshold=threshold)
    want, their_centers = theirs.get_outliers(x, y, threshold=threshold)
    assert got.tolist() == want.long().tolist()
    torch.testing.assert_close(centers[:, present], their_centers[:, present], rtol=0, atol=0)
    # a class absent from the batch: its first sub-center (pml leaves that column uninitialised)
    for c in (~present).nonzero().flatten().tolist():
        assert torch.equal(centers[:, c], ours.W[:, 3 * c])
    assert ours.get_outliers(x, y, threshold=threshold, return_dominant_centers=False)[0].tolist() == got.tolist()
