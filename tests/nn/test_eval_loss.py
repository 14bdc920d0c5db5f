"""A head's ``loss()`` in eval mode outside ``torch.no_grad()`` — a validation loss, most often only read — forms no
gradient during its forward: the row tiles and Proxy-Anchor's one pass would pay two more GEMMs and a C×d buffer for
it (2.19× the time of the same loss under ``no_grad``, ArcFace, N = 1024, C = 2·10^4, d = 512, one thread). Its value
is the training-path's, and a backward, if one comes (an attack on the inputs), gives the dense path's gradients."""

from __future__ import annotations

from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

import mll
import mll.functional as MF
from mll.functional import chunked
from mll.functional._engine import class_sums, row_tiles

D, C, N = 6, 40, 33
HEADS: dict[str, Callable[[], Any]] = {
    "ArcFace": lambda: mll.ArcFace(D, C, dtype=torch.float64),
    "CurricularFace": lambda: mll.CurricularFace(D, C, dtype=torch.float64),
    "ArcFace, 3 sub-centers": lambda: mll.ArcFace(D, C, num_sub_centers=3, dtype=torch.float64),
    "ProxyAnchor": lambda: mll.ProxyAnchor(D, C, dtype=torch.float64),
    "DeepNCM": lambda: mll.DeepNCM(D, C, dtype=torch.float64),
    "ShardedArcFace": lambda: mll.ShardedArcFace(D, C, dtype=torch.float64),
    "ShardedProxyAnchor": lambda: mll.ShardedProxyAnchor(D, C, dtype=torch.float64),
}


@pytest.fixture
def formed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the forward passes that formed a gradient during this test."""
    calls: list[str] = []
    tiles, one_pass = row_tiles.tile_gradients, class_sums.one_pass

    def spy_tiles(*args: Any, **kwargs: Any) -> Any:
        calls.append("row tiles")
        return tiles(*args, **kwargs)

    def spy_one_pass(*args: Any, **kwargs: Any) -> Any:
        calls.append("one pass")
        return one_pass(*args, **kwargs)

    monkeypatch.setattr(row_tiles, "tile_gradients", spy_tiles)
    monkeypatch.setattr(class_sums, "one_pass", spy_one_pass)
    return calls


def dense_loss(head: Any, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """What ``loss()`` in eval mode equals: the plain logits' cross-entropy (Proxy-Anchor: its own loss)."""
    if isinstance(head, mll.ProxyAnchor):
        return MF.proxy_anchor_loss(head.cosine(x), y, alpha=head.alpha, delta=head.delta)
    return F.cross_entropy(head(x), y)


@pytest.mark.parametrize("name", sorted(HEADS))
def test_an_eval_mode_loss_forms_no_gradient_in_its_forward_and_backward_is_still_exact(name, formed) -> None:
    torch.manual_seed(1)
    head = HEADS[name]()
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (N,))
    with MF.set_loss_path("row_tiles", rows=8):
        head.train()
        head.loss(x, y)
        assert formed, "the training step should form its gradient in the forward: the test would prove nothing"
        formed.clear()
        head.eval()
        loss = head.loss(x, y)
        assert formed == []
        loss.backward()
        assert formed == []  # (no path recomputed its way through the row tiles either)
    got = (x.grad, *(p.grad for p in head.parameters()))
    x_ref = x.detach().clone().requires_grad_(True)
    for p in head.parameters():
        p.grad = None
    want_loss = dense_loss(head, x_ref, y)
    want_loss.backward()
    want = (x_ref.grad, *(p.grad for p in head.parameters()))
    torch.testing.assert_close(loss, want_loss, rtol=1e-12, atol=1e-12)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_the_hint_ends_with_the_call_even_when_it_raises() -> None:
    head = mll.ArcFace(D, C).eval()
    with pytest.raises(ValueError):
        head.loss(torch.randn(4, D), torch.full((4,), C))  # a label out of range
    assert not chunked._READ_ONLY.get()
    x = torch.randn(4, D, requires_grad=True)
    assert chunked.scalar_loss("mean", x)  # a functional loss outside a head: as before


@pytest.mark.parametrize("name", ["ArcFace", "ProxyAnchor"])
def test_an_eval_mode_loss_compiles_whole(name) -> None:
    """``read_only`` is skipped under ``torch.compile`` (no path forms the gradient in the forward there): one graph."""
    torch.manual_seed(1)
    head = HEADS[name]().eval()
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (N,))
    compiled = torch.compile(lambda a, b: head.loss(a, b), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, y), head.loss(x, y), rtol=1e-12, atol=1e-12)


@pytest.mark.slow  # compiles three heads
@pytest.mark.parametrize("name", ["ShardedArcFace", "ShardedDeepNCM", "ShardedProxyAnchor"])
def test_a_sharded_heads_eval_loss_forms_no_gradient_when_compiled_either(name, formed) -> None:
    """The class-sharded losses leave the graph for their collectives (``torch.compiler.disable``), where a traced
    flag would not reach them: their heads run the eval-mode loss outside the graph, with the flag set."""
    torch.manual_seed(1)
    heads = {"ShardedDeepNCM": lambda: mll.ShardedDeepNCM(D, C, dtype=torch.float64), **HEADS}
    head = heads[name]().eval()
    x = torch.randn(100, D, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, C, (100,))
    with MF.set_memory_budget(64 * C * 8):  # a tile of 64 rows fits, the 100 rows' logits do not
        want = head.loss(x, y)
        assert formed == []
        got = torch.compile(lambda a, b: head.loss(a, b), backend="aot_eager")(x, y)
    assert formed == []
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
