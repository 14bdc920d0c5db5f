"""The proxy heads (``ProxyNCAPlusPlus``, ``ProxyAnchor``) through the battery every head runs: module == functional,
eval without labels, state, ``functional_call``, gradcheck, autocast and half precision at cos = ±1, transforms,
host reads, errors. Their every-scale checks (``loss()`` == the dense loss) are in ``tests/nn/test_loss.py`` and the
sharded ones in ``tests/distributed/sharded_heads.py``."""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

import mll
from mll import functional as MF

D, C, K = 6, 5, 3
ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]

# name -> (constructor, the dense loss of the head on (x, y) from the functional core, the eval logits' scale)
HEADS: dict[str, tuple[Callable[..., Any], Callable[..., torch.Tensor], Callable[[Any], float]]] = {
    "ProxyNCAPlusPlus": (
        lambda k=K, **kw: mll.ProxyNCAPlusPlus(D, C, k, softmax_temperature=0.25, **kw),
        lambda h, x, y: F.cross_entropy(MF.proxy_nca_logits(h.cosine(x), softmax_temperature=0.25), y),
        lambda h: 8.0,
    ),
    "ProxyAnchor": (
        lambda k=K, **kw: mll.ProxyAnchor(D, C, k, alpha=16.0, delta=0.2, **kw),
        lambda h, x, y: MF.proxy_anchor_loss(h.cosine(x), y, alpha=16.0, delta=0.2),
        lambda h: 16.0,
    ),
}
HARD_ONLY = {"ProxyAnchor"}


def batch(n: int = 8, dtype: torch.dtype = torch.float32, soft: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=dtype)
    y = torch.randint(0, C, (n,), generator=g)
    if soft:
        return x, torch.softmax(torch.randn(n, C, generator=g, dtype=dtype), -1)
    return x, y


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("training", [True, False])
def test_forward_is_the_scaled_cosine_and_needs_no_labels(name, training) -> None:
    make, _, scale = HEADS[name]
    head = make(dtype=torch.float64).train(training)
    x, y = batch(dtype=torch.float64)
    want = MF.cosine_logits(x, head.weight, K) * scale(head)
    torch.testing.assert_close(head(x), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head(x, y), want, rtol=1e-12, atol=1e-12)  # labels accepted, ignored


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("k", [1, K])
@pytest.mark.parametrize("soft", [False, True])
def test_loss_is_the_dense_loss(name, k, soft) -> None:
    """``loss()`` over chunks of 2 classes == the dense loss from the functional core, value and gradients."""
    if soft and name in HARD_ONLY:
        pytest.skip("class indices only")
    make, dense_loss, _ = HEADS[name]
    head = make(k, dtype=torch.float64)
    x, y = batch(dtype=torch.float64, soft=soft)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    got = head.loss(xs[0], y, chunk_size=2)
    want = dense_loss(head, xs[1], y)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(got, [xs[0], head.weight]), torch.autograd.grad(want, [xs[1], head.weight])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", HEADS)
def test_gradcheck_of_the_loss(name) -> None:
    """Both paths, float64, features and proxies."""
    make, dense_loss, _ = HEADS[name]
    head = make(dtype=torch.float64)
    x, y = batch(n=5, dtype=torch.float64)
    x.requires_grad_(True)
    w = head.weight.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: _swap(head, w).loss(x, y, chunk_size=2), (x, w))
    assert torch.autograd.gradcheck(lambda x, w: dense_loss(_swap(head, w), x, y), (x, w))


def _swap(head: Any, w: torch.Tensor) -> Any:
    twin = copy.deepcopy(head)
    del twin.weight
    twin.weight = w
    return twin


@pytest.mark.parametrize("name", HEADS)
def test_state_dict_functional_call_and_repr(name) -> None:
    make, _, _ = HEADS[name]
    head, fresh = make(), make()
    fresh.load_state_dict(head.state_dict())
    x, _ = batch()
    torch.testing.assert_close(fresh.eval()(x), head.eval()(x))
    other = make().eval()
    state = {**dict(other.named_parameters()), **dict(other.named_buffers())}
    torch.testing.assert_close(torch.func.functional_call(head, state, (x,)), other(x))
    text = repr(head)
    assert f"in_features={D}" in text and f"out_features={C}" in text and f"num_sub_centers={K}" in text


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("training", [True, False])
def test_leading_dimensions(name, training) -> None:
    make, _, _ = HEADS[name]
    head = make().train(training)
    x, y = torch.randn(2, 4, D), torch.randint(0, C, (2, 4))
    out = head(x, y)
    assert out.shape == (2, 4, C)
    torch.testing.assert_close(out.reshape(8, C), head(x.reshape(8, D)))
    torch.testing.assert_close(head.loss(x, y), head.loss(x.reshape(8, D), y.reshape(8)))


@pytest.mark.parametrize("name", HEADS)
def test_bad_input_names_the_argument(name) -> None:
    head = HEADS[name][0]()
    with pytest.raises(ValueError, match=rf"input must have shape \(\*, {D}\)"):
        head.loss(torch.randn(4, D + 1), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"labels must hold class indices in \[0, {C}\), but got values from 0 to"):
        head.loss(torch.randn(4, D), torch.tensor([0, 1, 2, C]))
    with pytest.raises(ValueError, match=r"labels must be class indices of shape \(4\)"):
        head.loss(torch.randn(4, D), torch.tensor([0, 1]))


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_finite_at_cos_plus_minus_one(name, dtype) -> None:
    """Features equal and opposite to a proxy (cos = ±1) and a zero feature: finite logits, loss and gradients on
    both paths, in every dtype."""
    make, dense_loss, _ = HEADS[name]
    head = make(dtype=dtype)
    with torch.no_grad():
        head.weight[K : 2 * K] = head.weight[K]  # class 1's proxies coincide, so its pooled cosine reaches −1
    rows = head.weight.detach()
    x = torch.stack([rows[0], -rows[K], torch.zeros(D, dtype=dtype), rows[2 * K]]).requires_grad_(True)
    y = torch.tensor([0, 1, 2, 2])
    cos = MF.cosine_logits(x.detach().double(), rows.double(), K)
    assert cos[0, 0] > 0.99 and cos[1, 1] < -0.99
    out = head(x, y)
    assert out.dtype == dtype and torch.isfinite(out).all()
    for loss in (head.loss(x, y, chunk_size=2), dense_loss(head, x, y)):
        gx, gw = torch.autograd.grad(loss, [x, head.weight])
        assert torch.isfinite(loss) and torch.isfinite(gx).all() and torch.isfinite(gw).all(), (loss, gx, gw)


@pytest.mark.parametrize("name", HEADS)
def test_autocast_keeps_dtypes_and_is_within_bf16_of_float32(name) -> None:
    make, _, _ = HEADS[name]
    heads = [make(), make()]
    heads[1].load_state_dict(heads[0].state_dict())
    x, y = batch()
    xs = [x.clone().requires_grad_(True) for _ in heads]
    want = heads[0].loss(xs[0], y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = heads[1].loss(xs[1], y)
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got, want.detach(), rtol=3e-2, atol=3e-2)
    got.backward()
    want.backward()
    assert xs[1].grad.dtype == x.dtype and heads[1].weight.grad.dtype == torch.float32
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=0.1, atol=0.05 * float(xs[0].grad.abs().max()))


@pytest.mark.slow
@pytest.mark.parametrize("name", HEADS)
def test_compile_and_func_grad(name) -> None:
    """The forward compiles with ``fullgraph=True``; ``loss()`` compiles and runs under ``torch.func.grad``."""
    make, _, _ = HEADS[name]
    head = make(dtype=torch.float64)
    x, y = batch(dtype=torch.float64)
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), head(x), rtol=1e-12, atol=1e-12)
    loss = torch.compile(lambda a: head.loss(a, y, chunk_size=2), backend="aot_eager")
    torch.testing.assert_close(loss(x), head.loss(x, y, chunk_size=2), rtol=1e-12, atol=1e-12)
    grad = torch.func.grad(lambda a: head.loss(a, y, chunk_size=2))(x)
    xr = x.clone().requires_grad_(True)
    torch.testing.assert_close(grad, torch.autograd.grad(head.loss(xr, y, chunk_size=2), xr)[0], rtol=1e-12, atol=0)


# ---------------------------------------------------------------------------------------------- ProxyNCA++


def test_proxy_nca_sharded_form_in_one_process() -> None:
    head = mll.ProxyNCAPlusPlus(D, C, 2, softmax_temperature=0.2, pooling="soft", dtype=torch.float64)
    shard = mll.ShardedProxyNCAPlusPlus.from_dense(head)
    assert shard.softmax_temperature == 0.2 and shard.pooling == "soft" and shard.num_sub_centers == 2
    x, y = batch(dtype=torch.float64)
    torch.testing.assert_close(shard.loss(x, y), head.loss(x, y), rtol=1e-12, atol=1e-12)


def test_proxy_nca_fast_moving_proxies_are_a_parameter_group() -> None:
    """The docstring's recipe: the proxies in their own group with a far larger learning rate."""
    backbone = torch.nn.Linear(3, D)
    head = mll.ProxyNCAPlusPlus(D, C)
    opt = torch.optim.Adam([{"params": backbone.parameters()}, {"params": head.parameters(), "lr": 4e2}], lr=4e-3,
                           eps=1.0)  # fmt: skip
    x, y = torch.randn(8, 3), torch.randint(0, C, (8,))
    before = head.weight.detach().clone()
    head.loss(backbone(x), y).backward()
    opt.step()
    assert [g["lr"] for g in opt.param_groups] == [4e-3, 4e2]
    assert not torch.equal(head.weight, before)


# ---------------------------------------------------------------------------------------------- Proxy-Anchor


def test_proxy_anchor_loss_is_the_same_in_eval_mode_and_takes_mean_only() -> None:
    head = mll.ProxyAnchor(D, C, dtype=torch.float64)
    x, y = batch(dtype=torch.float64)
    train = head.loss(x, y)
    torch.testing.assert_close(head.eval().loss(x, y), train, rtol=0, atol=0)
    with torch.inference_mode():  # a validation loop: no graph, the same number
        torch.testing.assert_close(head.loss(x, y), train.detach(), rtol=0, atol=0)
    for training in (True, False):
        head.train(training)
        with pytest.raises(ValueError, match=r"ProxyAnchor's loss is one number for the batch .* reduction must be "
                                             r"'mean', but got 'none'"):  # fmt: skip
            head.loss(x, y, reduction="none")
        with pytest.raises(ValueError, match=r"ProxyAnchor needs class indices"):
            head.loss(x, torch.softmax(torch.randn(8, C, dtype=torch.float64), 1))


def test_proxy_anchor_defaults_are_the_papers() -> None:
    head = mll.ProxyAnchor(D, C)
    assert (head.alpha, head.delta) == (32.0, 0.1)
    assert "alpha=32, delta=0.1" in repr(head)
    with pytest.raises(ValueError, match=r"Proxy-Anchor alpha must be a positive finite float"):
        mll.ProxyAnchor(D, C, alpha=-1.0)
    with pytest.raises(ValueError, match=r"Proxy-Anchor delta must be a finite float >= 0"):
        mll.ProxyAnchor(D, C, delta=float("nan"))


def test_sharded_proxy_anchor_in_one_process_and_its_refusals() -> None:
    head = mll.ProxyAnchor(D, C, 2, alpha=20.0, delta=0.15, pooling="soft", dtype=torch.float64)
    shard = mll.ShardedProxyAnchor.from_dense(head)
    assert (shard.alpha, shard.delta, shard.pooling, shard.num_sub_centers) == (20.0, 0.15, "soft", 2)
    x, y = batch(dtype=torch.float64)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    got, want = shard.loss(xs[0], y, chunk_size=2), head.loss(xs[1], y)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, [xs[0], shard.weight]), torch.autograd.grad(want, [xs[1], head.weight])):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(shard(x), head(x), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match=r"ShardedProxyAnchor samples no classes: sample_rate must be 1.0"):
        mll.ShardedProxyAnchor(D, C, sample_rate=0.5)
    with pytest.raises(ValueError, match=r"reduction must be 'mean'"):
        shard.loss(x, y, reduction="sum")


def test_proxy_anchor_training_step_reads_nothing_from_the_device() -> None:
    """As tests/test_host_syncs.py counts them, for the dense and chunked paths with K = 2 (K = 1 runs there)."""
    from tests.test_host_syncs import HostReads

    head = mll.ProxyAnchor(D, C, 2)
    y = torch.randint(0, C, (8,))
    with MF.value_checks(False), HostReads() as reads:
        x = torch.randn(8, D, requires_grad=True)
        MF.proxy_anchor_loss(head.cosine(x), y).backward()
        head.loss(x, y).backward()
    assert sum(reads.count.values()) == 0


def test_proxy_anchor_warns_where_its_logits_would_meet_a_cross_entropy() -> None:
    """``F.cross_entropy(head(x, y), y)`` runs silently for ProxyAnchor but is not its loss: labels in training mode
    warn and name ``head.loss``; no labels, or eval mode, do not."""
    head = mll.ProxyAnchor(D, C)
    x, y = torch.randn(4, D), torch.randint(0, C, (4,))
    with pytest.warns(UserWarning, match=r"ProxyAnchor\(input, labels\) returns α·cos θ and ignores the labels: .*"
                      r"head\.loss\(input, labels\)"):  # fmt: skip
        logits = head(x, y)
    torch.testing.assert_close(logits, head.alpha * mll.functional.cosine_logits(x, head.weight))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        head(x)
        head.eval()(x, y)
