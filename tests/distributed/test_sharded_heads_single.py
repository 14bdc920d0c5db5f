"""Every head's sharded form in one process (no process group, or a group of one): the dense head's loss, logits
and state; blocks cut with ``from_dense`` reassemble with ``dense_state_dict``; and the cells the sharded forms
refuse say why. The multi-process exactness is in ``test_sharded.py::test_every_head_shards_exactly``."""

from __future__ import annotations

import copy

import pytest
import torch

import mll
from mll import functional as MF
from tests.conftest import exported_heads
from tests.distributed import sharded_heads as SH

TOL = {"rtol": 1e-10, "atol": 1e-10}
DENSE_NAMES = sorted({case.head for case in SH.HEAD_CASES})
HARD = [case for case in SH.HEAD_CASES if case.target == "hard"]  # one per configuration


def test_every_exported_head_has_a_sharded_form() -> None:
    heads = set(exported_heads(sharded=False))
    assert heads == set(DENSE_NAMES)
    for name in heads:
        sharded = getattr(mll, "Sharded" + name)
        assert sharded is getattr(mll.nn, "Sharded" + name) and issubclass(sharded, getattr(mll, name))
        assert sharded.dense is getattr(mll, name)


@pytest.mark.parametrize("case", SH.HEAD_CASES, ids=[case.name for case in SH.HEAD_CASES])
def test_a_world_of_one_is_the_dense_head(case) -> None:
    dense, twin = SH.dense_head(case), SH.dense_head(case)
    gen = {"generator": SH.elastic_generator()} if "Elastic" in case.head else {}
    shard = getattr(mll, "Sharded" + case.head).from_dense(twin, **gen)
    if "Elastic" in case.head:  # ElasticFace: the same generator state, the same draws
        dense.generator = SH.elastic_generator()
    assert (shard.class_start, shard.class_stop) == (0, SH.C)
    for step in range(SH.STEPS + 1):
        data = SH.batch(case, 2, step)
        for head in (dense, shard):
            head.train(step < SH.STEPS)
        xs = [data["x"].clone().requires_grad_(True) for _ in range(2)]
        got = shard.loss(xs[0], SH.target_of(case, data, slice(None)), reduction=case.reduction)
        want = dense.loss(xs[1], SH.dense_target(case, data), reduction=case.reduction)
        torch.testing.assert_close(got, want, **TOL)
        (got.sum() * 1.0).backward()
        want.sum().backward()
        torch.testing.assert_close(xs[0].grad, xs[1].grad, **TOL)
        for a, b in zip(SH.trainable(shard), SH.trainable(dense)):
            torch.testing.assert_close(a.grad, b.grad, **TOL)
        merged = mll.nn.dense_state_dict([shard.state_dict()])
        for key, value in dense.state_dict().items():
            torch.testing.assert_close(merged[key], value, **TOL)
    # head(x): this rank's block of logits (here all of them), the dense head's eval-mode logits, no change of state
    state = {k: v.clone() for k, v in shard.state_dict().items()}
    shard.train()
    x = SH.batch(case, 2, 0)["x"]
    torch.testing.assert_close(shard(x), dense.eval()(x), **TOL)
    assert all(torch.equal(v, shard.state_dict()[k]) for k, v in state.items())


@pytest.mark.parametrize("case", HARD, ids=[case.name for case in HARD])
def test_from_dense_blocks_reassemble(case) -> None:
    dense = SH.dense_head(case)
    cls = getattr(mll, "Sharded" + case.head)
    ranges = [(6, 9), (0, 0), (0, 4), (4, 6)]
    shards = [cls.from_dense(dense, class_range=r) for r in ranges]
    k = getattr(dense, "num_sub_centers", 1)
    assert [s.rows().shape[0] for s in shards] == [3 * k, 0, 4 * k, 2 * k]
    assert "class_range=[4, 6)" in repr(shards[3])
    merged = mll.nn.dense_state_dict([s.state_dict() for s in shards])
    fresh = SH.dense_head(case)
    with torch.no_grad():
        for tensor in fresh.state_dict().values():
            tensor.zero_() if tensor.is_floating_point() else None
    fresh.load_state_dict(merged)
    for key, value in dense.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    options = shards[0].options()
    assert options.keys() == dense.options().keys()
    for name, value in dense.options().items():
        assert torch.equal(options[name], value) if isinstance(value, torch.Tensor) else options[name] == value


def test_refused_cells_say_why() -> None:
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    pair = (torch.stack([y, (y + 1) % 9], 1), torch.full((4, 2), 0.5))
    with pytest.raises(ValueError, match=r"ShardedCurricularFace.loss needs class indices \(\*\) in training mode"):
        mll.ShardedCurricularFace(5, 9).loss(x, pair)
    elastic = mll.ShardedElasticArcFace(5, 9, margin=torch.full((9,), 0.4))
    with pytest.raises(ValueError, match=r"per-class margins takes class indices"):
        elastic.loss(x, torch.full((4, 9), 1 / 9))
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'num_sub_centers'"):
        mll.ShardedDeepNCM(5, 9, num_sub_centers=2)  # DeepNCM has no sub-centers, sharded or not
    # eval mode reads no statistics: pairs are fine there
    head = mll.ShardedCurricularFace(5, 9, dtype=torch.float64).eval()
    xd = x.double()
    want = head.loss(xd, y)
    got = head.loss(xd, (y.unsqueeze(1), torch.ones(4, 1, dtype=torch.float64)))
    torch.testing.assert_close(got, want, **TOL)


def test_heads_share_one_sharded_body() -> None:
    assert MF.sharded_margin_cross_entropy is mll.functional.sharded_margin_cross_entropy
    bodies = {getattr(mll, "Sharded" + name).loss_terms for name in DENSE_NAMES}
    # the shared one, MagFace's (adds its regulariser), DeepNCM's (updates its means), ProxyAnchor's (not a
    # cross-entropy: sharded_proxy_anchor_loss), and one per zoo head that adds a regulariser or, L-Softmax, uses the
    # features and weights un-normalised
    zoo = {"AdaMSoftmax", "SoftTriple", "LargeMarginSoftmax"}
    assert len(bodies) == 4 + len(zoo)


def test_loss_under_inference_mode() -> None:
    """A validation loop under torch.inference_mode: no graph, no .grad to accumulate into, a loss all the same."""
    x, y = torch.randn(4, 5), torch.tensor([0, 1, 2, 8])
    for head in (mll.ArcFace(5, 9), mll.ShardedArcFace(5, 9), mll.ShardedAdaCos(5, 9)):
        twin = copy.deepcopy(head)  # AdaCos's scale moves with each training call
        with torch.no_grad():
            want = head.loss(x, y)
        with torch.inference_mode():
            got = twin.loss(x, y)
        torch.testing.assert_close(got, want)


def test_sharded_magface_with_a_norm_that_overflows() -> None:
    """Finite entries whose norm is inf: the regulariser's gradient hook keeps the sharded loss equal to the dense."""
    torch.manual_seed(0)
    dense = mll.MagFace(5, 9)
    shard = mll.ShardedMagFace.from_dense(dense, feature_grad_scale=2.0)
    x = torch.randn(3, 5) * 40
    x[0] = 3e38
    y = torch.tensor([0, 4, 8])
    torch.testing.assert_close(shard.loss(x, y), dense.loss(x, y), equal_nan=True)
    assert torch.isfinite(dense.loss(x[1:], y[1:]))
    xs, xd = x[1:].clone().requires_grad_(), x[1:].clone().requires_grad_()
    shard.loss(xs, y[1:]).backward()
    dense.loss(xd, y[1:]).backward()
    torch.testing.assert_close(xs.grad, 2.0 * xd.grad)  # feature_grad_scale applies to the regulariser's part too


ONE_PER_HEAD = list({case.head: case for case in HARD}.values())


@pytest.mark.parametrize("case", ONE_PER_HEAD, ids=[case.head for case in ONE_PER_HEAD])
def test_sharded_loss_under_bf16_autocast_is_the_float32_loss(case) -> None:
    """The sharded loss under CPU bf16 autocast: finite, parameters and gradients keep their dtypes, and within bf16's
    precision of the same head's float32 loss (the kernel accumulates its softmax statistics in float32)."""
    gen = {"generator": torch.Generator().manual_seed(3)} if "Elastic" in case.head else {}
    shards = [getattr(mll, "Sharded" + case.head).from_dense(SH.dense_head(case).float(), **gen) for _ in range(2)]
    data = SH.batch(case, 2, 0)
    target = SH.target_of(case, data, slice(None))
    kwargs = {}
    if "Elastic" in case.head:  # the same margins for both
        kwargs["margins"] = shards[0].sample_margins(data["x"].float(), SH.dense_target(case, data)).float()
    xs = [data["x"].float().requires_grad_(True) for _ in shards]
    want = shards[0].loss(xs[0], target, reduction=case.reduction, **kwargs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = shards[1].loss(xs[1], target, reduction=case.reduction, **kwargs)
    assert got.dtype == torch.float32 and torch.isfinite(got).all()
    torch.testing.assert_close(got, want.detach(), rtol=3e-2, atol=3e-2 * max(1.0, float(want.detach().abs().max())))
    got.sum().backward()
    want.sum().backward()
    assert xs[1].grad.dtype == torch.float32 and torch.isfinite(xs[1].grad).all()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=0.1, atol=0.05 * float(xs[0].grad.abs().max()))
    for p, q in zip(SH.trainable(shards[1]), SH.trainable(shards[0])):
        assert p.dtype == q.dtype == torch.float32
        assert p.grad is not None and p.grad.dtype == p.dtype and torch.isfinite(p.grad).all()
