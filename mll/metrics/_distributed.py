"""Collectives of the sharded metrics: agreement on the inputs, then gathers of rows and candidates.

Faults are local, errors are collective: every rank checks its own inputs, the ranks exchange one summary, and
then all raise (the rank at fault its own error, the others one naming it) or all go on — none is left waiting in
a collective that its peers never reach.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable, Optional, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["agree", "all_gather_columns", "all_gather_rows", "all_reduce", "world_and_rank"]

T = TypeVar("T")


def world_and_rank(group: Any) -> tuple[int, int]:
    """``(world size, rank)`` in ``group``; ``(1, 0)`` without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def agree(
    check: Callable[[], T], summary: Callable[[T], Sequence[int]], mismatch: Callable[[Tensor], Optional[str]],
    function: str, device: torch.device, group: Any,
) -> T:  # fmt: skip
    """``check()`` on every rank, then one all-gather of each rank's ``[failed, *summary(result)]``.

    A rank whose check raised re-raises its error; the others raise a ``ValueError`` naming it. Otherwise
    ``mismatch(summaries)`` (``(world, len)`` int64, row r from rank r) may return a message that every rank raises.
    """
    world, _ = world_and_rank(group)
    if world == 1:
        result = check()
        message = mismatch(torch.tensor([list(summary(result))], dtype=torch.int64))
        if message is not None:
            raise ValueError(f"{function}: {message}")
        return result
    problem: Optional[Exception] = None
    try:
        result = check()
        row = [0, *summary(result)]
    except (TypeError, ValueError) as error:
        problem, row = error, [1]
    width = torch.tensor([len(row)], device=device)
    all_reduce(width, group, dist.ReduceOp.MAX)
    mine = torch.zeros(int(width), dtype=torch.int64, device=device)
    mine[: len(row)] = torch.tensor(row, dtype=torch.int64)
    rows = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(rows, mine, group=group)
    table = torch.stack(rows).cpu()
    failed = table[:, 0].nonzero().flatten().tolist()
    if problem is not None:
        raise problem
    if failed:
        raise ValueError(f"{function}: rank(s) {failed} of the group refused their inputs (see the error there)")
    message = mismatch(table[:, 1:])
    if message is not None:
        raise ValueError(f"{function}: {message}")
    return result


def all_reduce(tensor: Tensor, group: Any, op: Any = None) -> None:
    if world_and_rank(group)[0] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=group)


def all_gather_rows(tensor: Tensor, group: Any) -> tuple[Tensor, list[int]]:
    """Every rank's rows in rank order (ranks may hold different numbers of rows) and how many each held."""
    world, _ = world_and_rank(group)
    if world == 1:
        return tensor, [tensor.shape[0]]
    sizes_tensor = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    sizes_list = [torch.empty_like(sizes_tensor) for _ in range(world)]
    dist.all_gather(sizes_list, sizes_tensor, group=group)
    sizes = [int(s) for s in sizes_list]
    padded = tensor.new_zeros((max(sizes), *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([part[:size] for part, size in zip(parts, sizes)]), sizes


def all_gather_columns(tensor: Tensor, group: Any) -> Tensor:
    """Every rank's ``(B, k)`` block side by side, ``(B, world·k)``, in rank order."""
    world, _ = world_and_rank(group)
    if world == 1:
        return tensor
    tensor = tensor.contiguous()
    parts = [torch.empty_like(tensor) for _ in range(world)]
    dist.all_gather(parts, tensor, group=group)
    return torch.cat(parts, dim=1)
