"""The chunked loss at its edges: torch.func on every path, soft targets that require grad, the budget from the
environment, ``loss_plan``'s arguments. (Not under ``kernel_mode``: each test picks its paths.)"""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import mll
import mll.functional.chunked as chunked
from mll import functional as MF


@pytest.mark.parametrize("path", ["auto", "keep", "recompute"])  # (row tiles never run under torch.func)
def test_torch_func_grad_on_every_path_and_both_operands(path) -> None:
    """The kernel's backward runs on the saved tensors' values: under torch.func.grad they still track the
    transform's gradient, which its GEMMs into preallocated outputs refused (recompute; keep for the weight)."""
    g = torch.Generator().manual_seed(3)
    x, w = torch.randn(7, 5, generator=g, dtype=torch.float64), torch.randn(11, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 11, (7,), generator=g)

    def loss(a, b):
        return MF.margin_cross_entropy(a, b, y, scale=3.0, margin=MF.ARC(0.5), chunk_size=3)

    def dense(a, b):
        return F.cross_entropy(MF.arc_margin(MF.cosine_logits(a, b), y, 0.5, scale=3.0), y)

    with MF.set_loss_path(path), MF.set_memory_budget(0 if path == "auto" else None):
        assert MF.loss_plan(7, 11, chunk_size=3).path == {"auto": "recompute"}.get(path, path)
        for argnums in (0, 1, (0, 1)):
            got = torch.func.grad(loss, argnums=argnums)(x, w)
            want = torch.func.grad(dense, argnums=argnums)(x, w)
            torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        both = torch.func.grad(
            lambda a, b: MF.chunked_proxy_anchor_loss(a, b, y, chunk_size=3), argnums=(0, 1)
        )(x, w)  # fmt: skip
        ref = torch.func.grad(lambda a, b: MF.proxy_anchor_loss(MF.cosine_logits(a, b), y), argnums=(0, 1))(x, w)
        torch.testing.assert_close(both, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path", ["auto", "dense", "keep", "row_tiles", "recompute"])
def test_a_heads_loss_refuses_soft_targets_that_require_grad_on_every_path(path) -> None:
    """Before, the dense path differentiated them and the others dropped their gradient without a word."""
    head = mll.ScaledNormalizedLinear(5, 11).double()
    x = torch.randn(7, 5, dtype=torch.float64)
    raw = torch.randn(7, 11, dtype=torch.float64, requires_grad=True)
    target = torch.softmax(raw, 1)
    with MF.set_loss_path(path):
        with pytest.raises(ValueError, match="does not differentiate soft targets: detach the targets"):
            head.loss(x, target)
        with torch.no_grad():  # no gradient asked for: the loss, as the dense path's
            torch.testing.assert_close(head.loss(x, target), F.cross_entropy(head(x, target), target))
        torch.testing.assert_close(head.loss(x, target.detach()), F.cross_entropy(head(x, target), target))


def test_the_budget_from_the_environment_refuses_infinity() -> None:
    for text in ("inf", "infinity", "1e400", "-inf"):
        done = subprocess.run([sys.executable, "-c", "import mll"], env={**os.environ, "MLL_MEMORY_BUDGET": text},
                              capture_output=True, text=True)  # fmt: skip
        assert done.returncode == 1 and "OverflowError" not in done.stderr, done.stderr
        assert f"MLL_MEMORY_BUDGET must be a number of bytes (e.g. 268435456 or 256MB), but got {text!r}" in done.stderr


def test_loss_plan_checks_its_sizes_and_counts_an_existing_grad() -> None:
    for kwargs, match in (
        ({"batch": -5, "num_classes": 10}, "batch must be an integer >= 0, but got -5"),
        ({"batch": 1.5, "num_classes": 10}, "batch must be an integer >= 0, but got 1.5"),
        ({"batch": 10, "num_classes": 0}, "num_classes must be an integer >= 1, but got 0"),
        ({"batch": 10, "num_classes": 10, "num_sub_centers": 0}, "num_sub_centers must be an integer >= 1"),
        ({"batch": 10, "num_classes": 10, "held": -1}, "held must be an integer >= 0, but got -1"),
    ):
        with pytest.raises(ValueError, match=match):
            MF.loss_plan(**kwargs)
    # N = C = 130 in float64 (d = 5), a budget of 130 rows of logits (tiles of 128): with an existing .grad the weight
    # gradient formed beside it takes room from the tile (96 rows) — loss_plan says so when told, and loss() does it
    head = mll.ArcFace(5, 130).double()
    x, y = torch.randn(130, 5, dtype=torch.float64), torch.randint(0, 130, (130,))
    held = head.weight.numel() * 8
    ran, original = [], chunked.row_tiled_ce

    def recording(*args):
        ran.append(args[5])  # the tile's rows
        return original(*args)

    with MF.set_memory_budget(130 * 130 * 8), pytest.MonkeyPatch.context() as patch:
        patch.setattr(chunked, "row_tiled_ce", recording)
        without, beside = (
            MF.loss_plan(130, 130, dtype=torch.float64),
            MF.loss_plan(130, 130, dtype=torch.float64, held=held),
        )
        assert (without.path, without.rows, beside.path, beside.rows) == ("row_tiles", 128, "row_tiles", 96)
        head.loss(x, y).backward()
        head.loss(x, y).backward()  # a .grad exists now
        assert ran == [128, 96]
    with MF.set_memory_budget(np.int64(1 << 24)), MF.set_loss_path("row_tiles", rows=np.int64(64)):
        assert MF.loss_plan(256, 100_000).rows == 64


def test_the_functional_losses_take_soft_targets_that_require_grad_under_no_grad() -> None:
    """As a head's ``loss()`` does: with no gradient asked for there is none to drop, and the loss is the detached
    targets' (before, ``margin_cross_entropy`` and the sharded loss refused them even under ``no_grad``)."""
    x = torch.randn(6, 4, dtype=torch.float64)
    w = torch.randn(5, 4, dtype=torch.float64)
    soft = torch.softmax(torch.randn(6, 5, dtype=torch.float64), 1).requires_grad_(True)
    classes = torch.randint(0, 5, (6, 2))
    weights = torch.rand(6, 2, dtype=torch.float64, requires_grad=True)
    losses = {
        "margin_cross_entropy": lambda t: MF.margin_cross_entropy(x, w, t, scale=10.0),
        "sharded_margin_cross_entropy": lambda t: MF.sharded_margin_cross_entropy(
            x, w, t, class_start=0, num_classes=5, scale=10.0
        ),
    }
    for name, loss in losses.items():
        for target, detached in ((soft, soft.detach()), ((classes, weights), (classes, weights.detach()))):
            with pytest.raises(ValueError, match="not differentiate soft targets"):
                loss(target)
            with torch.no_grad():
                got = loss(target)
            assert torch.equal(got, loss(detached)), name
