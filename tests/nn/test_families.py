"""Module behaviour specific to the newer margin families, per-class margins and the sub-center options."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mll
from mll import functional as MF
from tests import reference_papers as ref

D, C = 6, 5


def test_curricular_t_follows_the_batches_and_is_saved() -> None:
    head = mll.CurricularFace(D, C, scale=10.0, dtype=torch.float64)
    x, y = torch.randn(8, D, dtype=torch.float64), torch.randint(0, C, (8,))
    expected = 0.0
    for _ in range(3):
        cos = MF.cosine_logits(x, head.weight).detach()
        expected = 0.99 * expected + 0.01 * float(cos[torch.arange(8), y].mean())
        head(x, y)
    assert float(head.t) == pytest.approx(expected, rel=1e-12)
    assert "t" in head.state_dict()
    head.eval()(x)
    assert float(head.t) == pytest.approx(expected, rel=1e-12), "eval mode leaves t alone"
    with pytest.raises(ValueError, match="CurricularFace needs class indices"):
        head.train()(x, torch.softmax(torch.randn(8, C, dtype=torch.float64), -1))


def test_adaface_statistics_move_with_the_norms() -> None:
    head = mll.AdaFace(D, C)
    x = torch.randn(16, D) * 3
    head(x, torch.randint(0, C, (16,)))
    norms = x.norm(dim=-1)
    assert float(head.norm_mean) == pytest.approx(0.99 * 20 + 0.01 * float(norms.mean()), rel=1e-6)
    assert float(head.norm_std) == pytest.approx(0.99 * 100 + 0.01 * float(norms.std()), rel=1e-6)
    head.reset_running_stats()
    assert float(head.norm_mean) == 20.0 and float(head.norm_std) == 100.0


def test_magface_loss_adds_the_weighted_regularizer() -> None:
    head = mll.MagFace(D, C, lower=1.0, upper=6.0, lambda_g=35.0, dtype=torch.float64)
    x = (torch.randn(6, D, dtype=torch.float64) * 2).requires_grad_(True)
    y = torch.randint(0, C, (6,))
    a = x.detach().norm(dim=-1).clamp(1.0, 6.0)
    reg = (a / 36 + 1 / a).mean()
    torch.testing.assert_close(head.regularizer(x), reg)
    torch.testing.assert_close(head.loss(x, y), F.cross_entropy(head(x, y), y) + 35.0 * reg)
    per_sample = head.loss(x, y, reduction="none")
    assert per_sample.shape == (6,)
    torch.testing.assert_close(per_sample.mean(), head.loss(x, y))
    head.loss(x, y).backward()
    assert torch.isfinite(x.grad).all()


def test_elastic_heads_draw_fresh_seeded_margins() -> None:
    def run(seed):
        torch.manual_seed(0)
        head = mll.ElasticArcFace(D, C, scale=10.0, std=0.1, generator=torch.Generator().manual_seed(seed))
        x, y = torch.randn(4, D), torch.randint(0, C, (4,))
        return head(x, y), head(x, y)

    (a1, a2), (b1, _), (c1, _) = run(1), run(1), run(2)
    assert torch.equal(a1, b1), "same seed, same draws"
    assert not torch.equal(a1, a2), "a fresh margin every step"
    assert not torch.equal(a1, c1)


def test_elastic_per_class_margins_center_each_class() -> None:
    margins = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    head = mll.ElasticCosFace(D, C, scale=1.0, margin=margins, std=0.0)
    x, y = torch.randn(6, D), torch.tensor([0, 1, 2, 3, 4, 0])
    torch.testing.assert_close(head(x, y), MF.cos_margin(MF.cosine_logits(x, head.weight), y, margins))


@pytest.mark.parametrize("cls", [mll.CosFace, mll.ArcFace])
def test_per_class_margins_are_buffers_and_reach_the_chunked_loss(cls) -> None:
    margins = MF.dynamic_margins(torch.tensor([1, 3, 10, 30, 100]))
    head = cls(D, C, 2, margin=margins, dtype=torch.float64)
    assert torch.equal(head.state_dict()["margin"], margins)
    assert "margin=per-class[5] in [0.05, 0.5]" in repr(head)
    x, y = torch.randn(7, D, dtype=torch.float64), torch.randint(0, C, (7,))
    soft = torch.softmax(torch.randn(7, C, dtype=torch.float64), -1)
    for target in (y, soft):
        torch.testing.assert_close(head.loss(x, target, chunk_size=2), F.cross_entropy(head(x, target), target))
    with pytest.raises(ValueError, match=r"tensor of shape \(5,\), one per class"):
        cls(D, C, margin=torch.full((4,), 0.3))


@pytest.mark.parametrize("cls", [mll.ScaledNormalizedLinear, mll.CosFace, mll.ArcFace])
def test_soft_sub_center_pooling_in_heads_and_the_chunked_loss(cls) -> None:
    head = cls(D, C, 3, pooling="soft", pooling_temperature=0.2, dtype=torch.float64)
    assert "pooling='soft', pooling_temperature=0.2" in repr(head)
    x, y = torch.randn(7, D, dtype=torch.float64), torch.randint(0, C, (7,))
    cos = MF.cosine_logits(x, head.weight, 3, pooling="soft", pooling_temperature=0.2)
    torch.testing.assert_close(head.eval()(x), cos * head.scale)
    head.train()
    loss = head.loss(x, y, chunk_size=2)
    dense = F.cross_entropy(head(x, y), y)
    torch.testing.assert_close(loss, dense)
    (g_chunked,) = torch.autograd.grad(loss, head.weight)
    (g_dense,) = torch.autograd.grad(dense, head.weight)
    torch.testing.assert_close(g_chunked, g_dense)


def test_soft_pooling_matches_softtriple_and_tends_to_max() -> None:
    x, w = torch.randn(4, D, dtype=torch.float64), torch.randn(C * 3, D, dtype=torch.float64)
    cos_k = (ref.normalize(x.numpy()) @ ref.normalize(w.numpy()).T).reshape(4, C, 3)
    got = MF.cosine_logits(x, w, 3, pooling="soft", pooling_temperature=0.1)
    np.testing.assert_allclose(ref.as_np(got), ref.soft_pool(cos_k, 0.1), rtol=1e-12)
    cold = MF.cosine_logits(x, w, 3, pooling="soft", pooling_temperature=1e-6)
    torch.testing.assert_close(cold, MF.cosine_logits(x, w, 3), rtol=1e-6, atol=1e-6)
    assert torch.equal(MF.cosine_logits(x, w[:C], 1, pooling="soft"), MF.cosine_logits(x, w[:C]))
    with pytest.raises(ValueError, match="pooling must be 'max' or 'soft'"):
        MF.cosine_logits(x, w, 3, pooling="mean")
    with pytest.raises(ValueError, match="temperature must be a positive finite float"):
        mll.ArcFace(D, C, 3, pooling="soft", pooling_temperature=0.0)


def _noisy_sub_center_data():
    """Class c's samples sit near sub-center c % 3 (the dominant one), a few near another, two far from all."""
    g = torch.Generator().manual_seed(0)
    weight = torch.nn.functional.normalize(torch.randn(C * 3, D, generator=g, dtype=torch.float64), dim=-1)
    xs, ys = [], []
    for c in range(C):
        dominant = c % 3
        for k, count in ((dominant, 10), ((dominant + 1) % 3, 3)):
            xs.append(weight[c * 3 + k] + 0.05 * torch.randn(count, D, generator=g, dtype=torch.float64))
            ys += [c] * count
    xs.append(-weight[[0, 4]])  # opposite to the dominant sub-centers of classes 0 and 1: 180° from them
    ys += [0, 1]
    return torch.cat(xs), torch.tensor(ys), weight


def test_sub_center_counts_and_outliers_match_a_loop() -> None:
    x, y, weight = _noisy_sub_center_data()
    counts = MF.sub_center_counts(x, weight, y, 3)
    expected = np.zeros((C, 3), dtype=np.int64)
    for xi, yi in zip(x.numpy(), y.numpy()):
        expected[yi, np.argmax([xi @ weight[yi * 3 + k].numpy() / np.linalg.norm(xi) for k in range(3)])] += 1
    np.testing.assert_array_equal(counts.numpy(), expected)
    dominant = MF.dominant_sub_centers(counts)
    assert dominant.tolist() == [c % 3 for c in range(C)]
    outliers = MF.sub_center_outliers(x, weight, y, dominant, 3, max_angle=math.radians(75))
    angles = [
        math.degrees(
            math.acos(
                max(-1.0, min(1.0, float(F.cosine_similarity(xi, weight[int(yi) * 3 + int(dominant[yi])], dim=0))))
            )
        )
        for xi, yi in zip(x, y)
    ]
    assert outliers.tolist() == [a > 75 for a in angles]
    assert outliers[-2:].tolist() == [True, True]


@pytest.mark.parametrize("cls", [mll.ArcFace, mll.CurricularFace, mll.ScaledNormalizedLinear])
def test_clean_sub_centers_returns_a_one_center_head(cls) -> None:
    x, y, weight = _noisy_sub_center_data()
    head = cls(D, C, 3, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight * 4.0)
    before = head.weight.detach().clone()
    result = mll.clean_sub_centers(head, x, y, batch_size=7)
    assert type(result.head) is cls and result.head.num_sub_centers == 1
    assert result.head.weight.shape == (C, D) and torch.equal(head.weight, before), "the original is untouched"
    rows = torch.arange(C) * 3 + result.dominant
    assert torch.equal(result.head.weight.detach(), before[rows])
    assert result.counts.sum() == len(y) and result.outliers[-2:].all()
    assert torch.equal(result.outliers, MF.sub_center_outliers(x, weight, y, result.dominant, 3))
    torch.testing.assert_close(
        result.head.eval()(x), MF.cosine_logits(x, before[rows]) * head.scale, msg="cosines to the dominant centers"
    )
    assert "num_sub_centers=1" in repr(result.head)


def test_keep_dominant_sub_centers_checks_its_input() -> None:
    head = mll.ArcFace(D, C, 3)
    with pytest.raises(ValueError, match=r"dominant must have shape \(5,\)"):
        mll.nn.keep_dominant_sub_centers(head, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"sub-center indices in \[0, 3\)"):
        mll.nn.keep_dominant_sub_centers(head, torch.full((C,), 3))


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: mll.CombinedMargin(D, C, m1=0.5), r"combined m1 must be in \[1, 10\)"),
        (lambda: mll.SphereFace(D, C, lambda_=-2.0), r"lambda_ must be a finite float >= 0"),
        (lambda: mll.CurricularFace(D, C, decay=1.0), r"decay must be a float in \[0, 1\)"),
        (lambda: mll.AdaFace(D, C, h=0.0), r"AdaFace h must be a positive finite float"),
        (lambda: mll.MagFace(D, C, lower=50.0, upper=20.0), r"MagFace lower must be below upper"),
        (lambda: mll.MagFace(D, C, margin_high=2.0), r"MagFace margin_high must be in \[0, 1.571\)"),
        (lambda: mll.ElasticArcFace(D, C, std=-0.1), r"ElasticArcFace std must be a finite float >= 0"),
        (lambda: mll.ElasticCosFace(D, C, generator=0), r"generator must be a torch.Generator"),
    ],
)
def test_bad_constructor_arguments(make, match) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        make()


CHUNKED = {
    "CombinedMargin": lambda: mll.CombinedMargin(D, C, 2, m1=1.2, m2=0.3, m3=0.1, dtype=torch.float64),
    "SphereFace": lambda: mll.SphereFace(D, C, 2, margin=3.0, lambda_=2.0, dtype=torch.float64),
    "AdaFace": lambda: mll.AdaFace(D, C, 2, margin=torch.linspace(0.2, 0.6, C), dtype=torch.float64),
    "ElasticArcFace": lambda: mll.ElasticArcFace(
        D, C, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    ),
    "ElasticCosFace": lambda: mll.ElasticCosFace(
        D, C, 2, margin=torch.linspace(0.1, 0.5, C), generator=torch.Generator().manual_seed(3), dtype=torch.float64
    ),
}


@pytest.mark.parametrize("name", CHUNKED)
@pytest.mark.parametrize("soft", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_chunked_loss_equals_dense_cross_entropy(name, soft, training) -> None:
    import copy

    head = CHUNKED[name]().train(training)
    twin = copy.deepcopy(head)  # running statistics and random draws advance identically in both
    x = (torch.randn(2, 4, D, dtype=torch.float64) * 5).requires_grad_(True)
    y = torch.randint(0, C, (2, 4))
    target = torch.softmax(torch.randn(2, 4, C, dtype=torch.float64), -1) if soft else y
    chunked = head.loss(x, target, chunk_size=2)
    dense = F.cross_entropy(twin(x, target).reshape(8, C), target.reshape(8, C) if soft else y.reshape(8))
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(chunked, (x, head.weight))
    want = torch.autograd.grad(dense, (x, twin.weight))
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for (key, a), b in zip(head.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)


@pytest.mark.parametrize("soft", [False, True])
def test_chunked_loss_differentiates_margins_that_need_a_gradient(soft) -> None:
    # MagFace's margin depends on the feature magnitude: the chunked loss gives that gradient too, as the dense path
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(C * 2, D, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (5,), generator=g)
    target = torch.softmax(torch.randn(5, C, generator=g, dtype=torch.float64), -1) if soft else y
    margins = (0.2 + 0.1 * x.norm(dim=-1, keepdim=True)).clamp(max=1.2)
    chunked = MF.margin_cross_entropy(x, w, target, scale=8.0, margin=MF.ARC(margins), num_sub_centers=2,
                                      chunk_size=3)  # fmt: skip
    dense = F.cross_entropy(MF.arc_margin(MF.cosine_logits(x, w, 2), target, margins, scale=8.0), target)
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)
    got = torch.autograd.grad(chunked, (x, w), retain_graph=True)
    for a, b in zip(got, torch.autograd.grad(dense, (x, w))):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "make",
    [
        lambda **kw: mll.ArcFace(D, C, margin=torch.linspace(0.1, 0.5, C), **kw),
        lambda **kw: mll.CombinedMargin(D, C, m3=torch.linspace(0.0, 0.3, C), **kw),
        lambda **kw: mll.MagFace(D, C, margin_low=torch.full((C,), 0.3), **kw),
    ],
)
def test_per_class_margin_buffers_follow_the_factory_arguments(make) -> None:
    head = make(device="meta", dtype=torch.float64)
    for name, buffer in head.named_buffers():
        assert buffer.device.type == "meta" and buffer.dtype == torch.float64, name
    head = make(dtype=torch.float64)
    x, y = torch.randn(4, D, dtype=torch.float64), torch.randint(0, C, (4,))
    assert head(x, y).dtype == torch.float64


def test_margin_tensors_move_to_the_cosines_device_and_dtype() -> None:
    cos = torch.rand(3, C, dtype=torch.float64)
    y = torch.tensor([0, 1, 4])
    margins = torch.linspace(0.1, 0.5, C, dtype=torch.float16)
    torch.testing.assert_close(MF.arc_margin(cos, y, margins), MF.arc_margin(cos, y, margins.double()))


@pytest.mark.slow
def test_sphereface_lambda_is_a_saved_buffer_that_compiles_once() -> None:
    head = mll.SphereFace(D, C, lambda_=1000.0)
    head.lambda_ = 5.0
    assert float(head.lambda_) == 5.0 and float(head.state_dict()["annealing_lambda"]) == 5.0
    fresh = mll.SphereFace(D, C, lambda_=1000.0)
    fresh.load_state_dict(head.state_dict())
    assert float(fresh.lambda_) == 5.0, "resuming keeps the annealing where it was"
    with pytest.raises(ValueError, match="lambda_ must be a finite float >= 0"):
        head.lambda_ = -1.0
    x, y = torch.randn(4, D), torch.randint(0, C, (4,))
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    for step in range(12):  # more than dynamo's recompile limit (8): a float attribute would fail here
        head.lambda_ = 1000.0 / (1 + step)
        torch.testing.assert_close(compiled(x, y), head(x, y))


@pytest.mark.slow
def test_elastic_margins_can_be_drawn_outside_a_compiled_step() -> None:
    head = mll.ElasticArcFace(D, C, generator=torch.Generator().manual_seed(0))
    x, y = torch.randn(4, D), torch.randint(0, C, (4,))
    margins = head.sample_margins(x, y)
    compiled = torch.compile(lambda a, b, m: head.loss(a, b, margins=m), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, y, margins), F.cross_entropy(head(x, y, margins=margins), y))
    with pytest.raises(ValueError, match=r"ElasticArcFace margins must be in \[0, 1.571\)"):
        head(x, y, margins=torch.full((4, 1), 2.0))


def test_heuristic_scale_refuses_combined_margins_without_a_solution() -> None:
    with pytest.raises(ValueError, match=r"perfectly aligned feature, -0.02242, is not positive; pass scale="):
        mll.CombinedMargin(D, C, m1=1.0, m2=0.5, m3=0.9)
    assert mll.CombinedMargin(D, C, scale=30.0, m1=1.0, m2=0.5, m3=0.9).scale == 30.0


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda c, y: MF.ada_margin(c, y, torch.ones(2), mean=20.0, std=-1e-3), r"AdaFace std must be finite and >= 0"),
        (lambda c, y: MF.ada_margin(c, y, torch.ones(2), mean=float("nan"), std=1.0), r"AdaFace mean must be finite"),
        (lambda c, y: MF.curricular_margin(c, y, 0.5, t=float("nan")), r"CurricularFace t must be finite"),
        (lambda c, y: MF.mag_margin(c, y, torch.ones(2), margin_low=0.8, margin_high=0.1), r"must not exceed"),
        (lambda c, y: MF.elastic_margins(3.0, 0.1, (2, 1)), r"must lie in bounds \[0, 1.571\)"),
    ],
)
def test_statistics_and_ranges_are_checked(call, match) -> None:
    with pytest.raises(ValueError, match=match):
        call(torch.rand(2, C), torch.tensor([0, 3]))
