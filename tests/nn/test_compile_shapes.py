"""Every head under ``torch.compile(fullgraph=True)`` where users meet it: changing batch sizes (dynamo then makes
the batch dimension symbolic) and a compiled ``loss()`` with no gradient to build (a validation loop).

Each compiled step is checked against the same step run eagerly on a copy of the head (same state, same seed for
the ElasticFace draws): values, gradients and the running state after the step. Compiled, ``loss()`` runs the chunk
kernel; eagerly the cost model would take the dense path at these tiny shapes, so the eager twin is held to the
kernel too (``set_loss_path("recompute")``): the same computation, compared to float32 rounding.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import mll
from mll import functional as MF
from tests.conftest import exported_heads

pytestmark = pytest.mark.slow  # every test compiles (the quick tier leaves them out)

HEADS = exported_heads(sharded=False)
D, C = 16, 40


def dense(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(x, y), y)


def chunked(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return head.loss(x, y)  # type: ignore[operator]


def run(fn, head, x, y, seed):  # type: ignore[no-untyped-def]
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)  # ElasticFace draws its margins from the global generator
    loss = fn(head, x, y)
    loss.backward()
    return loss.detach(), x.grad, [p.grad for p in head.parameters()], [b.clone() for b in head.buffers()]


def both(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The dense path and ``loss()`` in one step (one compilation for both)."""
    return dense(head, x, y) + chunked(head, x, y)


@pytest.mark.parametrize("name", HEADS)
def test_changing_batch_sizes_compile_with_symbolic_shapes(name) -> None:
    torch.manual_seed(0)
    head = getattr(mll, name)(D, C)
    twin = copy.deepcopy(head)
    torch._dynamo.reset()
    compiled = torch.compile(both, fullgraph=True, dynamic=True, backend="eager")
    for step, batch in enumerate((6, 5)):  # the last batch of an epoch is smaller
        x, y = torch.randn(batch, D), torch.randint(0, C, (batch,))
        head.zero_grad(set_to_none=True)
        twin.zero_grad(set_to_none=True)
        with MF.set_loss_path("recompute"):
            got = run(compiled, head, x, y, seed=step)
            want = run(both, twin, x, y, seed=step)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", HEADS)
def test_compiled_loss_without_gradients(name, training) -> None:
    """``loss()`` compiled and called under ``torch.no_grad()`` (nothing needs a gradient): the chunk kernel's
    forward runs alone, and gives the eager value."""
    torch.manual_seed(0)
    head = getattr(mll, name)(D, C).train(training)
    twin = copy.deepcopy(head)
    x, y = torch.randn(6, D), torch.randint(0, C, (6,))
    torch._dynamo.reset()
    compiled = torch.compile(chunked, fullgraph=True, backend="aot_eager")
    with torch.no_grad(), MF.set_loss_path("recompute"):
        torch.manual_seed(1)
        got = compiled(head, x, y)
        torch.manual_seed(1)
        want = chunked(twin, x, y)
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    for mine, theirs in zip(head.buffers(), twin.buffers()):  # running state updated alike
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-6)
