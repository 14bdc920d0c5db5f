r"""Class-sharded margin cross-entropy on ``torch.distributed``: model parallelism for the classifier.

When the C·K×d class weights outgrow one device, rank r keeps only the rows of its contiguous block of classes
``[class_start, class_stop)`` (as in InsightFace's Partial FC, "Partial FC: Training 10 Million Identities on a
Single Machine", An et al., ICCVW 2021, https://arxiv.org/abs/2010.05222). One step:

1. the ranks agree: each checks its own arguments and inputs, one all-gather exchanges a small report, and then
   every rank raises the same error (naming the rank and the values) or every rank proceeds (``_engine/agreement.py``);
2. every rank's L2-normalised features and targets are all-gathered (N·d numbers and N·P targets, N the global
   batch, P = 1 for class indices);
3. each rank runs the chunk kernel of :func:`mll.functional.margin_cross_entropy` on its block — the same code —
   with two all-reduces that assemble the softmax over all C classes exactly: MAX of each row's largest logit,
   then SUM of each row's rescaled sum of exponentials and of its target term;
4. backward recomputes the block's logits, writes the block's weight gradient (which never leaves the rank) and
   sends the feature gradients home with a reduce-scatter.

Per step and rank the traffic is O(N·d + N·P), independent of C; see ``docs/sharded.md`` for the byte counts.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from mll.functional._engine.agreement import Report, agree, check_block
from mll.functional._engine.block import RankRows, Ranks
from mll.functional._engine.checks import (
    check_generator,
    check_pair,
    check_reduction,
    check_sample_rate,
    check_scale,
    check_target,
    is_int,
)
from mll.functional._engine.chunks import Spec, prepare
from mll.functional._engine.compiled import outside_graph
from mll.functional._engine.distributed import GatherRows, all_gather_rows, all_reduce, rank_and_world
from mll.functional._engine.kernel import chunked_ce
from mll.functional._engine.normalization import normalize
from mll.functional._engine.numerics import Scale, acc_dtype
from mll.functional._engine.plan import Plan, plan
from mll.functional._engine.row_tiles import row_tiled_ce
from mll.functional._engine.targets import Target, Targets, dense_to_pair, merge_duplicates, pad_pairs
from mll.functional.chunked import Reduction, logits_buffers, scalar_loss
from mll.functional.margin import Margin, param_tensor
from mll.functional.margins import resolve_margin
from mll.functional.sharding import sample_classes

__all__ = ["sharded_margin_cross_entropy"]


def _check_locally(
    input: Any, weight: Any, target: Any, class_start: Any, num_classes: Any, scale: Any, margin: Any,
    margin_type: Any, easy_margin: Any, num_sub_centers: Any, pooling: Any, pooling_temperature: Any, sample_rate: Any,
    generator: Any, chunk_size: Any, feature_grad_scale: Any, reduction: Any, report: Report,
) -> tuple[Margin, Optional[Tensor], Optional[tuple[Tensor, Tensor]], int, tuple[int, ...], torch.dtype]:  # fmt: skip
    """Every check of one rank's call, filling ``report`` as it goes (what must agree between ranks)."""
    check_scale(scale)
    report.set_scale(scale)
    margin_ = resolve_margin(margin, margin_type, easy_margin)
    report.set_margin(margin_.family.name, margin_.params)
    check_reduction(reduction)
    report.set_reduction(reduction)
    check_sample_rate(sample_rate)  # each rank samples its own block: rates need not agree
    check_generator(generator)
    k, lead = check_block(
        report, input, weight, class_start, num_classes, num_sub_centers, pooling, pooling_temperature, chunk_size,
        feature_grad_scale,
    )  # fmt: skip
    num_classes = int(num_classes)
    width = weight.shape[0] // k
    acc = acc_dtype(input.dtype)
    shape = torch.Size((*lead, num_classes))
    for spec, value in zip(margin_.family.parameters, margin_.params):
        if isinstance(value, Tensor) and value.dim() == 1:  # per class: this block's classes
            spec.check(value, margin_.family.label, (*lead, width) if width > 0 else None)
            if value.shape[0] != width:
                raise ValueError(
                    f"{margin_.family.label} {spec.name} per class must have shape ({width},), one per class of this "
                    f"rank's block, but got {tuple(value.shape)}"
                )
        elif isinstance(value, Tensor) and value.dim() > 1 and value.shape[-1] != 1:
            raise ValueError(
                f"{margin_.family.label} {spec.name} per entry (*, C) is not sharded: give it per class of the block "
                "(B,) or per sample (*, 1)"
            )
        else:
            spec.check(value, margin_.family.label, shape)
    labels, pair = None, None
    if isinstance(target, (tuple, list)):
        pair = check_pair(target, lead, num_classes)
    else:
        checked = check_target(target, shape)
        if not checked.is_floating_point():
            labels = checked.reshape(-1)
        else:
            if checked.requires_grad and torch.is_grad_enabled():
                raise ValueError("the sharded loss does not differentiate soft targets: detach target")
            pair = dense_to_pair(checked.reshape(-1, num_classes))
    if margin_.family.class_indices_only and labels is None:
        raise ValueError(
            f"{margin_.family.label} needs class indices (an integer tensor of shape (*)), not soft targets"
        )
    report.soft = labels is None
    report.entries = 1 if pair is None else pair[0].shape[-1]
    report.set_requires_grad(input, weight, scale)
    if pair is not None:
        p = pair[0].shape[-1]
        pair = (pair[0].reshape(report.rows, p), pair[1].reshape(report.rows, p).to(acc))
    return margin_, labels, pair, k, lead, acc


def sharded_margin_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Target,
    *,
    class_start: int,
    num_classes: int,
    scale: Scale,
    margin: Union[Margin, float] = 0.0,
    margin_type: Optional[str] = None,
    easy_margin: bool = False,
    num_sub_centers: int = 1,
    pooling: str = "max",
    pooling_temperature: float = 0.1,
    sample_rate: float = 1.0,
    generator: Optional[torch.Generator] = None,
    chunk_size: Optional[int] = None,
    feature_grad_scale: Optional[float] = None,
    group: Any = None,
    reduction: Reduction = "mean",
    normalized: bool = True,
    sampler: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:
    r"""Margin cross-entropy over C classes whose weights are split by class across the ranks of ``group``.

    Every rank of the group calls it in the same step with its own features and targets and its block of the
    weights: rows ``(c − class_start)·K + k`` of ``weight`` are sub-center k of class c, for the block's classes
    ``class_start <= c < class_start + weight.shape[0] / K``. The blocks must tile ``[0, C)`` (in any rank order;
    empty blocks are allowed, see :func:`shard_bounds`). The result equals, in value and gradients,
    :func:`margin_cross_entropy` (and ``F.cross_entropy`` of the dense head's logits) on the global batch — all
    ranks' samples in rank order — with the full weight matrix. Without an initialised process group (or in a
    group of one) it is that single-process loss.

    **Margin.** Any :class:`MarginFamily`: ``margin=ARC(0.5)``, or a float with ``margin_type``. Its parameters are
    floats (the same on every rank), per-class tensors of *this block*, shape ``(B,)``, or per-sample tensors of
    this rank's samples, shape ``(*, 1)`` (gathered with the features; a per-sample parameter that requires grad,
    MagFace's magnitude, gets its gradient home like the features).

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
    ``t[i, classes[i, p]] += weights[i, p]``.

    **Faults.** Every argument and input is checked on its rank, then the ranks agree before any other collective:
    a bad argument on one rank raises the same error on every rank (naming the rank), and the group stays usable.
    A rank that does not call at all (a crash, a skipped step) leaves the others waiting until the process group's
    timeout (``torch.distributed.init_process_group(timeout=...)``, 30 minutes by default for gloo).

    **Communication** per call and rank: the agreement (one all-gather of ~30 integers), an all-gather of the
    features (N·d) and targets (N·P), an all-reduce MAX (N numbers) and SUM (2N); in backward an all-gather of a
    flag and the upstream gradients and a reduce-scatter of the feature gradients (N·d). Nothing grows with C. It
    runs eagerly (a graph break under ``torch.compile``; host syncs, Python loops) and gives first derivatives only.
    Collectives run on ``input``'s device, so gloo (CPU) and nccl (GPU) both work.

    Args:
        input (Tensor[*, d]): this rank's features.
        weight (Tensor[B*K, d]): this rank's block of class weights (B classes, possibly 0).
        target: this rank's class indices ``(*)``, soft targets ``(*, C)``, or a pair ``(classes, weights)``.
        class_start (int): the block's first class.
        num_classes (int): ``C``, all classes over all ranks.
        scale (float or Tensor): ``s`` (the same on every rank).
        margin (Margin or float): a bound margin, or a float with ``margin_type`` (as :func:`margin_cross_entropy`).
        margin_type (str, optional): ``"cos"`` (default), ``"arc"``, ``"none"``, or another family's name.
        easy_margin (bool): ArcFace's easy margin (with ``margin_type="arc"``).
        num_sub_centers (int): ``K``.
        pooling (str): ``"max"`` or ``"soft"`` sub-center pooling.
        pooling_temperature (float): γ of soft pooling.
        sample_rate (float): Partial FC's fraction of each block kept per call, in ``(0, 1]``.
        generator (torch.Generator, optional): for the sampling, on the weights' device.
        chunk_size (int, optional): classes per chunk of the block; default ``2**18 // (N·K)`` on the CPU,
            ``2**22 // (N·K)`` on an accelerator (N global).
        feature_grad_scale (float, optional): multiplier of the features' gradient; None means the world size.
        group (ProcessGroup, optional): the ranks sharing the classes; the default group when None.
        reduction (str): ``"mean"``, ``"sum"`` or ``"none"``.
        normalized (bool): True (every cosine head): features and weights are L2-normalised, the family sees
            cosines; False: both are used as they are, the family sees the dot products x·w (L-Softmax, whose
            margin reads the norms: :data:`mll.functional.LARGE_MARGIN`).
        sampler (callable, optional): with ``sample_rate < 1``, chooses the kept classes in place of
            :func:`sample_classes`: ``sampler(positive) -> kept``, from the block's positive flags (Tensor[width] of
            bool) to the sorted block-local indices to keep, every positive among them (e.g.
            :func:`sample_classes_by_key`, whose sample does not depend on the blocks).

    Returns:
        Tensor: the loss (float32 for half-precision inputs).
    """
    return outside_graph(_sharded, _EAGER)(
        input, weight, target, class_start, num_classes, scale, margin, margin_type, easy_margin, num_sub_centers,
        pooling, pooling_temperature, sample_rate, generator, chunk_size, feature_grad_scale, group, reduction,
        normalized, sampler,
    )  # fmt: skip


_EAGER: list[Any] = []  # _sharded outside the graph (outside_graph)


def _sharded(
    input: Tensor, weight: Tensor, target: Target, class_start: int, num_classes: int, scale: Scale, margin: Any,
    margin_type: Optional[str], easy_margin: bool, num_sub_centers: int, pooling: str, pooling_temperature: float,
    sample_rate: float, generator: Optional[torch.Generator], chunk_size: Optional[int],
    feature_grad_scale: Optional[float], group: Any, reduction: str, normalized: bool = True,
    sampler: Optional[Callable[[Tensor], Tensor]] = None,
) -> Tensor:  # fmt: skip
    rank, world = rank_and_world(group)
    device = input.device if isinstance(input, Tensor) else torch.device("cpu")
    # 1. this rank's checks; their outcome travels in the report, so that every rank raises or every rank goes on
    report = Report()
    problem: Optional[Exception] = None
    local: Any = None
    try:
        local = _check_locally(
            input, weight, target, class_start, num_classes, scale, margin, margin_type, easy_margin,
            num_sub_centers, pooling, pooling_temperature, sample_rate, generator, chunk_size, feature_grad_scale,
            reduction, report,
        )  # fmt: skip
    except (TypeError, ValueError) as error:
        problem = error
    reports = agree(report, problem, device, group, world, num_classes if is_int(num_classes) else 0)
    margin_, labels, pair, k, lead, acc = local
    sizes = [r.rows for r in reports]
    total, d, width = sum(sizes), input.shape[-1], weight.shape[0] // k
    if total == 0:  # an empty global batch: empty losses, the mean NaN, as F.cross_entropy; nothing to exchange
        losses = input.reshape(0, d).sum(-1) + 0.0 * weight.sum()
        if reduction == "none":
            return losses.reshape(lead)
        return losses.sum() if reduction == "sum" else losses.mean()

    # 2. gather the features, the targets and the per-sample margin parameters
    grad_scale = float(world) if feature_grad_scale is None else float(feature_grad_scale)
    x = (normalize(input) if normalized else input).reshape(sizes[rank], d)
    if world > 1 or grad_scale != 1.0:
        x = GatherRows.apply(x, sizes, rank, group, grad_scale)
    p = max(r.entries for r in reports)
    if labels is not None:
        classes = all_gather_rows(labels.reshape(-1, 1), sizes, group)
        weights, row_sum = None, None
    else:
        assert pair is not None
        pair_classes, pair_weights = pad_pairs(pair[0], pair[1], p)
        classes = all_gather_rows(pair_classes, sizes, group)
        weights = all_gather_rows(pair_weights, sizes, group)
        row_sum = weights.sum(1)
        classes, weights = merge_duplicates(classes, weights)
    classes = torch.where(classes >= 0, classes - int(class_start), -1)  # block-local; outside [0, width): elsewhere
    params = []
    for value in margin_.params:
        tensor = param_tensor(value, acc, x.device)
        if tensor.dim() >= 1 and tensor.shape[-1] == 1 and tensor.dim() > 1:  # per sample: this rank's rows
            tensor = tensor.expand(*lead, 1).reshape(sizes[rank], 1)
            if world > 1 or (tensor.requires_grad and grad_scale != 1.0):
                tensor = GatherRows.apply(tensor, sizes, rank, group, grad_scale)
        params.append(tensor)

    # Partial FC: keep the block's positives and a random sample of the rest
    w = weight
    if sample_rate < 1.0 and width > 0:
        inside = (classes >= 0) & (classes < width)
        if weights is not None:
            inside &= weights != 0
        positive = torch.zeros(width, dtype=torch.bool, device=weight.device)
        positive[classes[inside]] = True
        kept = sample_classes(positive, sample_rate, generator=generator) if sampler is None else sampler(positive)
        if kept.numel() < width:
            rows_of_kept = (kept.unsqueeze(1) * k + torch.arange(k, device=kept.device)).reshape(-1)
            w = weight.index_select(0, rows_of_kept)  # autograd scatters the gradient back to these rows
            in_block = (classes >= 0) & (classes < width)
            remapped = torch.searchsorted(kept, classes.clamp(0, width - 1).contiguous())
            hit = in_block & (kept[remapped.clamp(max=kept.numel() - 1)] == classes)
            classes = torch.where(hit, remapped, -1)
            params = [t.index_select(0, kept) if t.dim() == 1 else t for t in params]  # per class: the kept ones
            width = kept.numel()

    # 3. the chunk kernel, its row statistics all-reduced over the blocks
    tau = float(pooling_temperature) if pooling == "soft" and k > 1 else None
    spec = Spec(margin_.family, Targets(classes=classes, weights=weights, row_sum=row_sum), k, 1, tau,
                reduce=lambda t, op: all_reduce(t, op, group, world), normalize_weight=normalized)  # fmt: skip
    choice = _agreed_plan(spec, total, width, input, w, scale, params, reduction, chunk_size, group, world)
    spec.chunk, spec.keep = choice.chunk, choice.path == "keep"
    value = prepare(spec, x, w, tuple(params))
    if margin_.family.negatives is not None:  # each row's target cosine and parameters, from the rank that owns it
        owner = (classes[:, :1] >= 0) & (classes[:, :1] < width)
        assert spec.target_cos is not None
        spec.target_cos = all_reduce(torch.where(owner, spec.target_cos, 0.0), "sum", group, world)
        spec.row_params = tuple(
            all_reduce(torch.where(owner, r, 0.0), "sum", group, world) if t.dim() == 1 else r
            for t, r in zip(params, spec.row_params)
        )
    if choice.path == "row_tiles":  # the loss and its gradient in one pass, tile by tile (the same tiles everywhere)
        spec.ranks = Ranks(rank, sizes, group)
        out = row_tiled_ce(x, w, scale, value, spec, choice.rows, reduction, total, *params)
        return out.to(input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32)
    losses, *_ = chunked_ce(x, w, scale, value, spec, *params)
    out = RankRows.apply(losses, sizes, rank, group, reduction)
    out = out.to(input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32)
    return out.reshape(lead) if reduction == "none" else out


def _agreed_plan(
    spec: Spec, total: int, width: int, input: Tensor, weight: Tensor, scale: Any, params: list[Tensor],
    reduction: str, chunk_size: Optional[int], group: Any, world: int,
) -> Plan:  # fmt: skip
    """The cost model's path for this rank's block; the row tiles run collectives per tile, so every rank tiles alike
    (the smallest tile of any rank) or none does (one small all-reduce)."""
    buffers = logits_buffers(spec)
    scalar = not spec.compiled and scalar_loss(reduction, input, weight, scale, params)
    choice = plan(total, max(width, 1), spec.num_sub_centers, buffers, input.dtype, input.device, scalar_loss=scalar,
                  chunk=chunk_size)  # fmt: skip
    if not scalar:
        return choice
    mine = choice.rows if choice.path == "row_tiles" else 0
    rows = mine if world == 1 else -int(all_reduce(torch.tensor([-mine], device=input.device), "max", group, world)[0])
    if rows > 0:
        return replace(choice, path="row_tiles", rows=rows)
    return plan(total, max(width, 1), spec.num_sub_centers, buffers, input.dtype, input.device, chunk=chunk_size)
