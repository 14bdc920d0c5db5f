"""The global batch as one rank's block of classes sees it: its statistics, and its losses back on their ranks.

A sharded head's statistic (AdaCos's scale, CurricularFace's ``t``, DeepNCM's class means) is a function of the
global batch — every rank's samples — and of all C classes, while a rank holds only its block. Each rank gathers
the batch once (:func:`gather_block_batch`), computes its block's share and the ranks add the shares
(:func:`all_reduce_log_sum_exp` for a log-sum-exp over the classes, a plain sum otherwise), so that every rank
ends with the number a single process computes on the global batch with the full weights. No autograd there: the
statistics are running state, updated under ``no_grad``. The sharded loss's per-row losses, the same global rows on
every rank, go back to what each rank returns — its own rows, or their sum or mean — through :class:`RankRows`,
whose backward gathers every rank's upstream gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from mll.functional._engine.agreement import check_backward_agreement
from mll.functional._engine.checks import is_soft
from mll.functional._engine.distributed import all_gather_ints, all_gather_rows, all_reduce, rank_and_world
from mll.functional._engine.numerics import has_values
from mll.functional._engine.targets import dense_to_pair, pad_pairs

__all__ = [
    "RankRows",
    "Ranks",
    "all_reduce_log_sum_exp",
    "block_soft_targets",
    "gather_block_batch",
    "own_share_sum",
    "pair_class_sums",
]


def gather_block_batch(
    input: Tensor, target: Any, num_classes: int, class_start: int, width: int, group: Any
) -> tuple[Tensor, Tensor, Tensor]:
    """Every rank's features (detached, in rank order) and targets, as the block ``[class_start, class_start +
    width)`` sees them.

    ``target`` is this rank's checked target: class indices ``(*)``, soft targets ``(*, C)`` or a pair ``(classes,
    weights)``. Returns ``(x (N, d), classes (N, P) int64, weights (N, P))`` for the global batch of N rows:
    block-local class indices, −1 for entries outside the block (and padding), with their weights (1 for class
    indices). Two small all-gathers besides the features' and targets'.
    """
    _, world = rank_and_world(group)
    x = input.detach().reshape(-1, input.shape[-1])
    n = x.shape[0]
    if isinstance(target, (tuple, list)):
        p = target[0].shape[-1]
        classes, weights = target[0].reshape(n, p), target[1].detach().reshape(n, p)
    elif is_soft(target):
        classes, weights = dense_to_pair(target.detach().reshape(n, num_classes))
    else:
        classes = target.reshape(n, 1)
        weights = torch.ones(classes.shape, dtype=torch.float64, device=x.device)
    counts = all_gather_ints([n, classes.shape[1]], x.device, group, world)
    sizes, p = [row[0] for row in counts], max(max(row[1] for row in counts), 1)
    classes, weights = pad_pairs(classes.to(torch.int64), weights.to(torch.float64), p)
    x = all_gather_rows(x, sizes, group)
    classes = all_gather_rows(classes, sizes, group)
    weights = all_gather_rows(weights, sizes, group)
    local = classes - int(class_start)
    inside = (classes >= 0) & (local >= 0) & (local < width)
    return x, torch.where(inside, local, -1), torch.where(inside, weights, 0.0)


def block_soft_targets(classes: Tensor, weights: Tensor, width: int, dtype: torch.dtype) -> Tensor:
    """Block-local pairs as dense soft targets of the block, ``(N, width)`` (the entries outside add nothing)."""
    dense = torch.zeros((classes.shape[0], width), dtype=dtype, device=classes.device)
    if width == 0:
        return dense
    inside = classes >= 0
    return dense.scatter_add_(1, classes.clamp(min=0), torch.where(inside, weights, 0.0).to(dtype))


def pair_class_sums(features: Tensor, classes: Tensor, weights: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Per-class weighted sums of the finite feature rows and their total weights, ``(width, d)`` and ``(width,)``,
    for block-local pairs (entries −1 add nothing): DeepNCM's batch statistics of one block."""
    dtype = torch.promote_types(features.dtype, torch.float32)
    features = features.to(dtype)
    finite = torch.isfinite(features).all(-1, keepdim=True)
    features = torch.where(finite, features, 0.0)
    sums, counts = features.new_zeros(width, features.shape[-1]), features.new_zeros(width)
    keep = (classes >= 0) & finite
    if not has_values(classes):  # no values to select by (meta, fake): every entry, with weight 0 where not kept
        if width == 0:
            return sums, counts
        w = torch.where(keep, weights.to(dtype), 0.0)
        pairs = (features.unsqueeze(1) * w.unsqueeze(-1)).reshape(-1, features.shape[-1])
        column = classes.clamp(min=0).reshape(-1)
        return sums.index_add_(0, column, pairs), counts.index_add_(0, column, w.reshape(-1))
    row = torch.arange(classes.shape[0], device=classes.device).unsqueeze(1).expand_as(classes)[keep]
    w = weights.to(dtype)[keep]
    column = classes[keep]
    return sums.index_add_(0, column, features[row] * w.unsqueeze(1)), counts.index_add_(0, column, w)


def all_reduce_log_sum_exp(values: Tensor, group: Any) -> Tensor:
    """``log Σ_r exp(values_r)`` over the ranks, elementwise, without overflow (a MAX then a SUM all-reduce)."""
    _, world = rank_and_world(group)
    if world == 1:
        return values
    top = all_reduce(values.clone(), "max", group, world)
    shift = torch.where(torch.isfinite(top), top, 0.0)
    total = all_reduce(torch.exp(values - shift), "sum", group, world)
    return shift + torch.log(total)


def own_share_sum(values: Tensor, group: Any) -> tuple[Tensor, Tensor]:
    """The sum of ``values`` over every rank's entries (the same number on every rank), whose gradient reaches only
    this rank's entries — the sharded loss's contract: each rank's output stands for its own samples — and the
    global number of entries."""
    _, world = rank_and_world(group)
    local = values.sum()
    count = torch.tensor(float(values.numel()), dtype=torch.float64, device=values.device)
    totals = torch.stack([local.detach().to(torch.float64), count])
    totals = all_reduce(totals, "sum", group, world)
    # the global sum's value, to the bit on every rank, with the gradient of this rank's sum
    return totals[0].to(local.dtype) + (local - local.detach()), totals[1]


class RankRows(torch.autograd.Function):
    """The global per-row losses to what this rank returns: its own rows (``"none"``), or the sum/mean over the
    global batch (identical on every rank). Backward gathers every rank's upstream gradient, so each block gets the
    gradient of the sum over ranks of what each rank backpropagates — with the same ``loss.backward()`` on every
    rank, the gradient of the loss itself."""

    @staticmethod
    def forward(ctx: Any, losses: Tensor, sizes: list[int], rank: int, group: Any, reduction: str) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group, ctx.reduction = sizes, rank, group, reduction
        if reduction == "none":
            offset = sum(sizes[:rank])
            return losses[offset : offset + sizes[rank]].clone()
        return losses.sum() if reduction == "sum" else losses.mean()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        sizes, world = ctx.sizes, len(ctx.sizes)
        check_backward_agreement(grad.device, ctx.group, world)  # no rank left waiting on a double backward
        total = sum(sizes)
        if ctx.reduction == "none":
            return all_gather_rows(grad.reshape(-1), sizes, ctx.group), None, None, None, None
        per_rank = all_gather_rows(grad.reshape(1), [1] * world, ctx.group)
        g = per_rank.repeat_interleave(torch.tensor(sizes, device=grad.device), output_size=total)
        return (g / total if ctx.reduction == "mean" else g), None, None, None, None


@dataclass
class Ranks:
    """The ranks that share a class-sharded loss: this rank, every rank's row count (the global rows are theirs in
    rank order) and the group."""

    rank: int
    sizes: list[int]
    group: Any

    def reduce(self, tensor: Tensor, op: str) -> Tensor:
        """All-reduce in place (``op`` "max" or "sum")."""
        return all_reduce(tensor, op, self.group, len(self.sizes))

    def row_upstream(self, grad: Tensor) -> Optional[Tensor]:
        """Each global row's upstream gradient, from every rank's upstream gradient of its scalar loss — the sharded
        loss's contract: a rank's output stands for its own rows — or None when every rank's is the same. Refuses a
        double backward on every rank first (no rank left waiting)."""
        world = len(self.sizes)
        check_backward_agreement(grad.device, self.group, world)
        if world == 1:
            return None
        per_rank = all_gather_rows(grad.reshape(1), [1] * world, self.group)
        if bool((per_rank == per_rank[0]).all()):
            return None
        return per_rank.repeat_interleave(torch.tensor(self.sizes, device=grad.device), output_size=sum(self.sizes))
