"""The battery every head runs: module == functional, eval without labels, state, dtypes, transforms, errors."""

import copy
import inspect
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mll
from mll import functional as MF
from tests.conftest import exported_heads

D, C, K = 6, 5, 3

# name -> (constructor, expected training output from the functional core given (module, x, labels))
HEADS = {
    "NormalizedLinear": (
        lambda **kw: mll.NormalizedLinear(D, C, K, **kw),
        lambda h, x, y: MF.cosine_logits(x, h.weight, K),
    ),
    "ScaledNormalizedLinear": (
        lambda **kw: mll.ScaledNormalizedLinear(D, C, K, **kw),
        lambda h, x, y: MF.cosine_logits(x, h.weight, K) * MF.heuristic_scale(C),
    ),
    "ScaledNormalizedLinearSqrt": (
        lambda **kw: mll.ScaledNormalizedLinearSqrt(D, C, K, scale=2.0, **kw),
        lambda h, x, y: MF.cosine_logits(x, h.weight, K) * 2.0 * math.sqrt(D),
    ),
    "CosFace": (
        lambda **kw: mll.CosFace(D, C, K, margin=0.35, **kw),
        lambda h, x, y: MF.cos_margin(
            MF.cosine_logits(x, h.weight, K), y, 0.35, scale=MF.heuristic_scale(C, 0.35, margin_type="cos")
        ),
    ),
    "ArcFace": (
        lambda **kw: mll.ArcFace(D, C, K, margin=0.5, **kw),
        lambda h, x, y: MF.arc_margin(
            MF.cosine_logits(x, h.weight, K), y, 0.5, scale=MF.heuristic_scale(C, 0.5, margin_type="arc")
        ),
    ),
    "FixedAdaCos": (
        lambda **kw: mll.FixedAdaCos(D, C, K, **kw),
        lambda h, x, y: MF.cosine_logits(x, h.weight, K) * MF.heuristic_scale(C),
    ),
    "AdaCos": (
        lambda **kw: mll.AdaCos(D, C, K, **kw),
        lambda h, x, y: (
            MF.cosine_logits(x, h.weight, K)
            * MF.adacos_scale(MF.cosine_logits(x, h.weight, K), y, scale=MF.heuristic_scale(C))
        ),
    ),
    "DeepNCM": (
        lambda **kw: _with_means(mll.DeepNCM(D, C, **kw)),
        lambda h, x, y: MF.ncm_logits(x, h.means, MF.heuristic_scale(C)),
    ),
    "CombinedMargin": (
        lambda **kw: mll.CombinedMargin(D, C, K, scale=20.0, m1=1.2, m2=0.3, m3=0.1, **kw),
        lambda h, x, y: MF.combined_margin(MF.cosine_logits(x, h.weight, K), y, 1.2, 0.3, 0.1, scale=20.0),
    ),
    "SphereFace": (
        lambda **kw: mll.SphereFace(D, C, K, margin=3.0, lambda_=5.0, **kw),
        lambda h, x, y: MF.sphere_margin(
            MF.cosine_logits(x, h.weight, K),
            y,
            3.0,
            lambda_=5.0,
            scale=MF.heuristic_scale(C, 3.0, margin_type="sphere"),
        ),
    ),
    "CurricularFace": (
        lambda **kw: mll.CurricularFace(D, C, K, scale=16.0, margin=0.4, **kw),
        lambda h, x, y: MF.curricular_margin(
            MF.cosine_logits(x, h.weight, K),
            y,
            0.4,
            scale=16.0,
            t=MF.curricular_update(0.0, MF.cosine_logits(x, h.weight, K), y, decay=0.99),
        ),
    ),
    "AdaFace": (
        lambda **kw: mll.AdaFace(D, C, K, scale=16.0, margin=0.4, **kw),
        lambda h, x, y: MF.ada_margin(
            MF.cosine_logits(x, h.weight, K),
            y,
            x.norm(dim=-1),
            0.4,
            scale=16.0,
            **dict(zip(("mean", "std"), MF.adaface_update(20.0, 100.0, x.norm(dim=-1)))),
        ),
    ),
    "MagFace": (
        lambda **kw: mll.MagFace(D, C, K, scale=16.0, lower=1.0, upper=4.0, **kw),
        lambda h, x, y: MF.mag_margin(
            MF.cosine_logits(x, h.weight, K), y, x.norm(dim=-1), lower=1.0, upper=4.0, scale=16.0
        ),
    ),
    "ElasticArcFace": (
        lambda **kw: mll.ElasticArcFace(D, C, K, scale=16.0, generator=torch.Generator().manual_seed(0), **kw),
        lambda h, x, y: MF.arc_margin(
            MF.cosine_logits(x, h.weight, K),
            y,
            scale=16.0,
            margin=MF.elastic_margins(
                0.5, 0.05, (x.shape[0], 1), generator=torch.Generator().manual_seed(0), dtype=x.dtype
            ),
        ),
    ),
    "ElasticCosFace": (
        lambda **kw: mll.ElasticCosFace(D, C, K, scale=16.0, generator=torch.Generator().manual_seed(0), **kw),
        lambda h, x, y: MF.cos_margin(
            MF.cosine_logits(x, h.weight, K),
            y,
            scale=16.0,
            margin=MF.elastic_margins(
                0.35,
                0.05,
                (x.shape[0], 1),
                bounds=(0.0, 1.0),
                generator=torch.Generator().manual_seed(0),
                dtype=x.dtype,
            ),
        ),
    ),
    "MVSoftmax": (
        lambda **kw: mll.MVSoftmax(D, C, K, scale=16.0, margin=0.3, t=0.25, margin_type="arc", **kw),
        lambda h, x, y: MF.mv_margin(MF.cosine_logits(x, h.weight, K), y, 0.3, t=0.25, margin_type="arc", scale=16.0),
    ),
    "NPCFace": (
        lambda **kw: mll.NPCFace(D, C, K, scale=16.0, margin=0.4, **kw),
        lambda h, x, y: MF.npcface_margin(MF.cosine_logits(x, h.weight, K), y, 0.4, scale=16.0),
    ),
    "ArcNegFace": (
        lambda **kw: mll.ArcNegFace(D, C, K, scale=16.0, margin=0.4, **kw),
        lambda h, x, y: MF.arcneg_margin(MF.cosine_logits(x, h.weight, K), y, 0.4, scale=16.0),
    ),
    "CircleLoss": (
        lambda **kw: mll.CircleLoss(D, C, K, scale=16.0, margin=0.3, **kw),
        lambda h, x, y: MF.circle_margin(MF.cosine_logits(x, h.weight, K), y, 0.3, scale=16.0),
    ),
}
NEW_MARGINS = {
    "CombinedMargin",
    "SphereFace",
    "CurricularFace",
    "AdaFace",
    "MagFace",
    "ElasticArcFace",
    "ElasticCosFace",
    "MVSoftmax",
    "NPCFace",
    "ArcNegFace",
    "CircleLoss",
}
NEEDS_LABELS = {"CosFace", "ArcFace", "DeepNCM"} | NEW_MARGINS
#: heads whose training forward changes running state or draws random numbers: gradcheck them in eval mode
STATEFUL = {"AdaCos", "DeepNCM", "CurricularFace", "AdaFace", "ElasticArcFace", "ElasticCosFace"}
HARD_ONLY = {"CurricularFace", "MVSoftmax", "NPCFace", "ArcNegFace", "CircleLoss"}
#: the options under which a head's gradient is the exact derivative of its logits, for gradcheck (the defaults hold
#: a statistic or a weight constant, as their authors do: NPCFace's positive margin, ArcNegFace's weights, whose
#: σ → ∞ makes them the constant α, Circle loss's α's)
EXACT = {"NPCFace": {"m1": 0.0}, "ArcNegFace": {"sigma": 1e12}, "CircleLoss": {"detach_weights": False}}


def _with_means(head: mll.DeepNCM) -> mll.DeepNCM:
    with torch.no_grad():
        head.means.copy_(torch.randn(head.means.shape))
    return head


def batch(n=4, dtype=torch.float32, soft=False):
    x = torch.randn(n, D, dtype=dtype)
    y = torch.randint(0, C, (n,))
    if soft:
        return x, torch.softmax(torch.randn(n, C, dtype=dtype), -1)
    return x, y


def eval_expected(head, x):
    if isinstance(head, mll.DeepNCM):
        return MF.ncm_logits(x, head.means, head.scale)
    cos = MF.cosine_logits(x, head.weight, head.num_sub_centers)
    if isinstance(head, mll.NormalizedLinear):
        return cos
    extra = math.sqrt(D) if isinstance(head, mll.ScaledNormalizedLinearSqrt) else 1.0
    return cos * head.scale * extra


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("soft", [False, True])
def test_module_equals_functional(name, soft) -> None:
    if soft and name in HARD_ONLY:
        pytest.skip("class indices only")
    make, expected = HEADS[name]
    head = make(dtype=torch.float64)
    x, y = batch(dtype=torch.float64, soft=soft)
    want = expected(head, x, y)  # computed before the module updates any running state
    torch.testing.assert_close(head(x, y), want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", HEADS)
def test_eval_mode_needs_no_labels_and_applies_no_margin(name) -> None:
    head = HEADS[name][0]().eval()
    x, y = batch()
    state = {k: v.clone() for k, v in head.state_dict().items()}
    out = head(x)
    torch.testing.assert_close(out, eval_expected(head, x))
    torch.testing.assert_close(head(x, y), out)  # labels are accepted and ignored in eval mode
    for k, v in head.state_dict().items():
        assert torch.equal(v, state[k]), f"{k} changed in eval mode"


@pytest.mark.parametrize("name", HEADS)
def test_training_without_labels(name) -> None:
    head = HEADS[name][0]()
    x, _ = batch()
    if name in NEEDS_LABELS:
        with pytest.raises(ValueError, match=rf"{name} needs labels in training mode"):
            head(x)
    else:
        assert head(x).shape == (4, C)


@pytest.mark.parametrize("name", sorted(NEEDS_LABELS | {"AdaCos"}))
def test_bad_labels_name_the_argument(name) -> None:
    head = HEADS[name][0]()
    x, _ = batch()
    with pytest.raises(
        ValueError, match=rf"labels must hold class indices in \[0, {C}\), but got values from 0 to {C}"
    ):
        head(x, torch.tensor([0, 1, 2, C]))
    with pytest.raises(ValueError, match=r"labels must be class indices of shape \(4\)"):
        head(x, torch.tensor([0, 1]))
    with pytest.raises(TypeError, match=r"labels must be .* but got dtype torch.bool"):
        head(x, torch.tensor([True, False, True, False]))


@pytest.mark.parametrize("name", HEADS)
def test_bad_features_name_the_argument(name) -> None:
    head = HEADS[name][0]()
    with pytest.raises(ValueError, match=rf"input must have shape \(\*, {D}\)"):
        head(torch.randn(4, D + 1), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("training", [False, True])
def test_leading_dimensions(name, training) -> None:
    head = HEADS[name][0]().train(training)
    flat = copy.deepcopy(head)  # training updates running state: each copy sees the batch once
    x, y = torch.randn(2, 3, D), torch.randint(0, C, (2, 3))
    out = head(x, y)
    assert out.shape == (2, 3, C)
    torch.testing.assert_close(out.reshape(6, C), flat(x.reshape(6, D), y.reshape(6)))
    for (key, a), b in zip(head.state_dict().items(), flat.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)


@pytest.mark.parametrize("name", HEADS)
def test_state_dict_round_trip(name) -> None:
    make, _ = HEADS[name]
    head, fresh = make(), make()
    head(*batch())  # a training step, so that running state (AdaCos scale, DeepNCM means) moves
    fresh.load_state_dict(head.state_dict())
    x, _ = batch()
    torch.testing.assert_close(fresh.eval()(x), head.eval()(x))


@pytest.mark.parametrize("name", HEADS)
def test_functional_call_with_other_state(name) -> None:
    make, _ = HEADS[name]
    head, other = make().eval(), make().eval()
    x, _ = batch()
    state = {**dict(other.named_parameters()), **dict(other.named_buffers())}
    torch.testing.assert_close(torch.func.functional_call(head, state, (x,)), other(x))


@pytest.mark.parametrize("name", HEADS)
def test_float64_factory_and_gradcheck(name) -> None:
    make, _ = HEADS[name]
    head = make(dtype=torch.float64).eval() if name in STATEFUL else make(dtype=torch.float64, **EXACT.get(name, {}))
    assert all(t.dtype == torch.float64 for t in head.state_dict().values())
    x, y = batch(dtype=torch.float64)
    x.requires_grad_(True)
    params = [p for p in head.parameters() if p.requires_grad]

    def f(x, *ps):
        state = dict(zip([n for n, p in head.named_parameters() if p.requires_grad], ps))
        return F.cross_entropy(torch.func.functional_call(head, state, (x, y)), y)

    assert torch.autograd.gradcheck(f, (x, *params))


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("soft", [False, True])
def test_autocast_keeps_parameter_dtypes_and_is_finite(name, soft) -> None:
    if soft and name in HARD_ONLY:
        pytest.skip("class indices only")
    make, _ = HEADS[name]
    head = make()
    x, y = batch(n=8, soft=soft)
    x.requires_grad_(True)
    dtypes = {k: v.dtype for k, v in head.state_dict().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(x, y)
        loss = F.cross_entropy(out.float(), y)
    loss.backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    assert {k: v.dtype for k, v in head.state_dict().items()} == dtypes
    for p in head.parameters():
        assert p.grad is None or (p.grad.dtype == p.dtype and torch.isfinite(p.grad).all())


@pytest.mark.parametrize("name", HEADS)
def test_chunked_loss_under_bf16_autocast_is_the_float32_loss(name) -> None:
    """``loss()`` under bf16 autocast: finite, parameters and gradients keep their dtypes, and within bf16's
    precision of the float32 loss and of the dense path under the same autocast."""
    make, _ = HEADS[name]
    x, y = batch(n=8, soft=False)
    heads = [make() for _ in range(3)]
    for h in heads[1:]:
        h.load_state_dict(heads[0].state_dict())
    xs = [x.clone().requires_grad_(True) for _ in heads]
    want = heads[0].loss(xs[0], y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = heads[1].loss(xs[1], y)
        dense = F.cross_entropy(heads[2](xs[2], y).float(), y)
        if isinstance(heads[2], mll.MagFace):  # its loss() adds the regulariser
            dense = dense + heads[2].lambda_g * heads[2].regularizer(xs[2])
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got, want.detach(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(got, dense, rtol=3e-2, atol=3e-2)
    got.backward()
    want.backward()
    assert xs[1].grad.dtype == x.dtype and torch.isfinite(xs[1].grad).all()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=0.1, atol=0.05 * float(xs[0].grad.abs().max()))
    for p, q in zip(heads[1].parameters(), heads[0].parameters()):
        assert p.dtype == q.dtype and (p.grad is None or (p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()))


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_modules_at_cos_plus_minus_one(name, dtype) -> None:
    make, _ = HEADS[name]
    head = make(dtype=dtype)
    rows = head.means if isinstance(head, mll.DeepNCM) else head.weight
    k = 1 if isinstance(head, mll.DeepNCM) else K
    with torch.no_grad():
        rows[k : 2 * k] = rows[k]  # class 1's sub-centers coincide, so its pooled cosine can reach -1
    x = torch.stack([rows[0].detach(), -rows[k].detach(), torch.zeros(D, dtype=dtype)]).requires_grad_(True)
    y = torch.tensor([0, 1, 2])
    cos = MF.cosine_logits(x.detach(), rows.detach(), k)
    assert cos[0, 0] > 0.99 and cos[1, 1] < -0.99  # the edges this test is about
    out = head(x, y)
    F.cross_entropy(out.float(), y).backward()
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("name", HEADS)
def test_extra_repr_shows_hyper_parameters(name) -> None:
    text = repr(HEADS[name][0]())
    assert f"in_features={D}" in text and f"out_features={C}" in text
    if name != "DeepNCM":
        assert f"num_sub_centers={K}" in text


def test_numpy_numbers_are_accepted() -> None:
    head = mll.ArcFace(np.int64(D), np.int64(C), np.int32(2), scale=np.float32(20.0), margin=np.float64(0.4))
    assert head.weight.shape == (2 * C, D) and head.scale.item() == 20.0 and head.margin == pytest.approx(0.4)
    assert mll.DeepNCM(np.int64(D), np.int64(C), alpha=np.float32(0.5)).means.shape == (C, D)


def test_adacos_keeps_its_scale_on_an_empty_batch() -> None:
    head = mll.AdaCos(D, C, scale=4.0)
    assert head(torch.zeros(0, D), torch.zeros(0, dtype=torch.long)).shape == (0, C)
    assert head.scale.item() == 4.0


def test_margin_heads_show_their_margin() -> None:
    assert "margin=0.35" in repr(mll.CosFace(D, C, margin=0.35))
    assert "margin=0.5, easy_margin=True" in repr(mll.ArcFace(D, C, easy_margin=True))


@pytest.mark.parametrize("name", ["ScaledNormalizedLinear", "ScaledNormalizedLinearSqrt", "CosFace", "ArcFace"])
def test_trainable_scale_is_a_parameter_with_a_gradient(name) -> None:
    cls = getattr(mll, name)
    head = cls(D, C, trainable_scale=True, dtype=torch.float64)
    assert any(p is head.scale for p in head.parameters())
    x, y = batch(dtype=torch.float64)
    F.cross_entropy(head(x, y), y).backward()
    assert head.scale.grad is not None and head.scale.grad.shape == ()
    fixed = cls(D, C)
    assert all(p is not fixed.scale for p in fixed.parameters()) and "scale" in dict(fixed.named_buffers())


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: mll.ArcFace(D, 1), ValueError, r"out_features must be an integer >= 2 .*got 1"),
        (lambda: mll.CosFace(0, C), ValueError, r"in_features must be an integer >= 1, but got 0"),
        (lambda: mll.ScaledNormalizedLinear(D, C, 0), ValueError, r"num_sub_centers must be an integer >= 1"),
        (lambda: mll.NormalizedLinear(D, C, 1.5), ValueError, r"num_sub_centers must be an integer >= 1"),
        (lambda: mll.CosFace(D, C, margin=1.2), ValueError, r"CosFace margin must be in \[0, 1\), but got 1.2"),
        (lambda: mll.ArcFace(D, C, margin=2.0), ValueError, r"ArcFace margin must be in \[0, 1.571\), but got 2.0"),
        (lambda: mll.ArcFace(D, C, scale=0.0), ValueError, r"scale must be positive and finite, but got 0.0"),
        (lambda: mll.AdaCos(D, C, scale=float("nan")), ValueError, r"scale must be positive and finite"),
        (lambda: mll.ScaledNormalizedLinear(D, C, scale="30"), TypeError, r"scale must be a positive float"),
        (lambda: mll.CosFace(D, C, trainable_scale=1), TypeError, r"trainable_scale must be a bool"),
        (
            lambda: mll.DeepNCM(D, C, alpha=1.0),
            ValueError,
            r"alpha must be a float in \[0, 1\) \(the weight of the old value\), but got 1.0",
        ),
        (lambda: mll.FixedAdaCos(D, C, margin=0.2), TypeError, r"unexpected keyword argument 'margin'"),
        # the head and the argument the user wrote, not a family the head is built on
        (lambda: mll.LargeMarginSoftmax(D, C, lambda_=-1), ValueError, r"^L-Softmax lambda_ must be a finite float"),
        (
            lambda: mll.LargeMarginSoftmax(D, C, margin=torch.full((C,), 0.5)),
            ValueError,
            r"^L-Softmax margin must be in \[1, 10\), but got values from 0.5 to 0.5",
        ),
        (
            lambda: mll.SoftTriple(D, C, margin=torch.full((C,), -0.1)),
            ValueError,
            r"^SoftTriple margin must be in \[0, 1\), but got values from -0.1",
        ),
        (
            lambda: mll.CurricularFace(D, C, margin=torch.full((C,), 2.0)),
            ValueError,
            r"^CurricularFace margin must be in \[0, 1.571\)",
        ),
        (lambda: mll.AdaFace(D, C, margin=torch.full((C,), -0.1)), ValueError, r"^AdaFace margin must be in"),
        (lambda: mll.ElasticCosFace(D, C, margin=torch.full((C,), 1.5)), ValueError, r"^ElasticCosFace margin must"),
        (lambda: mll.MagFace(D, C, margin_high=torch.full((C,), 2.0)), ValueError, r"^MagFace margin_high must be"),
        (lambda: mll.NPCFace(D, C, t=torch.ones(C)), TypeError, r"^NPCFace t must be a float, but got a tensor"),
        # a scale its dtype cannot hold: refused, not stored as inf or 0
        (
            lambda: mll.ArcFace(D, C, scale=1e39),
            ValueError,
            r"^ArcFace scale must fit the head's dtype torch.float32 .*but got 1e\+39, which is inf",
        ),
        (lambda: mll.CosFace(D, C, scale=1e-50), ValueError, r"^CosFace scale must fit .*which is 0.0 in torch"),
        (
            lambda: mll.ScaledNormalizedLinear(D, C, scale=1e5, dtype=torch.float16),
            ValueError,
            r"^ScaledNormalizedLinear scale must fit the head's dtype torch.float16",
        ),
        (lambda: mll.DeepNCM(D, C, scale=1e39), ValueError, r"^DeepNCM scale must fit the head's dtype"),
        (lambda: mll.ShardedArcFace(D, C, scale=1e39), ValueError, r"^ShardedArcFace scale must fit the head's dtype"),
    ],
)
def test_bad_constructor_arguments(make, error, match) -> None:
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("name", [n for n in exported_heads(sharded=False) if n != "DeepNCM"])
def test_bad_per_class_margins_are_named_as_the_head_names_them(name) -> None:
    """Every margin argument given as a per-class tensor out of its range is refused by the head's own check (the
    message is the one a float gets, with the head's name), before the default scale reads its mean."""
    cls = getattr(mll, name)
    special = {
        "CombinedMargin": ("m1", "m2", "m3"),
        "MagFace": ("margin_low", "margin_high"),
        "MVSoftmax": ("margin", "t"),
    }
    args = special.get(name, ("margin",) if "margin" in inspect.signature(cls).parameters else ())
    for arg in args:
        try:
            cls(D, C, **{arg: -1.0})
        except ValueError as error:
            float_message = str(error).split(", but got")[0]
        else:
            continue  # a parameter without a lower bound
        with pytest.raises(ValueError, match="^" + re.escape(float_message) + ", but got values from -1"):
            cls(D, C, **{arg: torch.full((C,), -1.0)})
