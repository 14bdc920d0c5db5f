"""The class sample keyed by (seed, step, class): the same classes on any split of the classes over the ranks."""

from __future__ import annotations

import pytest
import torch

from mll import functional as MF
from mll.functional.sharding import class_uniforms

M32 = 0xFFFFFFFF


def mix32(x: int) -> int:
    """The 32-bit hash in plain Python integers (an independent reference: arbitrary precision, then mod 2**32)."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & M32
    return x ^ (x >> 16)


def uniform(seed: int, step: int, c: int) -> float:
    k = mix32(seed & M32)
    for part in ((seed >> 32) & M32, step & M32, (step >> 32) & M32):
        k = mix32(k ^ part)
    return (mix32(mix32((c & M32) ^ k) ^ ((c >> 32) & M32)) + 0.5) / 2**32


def test_the_uniforms_are_the_hash_of_seed_step_and_class() -> None:
    classes = torch.tensor([0, 1, 2, 77, 2**31 - 1, 2**32 + 5, 10**12])
    for seed, step in ((0, 0), (2**52 - 1, 3), (123456789, 2**33 + 1)):
        want = torch.tensor([uniform(seed, step, int(c)) for c in classes], dtype=torch.float64)
        assert torch.equal(class_uniforms(classes, seed, step), want)


def test_the_uniforms_look_uniform_and_change_with_seed_and_step() -> None:
    u = class_uniforms(torch.arange(200_000), 7, 0)
    assert abs(float(u.mean()) - 0.5) < 0.005 and float(u.min()) > 0 and float(u.max()) < 1
    counts = torch.histc(u.float(), bins=10, min=0, max=1)
    assert (counts - 20_000).abs().max() < 600  # about 4.5 standard deviations of a bin's count
    assert not torch.equal(u, class_uniforms(torch.arange(200_000), 7, 1))
    assert not torch.equal(u, class_uniforms(torch.arange(200_000), 8, 0))


@pytest.mark.parametrize("rate", [0.05, 0.3, 0.99])
def test_any_split_of_the_classes_keeps_the_same_classes(rate) -> None:
    c = 1000
    positive = torch.zeros(c, dtype=torch.bool)
    positive[torch.randint(0, c, (40,))] = True
    whole = MF.sample_classes_by_key(positive, rate, class_start=0, seed=11, step=4)
    assert positive[whole].sum() == positive.sum()  # every positive kept
    expected = positive | torch.tensor([uniform(11, 4, j) < rate for j in range(c)])
    assert torch.equal(whole, expected.nonzero().squeeze(1))
    for world in (2, 3, 7):
        parts = [
            MF.sample_classes_by_key(positive[a:b], rate, class_start=a, seed=11, step=4) + a
            for a, b in MF.shard_bounds(c, world)
        ]
        assert torch.equal(torch.cat(parts), whole)


def test_rate_one_keeps_every_class_and_bad_arguments_are_named() -> None:
    positive = torch.zeros(9, dtype=torch.bool)
    assert torch.equal(MF.sample_classes_by_key(positive, 1.0, class_start=3, seed=0, step=0), torch.arange(9))
    assert MF.sample_classes_by_key(torch.zeros(0, dtype=torch.bool), 0.5, class_start=0, seed=0, step=0).numel() == 0
    with pytest.raises(ValueError, match=r"sample_rate must be a float in \(0, 1\], but got 0"):
        MF.sample_classes_by_key(positive, 0, class_start=0, seed=0, step=0)
    with pytest.raises(ValueError, match=r"seed must be an integer >= 0, but got -1"):
        MF.sample_classes_by_key(positive, 0.5, class_start=0, seed=-1, step=0)
    with pytest.raises(ValueError, match=r"class_start must be an integer >= 0, but got 1.5"):
        MF.sample_classes_by_key(positive, 0.5, class_start=1.5, seed=0, step=0)
    with pytest.raises(TypeError, match=r"positive must be a 1-dim bool tensor"):
        MF.sample_classes_by_key(positive.long(), 0.5, class_start=0, seed=0, step=0)
