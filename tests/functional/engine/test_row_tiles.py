"""The row tiles' layout and allocations: which tiles run class-major, and a group's temporaries allocated once per
step whatever the number of groups (``row_tiles.py``, ``numerics.scratch``). Their numbers against the references
are the chunked loss's tests (``tests/functional/test_chunked.py``: every path, both layouts)."""

from __future__ import annotations

import pytest
import torch

import mll
import mll.functional as MF
from mll.functional._engine import row_tiles
from mll.functional._engine.chunks import Spec
from mll.functional._engine.targets import Targets
from tests.functional.test_chunked import _LargeAllocations


def _spec(family: MF.MarginFamily) -> Spec:
    return Spec(family, Targets(classes=torch.zeros(1, 1, dtype=torch.int64)), 1, 1 << 16)


def test_a_non_target_part_runs_class_major_in_small_tiles_or_over_many_classes() -> None:
    """The plain families always (one sub-center, class targets, one process); CurricularFace's family below 128 rows
    or above 2^18 classes, where row-major groups would hold a row or two."""
    plain, curricular = _spec(MF.ARC), _spec(MF.CURRICULAR)
    wide = row_tiles.NEGATIVES_ROW_MAJOR_WIDTH
    assert wide == row_tiles.GROUP_ELEMENTS // 4
    for rows in (1, 127, 128, 4096):
        for width in (2, wide, wide + 1):
            assert row_tiles.class_major(plain, width, rows, False)
            assert row_tiles.class_major(curricular, width, rows, False) == (rows < 128 or width > wide), (rows, width)
            assert not row_tiles.class_major(curricular, width, rows, True)  # the scale's gradient keeps its logits


@pytest.mark.parametrize("class_major", [False, True])
@pytest.mark.parametrize("name", ["ScaledNormalizedLinear", "ArcFace", "CurricularFace", "NPCFace", "MVSoftmax"])
def test_row_tiles_allocate_per_step_not_per_group(name: str, class_major: bool, monkeypatch) -> None:
    """A group's or block's temporaries — a family's mask and values (``numerics.scratch``), the columns' factor
    ``inv·s`` — are allocated once per step and reused: twice the rows (twice the groups and tiles) allocate no more
    buffers of a group's size. Under glibc's default allocator each fresh allocation of a few MB is mapped and
    faulted in anew (CurricularFace at C = 10^6 took 1.42× ArcFace's time with one per group, 1.18× without)."""
    c, rows = 5000, 4
    monkeypatch.setattr(row_tiles, "CLASS_MAJOR", class_major)
    # groups of one row (5000 logits); blocks of 1250 classes × 4 rows (5000): larger than anything per tile
    monkeypatch.setattr(row_tiles, "GROUP_ELEMENTS", rows * 1250 if class_major else 1)
    counts = []
    for n in (16, 32):
        torch.manual_seed(0)
        head = getattr(mll, name)(3, c, dtype=torch.float64)
        x = torch.randn(n, 3, dtype=torch.float64, requires_grad=True)
        with MF.set_loss_path("row_tiles", rows=rows), _LargeAllocations(c) as seen:
            head.loss(x, torch.randint(0, c, (n,)))
        counts.append(len(seen.seen))
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("name", ["ArcFace", "CurricularFace"])
def test_the_tiles_buffer_is_released_before_the_weight_gradients_fold(name: str, monkeypatch) -> None:
    """The normalisation's fold runs after the last tile, with blocks of its own (``normalization.BLOCK_ELEMENTS``):
    the tiles' logits must be gone by then, or the step's peak is a tile plus a fold block (at N = 256, C = 10^4,
    d = 512 a tile of 10 MB and a block of 2 MB: 12.2 MB above the gradients against 10.2 MB)."""
    import weakref

    buffers: list[weakref.ref] = []
    sizes: list[int] = []
    alive: list[bool] = []
    empty, fold = torch.empty, row_tiles.fold_normalization_

    def tracked_empty(*args, **kwargs):
        out = empty(*args, **kwargs)
        buffers.append(weakref.ref(out))
        sizes.append(out.numel())
        return out

    def checked_fold(*args, **kwargs):
        alive.append(any(ref() is not None and ref().numel() == 8 * 3000 for ref in buffers))
        return fold(*args, **kwargs)

    monkeypatch.setattr(row_tiles, "fold_normalization_", checked_fold)
    torch.manual_seed(0)
    head = getattr(mll, name)(5, 3000, dtype=torch.float64)
    x = torch.randn(16, 5, dtype=torch.float64, requires_grad=True)
    with MF.set_loss_path("row_tiles", rows=8):
        monkeypatch.setattr(torch, "empty", tracked_empty)
        loss = head.loss(x, torch.randint(0, 3000, (16,)))
        monkeypatch.setattr(torch, "empty", empty)
    loss.backward()
    assert 8 * 3000 in sizes  # the tiles' buffer was made here (and the check above can see it)
    assert alive == [False], alive


@pytest.mark.parametrize("margin_type", ["arc", "cos", "curricular"])
def test_class_major_tiles_equal_the_kept_logits_with_few_hot_pairs(margin_type: str, monkeypatch) -> None:
    """The class-major tiles leave each row's softmax factor Σt/Σe^{z−max} to the gradient GEMMs' small operands
    and form the target entries last: few-hot pairs (a class twice in a row, merged; a row whose weights sum to 0,
    which has no gradient), a per-class margin that needs a gradient, several blocks with a ragged last one and a
    ragged last tile (CurricularFace: class indices, its non-target part formed in both passes) — the same losses
    and gradients as the chunk kernel keeping its logits, in float64."""
    calls = []
    blocks = row_tiles.class_blocks
    monkeypatch.setattr(row_tiles, "class_blocks", lambda *a, **k: calls.append(1) or blocks(*a, **k))
    monkeypatch.setattr(row_tiles, "block_columns", lambda rows, width: 3)
    torch.manual_seed(0)
    n, c, d = 7, 11, 4
    x = torch.randn(n, d, dtype=torch.float64)
    w = torch.randn(c, d, dtype=torch.float64)
    classes = torch.randint(0, c, (n, 2))
    classes[2, 1] = classes[2, 0]  # a mixup of two samples of one class
    weights = torch.rand(n, 2, dtype=torch.float64)
    weights[4] = 0.0  # no target weight at all
    losses = {}
    for path in ("keep", "row_tiles"):
        xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
        m = torch.full((c,), 0.3, dtype=torch.float64, requires_grad=True)
        # (CurricularFace takes class indices only; its t is a statistic, without a gradient)
        if margin_type == "curricular":
            target: object = classes[:, 0]
            margin = {"margin": MF.CURRICULAR(m, torch.tensor(0.4, dtype=torch.float64))}
        else:
            target, margin = (classes, weights), {"margin": m, "margin_type": margin_type}
        with MF.set_loss_path(path, rows=3):
            loss = MF.margin_cross_entropy(xs, ws, target, scale=9.0, **margin)
        losses[path] = (loss, torch.autograd.grad(loss, [xs, ws, m]))
    assert calls, "the class-major tiles did not run"
    (want, want_grads), (got, got_grads) = losses["keep"], losses["row_tiles"]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, ref in zip(got_grads, want_grads):
        torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)
