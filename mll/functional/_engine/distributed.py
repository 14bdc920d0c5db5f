"""The collectives behind the class-sharded loss, on plain ``torch.distributed`` (gloo, nccl, any backend).

Ranks may hold different numbers of samples (the last batch of an epoch, a sampler without padding), while
``torch.distributed``'s single-tensor all-gather and reduce-scatter need equal sizes. Every rank knows every rank's
row count (exchanged once per step), so rows are padded to the longest rank's count and the padding is dropped
again: the volume is ``world · max_r n_r`` rows instead of ``Σ_r n_r``, the same for balanced batches.

Collectives run on the device of the tensors they move, so the same code serves gloo on CPU and nccl on GPU.
"""

from __future__ import annotations

import struct
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor


# torch 2.13 renamed all_gather_into_tensor / reduce_scatter_tensor (the old names warn); the floor, 2.4, has only
# the old ones
def _all_gather_single(out: Tensor, tensor: Tensor, group: Any) -> None:
    gather: Any = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather(out, tensor, group=group)


def _reduce_scatter_single(out: Tensor, tensor: Tensor, group: Any) -> None:
    scatter: Any = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    scatter(out, tensor, group=group)


def rank_and_world(group: Any = None) -> tuple[int, int]:
    """This process's rank in ``group`` and the group's size; ``(0, 1)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group was given, but torch.distributed is not initialised (no process group)")
        return 0, 1
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    if rank < 0:
        raise ValueError("this process is not a member of the given group")
    return rank, world


def float_bits(value: float) -> int:
    """A float as the int64 with the same bits, so it can travel in an integer tensor and compare exactly."""
    return int(struct.unpack("<q", struct.pack("<d", float(value)))[0])


def bits_float(bits: int) -> float:
    return float(struct.unpack("<d", struct.pack("<q", int(bits)))[0])


def all_gather_ints(values: list[int], device: torch.device, group: Any, world: int) -> list[list[int]]:
    """Every rank's list of small integers (same length everywhere), as Python lists indexed by rank."""
    if world == 1:
        return [list(values)]
    mine = torch.tensor(values, dtype=torch.int64, device=device)
    out = torch.empty(world * len(values), dtype=torch.int64, device=device)
    _all_gather_single(out, mine, group=group)
    return out.view(world, len(values)).tolist()


def _row_index(sizes: list[int], longest: int, device: torch.device) -> Tensor:
    """Positions of the real rows in the padded ``(world · longest)`` layout, rank after rank."""
    return torch.cat(
        [torch.arange(r * longest, r * longest + n, device=device) for r, n in enumerate(sizes)]
        or [torch.zeros(0, dtype=torch.int64, device=device)]
    )


def all_gather_rows(tensor: Tensor, sizes: Optional[list[int]] = None, group: Any = None) -> Tensor:
    """Concatenate every rank's rows (``sizes[r]`` of them on rank r), in rank order. No autograd.

    The one all-gather of the library. Without ``sizes`` the ranks exchange their row counts first (eager), or —
    under ``torch.compile``, which cannot read them without a graph break — must all hold the same number of rows
    (as with ``DistributedSampler``); then a mismatch is an error from the collective.
    """
    if sizes is None:
        world = rank_and_world(group)[1]
        if world == 1:
            return tensor
        if torch.compiler.is_compiling():
            out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
            _all_gather_single(out, tensor.contiguous(), group=group)
            return out
        sizes = [row[0] for row in all_gather_ints([tensor.shape[0]], tensor.device, group, world)]
    world, longest = len(sizes), max(sizes)
    if world == 1:
        return tensor
    rest = tuple(tensor.shape[1:])
    if longest == 0:
        return tensor.new_empty((0, *rest))
    padded = tensor
    if tensor.shape[0] < longest:
        padded = torch.cat([tensor, tensor.new_zeros((longest - tensor.shape[0], *rest))])
    out = tensor.new_empty((world * longest, *rest))
    _all_gather_single(out, padded.contiguous(), group=group)
    if all(n == longest for n in sizes):
        return out
    return out.index_select(0, _row_index(sizes, longest, tensor.device))


def reduce_scatter_rows(tensor: Tensor, sizes: list[int], rank: int, group: Any) -> Tensor:
    """The transpose of :func:`all_gather_rows`: sum ``tensor`` (every rank's rows, on every rank) over the ranks
    and keep this rank's own rows."""
    world, longest = len(sizes), max(sizes)
    if world == 1:
        return tensor
    rest = tuple(tensor.shape[1:])
    if longest == 0:
        return tensor.new_zeros((0, *rest))
    if all(n == longest for n in sizes):
        padded = tensor.contiguous()
    else:
        padded = tensor.new_zeros((world * longest, *rest))
        padded.index_copy_(0, _row_index(sizes, longest, tensor.device), tensor)
    out = tensor.new_empty((longest, *rest))
    _reduce_scatter_single(out, padded, group=group)
    return out[: sizes[rank]]


def refuse_double_backward() -> None:
    """Raise in a backward run with ``create_graph=True``: the collectives in these backwards are not recorded, so
    a second derivative (a gradient penalty) would silently be wrong."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            "the sharded loss gives first derivatives only: backward with create_graph=True (double backward, "
            "gradient penalties) is not supported"
        )


class GatherRows(torch.autograd.Function):
    """All-gather of rows whose gradient comes home: backward sums every rank's gradient for this rank's rows.

    Each rank's loss uses every rank's features, so the gradient for rank r's features is spread over all ranks;
    the backward is a reduce-scatter (O(rows · d) per rank, like the forward), times ``grad_scale``.
    """

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, sizes: list[int], rank: int, group: Any, grad_scale: float) -> Tensor:
        ctx.sizes, ctx.rank, ctx.group, ctx.grad_scale = sizes, rank, group, grad_scale
        return all_gather_rows(tensor, sizes, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], ...]:
        refuse_double_backward()
        out = reduce_scatter_rows(grad, ctx.sizes, ctx.rank, ctx.group)
        if ctx.grad_scale != 1.0:
            out = out * ctx.grad_scale
        return out, None, None, None, None


def all_reduce(tensor: Tensor, op: str, group: Any, world: int) -> Tensor:
    """In-place all-reduce (``op`` "sum" or "max"), skipped in a world of one."""
    if world > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_sum(tensor: Tensor, group: Any = None) -> Tensor:
    """Sum ``tensor`` over the ranks of ``group`` in place (nothing in a world of one); returns it."""
    return all_reduce(tensor, "sum", group, rank_and_world(group)[1])
