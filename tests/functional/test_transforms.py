"""The functional core under torch.func transforms and torch.compile."""

from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

from mll import functional as MF

N, D, C, K = 5, 4, 6, 2


def pipeline(x, w, y, soft):
    cos = MF.cosine_logits(x, w, K)
    arc = F.cross_entropy(MF.arc_margin(cos, y, 0.5, scale=8.0), y)
    cosf = F.cross_entropy(MF.cos_margin(cos, soft, 0.35, scale=8.0), soft)
    arc_soft = F.cross_entropy(MF.arc_margin(cos, soft, 0.3, scale=8.0), soft)
    return arc + cosf + arc_soft


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    ws = torch.randn(3, C * K, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (N,), generator=g)
    soft = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), -1)
    return x, ws, y, soft


def test_vmap_over_a_stack_of_weights_equals_a_loop(data) -> None:
    x, ws, y, soft = data

    def heads(w):
        cos = MF.cosine_logits(x, w, K)
        return (
            MF.arc_margin(cos, y, 0.5, scale=4.0),
            MF.cos_margin(cos, soft, 0.3, scale=4.0),
            MF.ncm_logits(x, w[:C], 3.0),
            MF.adacos_scale(cos, y, scale=4.0),
            MF.ncm_update(w[:C], x, y, 0.9),
        )

    batched = torch.func.vmap(heads)(ws)
    looped = [torch.stack(out) for out in zip(*(heads(w) for w in ws))]
    for b, lo in zip(batched, looped):
        torch.testing.assert_close(b, lo, rtol=1e-12, atol=1e-12)


def test_vmap_over_labels_and_soft_targets(data) -> None:
    x, ws, y, soft = data
    labels = torch.stack([y, y.flip(0), (y + 1) % C])
    cos = MF.cosine_logits(x, ws[0], K)
    batched = torch.func.vmap(lambda t: MF.arc_margin(cos, t, 0.5, scale=2.0))(labels)
    looped = torch.stack([MF.arc_margin(cos, t, 0.5, scale=2.0) for t in labels])
    torch.testing.assert_close(batched, looped)
    softs = torch.stack([soft, soft.flip(0), soft.roll(1, -1)])
    batched = torch.func.vmap(lambda t: MF.arc_margin(cos, t, 0.5, scale=2.0))(softs)
    looped = torch.stack([MF.arc_margin(cos, t, 0.5, scale=2.0) for t in softs])
    torch.testing.assert_close(batched, looped)


def test_per_sample_gradients_equal_a_loop(data) -> None:
    x, ws, y, soft = data
    w = ws[0]

    def loss(w, xi, yi, ti):
        return pipeline(xi[None], w, yi[None], ti[None])

    batched = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))(w, x, y, soft)
    looped = torch.stack([torch.func.grad(loss)(w, x[i], y[i], soft[i]) for i in range(N)])
    torch.testing.assert_close(batched, looped, rtol=1e-12, atol=1e-12)
    w_ = w.clone().requires_grad_(True)
    (autograd,) = torch.autograd.grad(loss(w_, x[1], y[1], soft[1]), w_)
    torch.testing.assert_close(batched[1], autograd, rtol=1e-12, atol=1e-12)


def test_grad_of_the_pipeline_equals_autograd(data) -> None:
    x, ws, y, soft = data
    w = ws[1].clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(pipeline(x, w, y, soft), w)
    torch.testing.assert_close(torch.func.grad(pipeline, argnums=1)(x, ws[1], y, soft), expected)


@pytest.mark.slow
def test_compile_fullgraph_equals_eager() -> None:
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(C * K, D, generator=g, requires_grad=True)
    y = torch.randint(0, C, (N,), generator=g)
    soft = torch.softmax(torch.randn(N, C, generator=g), -1)
    means = torch.randn(C, D, generator=g)

    def everything(x, w, y, soft, means):
        cos = MF.cosine_logits(x, w, K)
        new_scale = MF.adacos_scale(cos, y, scale=4.0)
        loss = pipeline(x, w, y, soft) + F.cross_entropy(MF.ncm_logits(x, means, new_scale), y)
        return loss, new_scale, MF.ncm_update(means, x, y, 0.9)

    eager = everything(x, w, y, soft, means)
    eager_grads = torch.autograd.grad(eager[0], (x, w))
    compiled = torch.compile(everything, fullgraph=True)(x, w, y, soft, means)
    compiled_grads = torch.autograd.grad(compiled[0], (x, w))
    for a, b in zip((*eager, *eager_grads), (*compiled, *compiled_grads)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# every function of the first row of docs/functional.md's table, under vmap (a batch of 2 problems) and compile
_CLAIMED = {
    "margin_logits": lambda c, y, t, x, n: MF.margin_logits(c, y, MF.COMBINED(1.2, 0.2, 0.1), scale=3.0),
    "curricular_margin": lambda c, y, t, x, n: MF.curricular_margin(c, y, 0.4, t=0.3, scale=3.0),
    "ada_margin": lambda c, y, t, x, n: MF.ada_margin(c, t, n, 0.4, mean=10.0, std=3.0, scale=3.0),
    "mag_margin": lambda c, y, t, x, n: MF.mag_margin(c, y, n, lower=1.0, upper=5.0, scale=3.0),
    "sphere_margin": lambda c, y, t, x, n: MF.sphere_margin(c, y, 3.0, lambda_=1.0, scale=3.0),
    "adacos_scale": lambda c, y, t, x, n: MF.adacos_scale(c, t, scale=4.0),
    "adaface_update": lambda c, y, t, x, n: torch.stack(MF.adaface_update(20.0, 100.0, n)),
    "curricular_update": lambda c, y, t, x, n: MF.curricular_update(0.1, c, y),
    "ncm_update": lambda c, y, t, x, n: MF.ncm_update(torch.ones(C, D, dtype=x.dtype), x, y, 0.9),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", _CLAIMED)
def test_the_documented_functions_run_under_vmap_and_compile(name) -> None:
    g = torch.Generator().manual_seed(9)
    x = torch.randn(2, N, D, generator=g, dtype=torch.float64)
    cos = torch.rand(2, N, C, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, C, (2, N), generator=g)
    soft = torch.softmax(torch.randn(2, N, C, generator=g, dtype=torch.float64), -1)
    norms = x.norm(dim=-1)
    fn = _CLAIMED[name]
    looped = torch.stack([fn(cos[i], y[i], soft[i], x[i], norms[i]) for i in range(2)])
    torch.testing.assert_close(torch.func.vmap(fn)(cos, y, soft, x, norms), looped, rtol=1e-12, atol=1e-12)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(cos[0], y[0], soft[0], x[0], norms[0]), looped[0], rtol=1e-12, atol=1e-12)


_TRANSFORMED: dict[str, Callable[[torch.Tensor, torch.Tensor], Any]] = {
    "mv-am-a": lambda c, y: MF.mv_margin(c, y, 0.35, t=0.2, scale=3.0),
    "mv-arc-f": lambda c, y: MF.mv_margin(c, y, 0.5, t=0.2, margin_type="arc", adaptive=False, scale=3.0),
    "npcface": lambda c, y: MF.npcface_margin(c, y, 0.5, scale=3.0),
    "arcneg": lambda c, y: MF.arcneg_margin(c, y, 0.5, scale=3.0),
    "circle": lambda c, y: MF.circle_margin(c, y, 0.25, scale=64.0),
    "circle-exact": lambda c, y: MF.circle_margin(c, y, 0.25, detach_weights=False, scale=64.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", _TRANSFORMED)
def test_vmap_and_compile_equal_eager(name) -> None:
    g = torch.Generator().manual_seed(9)
    cos = torch.rand(2, 5, 6, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, 6, (2, 5), generator=g)
    fn = _TRANSFORMED[name]
    looped = torch.stack([fn(cos[i], y[i]) for i in range(2)])
    torch.testing.assert_close(torch.func.vmap(fn)(cos, y), looped, rtol=1e-12, atol=1e-12)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(cos[0], y[0]), looped[0], rtol=1e-12, atol=1e-12)
    grad = torch.func.grad(lambda c: F.cross_entropy(fn(c, y[0]), y[0]))(cos[0])
    c = cos[0].clone().requires_grad_(True)
    (want,) = torch.autograd.grad(F.cross_entropy(fn(c, y[0]), y[0]), c)
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)
