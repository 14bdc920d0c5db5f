"""Additive margins on the target logit: CosFace and ArcFace.

Every margin has two paths that agree exactly for one-hot targets:

* **class indices** ``target: Tensor[*]`` (integers): the margin's trigonometry runs on the N target cosines
  only and is written back in place (see ``_target.py``): O(N) extra work, no N×C one-hot, no N×C arccos;
* **soft targets** ``target: Tensor[*, C]`` (floats, e.g. mixup): the margin is weighted per entry, ``m·t``,
  on the dense N×C tensor with plain autograd.

Each margin is defined once as a value function ``ψ(cos, m)`` written in differentiable torch ops (used by the
dense path) and its analytic derivative ``∂ψ/∂cos`` (used by the index path); the tests check one against the
other and both against an independent float64 reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mll.functional._checks import check_cosine, check_margin, check_scale, check_target, is_soft, values_checkable
from mll.functional._target import (
    Scale,
    _ScaledTargetReplace,
    gather_target,
    scaled_dense_replace,
    scaled_target_replace,
    work_dtype,
)

__all__ = ["arc_margin", "cos_margin"]

#: Valid ranges. CosFace: ``m < 1`` keeps a perfectly aligned target positive. ArcFace: ``m < π/2`` keeps
#: ``cos(0 + m) > 0`` and makes the fallback past ``π − m`` monotone in ``m``.
COS_MARGIN_RANGE = (0.0, 1.0)
ARC_MARGIN_RANGE = (0.0, math.pi / 2)


def _sin_from_cos(cosine: Tensor) -> Tensor:
    # sin θ = sqrt(1 − cos²θ), clamped away from 0 so neither it nor its gradient is infinite at cos = ±1
    # (where the clamp is active its gradient is 0, and the analytic slope below says the same).
    # (1 − c)(1 + c) rather than 1 − c²: no cancellation near |c| = 1
    eps = torch.finfo(cosine.dtype).eps
    return ((1 - cosine) * (1 + cosine)).clamp(min=eps).sqrt()


def _arc_value(cosine: Tensor, margin: Tensor | float, easy_margin: bool) -> Tensor:
    r"""ψ(θ) = cos(θ + m) = cosθ·cos m − sinθ·sin m where it is monotone, else the established fallback.

    Past θ > π − m, cos(θ + m) rises again and would reward a worse feature. Like InsightFace and
    pytorch-metric-learning we use cosθ − m·sin m there; with ``easy_margin`` the margin is applied only where
    cosθ > 0 and the cosine passes through elsewhere.
    """
    m = torch.as_tensor(margin, dtype=cosine.dtype, device=cosine.device)
    cos_m, sin_m = torch.cos(m), torch.sin(m)
    shifted = cosine * cos_m - _sin_from_cos(cosine) * sin_m
    if easy_margin:
        return torch.where(cosine > 0, shifted, cosine)
    return torch.where(cosine > -cos_m, shifted, cosine - m * sin_m)


def _arc_value_and_slope(cosine: Tensor, margin: Tensor, easy_margin: bool) -> tuple[Tensor, Tensor]:
    """:func:`_arc_value` and its derivative ∂ψ/∂cos, without autograd, for both paths.

    ``margin`` is a 0-dim tensor (class indices: applied to the N target cosines) or ``m·t`` of the same shape as
    ``cosine`` (soft targets). One function for both keeps class indices and one-hot soft targets bit-identical.
    On the shifted branch ∂ψ/∂cos = cos m + sin m · cosθ / sinθ (0 in place of the ratio where the clamp on sin²θ
    is active, as autograd of :func:`_arc_value` gives); 1 on the fallback branches. The tests hold the value to
    :func:`_arc_value` and the slope to its autograd derivative.
    """
    cos_m, sin_m = torch.cos(margin), torch.sin(margin)
    eps = torch.finfo(cosine.dtype).eps
    sin2 = (1 - cosine) * (1 + cosine)
    sin = sin2.clamp(min=eps).sqrt()
    shifted = cosine * cos_m - sin * sin_m
    shifted_slope = torch.where(sin2 > eps, cosine / sin, 0.0) * sin_m + cos_m
    if easy_margin:
        keep, fallback = cosine > 0, cosine
    else:
        keep, fallback = cosine > -cos_m, cosine - margin * sin_m
    return torch.where(keep, shifted, fallback), torch.where(keep, shifted_slope, 1.0)


def _dense(cosine: Tensor, target: Tensor, margin: float, value_fn, scale: Scale) -> Tensor:
    dtype = work_dtype(cosine.dtype)
    out = value_fn(cosine.to(dtype), margin * target.to(dtype))
    return (out * scale).to(cosine.dtype)


#: soft targets with at most this fraction of non-zero entries take the sparse path in eager mode
SPARSE_FRACTION = 1 / 8


def _soft_nonzero(target: Tensor) -> Tensor | None:
    """Flat indices of the non-zero soft-target entries when few enough for the sparse path, else None.

    Few-hot soft targets (mixup, CutMix: two classes per row) leave most of the N×C entries at t = 0, where
    every margin here is the identity with slope 1. In eager mode the margin then runs on those entries only,
    through the same fused scatter as class indices: O(nnz) trigonometry instead of O(N·C). The number of
    entries is data-dependent, so under ``torch.compile`` and ``torch.func`` (and for dense targets such as
    label smoothing, or targets that require grad) the dense path runs instead; both give identical logits.
    """
    if target.requires_grad or not values_checkable():
        return None
    index = target.reshape(-1).nonzero().squeeze(-1)
    return index if index.numel() <= SPARSE_FRACTION * target.numel() else None


def _sparse(cosine: Tensor, target: Tensor, index: Tensor, margin: float, value_and_slope, scale: Scale) -> Tensor:
    flat = cosine.reshape(1, -1)
    dtype = work_dtype(cosine.dtype)
    t = flat.detach()[0, index].to(dtype)
    value, slope = value_and_slope(t, margin * target.reshape(-1)[index].to(dtype))
    return _ScaledTargetReplace.apply(flat, index.unsqueeze(0), value.unsqueeze(0), slope.unsqueeze(0), scale).reshape(
        cosine.shape
    )


def _cos_value_and_slope(cosine: Tensor, margin: Tensor) -> tuple[Tensor, Tensor]:
    return cosine - margin, torch.ones_like(cosine)


def cos_margin(cosine: Tensor, target: Tensor, margin: float, *, scale: Scale = 1.0) -> Tensor:
    r"""CosFace's additive cosine margin on the target logit, optionally scaled.

    "CosFace: Large Margin Cosine Loss for Deep Face Recognition" (Wang et al., CVPR 2018,
    https://arxiv.org/abs/1801.09414), Eq. 4:

    .. math:: \psi_{ij} = s\,(\cos\theta_{ij} - m\,t_{ij})

    with :math:`t` the one-hot target (class indices) or the soft target (e.g. mixup weights).

    Args:
        cosine (Tensor[*, C]): cosines, e.g. from :func:`cosine_logits`.
        target (Tensor[*] of int or Tensor[*, C] of float): class indices or soft targets.
        margin (float): ``m`` in ``[0, 1)``.
        scale (float or Tensor): ``s``, multiplied in (fused, no extra pass over the logits).

    Returns:
        Tensor[*, C]: the scaled logits with the margin applied, in ``cosine``'s dtype.
    """
    check_cosine(cosine)
    check_margin(margin, *COS_MARGIN_RANGE, "CosFace")
    check_scale(scale)
    return cos_margin_unchecked(cosine, check_target(target, cosine.shape), margin, scale)


def cos_margin_unchecked(cosine: Tensor, target: Tensor, margin: float, scale: Scale) -> Tensor:
    """:func:`cos_margin` without argument checks, for modules that validated their inputs already."""
    if is_soft(target):
        index = _soft_nonzero(target)
        if index is not None:
            return _sparse(cosine, target, index, margin, _cos_value_and_slope, scale)
        return _dense(cosine, target, margin, lambda c, m: c - m, scale)
    t = gather_target(cosine, target).to(work_dtype(cosine.dtype))
    return scaled_target_replace(cosine, target, t - margin, torch.ones_like(t), scale)


def arc_margin(
    cosine: Tensor, target: Tensor, margin: float, *, easy_margin: bool = False, scale: Scale = 1.0
) -> Tensor:
    r"""ArcFace's additive angular margin on the target logit, optionally scaled.

    "ArcFace: Additive Angular Margin Loss for Deep Face Recognition" (Deng et al., CVPR 2019,
    https://arxiv.org/abs/1801.07698), Eq. 3:

    .. math:: \psi_{ij} = s\,\cos(\theta_{ij} + m\,t_{ij})

    computed as :math:`\cos\theta\cos m - \sin\theta\sin m` with :math:`\sin\theta` clamped away from 0, so
    values and gradients are finite at :math:`\cos\theta = \pm 1` in every dtype (trigonometry in float32 for
    float16/bfloat16). At exactly :math:`|\cos\theta| = 1`, :math:`\sin\theta` is taken as √ε of the working
    dtype (1.5e-8 in float64, 3.5e-4 in float32): a change of at most √ε·sin m, below the angular resolution of
    a floating-point cosine there (the next float32 below 1 is already θ ≈ 3.5e-4).
    Past :math:`\theta > \pi - m` the logit would rise again with θ; there it is :math:`\cos\theta - m\sin m`
    (InsightFace's fix), which keeps it non-increasing in θ and in ``m``.
    With ``easy_margin=True`` the margin applies only where :math:`\cos\theta > 0` (not monotone at θ = π/2).

    The gradient is the exact derivative of the value above (no straight-through shortcut); first derivatives
    only (see the module notes in ``mll/functional/_target.py``).

    Args:
        cosine (Tensor[*, C]): cosines, e.g. from :func:`cosine_logits`.
        target (Tensor[*] of int or Tensor[*, C] of float): class indices or soft targets.
        margin (float): ``m`` in radians, in ``[0, π/2)``.
        easy_margin (bool): apply the margin only to targets with positive cosine.
        scale (float or Tensor): ``s``, multiplied in (fused, no extra pass over the logits).

    Returns:
        Tensor[*, C]: the scaled logits with the margin applied, in ``cosine``'s dtype.
    """
    check_cosine(cosine)
    check_margin(margin, *ARC_MARGIN_RANGE, "ArcFace")
    check_scale(scale)
    return arc_margin_unchecked(cosine, check_target(target, cosine.shape), margin, easy_margin, scale)


def arc_margin_unchecked(cosine: Tensor, target: Tensor, margin: float, easy_margin: bool, scale: Scale) -> Tensor:
    """:func:`arc_margin` without argument checks, for modules that validated their inputs already."""
    dtype = work_dtype(cosine.dtype)
    if is_soft(target):
        index = _soft_nonzero(target)
        if index is not None:
            return _sparse(cosine, target, index, margin, lambda c, m: _arc_value_and_slope(c, m, easy_margin), scale)
        # ψ and ∂ψ/∂cos in one no-grad pass over the N×C entries; only the slope is kept for backward
        with torch.no_grad():
            value, slope = _arc_value_and_slope(cosine.detach().to(dtype), margin * target.to(dtype), easy_margin)
        if target.requires_grad:  # rare: a gradient for the soft targets themselves, through plain autograd
            value = _arc_value(cosine.detach().to(dtype), margin * target.to(dtype), easy_margin)
        return scaled_dense_replace(cosine, value, slope, scale)
    t = gather_target(cosine, target).to(dtype)
    value, slope = _arc_value_and_slope(t, torch.tensor(margin, dtype=dtype, device=t.device), easy_margin)
    return scaled_target_replace(cosine, target, value, slope, scale)
