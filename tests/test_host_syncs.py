"""A training step reads nothing back from the device once the value checks are off.

On a GPU every host read of a tensor value (``.item()``, ``bool(t)``, ``int(t)``) is a synchronisation. The CPU
has none to see, so the test counts the host reads themselves: each is one ``aten._local_scalar_dense`` call, seen
here by a dispatch mode wrapped around a training step of every head — the dense forward with cross-entropy, the
chunked ``loss()``, both backwards — with class indices and soft targets (where the head takes them), K = 1 and
K = 2.
"""

from __future__ import annotations

import collections

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import mll
from mll import functional as MF
from tests.conftest import exported_heads

HEADS = exported_heads(sharded=False)
N, D, C = 8, 16, 50
#: heads whose training step takes class indices only
HARD_ONLY = {"CurricularFace", "ProxyAnchor", "MVSoftmax", "NPCFace", "ArcNegFace", "CircleLoss"}


class HostReads(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count[func] += 1
        return func(*args, **(kwargs or {}))


def step(name: str, k: int, soft: bool) -> int:
    """Host reads of one training step (both paths) of head ``name``."""
    torch.manual_seed(0)
    head = getattr(mll, name)(D, C) if name == "DeepNCM" else getattr(mll, name)(D, C, k)
    norm = 40.0 if name in ("AdaFace", "MagFace") else 1.0  # their margins read the magnitudes
    y = torch.randint(0, C, (N,))
    target = F.one_hot(y, C).float() * 0.7 + 0.3 / C if soft else y
    with HostReads() as reads:
        for path in ("dense", "loss"):
            x = (torch.randn(N, D) * norm).requires_grad_()
            loss = F.cross_entropy(head(x, target), target) if path == "dense" else head.loss(x, target)
            loss.backward()
    return sum(reads.count.values())


@pytest.mark.parametrize("name", HEADS)
def test_no_host_read_with_value_checks_off(name) -> None:
    combos = [(1, False), (2, True)] if name not in {"DeepNCM", *HARD_ONLY} else [(1, False)]
    if name in HARD_ONLY:
        combos.append((2, False))
    if name == "DeepNCM":
        combos.append((1, True))
    if name == "LargeMarginSoftmax":  # one weight vector per class
        combos = [(1, False), (1, True)]
    with MF.value_checks(False):
        for k, soft in combos:
            assert step(name, k, soft) == 0, (k, soft)
    assert step(name, 1, False) > 0  # the counter sees the checks' reads: it can fail


def test_value_checks_is_a_switch_and_a_context_manager() -> None:
    bad = torch.tensor([0, 7])
    cos = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\)"):
        MF.arc_margin(cos, bad, 0.5)
    with MF.value_checks(False):
        with MF.value_checks(True), pytest.raises(ValueError, match=r"class indices in \[0, 5\)"):
            MF.arc_margin(cos, bad, 0.5)
        assert not mll.functional._engine.checks.values_checkable()
    assert mll.functional._engine.checks.values_checkable()
    switch = MF.value_checks(False)
    assert not mll.functional._engine.checks.values_checkable()
    switch.__exit__(None, None, None)
    with pytest.raises(TypeError, match=r"value_checks takes a bool, but got str"):
        MF.value_checks("off")
