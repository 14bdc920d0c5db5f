"""How the classes are split across ranks (:func:`shard_bounds`) and sampled per step (:func:`sample_classes`,
Partial FC's class sample), for the class-sharded loss (:func:`sharded_margin_cross_entropy`) and heads."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mll.functional._engine.checks import check_generator, check_num_classes, check_sample_rate, is_int

__all__ = ["sample_classes", "shard_bounds"]


def shard_bounds(num_classes: int, world_size: int) -> list[tuple[int, int]]:
    """Contiguous class blocks ``[(start, stop), …]``, one per rank, as even as possible.

    The first ``C mod world`` ranks hold one class more than the others (the split of :func:`numpy.array_split`);
    with fewer classes than ranks the last ``world − C`` blocks are empty, which the loss allows.

    Args:
        num_classes (int): ``C >= 2``.
        world_size (int): number of ranks, ``>= 1``.

    Returns:
        list of (int, int): rank r holds classes ``start <= c < stop``.
    """
    check_num_classes(num_classes, "num_classes")
    if not is_int(world_size) or world_size < 1:
        raise ValueError(f"world_size must be an integer >= 1, but got {world_size!r}")
    base, extra = divmod(int(num_classes), int(world_size))
    bounds, start = [], 0
    for r in range(int(world_size)):
        stop = start + base + (1 if r < extra else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def sample_classes(positive: Tensor, sample_rate: float, *, generator: Optional[torch.Generator] = None) -> Tensor:
    """One step's class sample of a block (Partial FC): every positive class plus uniformly random others.

    ``max(#positives, round(sample_rate · width), 1)`` classes are kept, positives first: each class gets a uniform
    random score in [0, 1), positives get 2, and the highest scores win (the scheme of the Partial FC paper). With
    ``round(sample_rate · width) >= width`` every class is kept and no random number is drawn, so a rate of 1 is
    exactly no sampling. Eager only: the number kept depends on the data (a host read).

    Args:
        positive (Tensor[width] of bool): the block's classes that are targets of some sample in the global batch.
        sample_rate (float): fraction of the block to keep, in ``(0, 1]``.
        generator (torch.Generator, optional): on ``positive``'s device; the default generator when None.

    Returns:
        Tensor[S] of int64: sorted block-local indices of the kept classes.
    """
    check_sample_rate(sample_rate)
    if not isinstance(positive, Tensor) or positive.dtype != torch.bool or positive.dim() != 1:
        got = (
            f"dtype {positive.dtype}, shape {tuple(positive.shape)}"
            if isinstance(positive, Tensor)
            else type(positive).__name__
        )
        raise TypeError(f"positive must be a 1-dim bool tensor (one flag per class of the block), but got {got}")
    check_generator(generator)
    width = positive.numel()
    count = max(1, round(sample_rate * width))
    if count >= width:
        return torch.arange(width, device=positive.device)
    count = max(count, int(positive.sum()))
    score = torch.rand(width, generator=generator, device=positive.device).masked_fill_(positive, 2.0)
    return score.topk(count, sorted=False).indices.sort().values
