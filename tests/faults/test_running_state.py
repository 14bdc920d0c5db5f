"""Running state under faults: a non-finite batch never reaches it, and a call that raises has changed nothing.

The policy, for every head with running state (AdaCos's scale, DeepNCM's means, CurricularFace's t, AdaFace's norm
statistics): rows with a non-finite feature (NaN, ±inf) are left out of the statistics update, and a batch with no
row left keeps the old state. So after a poisoned batch the state is the one the batch's finite rows give, and every
later clean step is what it would have been. Non-finite soft targets are an error.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F

import mll
from tests.conftest import exported_heads

D, C = 5, 6
STATEFUL: dict[str, Callable[[], torch.nn.Module]] = {
    "AdaCos": lambda: mll.AdaCos(D, C, dtype=torch.float64),
    "DeepNCM": lambda: mll.DeepNCM(D, C, alpha=0.5, dtype=torch.float64),
    "CurricularFace": lambda: mll.CurricularFace(D, C, 2, scale=8.0, decay=0.5, dtype=torch.float64),
    "AdaFace": lambda: mll.AdaFace(D, C, 2, scale=8.0, decay=0.5, dtype=torch.float64),
}
BAD_ROWS = {0: float("nan"), 3: float("inf"), 5: -float("inf")}


def clean_batch(seed: int, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return 4 * torch.randn(n, D, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)


def poisoned(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    for row, value in BAD_ROWS.items():
        x[row, row % D] = value
    return x


def state(head: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in head.state_dict().items() if k != "weight"}


def step(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, path: str) -> None:
    with torch.no_grad():
        head(x, y) if path == "forward" else head.loss(x, y)


@pytest.mark.parametrize("name", STATEFUL)
@pytest.mark.parametrize("path", ["forward", "loss"])
def test_a_poisoned_batch_updates_only_from_its_finite_rows(name, path) -> None:
    torch.manual_seed(0)
    head = STATEFUL[name]()
    twin = copy.deepcopy(head)
    x, y = clean_batch(1)
    keep = [i for i in range(len(x)) if i not in BAD_ROWS]
    step(head, poisoned(x), y, path)
    step(twin, x[keep], y[keep], path)  # the same batch without its bad rows
    for (key, a), b in zip(state(head).items(), state(twin).values()):
        assert torch.isfinite(a).all(), key
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=key)
    x2, y2 = clean_batch(2)  # and every later clean step is the one it would have been
    step(head, x2, y2, path)
    step(twin, x2, y2, path)
    for (key, a), b in zip(state(head).items(), state(twin).values()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=key)
    head.eval()
    assert torch.isfinite(head(x2)).all(), "eval logits of clean features stay finite"


@pytest.mark.parametrize("name", STATEFUL)
@pytest.mark.parametrize("path", ["forward", "loss"])
def test_a_batch_without_a_finite_row_keeps_the_state(name, path) -> None:
    torch.manual_seed(0)
    head = STATEFUL[name]()
    step(head, *clean_batch(3), path)
    before = state(head)
    x, y = clean_batch(4, n=3)
    x[:, 0] = float("nan")
    step(head, x, y, path)
    for (key, a), b in zip(state(head).items(), before.values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)


def test_adacos_keeps_its_scale_when_most_rows_are_fine() -> None:
    # the reported case: one NaN row among 64 used to drop the scale to min_scale
    torch.manual_seed(0)
    head = mll.AdaCos(D, 100)
    twin = copy.deepcopy(head)
    g = torch.Generator().manual_seed(5)
    x, y = torch.randn(64, D, generator=g), torch.randint(0, 100, (64,), generator=g)
    bad = x.clone()
    bad[7] = float("nan")
    head(bad, y)
    twin(x[torch.arange(64) != 7], y[torch.arange(64) != 7])
    assert float(head.scale) == pytest.approx(float(twin.scale), rel=1e-6)
    assert float(head.scale) > 2 * head.min_scale


@pytest.mark.parametrize("value", [float("inf"), -float("inf"), float("nan")])
@pytest.mark.parametrize("call", ["forward", "loss", "functional", "sharded"])
def test_non_finite_soft_targets_are_an_error(value, call) -> None:
    x = torch.randn(4, D, dtype=torch.float64)
    soft = torch.softmax(torch.randn(4, C, dtype=torch.float64), -1)
    soft[1, 2] = value
    head = mll.ArcFace(D, C, dtype=torch.float64)
    calls: dict[str, Callable[[], Any]] = {
        "forward": lambda: head(x, soft),
        "loss": lambda: head.loss(x, soft),
        "functional": lambda: mll.functional.margin_cross_entropy(x, head.weight, soft, scale=2.0),
        "sharded": lambda: mll.functional.sharded_margin_cross_entropy(
            x, head.weight, soft, class_start=0, num_classes=C, scale=2.0
        ),
    }
    with pytest.raises(ValueError, match=r"must be non-negative and finite \(not NaN or inf\)"):
        calls[call]()


# ------------------------------------------------------------------------------------------ validate, then mutate

HEADS_WITH_STATE: dict[str, Callable[[], torch.nn.Module]] = {
    **STATEFUL,
    "ElasticArcFace": lambda: mll.ElasticArcFace(D, C, generator=torch.Generator().manual_seed(3)),
    "MagFace": lambda: mll.MagFace(D, C, lower=1.0, upper=5.0),
}
BAD_CALLS: dict[str, tuple[Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], Any], type, str]] = {
    "reduction": (lambda h, x, y: h.loss(x, y, reduction="avg"), ValueError, r"reduction must be 'mean', 'sum'"),
    "chunk_size": (lambda h, x, y: h.loss(x, y, chunk_size=0), ValueError, r"chunk_size must be None or an integer"),
    "label range (loss)": (lambda h, x, y: h.loss(x, y + C), ValueError, r"labels must hold class indices in \[0, 6\)"),
    "label range": (lambda h, x, y: h(x, y + C), ValueError, r"labels must hold class indices in \[0, 6\)"),
    "label shape": (lambda h, x, y: h(x, y[:-1]), ValueError, r"labels must be class indices of shape \(4\)"),
    "features": (lambda h, x, y: h.loss(x[:, :-1], y), ValueError, r"input must have shape \(\*, 5\)"),
    "soft labels (loss)": (
        lambda h, x, y: h.loss(x, F.one_hot(y, C).to(x.dtype) * float("nan")),
        ValueError,
        r"non-negative and finite",
    ),
}


@pytest.mark.parametrize("name", HEADS_WITH_STATE)
@pytest.mark.parametrize("bad", BAD_CALLS)
def test_a_call_that_raises_changes_no_state(name, bad) -> None:
    torch.manual_seed(0)
    head = HEADS_WITH_STATE[name]()
    dtype = head.weight.dtype if hasattr(head, "weight") else head.means.dtype
    x = torch.randn(4, D, dtype=dtype)
    y = torch.randint(0, C, (4,))
    head(x, y)  # some state to keep
    before = {k: v.clone() for k, v in head.state_dict().items()}
    generator = getattr(head, "generator", None)
    drawn = generator.get_state() if generator is not None else None
    call, error, match = BAD_CALLS[bad]
    with pytest.raises(error, match=match):
        call(head, x, y)
    for (key, a), b in zip(head.state_dict().items(), before.values()):
        assert torch.equal(a, b), key
    if generator is not None:
        assert torch.equal(generator.get_state(), drawn), "no draw before the error"


def test_curricular_face_refuses_soft_targets_before_moving_t() -> None:
    head = mll.CurricularFace(D, C)
    x, y = torch.randn(4, D), torch.randint(0, C, (4,))
    head(x, y)
    t = head.t.clone()
    for call in (lambda: head(x, F.one_hot(y, C).float()), lambda: head.loss(x, F.one_hot(y, C).float())):
        with pytest.raises(ValueError, match="CurricularFace needs class indices"):
            call()
        assert torch.equal(head.t, t)


# ------------------------------------------------------------------------ two calls before one backward (two views)

# sharded heads too: without a process group they hold every class, a world of one
ALL_HEADS = exported_heads(sharded=True)
PATHS: dict[str, Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "dense": lambda h, x, y: F.cross_entropy(h(x, y), y),
    "loss": lambda h, x, y: h.loss(x, y),  # type: ignore[operator]
}


COMBINATIONS = [
    *((name, paths) for name in ALL_HEADS if not name.startswith("Sharded")
      for paths in (("dense", "dense"), ("dense", "loss"), ("loss", "loss"))),
    *((name, ("loss", "loss")) for name in ALL_HEADS if name.startswith("Sharded")),  # their forward: block logits
]  # fmt: skip


@pytest.mark.parametrize(("name", "paths"), COMBINATIONS, ids=[f"{n}-{'+'.join(p)}" for n, p in COMBINATIONS])
def test_two_calls_before_one_backward(name, paths) -> None:
    """Two views through the head, one backward (multi-crop training): each call's graph keeps the state it used,
    although the second call updates the running state in place — the gradient is the sum of the two calls' taken
    one at a time."""
    torch.manual_seed(0)
    head = getattr(mll, name)(D, C, dtype=torch.float64)
    twin = copy.deepcopy(head)
    x1, y1 = clean_batch(1)
    x2, y2 = clean_batch(2)
    x = torch.cat([x1, x2]).requires_grad_()
    torch.manual_seed(1)  # ElasticFace's draws: the same for both orders
    (PATHS[paths[0]](head, x[:8], y1) + PATHS[paths[1]](head, x[8:], y2)).backward()
    x_twin = torch.cat([x1, x2]).requires_grad_()
    torch.manual_seed(1)
    PATHS[paths[0]](twin, x_twin[:8], y1).backward()  # one at a time: the second call after the first's backward
    PATHS[paths[1]](twin, x_twin[8:], y2).backward()
    torch.testing.assert_close(x.grad, x_twin.grad)
    for mine, theirs in zip(head.parameters(), twin.parameters()):
        torch.testing.assert_close(mine.grad, theirs.grad)
    for mine, theirs in zip(head.buffers(), twin.buffers()):
        torch.testing.assert_close(mine, theirs)
