"""The margin protocol: a family is data that every path consumes — dense logits, chunked and sharded losses, the
default scale — and a new family written by a user runs on all of them."""

import copy
import math
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F

from mll import functional as MF


def _shifted_cos(cos, w, m, p):
    """A user's family: ψ = cos θ − m·t − p·t·(1 − cos θ), slope 1 + p·t (not in the library)."""
    value = cos - m * w - p * w * (1 - cos)
    return value, (1 + p * w) * torch.ones_like(cos)


MINE = MF.MarginFamily(
    "mine",
    _shifted_cos,
    (MF.MarginParameter("m", 0.0, 1.0), MF.MarginParameter("p", 0.0, 2.0, high_inclusive=True)),
    target_logit=lambda th, m, p: math.cos(th) - m - p * (1 - math.cos(th)),
)


def problem(seed=0, n=6, c=7, k=2, d=5):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c * k, d, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, c, (n,), generator=g)
    soft = torch.softmax(torch.randn(n, c, generator=g, dtype=torch.float64), -1)
    return x, w, y, soft


@pytest.mark.parametrize("soft", [False, True])
def test_a_new_family_runs_on_the_dense_and_the_chunked_path(soft) -> None:
    x, w, y, t = problem()
    target = t if soft else y
    margin = MINE(0.2, torch.linspace(0.0, 1.0, 7, dtype=torch.float64))  # a per-class second parameter
    dense = F.cross_entropy(MF.margin_logits(MF.cosine_logits(x, w, 2), target, margin, scale=5.0), target)
    chunked = MF.margin_cross_entropy(x, w, target, scale=5.0, margin=margin, num_sub_centers=2, chunk_size=3)
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(chunked, (x, w))
    for a, b in zip(got, torch.autograd.grad(dense, (x, w))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # the reference: the equation written out on a one-hot (or soft) target
    cos = MF.cosine_logits(x, w, 2).detach()
    tt = t if soft else (torch.arange(7) == y[:, None]).double()
    p = torch.linspace(0.0, 1.0, 7, dtype=torch.float64)
    expected = 5.0 * (cos - 0.2 * tt - p * tt * (1 - cos))
    torch.testing.assert_close(MF.margin_logits(cos, target, margin, scale=5.0), expected, rtol=1e-12, atol=1e-12)


def test_a_new_family_gets_its_default_scale() -> None:
    want = math.log(99) / max(math.cos(math.pi / 4) - 0.2 - 0.5 * (1 - math.cos(math.pi / 4)), 0.8 / 4)
    assert MF.heuristic_scale(100, MINE(0.2, 0.5)) == pytest.approx(want)


def test_the_named_functions_are_the_families() -> None:
    x, w, y, soft = problem(1)
    cos = MF.cosine_logits(x, w, 2).detach()
    for target in (y, soft):
        pairs = [
            (MF.cos_margin(cos, target, 0.3, scale=4.0), MF.COS(0.3)),
            (MF.arc_margin(cos, target, 0.5, scale=4.0), MF.ARC(0.5)),
            (MF.arc_margin(cos, target, 0.5, easy_margin=True, scale=4.0), MF.ARC_EASY(0.5)),
            (MF.combined_margin(cos, target, 1.5, 0.2, 0.1, scale=4.0), MF.COMBINED(1.5, 0.2, 0.1)),
            (MF.sphere_margin(cos, target, 3.0, lambda_=2.0, scale=4.0), MF.SPHERE(3.0, 2.0)),
        ]
        for named, margin in pairs:
            assert torch.equal(named, MF.margin_logits(cos, target, margin, scale=4.0)), repr(margin)
    assert torch.equal(MF.margin_logits(cos, y, MF.NO_MARGIN(), scale=4.0), cos * 4.0)


def test_heuristic_scale_takes_margin_objects_and_the_older_strings_alike() -> None:
    assert MF.heuristic_scale(1000, MF.ARC(0.5)) == MF.heuristic_scale(1000, 0.5, margin_type="arc")
    assert MF.heuristic_scale(1000, MF.COS(0.35)) == MF.heuristic_scale(1000, 0.35)
    assert MF.heuristic_scale(1000, MF.COMBINED(1.0, 0.3, 0.2)) == MF.heuristic_scale(
        1000, (1.0, 0.3, 0.2), margin_type="combined"
    )
    assert MF.heuristic_scale(1000, MF.SPHERE(4.0, 0.0)) == MF.heuristic_scale(1000, 4.0, margin_type="sphere")
    assert MF.heuristic_scale(1000) == pytest.approx(math.sqrt(2) * math.log(999))
    per_class = MF.ARC(torch.tensor([0.3, 0.7]))  # per-class parameters: their mean
    assert MF.heuristic_scale(1000, per_class) == pytest.approx(MF.heuristic_scale(1000, MF.ARC(0.5)))


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: MF.ARC(2.0), ValueError, r"ArcFace margin must be in \[0, 1.571\), but got 2.0"),
        (lambda: MF.COS(), TypeError, r"the CosFace margin takes 1 parameter\(s\) \(margin\), but got 0"),
        (lambda: MF.COMBINED(0.5, 0.0, 0.0), ValueError, r"combined m1 must be in \[1, 10\)"),
        (lambda: MINE(0.1, 2.5), ValueError, r"mine p must be in \[0, 2\], but got 2.5"),
        (lambda: MF.ARC(torch.tensor([1, 2])), TypeError, r"ArcFace margin must be a float or a floating-point"),
        (lambda: MF.margin_logits(torch.rand(2, 3), torch.tensor([0, 1]), 0.5), TypeError, r"must be a mll.functional"),
        (
            lambda: MF.margin_logits(torch.rand(2, 3), torch.tensor([0, 1]), MF.ARC(torch.full((3,), 2.0))),
            ValueError,
            r"ArcFace margin must be in \[0, 1.571\), but got values from 2 to 2",
        ),
        (
            lambda: MF.margin_logits(torch.rand(2, 3), torch.rand(2, 3), MF.CURRICULAR(0.5, 0.0)),
            ValueError,
            r"CurricularFace needs class indices",
        ),
        (
            lambda: MF.margin_cross_entropy(
                torch.rand(2, 3),
                torch.rand(4, 3),
                torch.tensor([0, 1]),
                scale=2.0,
                margin=MF.ARC(0.5),
                margin_type="arc",
            ),
            ValueError,
            r"margin_type is only for a float margin",
        ),
        (
            lambda: MF.heuristic_scale(10, MF.COMBINED(1.0, 1.2, 0.9)),
            ValueError,
            r"no positive solution for the margin combined\(m1=1, m2=1.2, m3=0.9\)",
        ),
    ],
)
def test_bad_margins_name_the_family_and_the_parameter(make, error, match) -> None:
    with pytest.raises(error, match=match):
        make()


def test_a_bound_margin_shows_its_parameters() -> None:
    assert repr(MF.ARC(0.5)) == "arc(margin=0.5)"
    assert repr(MF.COMBINED(1.0, 0.3, torch.zeros(4))) == "combined(m1=1, m2=0.3, m3=Tensor(4,))"
    assert repr(MF.ARC) == "MarginFamily('arc')"


def test_margin_cross_entropy_under_torch_func_grad_compile_and_vmap() -> None:
    x, w, y, _ = problem(2, k=1)
    x, w = x.detach(), w.detach()

    def loss(features):
        return MF.margin_cross_entropy(features, w, y, scale=3.0, margin=MF.ARC(0.5), chunk_size=3)

    def dense(features):
        return F.cross_entropy(MF.arc_margin(MF.cosine_logits(features, w), y, 0.5, scale=3.0), y)

    torch.testing.assert_close(torch.func.grad(loss)(x), torch.func.grad(dense)(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.compile(loss, fullgraph=True, backend="aot_eager")(x), loss(x))
    with pytest.raises(RuntimeError, match=r"does not run under torch.func.vmap"):
        torch.func.vmap(loss)(x.unsqueeze(0).expand(2, -1, -1))
    with pytest.raises(RuntimeError, match=r"first derivatives only"):
        torch.func.grad(lambda f: torch.func.grad(loss)(f).sum())(x)
    leaf = x.clone().requires_grad_(True)
    with pytest.raises(RuntimeError, match=r"first derivatives only"):
        torch.autograd.grad(loss(leaf), leaf, create_graph=True)


def test_few_hot_pairs_equal_the_dense_soft_targets() -> None:
    x, w, y, _ = problem(3)
    g = torch.Generator().manual_seed(5)
    classes = torch.stack([y, torch.randint(0, 7, (6,), generator=g)], 1)
    classes[0, 1] = classes[0, 0]  # a mixup of two samples of one class: listed twice
    lam = torch.rand(6, 1, generator=g, dtype=torch.float64)
    weights = torch.cat([lam, 1 - lam], 1)
    dense = torch.zeros(6, 7, dtype=torch.float64).index_put_(
        (torch.arange(6).repeat_interleave(2), classes.reshape(-1)), weights.reshape(-1), accumulate=True
    )
    for margin in (MF.ARC(0.5), MF.COMBINED(1.5, 0.2, 0.1), MF.COS(torch.linspace(0.0, 0.6, 7))):
        kwargs = {"scale": 4.0, "margin": margin, "num_sub_centers": 2, "chunk_size": 2}
        pair = MF.margin_cross_entropy(x, w, (classes, weights), **kwargs)
        want = MF.margin_cross_entropy(x, w, dense, **kwargs)
        torch.testing.assert_close(pair, want, rtol=1e-12, atol=1e-12)
        got = torch.autograd.grad(pair, (x, w))
        for a, b in zip(got, torch.autograd.grad(want, (x, w))):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_few_hot_pairs_without_entries_give_what_all_zero_targets_give() -> None:
    """Pairs of shape (N, 0) pass the check: every row's target is empty, as an all-zero dense target (a loss of 0,
    gradients of 0), on every reduction — not a crash inside."""
    x, w, *_ = problem(6)
    empty = (torch.zeros(6, 0, dtype=torch.int64), torch.zeros(6, 0, dtype=torch.float64))
    for reduction in ("none", "mean", "sum"):
        kwargs = {"scale": 4.0, "margin": MF.ARC(0.5), "num_sub_centers": 2, "reduction": reduction}
        got = MF.margin_cross_entropy(x, w, empty, **kwargs)
        want = MF.margin_cross_entropy(x, w, torch.zeros(6, 7, dtype=torch.float64), **kwargs)
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        for a, b in zip(torch.autograd.grad(got.sum(), (x, w)), torch.autograd.grad(want.sum(), (x, w))):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-15)


def test_per_sample_gradients_of_the_chunked_loss_say_to_use_the_dense_path() -> None:
    """``torch.func.jacrev`` (a vmap over the backward) of the chunked losses: our message, not a batching rule's.
    (A step small enough for the cost model's dense path gives them: the dense path's numbers.)"""
    x, w, y, _ = problem(7, k=1)
    x, w = x.detach(), w.detach()

    def losses(weight, chunk_size=None):
        return MF.margin_cross_entropy(x, weight, y, scale=3.0, margin=MF.ARC(0.5), reduction="none",
                                       chunk_size=chunk_size)  # fmt: skip

    with pytest.raises(RuntimeError, match=r"chunked margin cross-entropy's backward does not run under .*jacrev"):
        torch.func.jacrev(lambda weight: losses(weight, chunk_size=3))(w)
    with pytest.raises(RuntimeError, match=r"chunked Proxy-Anchor loss's backward does not run under .*jacrev"):
        torch.func.jacrev(lambda weight: MF.chunked_proxy_anchor_loss(x, weight, y, chunk_size=3))(w)
    tiny = torch.func.jacrev(lambda weight: MF.chunked_proxy_anchor_loss(x, weight, y))(w)  # the dense path: runs
    torch.testing.assert_close(
        tiny, torch.func.jacrev(lambda weight: MF.proxy_anchor_loss(MF.cosine_logits(x, weight), y))(w)
    )
    # the dense path it points to gives them
    dense = torch.func.jacrev(
        lambda weight: F.cross_entropy(
            MF.arc_margin(MF.cosine_logits(x, weight), y, 0.5, scale=3.0), y, reduction="none"
        )
    )(w)
    assert dense.shape == (6, *w.shape)
    torch.testing.assert_close(torch.func.jacrev(losses)(w), dense, rtol=1e-12, atol=1e-12)  # tiny: dense


def _module_level_family() -> MF.MarginFamily:
    """A family made inside a function (no module-level name): it pickles by value (its functions are module-level)."""
    return MF.MarginFamily("made-in-a-function", _shifted_cos, MINE.parameters)


@pytest.mark.parametrize("name", sorted(n for n, v in vars(MF).items() if isinstance(v, MF.MarginFamily)))
def test_every_family_pickles_and_copies_to_itself(name) -> None:
    """A family is a module-level constant that heads compare by identity (``family is NO_MARGIN``): pickling and
    deep-copying give the same object, and a bound margin keeps its family and parameters."""
    family = getattr(MF, name)
    assert pickle.loads(pickle.dumps(family)) is family
    assert copy.deepcopy(family) is family
    params = tuple(p.low if math.isfinite(p.low) else 0.5 for p in family.parameters)
    margin = family(*params)
    again = pickle.loads(pickle.dumps(margin))
    assert again.family is family and again.params == margin.params


def test_a_users_family_pickles_by_name_or_by_value() -> None:
    assert pickle.loads(pickle.dumps(MINE)) is MINE  # a module-level name in the module of its function
    made = _module_level_family()
    again = pickle.loads(pickle.dumps(made))
    assert again is not made and again == made and again.value_and_slope is _shifted_cos


def test_renamed_arguments_warn_and_still_work() -> None:
    x, w, y, _ = problem(4)
    with pytest.warns(DeprecationWarning, match="temperature is deprecated.*use pooling_temperature"):
        old = MF.cosine_logits(x, w, 2, pooling="soft", temperature=0.3)
    torch.testing.assert_close(old, MF.cosine_logits(x, w, 2, pooling="soft", pooling_temperature=0.3))
    with pytest.warns(DeprecationWarning, match="momentum is deprecated.*use decay"):
        t = MF.curricular_update(0.0, MF.cosine_logits(x, w, 2), y, momentum=0.5)
    torch.testing.assert_close(t, MF.curricular_update(0.0, MF.cosine_logits(x, w, 2), y, decay=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the new names are silent
        MF.ncm_update(torch.zeros(7, 5, dtype=torch.float64), x.detach(), y, 0.9)
        MF.adaface_update(20.0, 100.0, x.detach().norm(dim=-1), decay=0.9)


def test_an_angular_margin_out_of_range_says_radians_and_reads_degrees() -> None:
    """pytorch-metric-learning takes its margins in degrees: 28.6 is 0.499 rad, and the error says so."""
    with pytest.raises(ValueError, match=r"ArcFace margin must be in \[0, 1.571\), but got 28.6 \(in radians: did you "
                       r"give degrees\? 28.6° = 0.499 rad\)$"):  # fmt: skip
        MF.ARC(28.6)
    with pytest.raises(ValueError, match=r"but got values from 0.1 to 30 \(in radians: did you give degrees\? 30° = "):
        MF.arc_margin(torch.rand(3, 3), torch.tensor([0, 1, 2]), torch.tensor([0.1, 30.0, 0.2]))
    with pytest.raises(ValueError, match=r"but got -0.1 \(in radians\)$"):
        MF.ARC(-0.1)
    with pytest.raises(ValueError, match=r"CosFace margin must be in \[0, 1\), but got 1.5$"):  # not an angle
        MF.COS(1.5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(
    "margin",
    [
        MF.ARC(0.5),
        MF.ARC_EASY(0.5),
        MF.COS(torch.linspace(0.1, 0.4, 7)),  # CosFace's shift: one scatter-add, per class here
        MF.COS(0.35),
        MF.COS(torch.tensor(0.2)),
        MF.COS(torch.linspace(0.1, 0.3, 6).unsqueeze(1)),  # per sample
        MF.COMBINED(1.2, 0.2, 0.1),
        MF.SPHERE(2.0, torch.tensor(1.5)),
    ],
    ids=repr,
)
def test_a_few_logits_take_autograds_operations_with_the_same_numbers(margin, dtype, monkeypatch) -> None:
    """Below ``FEW_LOGITS`` the target replacement is written in autograd's own operations (CosFace's, a shift, in
    one scatter-add): the fused Function's logits bit for bit and its gradients (to rounding), at cos = ±1 too, and
    under ``torch.func.vmap``."""
    from mll.functional import margin as margin_module

    g = torch.Generator().manual_seed(1)
    cos = (torch.rand(6, 7, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    y = torch.tensor([0, 1, 2, 3, 4, 6])
    cos[0, 0], cos[1, 1] = 1.0, -1.0
    upstream = torch.randn(6, 7, generator=g, dtype=dtype)
    results = []
    for few in (1 << 14, 0):
        monkeypatch.setattr(margin_module, "FEW_LOGITS", few)
        leaf = cos.clone().requires_grad_(True)
        logits = MF.margin_logits(leaf, y, margin, scale=4.0)
        (grad,) = torch.autograd.grad((logits * upstream).sum(), leaf)
        results.append((logits.detach(), grad))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=0, atol=0)
    torch.testing.assert_close(results[0][1], results[1][1])
    assert torch.isfinite(results[0][1]).all()
    monkeypatch.setattr(margin_module, "FEW_LOGITS", 1 << 14)
    batched = torch.func.vmap(lambda c: MF.margin_logits(c, y, margin, scale=4.0))(torch.stack([cos, cos.flip(1)]))
    torch.testing.assert_close(batched[1], MF.margin_logits(cos.flip(1), y, margin, scale=4.0), rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(6,), (7,), (6, 1), (6, 7)], ids=["0-dim", "per class", "per sample", "per entry"])
def test_a_few_cosface_logits_give_a_trained_margin_its_gradient(shape, monkeypatch) -> None:
    """CosFace's few-logit shift passes the gradient to a margin that requires one, as the fused path does, for
    each shape a margin broadcasts from, and over a batch of more than one leading dimension."""
    from mll.functional import margin as margin_module

    g = torch.Generator().manual_seed(3)
    cos = torch.rand(2, 3, 7, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.tensor([[0, 6, 2], [2, 5, 1]])
    upstream = torch.randn(2, 3, 7, generator=g, dtype=torch.float64)
    base = torch.rand(shape[:-1] if shape == (6,) else shape, generator=g, dtype=torch.float64) * 0.4
    base = base.reshape(2, 3, 1) if shape == (6, 1) else base.reshape(2, 3, 7) if shape == (6, 7) else base
    results = []
    for few in (1 << 14, 0):
        monkeypatch.setattr(margin_module, "FEW_LOGITS", few)
        leaf, m = cos.clone().requires_grad_(True), base.clone().requires_grad_(True)
        logits = MF.margin_logits(leaf, y, MF.COS(m), scale=3.0)
        results.append((logits.detach(), *torch.autograd.grad((logits * upstream).sum(), [leaf, m])))
    for few, fused in zip(results[0], results[1]):
        torch.testing.assert_close(few, fused, rtol=1e-12, atol=1e-12)
    target_upstream = upstream.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    assert results[0][2].abs().sum() > 0
    torch.testing.assert_close(results[0][2].sum(), -3.0 * target_upstream.sum())


@pytest.mark.parametrize(
    "scale",
    [3.0, torch.tensor(3.0), torch.tensor([3.0]), torch.tensor([[3.0]])],
    ids=["float", "0-dim", "(1,)", "(1, 1)"],
)
def test_the_non_target_replacement_scales_every_entry_by_its_own_scale(scale) -> None:
    """``scaled_negatives_replace`` (the dense path of families with a non-target part): the cosine's gradient is
    ``scale·slope`` entry by entry for a scale of any one-element shape (``check_scale``'s contract), and the values
    are scaled where they lie."""
    from mll.functional._engine.dense import scaled_negatives_replace

    g = torch.Generator().manual_seed(0)
    cos = torch.rand(5, 7, generator=g, dtype=torch.float64).requires_grad_(True)
    y = torch.tensor([0, 6, 3, 3, 1])
    scale = scale.double() if isinstance(scale, torch.Tensor) else scale
    neg_value, neg_slope = cos.detach() ** 2, 2 * cos.detach()
    value, slope = cos.detach().gather(1, y[:, None]).squeeze(1) - 0.3, torch.full((5,), 0.5, dtype=torch.float64)
    out = scaled_negatives_replace(cos, y, neg_value.clone(), neg_slope, value, slope, scale)
    full = torch.as_tensor(scale, dtype=torch.float64).expand(5, 7)
    target = F.one_hot(y, 7).bool()
    torch.testing.assert_close(out, torch.where(target, value[:, None], neg_value) * full, rtol=0, atol=1e-15)
    upstream = torch.randn(5, 7, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad((out * upstream).sum(), cos)
    want = torch.where(target, slope[:, None].expand(5, 7), neg_slope) * full * upstream
    torch.testing.assert_close(grad, want, rtol=0, atol=1e-14)
