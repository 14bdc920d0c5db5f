"""Class-sharded loss and heads in one process (no process group): the dense loss, the API, the errors.

The multi-process exactness tests are in ``test_sharded.py``; here a world of one holds every class, so the
sharded loss must be the dense loss, and everything that does not need several ranks is checked quickly.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import mll
from mll import functional as MF

MARGINS = {"arc": 0.5, "cos": 0.35, "none": 0.0}
TOL = {"rtol": 1e-10, "atol": 1e-10}


def dense_loss(x, w, target, scale, margin_type, k, reduction="mean", easy=False, margin=None):
    cos = MF.cosine_logits(x, w, k)
    m = MARGINS[margin_type] if margin is None else margin
    if margin_type == "arc":
        logits = MF.arc_margin(cos, target, m, easy_margin=easy, scale=scale)
    elif margin_type == "cos":
        logits = MF.cos_margin(cos, target, m, scale=scale)
    else:
        logits = cos * scale
    c = logits.shape[-1]
    t = target.reshape(-1, c) if target.is_floating_point() else target.reshape(-1)
    out = F.cross_entropy(logits.reshape(-1, c), t, reduction=reduction)
    return out.reshape(logits.shape[:-1]) if reduction == "none" else out


def sharded(x, w, target, *, num_classes, **kwargs):
    return MF.sharded_margin_cross_entropy(x, w, target, class_start=0, num_classes=num_classes, **kwargs)


def to_pair(soft: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft targets as (classes, weights) pairs, one entry per class (zeros included)."""
    classes = torch.arange(soft.shape[-1]).expand(soft.shape)
    return classes, soft


@st.composite
def problems(draw):
    lead = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    d, c, k = draw(st.integers(1, 5)), draw(st.integers(2, 9)), draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    w = torch.randn(c * k, d, generator=g, dtype=torch.float64)
    kind = draw(st.sampled_from(["hard", "soft", "pair"]))
    if kind == "hard":
        target = torch.randint(0, c, lead, generator=g)
    else:
        target = torch.softmax(3 * torch.randn(*lead, c, generator=g, dtype=torch.float64), -1)
        target = target * (torch.rand(*lead, c, generator=g, dtype=torch.float64) < 0.7)
    return x, w, target, kind, k, draw(st.integers(1, c + 2)), draw(st.sampled_from(list(MARGINS)))


@given(problems(), st.sampled_from(["mean", "sum", "none"]), st.booleans())
def test_world_of_one_equals_the_dense_loss(problem, reduction, easy) -> None:
    x, w, target, kind, k, chunk, margin_type = problem
    x.requires_grad_(True)
    w.requires_grad_(True)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    dense = dense_loss(x, w, target, scale, margin_type, k, reduction, easy)
    got = sharded(
        x, w, to_pair(target) if kind == "pair" else target, num_classes=w.shape[0] // k, scale=scale,
        margin=MARGINS[margin_type], margin_type=margin_type, easy_margin=easy, num_sub_centers=k, chunk_size=chunk,
        reduction=reduction,
    )  # fmt: skip
    torch.testing.assert_close(got, dense, **TOL)
    weights = torch.randn(dense.shape, dtype=torch.float64)
    for i, (a, b) in enumerate(
        zip(
            torch.autograd.grad((got * weights).sum(), (x, w, scale)),
            torch.autograd.grad((dense * weights).sum(), (x, w, scale)),
        )
    ):
        if i < 2 and x.shape[-1] == 1:  # d = 1: both are 0 up to rounding (see tests/functional/test_chunked.py)
            torch.testing.assert_close(a, torch.zeros_like(a), rtol=0, atol=1e-6)
            continue
        torch.testing.assert_close(a, b, **TOL)


def test_pairs_with_repeated_classes_equal_their_dense_soft_targets() -> None:
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    classes = torch.tensor([[1, 1], [0, 5], [2, 2], [4, 3]])  # a mixup of two samples of the same class
    weights = torch.tensor([[0.3, 0.7], [0.5, 0.5], [0.2, 0.2], [1.0, 0.0]], dtype=torch.float64)
    soft = torch.zeros(4, 6, dtype=torch.float64).index_put_(
        (torch.arange(4).repeat_interleave(2), classes.reshape(-1)), weights.reshape(-1), accumulate=True
    )
    kwargs = dict(num_classes=6, scale=5.0, margin=0.5, margin_type="arc")
    pair = sharded(x, w, (classes, weights), **kwargs)
    torch.testing.assert_close(pair, dense_loss(x, w, soft, 5.0, "arc", 1), **TOL)
    torch.testing.assert_close(pair, sharded(x, w, soft, **kwargs), **TOL)


def test_sampling_in_one_block_equals_the_dense_loss_over_the_kept_classes() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(40 * 2, 4, dtype=torch.float64, generator=g, requires_grad=True)
    y = torch.randint(0, 40, (6,), generator=g)
    generator = torch.Generator().manual_seed(3)
    state = generator.get_state()
    loss = sharded(x, w, y, num_classes=40, scale=8.0, margin=0.35, margin_type="cos", num_sub_centers=2,
                   sample_rate=0.1, generator=generator)  # fmt: skip
    generator.set_state(state)
    positive = torch.zeros(40, dtype=torch.bool).index_fill_(0, y, True)
    kept = MF.sample_classes(positive, 0.1, generator=generator)
    assert kept.numel() == max(4, y.unique().numel()) and torch.isin(y, kept).all()
    rows = (kept.unsqueeze(1) * 2 + torch.arange(2)).reshape(-1)
    dense = dense_loss(x, w.index_select(0, rows), torch.searchsorted(kept, y), 8.0, "cos", 2)
    torch.testing.assert_close(loss, dense, **TOL)
    grads, want = torch.autograd.grad(loss, (x, w)), torch.autograd.grad(dense, (x, w))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, **TOL)
    dropped = torch.ones(80, dtype=torch.bool).index_fill_(0, rows, False)
    assert torch.equal(grads[1][dropped], torch.zeros_like(grads[1][dropped]))


def test_feature_grad_scale_multiplies_only_the_feature_gradient() -> None:
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, 2])
    plain = torch.autograd.grad(sharded(x, w, y, num_classes=5, scale=4.0), (x, w))
    scaled = torch.autograd.grad(sharded(x, w, y, num_classes=5, scale=4.0, feature_grad_scale=3.0), (x, w))
    torch.testing.assert_close(scaled[0], 3 * plain[0], **TOL)
    torch.testing.assert_close(scaled[1], plain[1], **TOL)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch_matches_the_dense_path(reduction) -> None:
    x = torch.zeros(0, 4, requires_grad=True)
    w = torch.randn(6, 4, requires_grad=True)
    got = sharded(x, w, torch.zeros(0, dtype=torch.long), num_classes=6, scale=3.0, reduction=reduction)
    want = F.cross_entropy(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long), reduction=reduction)
    torch.testing.assert_close(got, want, equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_float32(dtype) -> None:
    x = torch.randn(8, 6).to(dtype).requires_grad_(True)
    w = torch.randn(30, 6).to(dtype).requires_grad_(True)
    y = torch.randint(0, 30, (8,))
    loss = sharded(x, w, y, num_classes=30, scale=20.0, margin=0.5, margin_type="arc", chunk_size=7)
    assert loss.dtype == torch.float32
    want = dense_loss(x.detach().float(), w.detach().float(), y, 20.0, "arc", 1)
    torch.testing.assert_close(loss, want, rtol=5e-2, atol=5e-2)
    loss.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


def test_a_double_backward_is_refused() -> None:
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    loss = sharded(x, torch.randn(5, 4, dtype=torch.float64), torch.tensor([0, 1, 2]), num_classes=5, scale=3.0)
    with pytest.raises(RuntimeError, match=r"first derivatives only: backward with create_graph=True"):
        torch.autograd.grad(loss, x, create_graph=True)


@pytest.mark.slow
def test_runs_eagerly_inside_a_compiled_function() -> None:
    head = mll.ShardedArcFace(4, 10, dtype=torch.float64)
    backbone = torch.nn.Linear(3, 4, dtype=torch.float64)
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 10, (5,))
    compiled = torch.compile(lambda x, y: head.loss(backbone(x), y), backend="eager")
    torch.testing.assert_close(compiled(x, y), head.loss(backbone(x), y), **TOL)


def test_shard_bounds() -> None:
    assert MF.shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert MF.shard_bounds(2, 3) == [(0, 1), (1, 2), (2, 2)]  # fewer classes than ranks: an empty block
    assert MF.shard_bounds(5, 1) == [(0, 5)]
    for c in range(2, 30):
        for world in range(1, 7):
            bounds = MF.shard_bounds(c, world)
            sizes = [b - a for a, b in bounds]
            assert bounds[0][0] == 0 and bounds[-1][1] == c and max(sizes) - min(sizes) <= 1
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    with pytest.raises(ValueError, match=r"world_size must be an integer >= 1, but got 0"):
        MF.shard_bounds(4, 0)
    with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2"):
        MF.shard_bounds(1, 2)


def test_sample_classes() -> None:
    positive = torch.zeros(100, dtype=torch.bool)
    positive[[3, 50, 99]] = True
    kept = MF.sample_classes(positive, 0.1, generator=torch.Generator().manual_seed(0))
    assert kept.numel() == 10 and torch.equal(kept, kept.sort().values) and kept.unique().numel() == 10
    assert torch.isin(torch.tensor([3, 50, 99]), kept).all()
    again = MF.sample_classes(positive, 0.1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(kept, again)
    many = torch.ones(100, dtype=torch.bool)
    many[::2] = False
    assert MF.sample_classes(many, 0.1).numel() == 50  # never fewer than the positives
    assert MF.sample_classes(torch.zeros(3, dtype=torch.bool), 0.01).numel() == 1  # never empty
    generator = torch.Generator().manual_seed(1)
    state = generator.get_state()
    assert torch.equal(MF.sample_classes(positive, 1.0, generator=generator), torch.arange(100))
    assert torch.equal(generator.get_state(), state)  # a rate of 1 draws nothing
    with pytest.raises(ValueError, match=r"sample_rate must be a float in \(0, 1\], but got 0.0"):
        MF.sample_classes(positive, 0.0)


X, W, Y = torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 4, 2])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"reduction": "avg"}, ValueError, r"reduction must be 'mean', 'sum' or 'none', but got 'avg'"),
        ({"margin_type": "tan"}, ValueError, r"margin_type must be one of \[.*\], but got 'tan'"),
        ({"margin": 2.0, "margin_type": "arc"}, ValueError, r"ArcFace margin must be in \[0, 1.571\), but got 2.0"),
        ({"sample_rate": 1.5}, ValueError, r"sample_rate must be a float in \(0, 1\], but got 1.5"),
        ({"chunk_size": 0}, ValueError, r"chunk_size must be None or an integer >= 1, but got 0"),
        ({"class_start": -1}, ValueError, r"class_start must be an integer >= 0, but got -1"),
        ({"num_classes": 1}, ValueError, r"num_classes must be an integer >= 2 \(number of classes\), but got 1"),
        ({"feature_grad_scale": float("nan")}, ValueError, r"feature_grad_scale must be None or a finite float"),
        ({"generator": 3}, TypeError, r"generator must be a torch.Generator or None, but got int"),
        ({"scale": -1.0}, ValueError, r"scale must be positive and finite, but got -1.0"),
        ({"num_sub_centers": 0}, ValueError, r"num_sub_centers must be an integer >= 1, but got 0"),
        ({"class_start": 1}, ValueError, r"must tile \[0, 6\) without gaps or overlaps, but got \[\(1, 6\)\]"),
        ({"num_classes": 6}, ValueError, r"must tile \[0, 6\) without gaps or overlaps, but got \[\(0, 5\)\]"),
        ({"group": object()}, ValueError, r"group was given, but torch.distributed is not initialised"),
    ],
)
def test_bad_arguments(kwargs, error, match) -> None:
    args = {"class_start": 0, "num_classes": 5, "scale": 3.0, **kwargs}
    if "class_start" in kwargs and kwargs["class_start"] == 1:
        args["num_classes"] = 6
    with pytest.raises(error, match=match):
        MF.sharded_margin_cross_entropy(X, W, Y, **args)


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [
        (torch.tensor([0, 5, 2]), ValueError, r"target must hold class indices in \[0, 5\), but got values from 0"),
        (torch.tensor([0, 1]), ValueError, r"target must be class indices of shape \(3\)"),
        (torch.rand(3, 4), ValueError, r"soft targets of shape \(3, 5\) \(a floating dtype\), but got a float tensor"),
        (-torch.rand(3, 5), ValueError, r"soft target must be non-negative and finite \(not NaN or inf\)"),
        (torch.rand(3, 5).requires_grad_(True), ValueError, r"does not differentiate soft targets: detach target"),
        ((torch.tensor([[0, 1]] * 3),), ValueError, r"a pair \(classes, weights\), but got a tuple of length 1"),
        ((torch.rand(3, 2), torch.rand(3, 2)), TypeError, r"target's classes must be an integer tensor of shape"),
        ((torch.ones(3, 2, dtype=torch.bool), torch.rand(3, 2)), TypeError, r"classes must be an integer.*torch.bool"),
        ((torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long)), TypeError, r"weights must be a"),
        ((torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 3)), ValueError, r"both have shape \(\*, P\)"),
        ((torch.full((3, 2), 7), torch.rand(3, 2)), ValueError, r"classes must be in \[0, 5\), but got values from 7"),
        ((torch.zeros(3, 2, dtype=torch.long), -torch.ones(3, 2)), ValueError, r"weights must be non-negative"),
        ((torch.zeros(3, 2, dtype=torch.long), torch.rand(3, 2, requires_grad=True)), ValueError, r"detach the"),
    ],
)
def test_bad_targets(target, error, match) -> None:
    with pytest.raises(error, match=match):
        MF.sharded_margin_cross_entropy(X, W, target, class_start=0, num_classes=5, scale=3.0)


def test_a_world_of_one_must_hold_every_class() -> None:
    with pytest.raises(ValueError, match=r"must tile \[0, 5\) without gaps or overlaps, but got \[\(0, 0\)\]"):
        MF.sharded_margin_cross_entropy(X, W[:0], Y, class_start=0, num_classes=5, scale=3.0)


def test_bad_features() -> None:
    with pytest.raises(ValueError, match=r"input must have shape \(\*, 4\) to match weight's in_features"):
        MF.sharded_margin_cross_entropy(torch.randn(3, 2), W, Y, class_start=0, num_classes=5, scale=3.0)
    with pytest.raises(TypeError, match=r"input and weight must have the same dtype"):
        MF.sharded_margin_cross_entropy(X.double(), W, Y, class_start=0, num_classes=5, scale=3.0)


# ---------------------------------------------------------------------------------------------- modules

HEADS = {
    "ShardedArcFace": (lambda **kw: mll.ShardedArcFace(4, 7, 3, margin=0.4, **kw), "arc", 0.4),
    "ShardedCosFace": (lambda **kw: mll.ShardedCosFace(4, 7, 3, margin=0.3, **kw), "cos", 0.3),
    "ShardedScaledNormalizedLinear": (lambda **kw: mll.ShardedScaledNormalizedLinear(4, 7, 3, **kw), "none", 0.0),
}
DENSE = {  # the same hyper-parameters
    "ShardedArcFace": lambda **kw: mll.ArcFace(4, 7, 3, margin=0.4, **kw),
    "ShardedCosFace": lambda **kw: mll.CosFace(4, 7, 3, margin=0.3, **kw),
    "ShardedScaledNormalizedLinear": lambda **kw: mll.ScaledNormalizedLinear(4, 7, 3, **kw),
}


@pytest.mark.parametrize("name", list(HEADS))
@pytest.mark.parametrize("training", [True, False])
def test_head_in_a_world_of_one_equals_the_dense_heads_loss(name, training) -> None:
    make, margin_type, margin = HEADS[name]
    head = make(dtype=torch.float64).train(training)
    assert (head.class_start, head.class_stop) == (0, 7) and head.weight.shape == (21, 4)
    margin_type = "none" if not training else margin_type
    expected_scale = MF.heuristic_scale(7, margin, margin_type="arc" if name == "ShardedArcFace" else "cos")
    assert float(head.scale) == pytest.approx(expected_scale)
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (2, 3))
    got = head.loss(x, y)
    with pytest.warns(DeprecationWarning, match=r"returning the loss is deprecated.*call head.loss"):
        assert torch.equal(head(x, y), got)  # the 0.2 call, still working
    # head(x): this rank's block of logits, here every class: the dense head's eval-mode logits
    torch.testing.assert_close(head(x), MF.cosine_logits(x, head.weight, 3) * head.scale, **TOL)
    want = dense_loss(x, head.weight, y, head.scale, margin_type, 3, margin=margin)
    torch.testing.assert_close(got, want, **TOL)
    assert head.loss(x, y, reduction="none").shape == (2, 3)
    dense = DENSE[name](dtype=torch.float64).train(training)
    dense.load_state_dict(mll.nn.dense_state_dict([head.state_dict()]))
    torch.testing.assert_close(dense.loss(x, y), got, **TOL)


def test_eval_mode_neither_samples_nor_applies_the_margin() -> None:
    head = mll.ShardedArcFace(4, 50, sample_rate=0.1, dtype=torch.float64).eval()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 50, (5,))
    want = dense_loss(x, head.weight, y, head.scale, "none", 1)
    torch.testing.assert_close(head.loss(x, y), want, **TOL)
    head.train()
    assert not torch.allclose(head.loss(x, y), want)


def test_sampling_head_trains_only_the_kept_rows() -> None:
    head = mll.ShardedCosFace(4, 100, sample_rate=0.05, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([1, 2, 3])
    head.loss(torch.randn(3, 4), y).backward()
    touched = head.weight.grad.abs().sum(1) > 0
    assert int(touched.sum()) == 5 and touched[y].all()


def test_from_dense_and_dense_state_dict_round_trip() -> None:
    dense = mll.ArcFace(4, 10, 2, trainable_scale=True, margin=0.3, easy_margin=True)
    shards = [mll.ShardedArcFace.from_dense(dense, class_range=r) for r in MF.shard_bounds(10, 4)]
    assert [s.weight.shape[0] for s in shards] == [6, 6, 4, 4]
    assert shards[1].margin == 0.3 and shards[1].easy_margin and shards[1].scale.requires_grad
    assert "class_range=[3, 6), sample_rate=1.0" in repr(shards[1])
    states = [s.state_dict() for s in shards]
    assert torch.equal(states[2]["class_range"], torch.tensor([6, 8]))
    merged = mll.nn.dense_state_dict(states[::-1])  # any order
    for key, value in dense.state_dict().items():
        assert torch.equal(merged[key], value)
    fresh = mll.ArcFace(4, 10, 2, trainable_scale=True, margin=0.3, easy_margin=True)
    fresh.load_state_dict(merged)
    assert torch.equal(fresh.weight, dense.weight)
    empty = mll.ShardedArcFace.from_dense(dense, class_range=(10, 10))
    assert empty.weight.shape == (0, 4)
    assert torch.equal(mll.nn.dense_state_dict([*states, empty.state_dict()])["weight"], dense.weight)


def test_state_dict_of_another_block_is_refused() -> None:
    a = mll.ShardedCosFace(4, 10, class_range=(0, 5))
    b = mll.ShardedCosFace(4, 10, class_range=(5, 10))
    with pytest.raises(ValueError, match=r"shard holds classes \[5, 10\), but the state_dict holds classes \[0, 5\)"):
        b.load_state_dict(a.state_dict())
    c = mll.ShardedCosFace(4, 10, class_range=(0, 5))
    c.load_state_dict(a.state_dict())
    assert torch.equal(c.weight, a.weight)
    assert copy.deepcopy(c).class_start == 0


def test_dense_state_dict_errors() -> None:
    a = mll.ShardedScaledNormalizedLinear(4, 10, class_range=(0, 5)).state_dict()
    b = mll.ShardedScaledNormalizedLinear(4, 10, class_range=(6, 10)).state_dict()
    with pytest.raises(ValueError, match=r"tile \[0, C\) without gaps or overlaps, but got \[\(0, 5\), \(6, 10\)\]"):
        mll.nn.dense_state_dict([a, b])
    with pytest.raises(ValueError, match=r"shard 0 lacks \['class_range'\]"):
        mll.nn.dense_state_dict([mll.ScaledNormalizedLinear(4, 10).state_dict()])
    c = mll.ShardedScaledNormalizedLinear(4, 10, scale=2.0, class_range=(5, 10)).state_dict()
    with pytest.raises(ValueError, match=r"the shards must hold the same scale"):
        mll.nn.dense_state_dict([a, c])
    d = mll.ShardedScaledNormalizedLinear(3, 10, class_range=(5, 10)).state_dict()
    with pytest.raises(ValueError, match=r"the same in_features, but got \[3, 4\]"):
        mll.nn.dense_state_dict([a, d])
    e = mll.ShardedScaledNormalizedLinear(4, 10, 2, class_range=(5, 10)).state_dict()
    with pytest.raises(ValueError, match=r"the same number of sub-centers"):
        mll.nn.dense_state_dict([a, e])
    with pytest.raises(ValueError, match=r"at least one shard"):
        mll.nn.dense_state_dict([])


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"class_range": (3, 12)}, ValueError, r"class_range must be a pair \(start, stop\) of integers with 0 <= st"),
        ({"class_range": (5, 4)}, ValueError, r"class_range must be a pair"),
        ({"sample_rate": 0}, ValueError, r"sample_rate must be a float in \(0, 1\], but got 0"),
        ({"feature_grad_scale": -1.0}, ValueError, r"feature_grad_scale must be None or a finite float >= 0"),
        ({"generator": 1}, TypeError, r"generator must be a torch.Generator or None"),
        ({"margin": 1.0}, ValueError, r"CosFace margin must be in \[0, 1\), but got 1.0"),
        ({"out_features": 1}, ValueError, r"out_features must be an integer >= 2"),
        ({"group": object()}, ValueError, r"group was given, but torch.distributed is not initialised"),
    ],
)
def test_bad_head_arguments(kwargs, error, match) -> None:
    args = {"in_features": 4, "out_features": 10, **kwargs}
    with pytest.raises(error, match=match):
        mll.ShardedCosFace(**args)


def test_from_dense_needs_the_matching_head() -> None:
    with pytest.raises(TypeError, match=r"ShardedArcFace.from_dense needs a single-process ArcFace, but got CosFace"):
        mll.ShardedArcFace.from_dense(mll.CosFace(4, 10))
    with pytest.raises(TypeError, match=r"but got ShardedArcFace \(a sharded head's blocks reassemble with"):
        mll.ShardedArcFace.from_dense(mll.ShardedArcFace(4, 10))


def test_exported_names() -> None:
    for name in ("ShardedArcFace", "ShardedCosFace", "ShardedScaledNormalizedLinear"):
        assert getattr(mll, name) is getattr(mll.nn, name)
    for name in ("sharded_margin_cross_entropy", "shard_bounds", "sample_classes"):
        assert name in MF.__all__


def test_a_state_dict_whose_class_range_is_not_a_pair_is_refused() -> None:
    head = mll.ShardedArcFace(4, 10, class_range=(0, 10))
    state = head.state_dict()
    state["class_range"] = torch.tensor([0, 5, 10])
    with pytest.raises(ValueError, match=r"class_range must be a pair \(start, stop\), but got shape \(3,\)"):
        head.load_state_dict(state)


def test_sample_classes_names_a_mask_that_is_not_bool() -> None:
    with pytest.raises(TypeError, match=r"positive must be a 1-dim bool tensor .* but got dtype torch.int64"):
        MF.sample_classes(torch.tensor([0, 1, 0, 1]), 0.5)
    with pytest.raises(TypeError, match=r"generator must be a torch.Generator or None, but got int"):
        MF.sample_classes(torch.tensor([False, True]), 0.5, generator=3)
