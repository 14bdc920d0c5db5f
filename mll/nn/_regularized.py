"""Loss terms that every sample's loss carries — a per-class regulariser (AdaM-Softmax's margins, SoftTriple's
centres) — on the dense, chunked and sharded paths.

Such a term is part of each sample's loss, so every reduction reduces ``ce_i + R``: ``"none"`` gives the rows,
``"mean"`` ``mean(ce) + R`` and ``"sum"`` ``sum(ce) + N·R``. On the class-sharded path it follows the sharded loss's
gradient contract (each rank's output stands for its own samples; see
:func:`mll.functional.sharded_margin_cross_entropy`): the rows are reduced with their own share of the gradient, and
a term's gradient gathers every rank's rows, either through a replicated parameter whose gradient is summed over
the ranks (:func:`sum_grad_over_ranks`, the margins every rank keeps whole) or through the sum of the blocks' parts
(:func:`shared_class_term`, a sum over classes of which each rank holds a block).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mll.functional._engine.block import own_share_sum
from mll.functional._engine.distributed import all_reduce_sum, rank_and_world, refuse_double_backward

__all__ = ["per_sample_term", "reduce_rows", "shared_class_term", "sum_grad_over_ranks"]


def per_sample_term(term: Tensor, input: Tensor, reduction: str) -> Tensor:
    """``term`` (0-dim) as carried by every row's loss under ``reduction``: itself for ``"none"`` (broadcast
    against the per-row losses) and ``"mean"``, the number of rows of ``input`` times it for ``"sum"``."""
    if reduction != "sum":
        return term
    return term * (input.numel() // max(input.shape[-1], 1))


def plus_regularizer(ce: Tensor, head: Any, input: Tensor, reduction: str) -> Tensor:
    """A regularised head's loss (AdaM-Softmax, SoftTriple): its cross-entropy ``ce`` plus ``head.regularizer()`` as
    part of every sample's loss (see :func:`per_sample_term`)."""
    return ce + per_sample_term(head.regularizer().to(ce.dtype), input, reduction)


def reduce_rows(rows: Tensor, reduction: str, group: Any) -> Tensor:
    """This rank's per-row losses reduced over the global batch (the same value on every rank), with the gradient
    of this rank's rows only — the sharded loss's contract for ``"mean"`` and ``"sum"``; the rows for ``"none"``."""
    if reduction == "none":
        return rows
    total, count = own_share_sum(rows, group)
    return total if reduction == "sum" else total / count.to(total.dtype)


class _SumGradOverRanks(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the ranks of ``group``."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None]:
        refuse_double_backward()
        return all_reduce_sum(grad.clone(), group=ctx.group), None


def sum_grad_over_ranks(tensor: Tensor, group: Any = None) -> Tensor:
    """``tensor``, whose gradient is summed over the ranks of ``group`` in backward (as is, in a world of one).

    For a parameter every rank keeps whole while each rank's loss differentiates its own part of it (its block's
    margins, its own samples' terms): the sum is the full gradient, the same on every rank, so the replicas stay
    equal under the same optimizer step (what DDP does for a replicated parameter). Every rank must backward."""
    if rank_and_world(group)[1] == 1 or not tensor.requires_grad:
        return tensor
    return _SumGradOverRanks.apply(tensor, group)


class _SharedClassTerm(torch.autograd.Function):
    """``Σ_r part_r`` over the ranks, as the term of each of this rank's ``rows`` rows; backward: every rank's part
    gets the sum of the upstream gradients of every rank's rows."""

    @staticmethod
    def forward(ctx: Any, part: Tensor, rows: int, group: Any) -> Tensor:
        ctx.group = group
        total = all_reduce_sum(part.detach().clone(), group=group)
        return total.expand(rows).clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None]:
        refuse_double_backward()
        return all_reduce_sum(grad.sum().clone(), group=ctx.group), None, None


def shared_class_term(part: Tensor, rows: int, group: Any = None) -> Tensor:
    """A per-class sum of which this rank holds the block's ``part`` (0-dim), as the term of each of its ``rows``
    rows ``(rows,)``: the value is the sum over every rank's block; the gradient of ``part`` is the global objective's
    (the upstream gradients of every rank's rows, summed). One all-reduce forward, one backward."""
    if rank_and_world(group)[1] == 1:
        return part.expand(rows)
    return _SharedClassTerm.apply(part, rows, group)
