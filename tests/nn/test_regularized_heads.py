"""The heads whose objective is not the plain cross-entropy of their own cosine logits — AdaM-Softmax and SoftTriple
add a regulariser, L-Softmax's logits are not cosines — through the battery every head runs, on their objective:
gradcheck of a training step, ``loss()`` == the dense objective with every reduction, hard labels == one-hot soft
labels, eval mode, state and ``functional_call``, compile and ``torch.func``, half precision at cos = ±1, autocast,
errors, the sharded form in a world of one. Each head's own tests (its paper, its authors' code) are in
``tests/nn/test_adaptive_margin.py``, ``tests/nn/test_soft_triple.py`` and ``tests/nn/test_large_margin.py``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

import mll
from mll import functional as MF
from tests.nn.regularized_heads import ZOO, C, D, batch, eval_logits, regularizer


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("soft", [False, True])
def test_gradcheck_dense_training_step(name, soft) -> None:
    head = ZOO[name](dtype=torch.float64)
    x, y = batch(soft=soft)
    names = [n for n, p in head.named_parameters() if p.requires_grad]
    params = [p.detach().clone().requires_grad_(True) for n, p in head.named_parameters() if p.requires_grad]

    def f(x, *ps):
        return F.cross_entropy(torch.func.functional_call(head, dict(zip(names, ps)), (x, y)), y)

    assert torch.autograd.gradcheck(f, (x.requires_grad_(True), *params))


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("target", ["indices", "soft"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunked_equals_dense(name, target, reduction) -> None:
    head = ZOO[name](dtype=torch.float64)
    twin = copy.deepcopy(head)
    x, y = batch(n=6, soft=target == "soft")
    given_, dense_y = y, y
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    got = head.loss(xs[0], given_, reduction=reduction, chunk_size=2)
    ce = F.cross_entropy(twin(xs[1], dense_y), dense_y, reduction="none")
    rows = ce + regularizer(twin)
    want = rows if reduction == "none" else (rows.sum() if reduction == "sum" else rows.mean())
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    ps = [p for p in head.parameters() if p.requires_grad]
    qs = [p for p in twin.parameters() if p.requires_grad]
    for a, b in zip(torch.autograd.grad(got.sum(), [xs[0], *ps]), torch.autograd.grad(want.sum(), [xs[1], *qs])):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", ZOO)
def test_hard_labels_equal_one_hot_soft_labels(name) -> None:
    head = ZOO[name](dtype=torch.float64)
    x, y = batch()
    onehot = F.one_hot(y, C).double()
    torch.testing.assert_close(head(x, y), head(x, onehot), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(head.loss(x, y), head.loss(x, onehot), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ZOO)
def test_eval_mode_needs_no_labels_and_changes_nothing(name) -> None:
    head = ZOO[name]().eval()
    x, y = batch(dtype=torch.float32)
    state = {k: v.clone() for k, v in head.state_dict().items()}
    out = head(x)
    torch.testing.assert_close(head(x, y), out)
    torch.testing.assert_close(out, eval_logits(head, x))
    for k, v in head.state_dict().items():
        assert torch.equal(v, state[k]), k
    with pytest.raises(ValueError, match=rf"{name} needs labels in training mode"):
        head.train()(x)


@pytest.mark.parametrize("name", ZOO)
def test_state_dict_functional_call_and_leading_dims(name) -> None:
    head, fresh = ZOO[name](), ZOO[name]()
    with torch.no_grad():
        fresh.weight.normal_()
    x, y = batch(dtype=torch.float32)
    head.loss(x, y).backward()
    fresh.load_state_dict(head.state_dict())
    torch.testing.assert_close(fresh(x, y), head(x, y))
    state = {**dict(fresh.named_parameters()), **dict(fresh.named_buffers())}
    other = ZOO[name]()
    torch.testing.assert_close(torch.func.functional_call(other, state, (x, y)), head(x, y))
    x3, y3 = torch.randn(2, 3, D), torch.randint(0, C, (2, 3))
    torch.testing.assert_close(head(x3, y3).reshape(6, C), head(x3.reshape(6, D), y3.reshape(6)))
    torch.testing.assert_close(head.loss(x3, y3, reduction="none").reshape(6), head.loss(x3.reshape(6, D),
                               y3.reshape(6), reduction="none"))  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_compile_and_func_grad_equal_eager(name) -> None:
    head = ZOO[name](dtype=torch.float64)
    x, y = batch()
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, y), head(x, y), rtol=1e-12, atol=1e-12)
    names = [n for n, p in head.named_parameters() if p.requires_grad]
    params = {n: p.detach().clone() for n, p in head.named_parameters() if p.requires_grad}

    def f(ps):
        return F.cross_entropy(torch.func.functional_call(head, ps, (x, y)), y)

    grads = torch.func.grad(f)(params)
    want = torch.autograd.grad(f({n: p.requires_grad_(True) for n, p in params.items()}), list(params.values()))
    for n, g in zip(names, want):
        torch.testing.assert_close(grads[n], g, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ZOO)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_finite_at_cos_plus_minus_one(name, dtype) -> None:
    head = ZOO[name](dtype=dtype)
    k = head.num_sub_centers
    with torch.no_grad():
        head.weight[k : 2 * k] = head.weight[k]
    w = head.weight.detach()
    x = torch.stack([w[0], -w[k], torch.zeros(D, dtype=dtype)]).requires_grad_(True)
    y = torch.tensor([0, 1, 2])
    out = head(x, y)
    F.cross_entropy(out.float(), y).backward()
    assert out.dtype == dtype and torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    x.grad = None
    loss = head.loss(x, y)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in head.parameters())


@pytest.mark.parametrize("name", ZOO)
def test_bf16_autocast_keeps_dtypes_and_is_near_float32(name) -> None:
    heads = [ZOO[name]() for _ in range(2)]
    heads[1].load_state_dict(heads[0].state_dict())
    x, y = batch(n=8, dtype=torch.float32)
    xs = [x.clone().requires_grad_(True) for _ in heads]
    want = heads[0].loss(xs[0], y)
    dtypes = {k: v.dtype for k, v in heads[1].state_dict().items()}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = heads[1].loss(xs[1], y)
        dense = F.cross_entropy(heads[1](x, y).float(), y) + regularizer(heads[1])
    assert got.dtype == torch.float32 and torch.isfinite(got)
    torch.testing.assert_close(got, want.detach(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(dense, want.detach(), rtol=3e-2, atol=3e-2)
    got.backward()
    assert {k: v.dtype for k, v in heads[1].state_dict().items()} == dtypes
    assert all(
        p.grad is None or (p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()) for p in heads[1].parameters()
    )


@pytest.mark.parametrize("name", ZOO)
def test_bad_labels_and_features_name_the_argument(name) -> None:
    head = ZOO[name]()
    x, _ = batch(dtype=torch.float32)
    with pytest.raises(ValueError, match=rf"labels must hold class indices in \[0, {C}\)"):
        head(x, torch.tensor([0, 1, 2, C]))
    with pytest.raises(ValueError, match=rf"labels must hold class indices in \[0, {C}\)"):
        head.loss(x, torch.tensor([0, 1, 2, C]))
    with pytest.raises(ValueError, match=rf"input must have shape \(\*, {D}\)"):
        head(torch.randn(4, D + 1), torch.zeros(4, dtype=torch.long))


@pytest.mark.parametrize("name", ZOO)
def test_sharded_world_of_one_and_blocks(name) -> None:
    head = ZOO[name](dtype=torch.float64)
    sharded = getattr(mll, "Sharded" + name)
    shard = sharded.from_dense(copy.deepcopy(head))
    x, y = batch(n=6)
    torch.testing.assert_close(shard.loss(x, y), head.loss(x, y), rtol=1e-12, atol=1e-12)
    blocks = [sharded.from_dense(head, class_range=r) for r in ((0, 2), (2, C))]
    merged = mll.nn.dense_state_dict([b.state_dict() for b in blocks])
    assert all(torch.equal(merged[k], v) for k, v in head.state_dict().items())
    assert "class_range=[2, 5)" in repr(blocks[1])


def test_every_zoo_head_is_exported_with_its_sharded_form() -> None:
    for name in ZOO:
        assert name in mll.__all__ and f"Sharded{name}" in mll.__all__
        assert getattr(mll, f"Sharded{name}").dense is getattr(mll, name)


def test_math_constant_names() -> None:
    assert MF.ADAPTIVE.title == "AdaM-Softmax" and math.isclose(MF.ADAPTIVE.target_logit(0.0, 0.3), 0.7)
