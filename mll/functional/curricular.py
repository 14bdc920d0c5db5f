"""CurricularFace: an ArcFace target with hard negatives re-weighted by a running statistic ``t``.

Unlike the target-only margins, the modulation touches every non-target logit that beats the target's margin
value, so this path makes one elementwise pass over the N×C cosines (and keeps them for backward). It is still
one fused autograd Function: no N×C one-hot, no N×C arccos.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mll.functional._checks import (
    check_cosine,
    check_margin_param,
    check_momentum,
    check_scale,
    check_target,
    is_soft,
    shape_str,
    values_checkable,
)
from mll.functional._target import Scale, _scatter, gather_target, work_dtype
from mll.functional.margins import ARC_MARGIN_RANGE, MarginParam, _arc_value_and_slope, _at_target, _param

__all__ = ["curricular_margin", "curricular_statistics", "curricular_update"]


class _ScaledCurricular(torch.autograd.Function):
    """``out = scale·N(t, cos)`` off target, ``scale·value`` at the target, with
    ``N(t, c) = c·(t + c)`` where ``c > threshold`` (hard negatives) and ``c`` elsewhere.

    ``∂out/∂cos = scale·(t + 2c)`` on hard negatives, ``scale`` on easy ones, ``scale·slope`` at the target.
    ``t`` and ``threshold`` are statistics (no gradient), as in the paper.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        cosine: Tensor, index: Tensor, value: Tensor, slope: Tensor, threshold: Tensor, t: Tensor, scale: Scale
    ) -> Tensor:
        t = t.to(cosine.dtype)
        hard = cosine > threshold.to(cosine.dtype)
        out = torch.where(hard, cosine * (cosine + t), cosine) * scale
        return _scatter(out, index, (value * scale).to(out.dtype))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        cosine, index, value, slope, threshold, t, scale = inputs
        ctx.scale_is_tensor = isinstance(scale, Tensor)
        ctx.scale = None if ctx.scale_is_tensor else scale
        ctx.scale_needs_grad = ctx.scale_is_tensor and ctx.needs_input_grad[6]
        ctx.value_dtype = value.dtype
        ctx.save_for_backward(
            cosine, index, slope, threshold, t, scale if ctx.scale_is_tensor else None,
            value if ctx.scale_needs_grad else None,
        )  # fmt: skip

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        cosine, index, slope, threshold, t, scale_t, value = ctx.saved_tensors
        scale = scale_t if ctx.scale_is_tensor else ctx.scale
        t = t.to(cosine.dtype)
        hard = cosine > threshold.to(cosine.dtype)
        grad_cosine = grad_value = grad_scale = None
        g = grad * scale
        g_target = g.gather(-1, index)
        if ctx.needs_input_grad[2]:
            grad_value = g_target.to(ctx.value_dtype)
        if ctx.needs_input_grad[0]:
            local = torch.where(hard, 2 * cosine + t, torch.ones_like(cosine))
            grad_cosine = _scatter(g * local, index, (g_target * slope).to(g.dtype))
        if ctx.scale_needs_grad:
            unscaled = torch.where(hard, cosine * (cosine + t), cosine).scatter(-1, index, value.to(cosine.dtype))
            grad_scale = (grad * unscaled).sum_to_size(scale_t.shape).to(scale_t.dtype)
        return grad_cosine, None, grad_value, None, None, None, grad_scale


def curricular_margin(
    cosine: Tensor, target: Tensor, margin: MarginParam = 0.5, *, t: Tensor | float, scale: Scale = 1.0
) -> Tensor:
    r"""CurricularFace's logits: ArcFace on the target, hard negatives re-weighted by ``t``.

    "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face Recognition" (Huang et al., CVPR 2020,
    https://arxiv.org/abs/2004.00288), Eq. 7–8:

    .. math::
        T(\cos\theta_y) = \cos(\theta_y + m), \qquad
        N(t, \cos\theta_j) = \begin{cases} \cos\theta_j & T(\cos\theta_y) - \cos\theta_j \ge 0 \\
                                            \cos\theta_j\,(t + \cos\theta_j) & \text{otherwise (a hard negative)}
                             \end{cases}

    The target logit is :func:`arc_margin`'s (with its fix past π − m, as in the paper's code); the hardness test
    compares against the plain :math:`\cos(\theta_y + m)`. Early in training ``t ≈ 0`` shrinks hard negatives
    (an easy curriculum); as ``t`` grows towards 1 they weigh more. ``t`` is a statistic with no gradient:
    update it with :func:`curricular_update` before the call, as the paper does (Eq. 9).

    Class indices only: the hardness threshold is *the* target's logit, which soft targets do not define.
    Sub-centers pool before the margin, as for every head (see :func:`cosine_logits`).

    Args:
        cosine (Tensor[*, C]): cosines.
        target (Tensor[*] of int): class indices.
        margin (float or Tensor): ``m`` in radians, ``[0, π/2)``; per class ``(C,)`` or per sample ``(*, 1)``.
        t (Tensor or float): the running statistic ``t`` (0-dim).
        scale (float or Tensor): ``s``.

    Returns:
        Tensor[*, C]: the scaled logits, in ``cosine``'s dtype.
    """
    check_cosine(cosine)
    check_margin_param(margin, *ARC_MARGIN_RANGE, "CurricularFace", cosine.shape)
    check_scale(scale)
    if isinstance(t, Tensor) and t.numel() != 1:
        raise ValueError(
            f"CurricularFace t must be a float or a one-element tensor, but got shape {shape_str(t.shape)}"
        )
    if values_checkable() and not math.isfinite(float(t)):
        raise ValueError(f"CurricularFace t must be finite, but got {float(t)!r}")
    target = check_target(target, cosine.shape)
    if is_soft(target):
        raise ValueError(
            "CurricularFace needs class indices (an integer tensor of shape (*)), not soft targets: its hard-negative "
            "test compares every logit with the target's"
        )
    return curricular_margin_unchecked(cosine, target, margin, t, scale)


def curricular_margin_unchecked(
    cosine: Tensor, target: Tensor, margin: MarginParam, t: Tensor | float, scale: Scale
) -> Tensor:
    """:func:`curricular_margin` without argument checks."""
    dtype = work_dtype(cosine.dtype)
    m = _at_target(_param(margin, dtype, cosine.device), cosine.shape, target)
    c = gather_target(cosine, target).to(dtype)
    value, slope = _arc_value_and_slope(c, m, False)
    # the paper's T(cos θ_y) = cos(θ_y + m), before the fix past π − m
    threshold = c * torch.cos(m) - ((1 - c) * (1 + c)).clamp(min=0).sqrt() * torch.sin(m)
    t_value = _param(t, dtype, cosine.device).detach().reshape(())
    return _ScaledCurricular.apply(
        cosine, target.unsqueeze(-1), value.unsqueeze(-1), slope.detach().unsqueeze(-1),
        threshold.detach().unsqueeze(-1), t_value, scale,
    )  # fmt: skip


def curricular_statistics(cosine: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Sum and count of the target cosines (float32, or float64 for float64 input), no grad: the parts of the mean
    that :func:`curricular_update` needs, so that a module can sum them across ranks first."""
    with torch.no_grad():
        c = gather_target(cosine, target).to(work_dtype(cosine.dtype))
        return c.sum(), torch.tensor(c.numel(), dtype=c.dtype, device=c.device)


def curricular_update(t: Tensor | float, cosine: Tensor, target: Tensor, *, momentum: float = 0.99) -> Tensor:
    r"""CurricularFace's running statistic, Eq. 9: ``t ← momentum·t + (1 − momentum)·mean_i cos θ_{y_i}``.

    The paper's α = 0.01 is ``1 − momentum``. An empty batch keeps ``t``.

    Args:
        t (Tensor or float): the current value.
        cosine (Tensor[*, C]): cosines of the batch.
        target (Tensor[*] of int): class indices.
        momentum (float): weight of the old value, ``[0, 1)``.

    Returns:
        Tensor: the new ``t``, 0-dim, float32 (float64 for float64 input), no grad.
    """
    check_cosine(cosine)
    check_momentum(momentum)
    target = check_target(target, cosine.shape)
    if is_soft(target):
        raise ValueError("curricular_update needs class indices (an integer tensor of shape (*)), not soft targets")
    total, count = curricular_statistics(cosine, target)
    return curricular_update_from_statistics(t, total, count, momentum)


def curricular_update_from_statistics(t: Tensor | float, total: Tensor, count: Tensor, momentum: float) -> Tensor:
    """:func:`curricular_update` from (possibly all-reduced) sums; keeps ``t`` when ``count`` is 0."""
    with torch.no_grad():
        old = _param(t, total.dtype, total.device).detach().reshape(())
        new = momentum * old + (1 - momentum) * total / count.clamp(min=1)
        return torch.where(count > 0, new, old)
