"""How the classes are split across ranks (:func:`shard_bounds`) and sampled per step (:func:`sample_classes`,
Partial FC's class sample of each rank's block; :func:`sample_classes_by_key`, a sample that does not depend on the
blocks), for the class-sharded loss (:func:`sharded_margin_cross_entropy`) and heads."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from mll.functional._engine.checks import check_generator, check_num_classes, check_sample_rate, is_int

__all__ = ["sample_classes", "sample_classes_by_key", "shard_bounds"]


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


_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, c: int) -> Tensor:
    """``x·c mod 2**32`` for 32-bit values held in int64, in two halves (no product reaches 2**63)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: Tensor) -> Tensor:
    # a 32-bit integer hash (xor-shift-multiply, the "lowbias32" constants of C. Wellons' hash-prospector)
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def class_uniforms(classes: Tensor, seed: int, step: int) -> Tensor:
    """One uniform number in (0, 1) per class index (int64), a hash of ``(seed, step, class)``: the same for a class
    whichever rank computes it, different per step and seed. Float64."""
    key = torch.tensor(
        [seed & _MASK32, (seed >> 32) & _MASK32, step & _MASK32, (step >> 32) & _MASK32], dtype=torch.int64
    )
    k = _mix32(key[0:1])
    for part in key[1:]:
        k = _mix32(k ^ part)
    k = k.to(classes.device)
    h = _mix32(_mix32((classes & _MASK32) ^ k) ^ ((classes >> 32) & _MASK32))
    return (h.to(torch.float64) + 0.5) / 2.0**32


def sample_classes_by_key(positive: Tensor, sample_rate: float, *, class_start: int, seed: int, step: int) -> Tensor:
    """One step's class sample of a block that does not depend on how the classes are split over the ranks.

    Every positive class is kept, and every other class c independently when its uniform number
    ``u(seed, step, c) < sample_rate`` — a hash of the seed, the step and the class index (:func:`class_uniforms`),
    not a draw from a generator. So the classes kept are the same whether one rank holds every class or several
    ranks hold blocks of them: a training state saved on A ranks resumes on B ranks with the same samples (see
    ``docs/sharded.md``). The number kept is random (``#positives + sample_rate·(width − #positives)`` on average),
    where :func:`sample_classes` keeps a fixed share of each block. A rate of 1 keeps every class. O(width) integer
    operations, on ``positive``'s device; eager only (the number kept depends on the data).

    Args:
        positive (Tensor[width] of bool): the block's classes that are targets of some sample in the global batch.
        sample_rate (float): each other class's probability of being kept, in ``(0, 1]``.
        class_start (int): the block's first class (its global index).
        seed (int): ``>= 0``, the same on every rank.
        step (int): ``>= 0``, this step's number, the same on every rank.

    Returns:
        Tensor[S] of int64: sorted block-local indices of the kept classes.
    """
    check_sample_rate(sample_rate)
    if not isinstance(positive, Tensor) or positive.dtype != torch.bool or positive.dim() != 1:
        raise TypeError("positive must be a 1-dim bool tensor (one flag per class of the block)")
    for name, value in (("class_start", class_start), ("seed", seed), ("step", step)):
        if not is_int(value) or value < 0:
            raise ValueError(f"{name} must be an integer >= 0, but got {value!r}")
    width = positive.numel()
    classes = torch.arange(int(class_start), int(class_start) + width, device=positive.device)
    keep = positive | (class_uniforms(classes, int(seed), int(step)) < sample_rate)
    return keep.nonzero().squeeze(1)
