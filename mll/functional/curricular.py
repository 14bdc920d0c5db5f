"""CurricularFace: an ArcFace target with hard negatives re-weighted by a running statistic ``t``.

Unlike the target-only margins, the modulation touches every non-target logit that beats the target's margin
value, so the family has a non-target part (see :class:`mll.functional.MarginFamily`): the dense path makes one
elementwise pass over the N×C cosines and keeps their slope for backward; the chunked and sharded losses apply it
chunk by chunk. No N×C one-hot, no N×C arccos.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mll.functional._engine.checks import (
    UNSET,
    check_cosine,
    check_decay,
    check_margin_param,
    check_scale,
    check_target,
    is_soft,
    renamed,
    shape_str,
    values_checkable,
)
from mll.functional._engine.dense import gather_target
from mll.functional._engine.numerics import Scale, above, in_place_ok, scratch, work_dtype
from mll.functional.margin import MarginFamily, MarginParam, MarginParameter, apply_margin, param_tensor
from mll.functional.margins import ARC_MARGIN_RANGE, _arc_value_and_slope

__all__ = ["CURRICULAR", "curricular_margin", "curricular_statistics", "curricular_update"]


def _curricular_target(cosine: Tensor, w: Tensor | float, margin: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    return _arc_value_and_slope(cosine, margin * w, False)


def _curricular_negatives(cosine: Tensor, target: Tensor, margin: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
    """N(t, c) = c·(t + c) on hard negatives, c > T(cos θ_y) = cos(θ_y + m) (the paper's T, before the fix past
    π − m), c elsewhere; slope t + 2c and 1. The threshold and ``t`` are statistics (no gradient), as in the paper."""
    threshold = target * torch.cos(margin) - ((1 - target) * (1 + target)).clamp(min=0).sqrt() * torch.sin(margin)
    t = t.to(cosine.dtype)
    if not in_place_ok():
        hard = cosine > threshold
        return torch.where(hard, cosine * (t + cosine), cosine), torch.where(hard, t + 2 * cosine, 1.0)
    # no graph (the dense path's statistics, the chunked loss's blocks): all arithmetic in two buffers of the
    # logits' size — the mask as a number h = 1 or 0, u = 1 + h·(t + c − 1) (a lerp: exactly t + c or 1), the slope
    # u + h·c over h and the value c·u over u (a block of 64 × 16384 logits on a CPU: 0.4 ms, against 2.7 ms with a
    # boolean mask, ``where`` and ``masked_fill``: see ``above``)
    step = above(cosine, threshold)
    u = torch.add(cosine, t, out=scratch(cosine, 1))
    u = torch.lerp(torch.ones((), dtype=u.dtype, device=u.device).expand_as(u), u, step, out=u)
    slope = torch.addcmul(u, step, cosine, out=step)  # u + h·c, in the mask's buffer: one pass
    return u.mul_(cosine), slope


#: CurricularFace: ArcFace's target logit, hard negatives re-weighted by the running statistic t.
CURRICULAR = MarginFamily(
    "curricular",
    _curricular_target,
    (MarginParameter("margin", *ARC_MARGIN_RANGE), MarginParameter("t", statistic=True)),
    target_logit=lambda th, m, t: math.cos(th + m),
    negatives=_curricular_negatives,
    class_indices_only=True,
    title="CurricularFace",
)


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
    if values_checkable(t) and not math.isfinite(float(t)):
        raise ValueError(f"CurricularFace t must be finite, but got {float(t)!r}")
    target = check_target(target, cosine.shape)
    if is_soft(target):
        raise ValueError(
            "CurricularFace needs class indices (an integer tensor of shape (*)), not soft targets: its hard-negative "
            "test compares every logit with the target's"
        )
    t_value = t.detach().reshape(()) if isinstance(t, Tensor) else float(t)
    margin_ = CURRICULAR(margin, t_value)
    margin_.check(cosine.shape)
    return apply_margin(cosine, target, margin_, scale)


def curricular_statistics(cosine: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Sum and count of the finite target cosines (float32, or float64 for float64 input), no grad: the parts of the
    mean that :func:`curricular_update` needs, so that a module can sum them across ranks first. A sample whose
    cosine is not finite (a NaN or infinite feature) is left out."""
    with torch.no_grad():
        return finite_sum_and_count(gather_target(cosine, target).to(work_dtype(cosine.dtype)))


def finite_sum_and_count(values: Tensor) -> tuple[Tensor, Tensor]:
    """The sum and the number of the finite entries of ``values`` (both 0-dim tensors: no host read)."""
    finite = torch.isfinite(values)
    return torch.where(finite, values, 0.0).sum(), finite.sum().to(values.dtype)


def curricular_update(
    t: Tensor | float, cosine: Tensor, target: Tensor, *, decay: float = 0.99, momentum: float = UNSET
) -> Tensor:
    r"""CurricularFace's running statistic, Eq. 9: ``t ← decay·t + (1 − decay)·mean_i cos θ_{y_i}``.

    The paper's α = 0.01 is ``1 − decay``. An empty batch keeps ``t``.

    Args:
        t (Tensor or float): the current value.
        cosine (Tensor[*, C]): cosines of the batch.
        target (Tensor[*] of int): class indices.
        decay (float): weight of the old value, ``[0, 1)`` (``momentum`` before 0.2, deprecated).

    Returns:
        Tensor: the new ``t``, 0-dim, float32 (float64 for float64 input), no grad.
    """
    check_cosine(cosine)
    decay = renamed(decay, momentum, "momentum", "decay")
    check_decay(decay)
    target = check_target(target, cosine.shape)
    if is_soft(target):
        raise ValueError("curricular_update needs class indices (an integer tensor of shape (*)), not soft targets")
    total, count = curricular_statistics(cosine, target)
    return curricular_update_from_statistics(t, total, count, decay)


def curricular_update_from_statistics(t: Tensor | float, total: Tensor, count: Tensor, decay: float) -> Tensor:
    """:func:`curricular_update` from (possibly all-reduced) sums; keeps ``t`` when ``count`` is 0."""
    with torch.no_grad():
        old = param_tensor(t, total.dtype, total.device).detach().reshape(())
        new = decay * old + (1 - decay) * total / count.clamp(min=1)
        return torch.where(count > 0, new, old)
