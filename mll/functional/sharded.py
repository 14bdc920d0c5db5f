r"""Class-sharded margin cross-entropy on ``torch.distributed``: model parallelism for the classifier.

When the C·K×d class weights outgrow one device, rank r keeps only the rows of its contiguous block of classes
``[class_start, class_stop)`` (as in InsightFace's Partial FC, "Partial FC: Training 10 Million Identities on a
Single Machine", An et al., ICCVW 2021, https://arxiv.org/abs/2010.05222). One step:

1. every rank's L2-normalised features and labels are all-gathered (N·d numbers and N labels, N the global batch);
2. each rank computes the cosines of all N features against its block, chunk by chunk as
   :func:`mll.functional.margin_cross_entropy` does, and applies the margin to the targets it owns;
3. the softmax over all C classes is assembled exactly from per-row statistics: an all-reduce MAX of each row's
   largest logit, then one all-reduce SUM of each row's sum of ``exp(z − max)`` and of its target term
   (the target logit, non-zero only on its owner; for soft targets ``Σ_j t_ij z_ij``, a sum over the blocks);
4. backward recomputes the block's logits, forms ``p − t`` locally, writes the block's weight gradient (which
   never leaves the rank) and sends the feature gradients home with a reduce-scatter.

Per step and rank the traffic is O(N·d + N), independent of C; see ``docs/sharded.md`` for the byte counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, TypeVar, Union, cast

import torch
from torch import Tensor

from mll.functional._checks import (
    _is_int,
    _is_real,
    check_features,
    check_margin,
    check_num_classes,
    check_num_sub_centers,
    check_scale,
    check_target,
    shape_str,
)
from mll.functional._distributed import (
    GatherRows,
    all_gather_ints,
    all_gather_rows,
    all_reduce,
    bits_float,
    float_bits,
    rank_and_world,
    refuse_double_backward,
)
from mll.functional._target import Scale
from mll.functional.chunked import (
    MarginType,
    Reduction,
    _chunk_logits,
    _eps,
    default_chunk_size,
)
from mll.functional.cosine import normalize
from mll.functional.margins import ARC_MARGIN_RANGE, COS_MARGIN_RANGE, ValueAndSlope, _arc_fn, _cos_fn

__all__ = ["sample_classes", "shard_bounds", "sharded_margin_cross_entropy"]

#: class indices ``(*)``, dense soft targets ``(*, C)``, or few-hot soft targets as ``(classes, weights)``, ``(*, P)``
Target = Union[Tensor, tuple[Tensor, Tensor]]


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
    if not _is_int(world_size) or world_size < 1:
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
    exactly no sampling.

    Args:
        positive (Tensor[width] of bool): the block's classes that are targets of some sample in the global batch.
        sample_rate (float): fraction of the block to keep, in ``(0, 1]``.
        generator (torch.Generator, optional): on ``positive``'s device; the default generator when None.

    Returns:
        Tensor[S] of int64: sorted block-local indices of the kept classes.
    """
    _check_sample_rate(sample_rate)
    width = positive.numel()
    count = max(1, round(sample_rate * width))
    if count >= width:
        return torch.arange(width, device=positive.device)
    count = max(count, int(positive.sum()))
    score = torch.rand(width, generator=generator, device=positive.device).masked_fill_(positive, 2.0)
    return score.topk(count, sorted=False).indices.sort().values


def _check_grad_scale_and_generator(feature_grad_scale: object, generator: object) -> None:
    if feature_grad_scale is not None and not (
        _is_real(feature_grad_scale) and math.isfinite(feature_grad_scale) and feature_grad_scale >= 0  # type: ignore[arg-type, operator]
    ):
        raise ValueError(f"feature_grad_scale must be None or a finite float >= 0, but got {feature_grad_scale!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, but got {type(generator).__name__}")


def _check_sample_rate(sample_rate: object) -> None:
    if not _is_real(sample_rate) or not (0.0 < sample_rate <= 1.0):  # type: ignore[operator]
        raise ValueError(f"sample_rate must be a float in (0, 1], but got {sample_rate!r}")


@dataclass
class _Comm:
    group: Any
    rank: int
    world: int
    sizes: list[int]  # rows of every rank
    reduction: str


@dataclass
class _Soft:
    """Soft targets that fall in this block: entries ``(row, col, val)`` sorted by col; ``spans[i]`` is the slice of
    chunk i; ``row_sum[i] = Σ_j t_ij`` over all C classes."""

    rows: Tensor
    cols: Tensor
    vals: Tensor
    row_sum: Tensor
    spans: list[tuple[int, int]]


class _ShardedMarginCE(torch.autograd.Function):
    """Losses of the global batch from one block of classes; statistics all-reduced; exact block-local backward."""

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        hard: Optional[Tensor],
        soft: Optional[_Soft],
        scale: Scale,
        margin: tuple[Tensor, ...],
        value_and_slope: ValueAndSlope,
        k: int,
        chunk: int,
        comm: _Comm,
    ) -> Tensor:
        n, width = x.shape[0], weight.shape[0] // k
        acc = _acc_dtype(x.dtype)
        s = scale.detach().to(acc) if isinstance(scale, Tensor) else scale
        local_max = torch.full((n,), -math.inf, dtype=acc, device=x.device)
        local_sum = torch.zeros(n, dtype=acc, device=x.device)
        target_logit = torch.zeros(n, dtype=acc, device=x.device)  # Σ_j t_ij z_ij over this block's j
        for i, start in enumerate(range(0, width, chunk)):
            stop = min(start + chunk, width)
            z, _, _, _ = _block_logits(x, weight, hard, soft, i, start, stop, k, s, margin, value_and_slope, acc)
            if soft is not None:
                lo, hi = soft.spans[i]
                rows, cols = soft.rows[lo:hi], soft.cols[lo:hi] - start
                target_logit.index_add_(0, rows, soft.vals[lo:hi] * z[rows, cols])
            else:
                assert hard is not None
                local = hard - start
                inside = (local >= 0) & (local < stop - start)
                picked = z.gather(1, local.clamp(0, stop - start - 1).unsqueeze(1)).squeeze(1)
                target_logit = torch.where(inside, picked, target_logit)
            new_max = torch.maximum(local_max, z.amax(1))
            local_sum = local_sum * torch.exp(local_max - new_max) + torch.exp(z - new_max[:, None]).sum(1)
            local_max = new_max
        # the softmax over all C classes: the global row max first, so that no block's exp overflows ...
        global_max = all_reduce(local_max.clone(), "max", comm.group, comm.world)
        # ... then one all-reduce for the rescaled sums and the target terms (an empty block adds exp(−inf)·0 = 0)
        stats = all_reduce(
            torch.stack([local_sum * torch.exp(local_max - global_max), target_logit]), "sum", comm.group, comm.world
        )
        lse = global_max + torch.log(stats[0])
        # −Σ_j t_j log p_j = (Σ_j t_j)·lse − Σ_j t_j z_j; for class indices Σ_j t_j = 1
        losses = (lse * soft.row_sum if soft is not None else lse) - stats[1]
        ctx.save_for_backward(x, weight, hard, lse, scale if isinstance(scale, Tensor) else None)
        ctx.soft, ctx.scale, ctx.margin, ctx.value_and_slope = soft, scale, margin, value_and_slope
        ctx.k, ctx.chunk, ctx.comm = k, chunk, comm
        out_dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        if comm.reduction == "none":
            offset = sum(comm.sizes[: comm.rank])
            return losses[offset : offset + comm.sizes[comm.rank]].to(out_dtype, copy=True)
        return (losses.sum() if comm.reduction == "sum" else losses.mean()).to(out_dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        refuse_double_backward()
        x, weight, hard, lse, scale_t = ctx.saved_tensors
        soft, k, chunk, comm = ctx.soft, ctx.k, ctx.chunk, ctx.comm
        acc = _acc_dtype(x.dtype)
        s = scale_t.detach().to(acc) if scale_t is not None else ctx.scale
        n, width = x.shape[0], weight.shape[0] // k
        g = _upstream_grad(grad.to(acc), comm, n)
        grad_x = torch.zeros(x.shape, dtype=acc, device=x.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if ctx.needs_input_grad[1] else None
        grad_s = None
        if scale_t is not None and ctx.needs_input_grad[4]:
            grad_s = torch.zeros((), dtype=acc, device=x.device)
        for i, start in enumerate(range(0, width, chunk)):
            stop = min(start + chunk, width)
            z, slope, kept, t = _block_logits(
                x, weight, hard, soft, i, start, stop, k, s, ctx.margin, ctx.value_and_slope, acc, keep=True
            )
            dz = torch.exp_(z - lse[:, None])  # p
            if soft is not None:
                dz.mul_(soft.row_sum[:, None])
                if t is not None:
                    dz.sub_(t)
            else:
                assert hard is not None
                local = hard - start
                inside = ((local >= 0) & (local < stop - start)).to(acc)
                dz.scatter_add_(1, local.clamp(0, stop - start - 1).unsqueeze(1), -inside.unsqueeze(1))
            dz.mul_(g[:, None])
            if grad_s is not None:
                grad_s += (dz * z).sum() / s
            if t is not None:  # soft targets in this chunk: the margin's slope on every entry
                dcos = dz.mul_(slope).mul_(s)
            else:
                dcos = dz.mul_(s)
                if hard is not None:  # the slope at each row's target entry (1 where the target is elsewhere)
                    index = (hard - start).clamp(0, stop - start - 1).unsqueeze(1)
                    dcos.scatter_(1, index, dcos.gather(1, index) * slope.unsqueeze(1))
            _add_grads(dcos, x, weight, kept, k, start, stop, grad_x, grad_w)
        if grad_s is not None:  # the scale is shared by the blocks: its gradient sums over them
            all_reduce(grad_s, "sum", comm.group, comm.world)
        return (
            None if grad_x is None else grad_x.to(x.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None,
            None,
            None if grad_s is None else grad_s.to(scale_t.dtype),
            *([None] * 5),
        )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics in float64 for float64 input, float32 otherwise (half precision included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_logits(
    x: Tensor,
    weight: Tensor,
    hard: Optional[Tensor],
    soft: Optional[_Soft],
    i: int,
    start: int,
    stop: int,
    k: int,
    s: Any,
    margin: tuple[Tensor, ...],
    value_and_slope: ValueAndSlope,
    acc: torch.dtype,
    keep: bool = False,
) -> tuple[Tensor, Tensor, Any, Optional[Tensor]]:
    """Logits of chunk i (block classes [start, stop)), the margin's slope, what backward needs, and the chunk's
    dense soft targets — None when no soft target falls in the chunk (then the slope is per row, as for class
    indices, and the margin's trigonometry is skipped: with t = 0 every margin is the identity)."""
    if soft is None or soft.spans[i][0] == soft.spans[i][1]:
        target = hard if hard is not None else torch.full((x.shape[0],), -1, dtype=torch.int64, device=x.device)
        z, slope, kept = _chunk_logits(x, weight, target, False, start, stop, k, s, value_and_slope, margin, acc, keep)
        return z, slope, kept, None
    lo, hi = soft.spans[i]
    t = torch.zeros(x.shape[0], stop - start, dtype=acc, device=x.device)
    # accumulate: a class listed twice for one sample (a mixup of two samples of that class) counts once, summed
    t.index_put_((soft.rows[lo:hi], soft.cols[lo:hi] - start), soft.vals[lo:hi], accumulate=True)
    rows = weight[start * k : stop * k]
    z, slope, kept = _chunk_logits(x, rows, t, True, 0, stop - start, k, s, value_and_slope, margin, acc, keep)
    return z, slope, kept, t


def _add_grads(
    dcos: Tensor,
    x: Tensor,
    weight: Tensor,
    kept: Any,
    k: int,
    start: int,
    stop: int,
    grad_x: Optional[Tensor],
    grad_w: Optional[Tensor],
) -> None:
    """Chain ∂loss/∂cos of one chunk through the sub-center max-pool, the GEMM and the weights' normalisation."""
    w_hat, norms, cos_k, pooled = kept
    acc = dcos.dtype
    if k > 1:  # max-pool: split among ties as amax does
        winners = (cos_k.view(x.shape[0], stop - start, k) == pooled.unsqueeze(-1)).to(acc)
        dcos = (winners * (dcos / winners.sum(-1)).unsqueeze(-1)).view(x.shape[0], -1)
    w_acc = w_hat.to(acc)
    if grad_x is not None:
        grad_x += dcos @ w_acc
    if grad_w is not None:
        d_hat = dcos.T @ x.to(acc)
        # backward of w / max(‖w‖, ε): remove the radial part where the norm is above ε
        eps = _eps(weight.dtype)
        radial = (w_acc * d_hat).sum(1, keepdim=True)
        grad_w[start * k : stop * k] = torch.where(norms > eps, d_hat - w_acc * radial, d_hat) / norms.clamp(min=eps)


def _upstream_grad(grad: Tensor, comm: _Comm, total: int) -> Tensor:
    """∂(objective)/∂(per-sample loss) for the N samples of the global batch.

    Each rank's output stands for its own samples: its per-sample gradients (``"none"``), or its scalar gradient
    spread over its samples (``"sum"``; divided by N for ``"mean"``). Gathering them gives every block the
    gradient of the sum over ranks of what each rank backpropagates — with the same ``loss.backward()`` on every
    rank, the gradient of the loss itself.
    """
    if comm.reduction == "none":
        return all_gather_rows(grad.reshape(-1), comm.sizes, comm.group)
    per_rank = all_gather_rows(grad.reshape(1), [1] * comm.world, comm.group)
    repeats = torch.tensor(comm.sizes, device=grad.device)
    g = per_rank.repeat_interleave(repeats, output_size=total)
    return g / total if comm.reduction == "mean" else g


def _check_margin_type(margin_type: object, margin: float) -> float:
    if margin_type == "cos":
        check_margin(margin, *COS_MARGIN_RANGE, "CosFace")
    elif margin_type == "arc":
        check_margin(margin, *ARC_MARGIN_RANGE, "ArcFace")
    elif margin_type == "none":
        return 0.0
    else:
        raise ValueError(f"margin_type must be 'cos', 'arc' or 'none', but got {margin_type!r}")
    return float(margin)


def _local_targets(
    target: object, lead: tuple[int, ...], num_classes: int, acc: torch.dtype
) -> tuple[Optional[Tensor], Optional[tuple[Tensor, Tensor, Tensor]]]:
    """This rank's targets as class indices ``(n,)`` or as the non-zero soft entries ``(rows, cols, vals)``."""
    n = math.prod(lead)
    if isinstance(target, (tuple, list)):
        if len(target) != 2:
            raise ValueError(
                f"target as a sequence must be a pair (classes, weights), but got a {type(target).__name__} of length "
                f"{len(target)}"
            )
        classes, weights = target
        if not isinstance(classes, Tensor) or classes.is_floating_point() or classes.is_complex():
            raise TypeError("target's classes must be an integer tensor of shape (*, P)")
        if not isinstance(weights, Tensor) or not weights.is_floating_point():
            raise TypeError("target's weights must be a floating-point tensor of shape (*, P)")
        if classes.dim() != len(lead) + 1 or tuple(classes.shape[:-1]) != lead or weights.shape != classes.shape:
            raise ValueError(
                f"target's classes and weights must both have shape (*, P) with * = {shape_str(lead)}, "
                f"but got {shape_str(classes.shape)} and {shape_str(weights.shape)}"
            )
        if weights.requires_grad:
            raise ValueError("the sharded loss does not differentiate soft targets: detach the weights")
        if classes.numel() > 0:
            lo, hi = (int(v) for v in torch.aminmax(classes))
            if lo < 0 or hi >= num_classes:
                raise ValueError(f"target's classes must be in [0, {num_classes}), but got values from {lo} to {hi}")
            if not bool((weights >= 0).all()):  # also catches NaN
                raise ValueError(f"target's weights must be non-negative and not NaN, but got min {weights.min():g}")
        p = classes.shape[-1]
        rows = torch.arange(n, device=classes.device).repeat_interleave(p)
        cols, vals = classes.reshape(-1).long(), weights.reshape(-1).to(acc)
        nonzero = vals != 0
        return None, (rows[nonzero], cols[nonzero], vals[nonzero])
    checked = check_target(target, torch.Size((*lead, num_classes)))
    if not checked.is_floating_point():
        return checked.reshape(-1), None
    if checked.requires_grad:
        raise ValueError("the sharded loss does not differentiate soft targets: detach target")
    flat = checked.reshape(n, num_classes)
    rows, cols = flat.nonzero(as_tuple=True)
    return None, (rows, cols, flat[rows, cols].to(acc))


# what every rank reports before the step; the fields after the first five must agree between ranks
_FIELDS = (
    "invalid input",
    "rows",
    "soft entries",
    "class_start",
    "class_stop",
    "num_classes",
    "in_features",
    "num_sub_centers",
    "target kind (0 class indices, 1 soft)",
    "dtype",
    "reduction",
    "margin_type",
    "margin",
    "easy_margin",
    "scale",
    "requires_grad (input, weight, scale)",
)
_FLOAT_FIELDS = {"margin", "scale"}
_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
_MARGIN_TYPES = ("cos", "arc", "none")


def _check_step(rows: list[list[int]], problem: Optional[Exception], num_classes: int) -> None:
    """Raise the same error on every rank when any rank's input is invalid or the ranks disagree, so that no rank
    is left waiting in a collective."""
    bad = [r for r, row in enumerate(rows) if row[0]]
    if problem is not None:
        raise problem
    if bad:
        raise ValueError(f"rank(s) {bad} got invalid input (their error says which); every rank stops here")
    for index in range(5, len(_FIELDS)):
        values = [row[index] for row in rows]
        if len(set(values)) > 1:
            name = _FIELDS[index]
            shown = [bits_float(v) for v in values] if name in _FLOAT_FIELDS else values
            raise ValueError(f"{name} must be the same on every rank, but got {shown} (by rank)")
    ranges = sorted((row[3], row[4]) for row in rows if row[4] > row[3])
    tiles = (
        bool(ranges)
        and all(0 <= row[3] <= row[4] <= num_classes for row in rows)
        and ranges[0][0] == 0
        and ranges[-1][1] == num_classes
        and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    )
    if not tiles:
        by_rank = [(row[3], row[4]) for row in rows]
        raise ValueError(
            f"the ranks' class blocks [class_start, class_start + weight rows / num_sub_centers) must tile "
            f"[0, {num_classes}) without gaps or overlaps, but got {by_rank} (by rank)"
        )


_Fn = TypeVar("_Fn", bound=Callable[..., Any])


def _eager(fn: _Fn) -> _Fn:
    """Collectives, host syncs and Python loops: always run eagerly, a graph break under ``torch.compile``."""
    return cast(_Fn, torch.compiler.disable(fn))


@_eager
def sharded_margin_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Target,
    *,
    class_start: int,
    num_classes: int,
    scale: Scale,
    margin: float = 0.0,
    margin_type: MarginType = "cos",
    easy_margin: bool = False,
    num_sub_centers: int = 1,
    sample_rate: float = 1.0,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    feature_grad_scale: Optional[float] = None,
    group: Any = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Margin cross-entropy over C classes whose weights are split by class across the ranks of ``group``.

    Every rank of the group calls it in the same step with its own features and targets and its block of the
    weights: rows ``(c − class_start)·K + k`` of ``weight`` are sub-center k of class c, for the block's classes
    ``class_start <= c < class_start + weight.shape[0] / K``. The blocks must tile ``[0, C)`` (in any rank order;
    empty blocks are allowed, see :func:`shard_bounds`). The result equals, in value and gradients,
    :func:`margin_cross_entropy` (and ``F.cross_entropy`` of the dense head's logits) on the global batch — all
    ranks' samples in rank order — with the full weight matrix. Without an initialised process group (or in a
    group of one) it is that single-process loss.

    **Value.** ``"mean"`` and ``"sum"`` reduce over the global batch and are identical on every rank;
    ``"none"`` gives this rank's own samples' losses, shape ``(*)``.

    **Gradient.** Every rank must call backward. Each rank's output stands for its own samples: the objective
    differentiated is the sum over ranks of what each rank backpropagates, with a ``"mean"``/``"sum"`` output
    counting as its own samples' share. So when every rank calls ``loss.backward()`` on the same loss L:

    * this rank's ``weight`` gets ∂L/∂W_r (it never leaves the rank), and a tensor ``scale`` gets ∂L/∂s (summed
      over the blocks, the same on every rank);
    * this rank's ``input`` gets ``feature_grad_scale · ∂L/∂x_r``, by default ``world_size · ∂L/∂x_r``: a backbone
      wrapped in ``DistributedDataParallel`` averages its gradients over the ranks, which turns this into exactly
      ∂L/∂θ, the single-process gradient of L. Pass ``feature_grad_scale=1.0`` for the plain ∂L/∂x_r (a backbone
      that is not data-parallel, or a wrapper that sums). Do not wrap the sharded weights in DDP: it would average
      different blocks.

    **Partial FC.** With ``sample_rate < 1`` each rank keeps, per call, the positive classes of the global batch
    in its block plus a uniform random sample of its other classes (:func:`sample_classes`, from ``generator``),
    computes only their logits, and the loss is the cross-entropy over the union of the kept classes; the other
    rows of ``weight`` get a zero gradient. A rate of 1 is exactly no sampling.

    **Targets.** Class indices ``(*)``; soft targets ``(*, C)`` (their non-zero entries travel, so the traffic is
    O(non-zeros): fine for mixup, not for label smoothing over many classes); or few-hot soft targets as a pair
    ``(classes, weights)`` of shape ``(*, P)`` each (mixup: P = 2), equal to the dense ``(*, C)`` targets with
    ``t[i, classes[i, p]] += weights[i, p]``; the margin is ``m·t`` per entry, as in :func:`arc_margin`.

    **Communication** per call and rank: a small exchange of sizes and settings (checked to agree, so a bad
    input on one rank raises on every rank instead of hanging them), an all-gather of the features (N·d) and the
    labels (N), an all-reduce MAX (N numbers) and SUM (2N); in backward an all-gather of N upstream gradients and
    a reduce-scatter of the feature gradients (N·d). Nothing grows with C. It runs eagerly (a graph break under
    ``torch.compile``; host syncs, Python loops) and gives first derivatives only. Collectives run on ``input``'s
    device, so gloo (CPU) and nccl (GPU) both work.

    Args:
        input (Tensor[*, d]): this rank's features.
        weight (Tensor[B*K, d]): this rank's block of class weights (B classes, possibly 0).
        target: this rank's class indices ``(*)``, soft targets ``(*, C)``, or a pair ``(classes, weights)``.
        class_start (int): the block's first class.
        num_classes (int): ``C``, all classes over all ranks.
        scale (float or Tensor): ``s`` (the same on every rank).
        margin (float): ``m`` (ignored for ``"none"``).
        margin_type (str): ``"cos"`` (CosFace), ``"arc"`` (ArcFace) or ``"none"``.
        easy_margin (bool): ArcFace's easy margin.
        num_sub_centers (int): ``K``.
        sample_rate (float): Partial FC's fraction of each block kept per call, in ``(0, 1]``.
        generator (torch.Generator, optional): for the sampling, on the weights' device.
        chunk_size (int, optional): classes per chunk of the block; default ``2**18 // (N·K)`` (N global).
        feature_grad_scale (float, optional): multiplier of the features' gradient; None means the world size.
        group (ProcessGroup, optional): the ranks sharing the classes; the default group when None.
        reduction (str): ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        Tensor: the loss (float32 for half-precision inputs).
    """
    check_scale(scale)
    margin = _check_margin_type(margin_type, margin)
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', but got {reduction!r}")
    _check_sample_rate(sample_rate)
    if chunk_size is not None and (not _is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"chunk_size must be an integer >= 1, but got {chunk_size!r}")
    if not _is_int(class_start) or class_start < 0:
        raise ValueError(f"class_start must be an integer >= 0, but got {class_start!r}")
    check_num_classes(num_classes, "num_classes")
    check_num_sub_centers(num_sub_centers)
    _check_grad_scale_and_generator(feature_grad_scale, generator)
    rank, world = rank_and_world(group)
    k, num_classes, class_start = int(num_sub_centers), int(num_classes), int(class_start)

    # checks of this rank's data: reported to every rank before anything else is exchanged
    problem: Optional[Exception] = None
    labels, entries = None, None
    try:
        check_features(input, weight, k)
        lead = tuple(input.shape[:-1])
        labels, entries = _local_targets(target, lead, num_classes, _acc_dtype(input.dtype))
    except (TypeError, ValueError) as error:
        problem = error
    ok = problem is None
    width = weight.shape[0] // k if ok else 0
    needs = [ok and torch.is_grad_enabled() and t.requires_grad for t in (input, weight)]
    needs.append(isinstance(scale, Tensor) and torch.is_grad_enabled() and scale.requires_grad)
    report = [
        int(not ok),
        math.prod(lead) if ok else 0,
        entries[0].numel() if entries is not None else 0,
        class_start,
        class_start + width,
        num_classes,
        input.shape[-1] if ok else 0,
        k,
        int(entries is not None),
        _DTYPES.index(input.dtype) if ok and input.dtype in _DTYPES else -1,
        _REDUCTIONS.index(reduction),
        _MARGIN_TYPES.index(margin_type),
        float_bits(margin),
        int(bool(easy_margin)),
        float_bits(float(scale.detach()) if isinstance(scale, Tensor) else float(scale)),
        needs[0] + 2 * needs[1] + 4 * needs[2],
    ]
    device = input.device if isinstance(input, Tensor) else torch.device("cpu")
    rows = all_gather_ints(report, device, group, world)
    _check_step(rows, problem, num_classes)

    sizes, entry_sizes = [row[1] for row in rows], [row[2] for row in rows]
    total, d = sum(sizes), input.shape[-1]
    if total == 0:  # an empty global batch: empty losses, the mean NaN, as F.cross_entropy; nothing to exchange
        losses = input.reshape(0, d).sum(-1) + 0.0 * weight.sum()
        if reduction == "none":
            return losses.reshape(lead)
        return losses.sum() if reduction == "sum" else losses.mean()

    acc = _acc_dtype(input.dtype)
    grad_scale = float(world) if feature_grad_scale is None else float(feature_grad_scale)
    x = normalize(input).reshape(sizes[rank], d)
    if world > 1 or grad_scale != 1.0:
        x = GatherRows.apply(x, sizes, rank, group, grad_scale)
    hard, soft = None, None
    if labels is not None:
        hard = all_gather_rows(labels, sizes, group) - class_start  # block-local; outside [0, width) elsewhere
        positive_cols = hard[(hard >= 0) & (hard < width)]
    else:
        assert entries is not None
        offset = sum(sizes[:rank])
        rows_cols = all_gather_rows(torch.stack([entries[0] + offset, entries[1]], 1), entry_sizes, group)
        vals = all_gather_rows(entries[2], entry_sizes, group)
        row_sum = torch.zeros(total, dtype=acc, device=x.device).index_add_(0, rows_cols[:, 0], vals)
        mine = (rows_cols[:, 1] >= class_start) & (rows_cols[:, 1] < class_start + width)
        entry_rows, entry_cols, vals = rows_cols[mine, 0], rows_cols[mine, 1] - class_start, vals[mine]
        positive_cols = entry_cols

    w = weight
    if sample_rate < 1.0 and width > 0:
        positive = torch.zeros(width, dtype=torch.bool, device=weight.device)
        positive[positive_cols] = True
        kept = sample_classes(positive, sample_rate, generator=generator)
        if kept.numel() < width:
            rows_of_kept = (kept.unsqueeze(1) * k + torch.arange(k, device=kept.device)).reshape(-1)
            w = weight.index_select(0, rows_of_kept)  # autograd scatters the gradient back to these rows
            if hard is not None:  # every positive is kept: targets in the block map to their rank in `kept`
                inside = (hard >= 0) & (hard < width)
                hard = torch.where(inside, torch.searchsorted(kept, hard.clamp(0, width - 1)), -1)
            else:
                entry_cols = torch.searchsorted(kept, entry_cols)
            width = kept.numel()

    chunk = default_chunk_size(total, width, k) if chunk_size is None else int(chunk_size)
    if labels is None:
        order = torch.argsort(entry_cols, stable=True)
        entry_rows, entry_cols, vals = entry_rows[order], entry_cols[order], vals[order]
        starts = torch.tensor([*range(0, width, chunk), width], device=entry_cols.device)
        bounds = torch.searchsorted(entry_cols, starts).tolist()
        soft = _Soft(entry_rows, entry_cols, vals, row_sum, list(zip(bounds[:-1], bounds[1:])))
    comm = _Comm(group, rank, world, sizes, reduction)
    fn = _arc_fn(easy_margin) if margin_type == "arc" else _cos_fn  # "none" is CosFace with m = 0
    params = (torch.tensor(margin, dtype=_acc_dtype(x.dtype), device=x.device),)
    out = _ShardedMarginCE.apply(x, w, hard, soft, scale, params, fn, k, chunk, comm)
    return out.reshape(lead) if reduction == "none" else out
