"""A sharded head's random state travels in its state_dict: a resume on the same ranks draws what the uninterrupted
run draws (class sampling by block or by key, ElasticFace's margins), in one process here; on several ranks and
across world sizes in ``tests/nn/test_resharding.py``."""

from __future__ import annotations

import io

import pytest
import torch

import mll

D, C = 4, 60


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return torch.randn(5, D, generator=g, dtype=torch.float64), torch.randint(0, C, (5,), generator=g)


def steps(head: torch.nn.Module, first: int, count: int) -> list[torch.Tensor]:
    out = []
    for step in range(first, first + count):
        x, y = batch(step)
        loss = head.loss(x, y)
        loss.backward()
        out.append(torch.cat([loss.detach().reshape(1), head.weight.grad.abs().sum(1)]))
        head.weight.grad = None
    return out


def reloaded(head: torch.nn.Module, make) -> torch.nn.Module:
    saved = io.BytesIO()
    torch.save(head.state_dict(), saved)
    fresh = make()
    fresh.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    return fresh


MAKERS = {
    "block": lambda: mll.ShardedArcFace(D, C, sample_rate=0.2, dtype=torch.float64),
    "block-own-generator": lambda: mll.ShardedCosFace(
        D, C, sample_rate=0.2, generator=torch.Generator().manual_seed(3), dtype=torch.float64
    ),
    "class": lambda: mll.ShardedArcFace(D, C, sample_rate=0.2, sampling="class", dtype=torch.float64),
    "elastic-block": lambda: mll.ShardedElasticArcFace(
        D, C, sample_rate=0.2, generator=torch.Generator().manual_seed(5), dtype=torch.float64
    ),
    "elastic-class": lambda: mll.ShardedElasticCosFace(
        D, C, sample_rate=0.3, sampling="class", generator=torch.Generator().manual_seed(5), dtype=torch.float64
    ),
}


@pytest.mark.parametrize("name", MAKERS)
def test_a_resume_from_the_state_dict_draws_what_the_uninterrupted_run_draws(name) -> None:
    make = MAKERS[name]
    torch.manual_seed(0)
    head = make()
    steps(head, 0, 2)
    torch.manual_seed(1)  # another global state: the resumed head must not depend on it
    resumed = reloaded(head, make)
    want, got = steps(head, 2, 3), steps(resumed, 2, 3)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # the samples did change from step to step (the test would pass with a sampler stuck on one draw otherwise)
    assert len({tuple((w[1:] > 0).tolist()) for w in want}) > 1


def test_the_state_dict_holds_the_random_state_only_where_there_is_one() -> None:
    assert set(mll.ShardedArcFace(D, C).state_dict()) == {"weight", "scale", "class_range"}
    assert "sampling_generator" in mll.ShardedArcFace(D, C, sample_rate=0.5).state_dict()
    counter = mll.ShardedArcFace(D, C, sample_rate=0.5, sampling="class").state_dict()["sampling_counter"]
    assert counter.dtype == torch.int64 and counter.shape == (2,) and counter[1] == 0
    elastic = mll.ShardedElasticArcFace(D, C, generator=torch.Generator().manual_seed(0)).state_dict()
    assert elastic["generator"].dtype == torch.uint8 and "sampling_generator" not in elastic
    assert "generator" not in mll.ShardedElasticArcFace(D, C).state_dict()  # the global generator is not the head's


def test_a_checkpoint_without_random_state_loads_and_the_head_keeps_its_own() -> None:
    head = mll.ShardedArcFace(D, C, sample_rate=0.2, sampling="class")
    head.sampling_step = 7
    old = {k: v for k, v in head.state_dict().items() if k != "sampling_counter"}  # as saved before 0.3
    twin = mll.ShardedArcFace(D, C, sample_rate=0.2, sampling="class")
    twin.load_state_dict(old)
    assert twin.sampling_step == 0 and torch.equal(twin.weight, head.weight)


def test_a_state_of_the_other_rule_is_refused_and_a_head_without_sampling_ignores_it() -> None:
    by_block = mll.ShardedArcFace(D, C, sample_rate=0.2).state_dict()
    by_key = mll.ShardedArcFace(D, C, sample_rate=0.2, sampling="class").state_dict()
    with pytest.raises(ValueError, match=r"holds the random state of sampling='block', but this ShardedArcFace"):
        mll.ShardedArcFace(D, C, sample_rate=0.2, sampling="class").load_state_dict(by_block)
    with pytest.raises(ValueError, match=r"holds the random state of sampling='class'"):
        mll.ShardedArcFace(D, C, sample_rate=0.2).load_state_dict(by_key)
    plain = mll.ShardedArcFace(D, C)
    plain.load_state_dict(by_key)  # sampling turned off on resume: nothing to draw
    assert torch.equal(plain.weight, by_key["weight"])


def test_dense_state_dict_leaves_the_random_state_out() -> None:
    shards = [mll.ShardedElasticArcFace(D, C, class_range=r, sample_rate=0.5, generator=torch.Generator())
              for r in ((0, 20), (20, C))]  # fmt: skip
    dense = mll.ElasticArcFace(D, C)
    dense.load_state_dict(mll.nn.dense_state_dict([s.state_dict() for s in shards]))
    assert torch.equal(dense.weight, torch.cat([s.weight for s in shards]).detach())


def test_the_sampling_argument_is_checked_and_shown() -> None:
    with pytest.raises(ValueError, match=r"sampling must be 'block' .* or 'class' .*, but got 'rows'"):
        mll.ShardedArcFace(D, C, sample_rate=0.5, sampling="rows")
    assert "sampling='class'" in repr(mll.ShardedArcFace(D, C, sample_rate=0.5, sampling="class"))
    assert "sampling" not in repr(mll.ShardedArcFace(D, C, sample_rate=0.5))


def test_class_sampling_keeps_the_keyed_sample_of_each_training_step() -> None:
    """Step t of training keeps exactly ``sample_classes_by_key(..., step=t)``; eval mode neither samples nor counts."""
    head = mll.ShardedArcFace(D, C, sample_rate=0.2, sampling="class", dtype=torch.float64)
    for step in range(3):
        head.eval()
        head.loss(*batch(9))
        head.train()
        x, y = batch(step)
        head.loss(x, y).backward()
        positive = torch.zeros(C, dtype=torch.bool).index_fill_(0, y, True)
        kept = mll.functional.sample_classes_by_key(positive, 0.2, class_start=0, seed=head.sampling_seed, step=step)
        assert torch.equal(head.weight.grad.abs().sum(1).nonzero().squeeze(1), kept)
        assert head.sampling_step == step + 1
        head.weight.grad = None
