"""NPCFace: hard negatives raised, and the target's angular margin grown with how hard they are.

Two parts, both on the engine's paths (see :class:`mll.functional.MarginFamily`): the non-target part raises every
*hard* negative (a cosine above the row's ``cos(θ_y + m)``) to ``t·cos θ_j + a``; the target part is ArcFace's
with a per-sample margin ``m' = m0 + m1·(mean cosine of the row's hard negatives)``. That mean is a statistic of
the whole row (no gradient, as in the authors' code): the dense path reads it from the N×C cosines
(:func:`npcface_statistics`), the chunked loss from one extra pass over the class chunks
(:func:`npcface_statistics_chunked`, no N×C buffer), and the sharded loss adds every block's sums over the ranks.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from mll.functional._engine.checks import check_cosine, check_margin_param, check_scale, check_target, is_real, is_soft
from mll.functional._engine.chunks import chunk_cosines, target_cosines
from mll.functional._engine.dense import gather_target
from mll.functional._engine.distributed import all_gather_ints, all_reduce_sum, rank_and_world
from mll.functional._engine.normalization import normalize
from mll.functional._engine.numerics import Scale, above, acc_dtype, in_place_ok, scratch, work_dtype
from mll.functional.chunked import default_chunk_size
from mll.functional.margin import MarginFamily, MarginParam, MarginParameter, apply_margin, at_target, param_tensor
from mll.functional.margins import ARC_MARGIN_RANGE, _arc_value_and_slope

__all__ = ["NPC", "npcface_margin", "npcface_statistics", "npcface_statistics_chunked"]


def _boundary(target: Tensor, margin: Tensor) -> Tensor:
    """The hard-negative threshold: ArcFace's logit at the row's target, cos(θ_y + m) (with the fix past π − m)."""
    return _arc_value_and_slope(target, margin, False)[0]


def _npc_target(cosine: Tensor, w: Tensor | float, margin: Tensor, positive: Tensor, t: Tensor, a: Tensor) -> Any:
    return _arc_value_and_slope(cosine, positive * w, False)


def _npc_negatives(cosine: Tensor, target: Tensor, margin: Tensor, positive: Tensor, t: Tensor, a: Tensor) -> Any:
    hard = above(cosine, _boundary(target, margin))  # the mask as a number: lerps, exact at 0 and 1
    t, a = t.to(cosine.dtype), a.to(cosine.dtype)
    shifted = torch.mul(cosine, t, out=scratch(cosine, 1)).add_(a) if in_place_ok() else t * cosine + a
    value = torch.lerp(cosine, shifted, hard, out=shifted if in_place_ok() else None)
    one = torch.ones((), dtype=cosine.dtype, device=cosine.device)
    return value, torch.lerp(one.expand_as(hard), t.expand_as(hard), hard, out=hard if in_place_ok() else None)


#: NPCFace: ``NPC(margin, positive, t, a)``; ``positive`` is the target's margin m' (per sample, ``(*, 1)``,
#: from :func:`npcface_statistics`), ``margin`` the hard-negative threshold's.
NPC = MarginFamily(
    "npc",
    _npc_target,
    (
        MarginParameter("margin", *ARC_MARGIN_RANGE),
        MarginParameter("positive", *ARC_MARGIN_RANGE, statistic=True),
        MarginParameter("t", 0.0, math.inf),
        MarginParameter("a", 0.0, math.inf),
    ),
    target_logit=lambda th, m, positive, t, a: math.cos(th + positive),
    negatives=_npc_negatives,
    class_indices_only=True,
    title="NPCFace",
)


def _hard_sums(x: Tensor, weight: Tensor, classes: Tensor, boundary: Tensor, k: int, tau: Optional[float],
               chunk: int) -> tuple[Tensor, Tensor]:  # fmt: skip
    """Per row: the sum and the number of the block's non-target cosines above ``boundary (N,)``, chunk by chunk.
    ``classes (N,)`` are block-local target classes (−1: the target is in another block)."""
    n = x.shape[0]
    total = torch.zeros(n, dtype=boundary.dtype, device=x.device)
    count = torch.zeros(n, dtype=boundary.dtype, device=x.device)
    for start, stop, cos in chunk_cosines(x, weight, k, tau, chunk):
        columns = torch.arange(start, stop, device=x.device)
        hard = (cos > boundary[:, None]) & (columns != classes[:, None])
        total += torch.where(hard, cos, 0.0).sum(1)
        count += hard.sum(1)
    return total, count


def _checked_target(cosine_shape: torch.Size, target: Tensor, margin: MarginParam) -> Tensor:
    check_margin_param(margin, *ARC_MARGIN_RANGE, "NPCFace", cosine_shape)
    target = check_target(target, cosine_shape)
    if is_soft(target):
        raise ValueError(
            "NPCFace needs class indices (an integer tensor of shape (*)), not soft targets: its hard negatives are "
            "those above the target's logit"
        )
    return target


def npcface_statistics(cosine: Tensor, target: Tensor, margin: MarginParam = 0.5) -> Tensor:
    r"""The mean cosine of each row's hard negatives (0 where there are none), ``(*, 1)``, no grad.

    Hard: :math:`j \ne y` with :math:`\cos\theta_j > \cos(\theta_y + m)` (ArcFace's target logit, with its fix past
    π − m). In working precision (float32 for half-precision input).

    Args:
        cosine (Tensor[*, C]): cosines.
        target (Tensor[*] of int): class indices.
        margin (float or Tensor): the threshold's ``m``, radians in ``[0, π/2)``; per class ``(C,)`` or per sample.
    """
    check_cosine(cosine)
    return hard_mean(cosine, _checked_target(cosine.shape, target, margin), margin)


def hard_mean(cosine: Tensor, target: Tensor, margin: MarginParam) -> Tensor:
    """:func:`npcface_statistics` without argument checks (``target``: checked int64 class indices)."""
    with torch.no_grad():
        c = cosine.detach().to(work_dtype(cosine.dtype))
        m = at_target(param_tensor(margin, c.dtype, c.device), c.shape, target)
        target_cos = gather_target(c, target)
        boundary = _boundary(target_cos, m).unsqueeze(-1)
        # every entry above the boundary, then the target's own entry taken out: two passes over the N×C cosines
        # (a comparison and a masked sum) instead of a mask of the non-targets as well
        above = c > boundary
        own = (target_cos.unsqueeze(-1) > boundary).to(c.dtype)
        total = torch.where(above, c, 0.0).sum(-1, keepdim=True) - own * target_cos.unsqueeze(-1)
        count = above.sum(-1, keepdim=True).to(c.dtype) - own
        return total / count.clamp(min=1)


def npcface_statistics_chunked(
    input: Tensor, weight: Tensor, target: Tensor, margin: MarginParam = 0.5, *, num_sub_centers: int = 1,
    pooling: str = "max", pooling_temperature: float = 0.1, chunk_size: Optional[int] = None,
) -> Tensor:  # fmt: skip
    """:func:`npcface_statistics` of ``cosine_logits(input, weight, ...)``, computed over class chunks (no N×C
    cosines): what :func:`margin_cross_entropy` with :data:`NPC` needs. ``target`` are class indices ``(*)``; the
    result is ``(*, 1)``, float32 (float64 for float64 input), no grad."""
    k = num_sub_centers
    shape = torch.Size((*input.shape[:-1], weight.shape[0] // k))
    target = _checked_target(shape, target, margin)
    tau = float(pooling_temperature) if pooling == "soft" and k > 1 else None
    return hard_mean_chunked(input, weight, target, margin, k, tau, chunk_size)


def hard_mean_chunked(input: Tensor, weight: Tensor, target: Tensor, margin: MarginParam, k: int,
                      tau: Optional[float], chunk_size: Optional[int] = None) -> Tensor:  # fmt: skip
    """:func:`npcface_statistics_chunked` without argument checks."""
    shape = torch.Size((*input.shape[:-1], weight.shape[0] // k))
    with torch.no_grad():
        x = normalize(input.detach()).reshape(-1, input.shape[-1])
        classes = target.reshape(-1)
        cos_y = target_cosines(x, weight, classes[:, None], k, tau)[:, 0]
        m = param_tensor(margin, cos_y.dtype, x.device)
        m = at_target(m.reshape(-1, 1) if m.dim() > 1 else m, torch.Size((x.shape[0], shape[-1])), classes)
        chunk = default_chunk_size(x.shape[0], shape[-1], k, x.device) if chunk_size is None else int(chunk_size)
        total, count = _hard_sums(x, weight, classes, _boundary(cos_y, m), k, tau, chunk)
        return (total / count.clamp(min=1)).reshape(*input.shape[:-1], 1)


def npcface_sharded_statistics(
    input: Tensor, labels: Tensor, weight: Tensor, margin: MarginParam, *, num_classes: int, class_start: int,
    num_sub_centers: int, tau: Optional[float], group: Any,
) -> Tensor:  # fmt: skip
    """:func:`npcface_statistics_chunked` of this rank's rows ``(*, 1)`` over the classes of every rank's block.

    Each rank takes the global batch (every rank's features, in rank order), the owner of each row's class gives its
    target cosine and margin (a sum over the ranks), each block adds its hard negatives' sums and counts, and the
    ranks add those: three all-reduces of N numbers besides the batch's all-gather."""
    from mll.functional._engine.block import gather_block_batch

    k = num_sub_centers
    width = weight.shape[0] // k
    _, world = rank_and_world(group)
    with torch.no_grad():
        x, classes, _ = gather_block_batch(input, labels, num_classes, class_start, width, group)
        x = normalize(x)
        local = classes[:, 0]
        owner = local >= 0
        acc = acc_dtype(x.dtype)
        cos_y = torch.where(owner, target_cosines(x, weight, local.clamp(min=0)[:, None], k, tau)[:, 0], 0.0)
        m = param_tensor(margin, acc, x.device)
        if m.dim() == 1:  # per class (kept whole on every rank): the owner reads it at the row's class
            m = torch.where(owner, m[(local + class_start).clamp(0, num_classes - 1)], 0.0)
            cos_y, m = all_reduce_sum(torch.stack([cos_y, m]), group)
        else:
            cos_y = all_reduce_sum(cos_y, group)
        chunk = default_chunk_size(x.shape[0], max(width, 1), k, x.device)
        total, count = _hard_sums(x, weight, local, _boundary(cos_y, m), k, tau, chunk)
        sums = all_reduce_sum(torch.stack([total, count]), group)
        mean = sums[0] / sums[1].clamp(min=1)
        sizes = [row[0] for row in all_gather_ints([labels.numel()], x.device, group, world)]
        start = sum(sizes[: rank_and_world(group)[0]])
        return mean[start : start + labels.numel()].reshape(*labels.shape, 1)


def npcface_margin(
    cosine: Tensor, target: Tensor, margin: MarginParam = 0.5, *, m0: float = 0.4, m1: float = 0.2, t: float = 1.1,
    a: float = 0.2, scale: Scale = 1.0,
) -> Tensor:  # fmt: skip
    r"""NPCFace's logits: hard negatives raised, the target's angular margin grown with their mean cosine.

    "NPCFace: Negative-Positive Collaboration Training for Large-scale Face Recognition" (Zeng et al., 2020,
    https://arxiv.org/abs/2007.10172), with the constants of the authors' code (FaceX-Zoo ``head/NPCFace.py``):

    .. math::
        M_j = [\cos\theta_j > \cos(\theta_y + m)],\ j \ne y, \qquad
        m' = m_0 + m_1 \frac{\sum_j M_j \cos\theta_j}{\max(1, \sum_j M_j)}, \\
        z_y = s\cos(\theta_y + m'), \qquad
        z_j = s\,(t\cos\theta_j + a) \text{ where } M_j = 1, \quad s\cos\theta_j \text{ elsewhere.}

    The collaboration: a sample with harder negatives gets a larger positive margin. :math:`m'` and the mask are
    statistics (no gradient through them, as in the authors' code); the raised logits have the exact slope ``t``, the
    target ArcFace's exact derivative at :math:`m'` (with its fix past π − m'). ``m0 − m1 ≥ 0`` and ``m0 + m1 < π/2``
    keep :math:`m'` a valid ArcFace margin for every mean cosine in [−1, 1].

    Class indices only. Sub-centers pool before the margin, as for every head.

    Args:
        cosine (Tensor[*, C]): cosines.
        target (Tensor[*] of int): class indices.
        margin (float or Tensor): the hard-negative threshold's ``m`` (default 0.5), radians in ``[0, π/2)``; per
            class ``(C,)`` or per sample ``(*, 1)``.
        m0 (float): the base positive margin (default 0.4).
        m1 (float): its growth with the hard negatives' mean cosine (default 0.2).
        t (float): the hard negatives' factor, ``>= 0`` (default 1.1).
        a (float): the hard negatives' offset, ``>= 0`` (default 0.2).
        scale (float or Tensor): ``s``.

    Returns:
        Tensor[*, C]: the scaled logits, in ``cosine``'s dtype.
    """
    check_cosine(cosine)
    check_npcface_options(m0, m1)
    check_scale(scale)
    positive = m0 + m1 * npcface_statistics(cosine, target, margin)
    margin_ = NPC(margin, positive, t, a)
    margin_.check(cosine.shape)
    return apply_margin(cosine, check_target(target, cosine.shape), margin_, scale)


def check_npcface_options(m0: object, m1: object) -> None:
    """``m0`` and ``m1`` floats with ``0 <= m1 <= m0`` and ``m0 + m1 < π/2``: m' stays in ArcFace's range."""
    for name, value in (("m0", m0), ("m1", m1)):
        if not is_real(value) or not math.isfinite(value):  # type: ignore[arg-type]
            raise ValueError(f"NPCFace {name} must be a finite float, but got {value!r}")
    if not (0 <= m1 <= m0 and m0 + m1 < math.pi / 2):  # type: ignore[operator]
        raise ValueError(
            "NPCFace needs 0 <= m1 <= m0 and m0 + m1 < π/2 (so that m0 + m1·cos stays in [0, π/2)), but got "
            f"m0={m0!r}, m1={m1!r}"
        )
