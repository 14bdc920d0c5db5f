r"""AdaM-Softmax (AdaptiveFace's adaptive margin): CosFace with one *learnable* margin per class and a regulariser
that keeps the margins from collapsing to zero.

"AdaptiveFace: Adaptive Margin and Sampling for Face Recognition" (Liu, Zhu, Lei & Li, CVPR 2019,
https://openaccess.thecvf.com/content_CVPR_2019/html/Liu_AdaptiveFace_Adaptive_Margin_and_Sampling_for_Face_Recognition_CVPR_2019_paper.html).
The target logit is CosFace's with the target class's margin, :math:`s(\cos\theta_y - m_y)`; the margins are
parameters trained with the network. The cross-entropy alone would push every :math:`m_j` down to 0, so the paper
adds :math:`L_m = -\frac{\lambda}{C}\sum_j m_j`, which pushes them up; a class whose samples are hard to separate
settles at a smaller margin than a class that is easy. The paper's hard prototype mining and adaptive data sampling
are samplers, not part of the head, and are not here.

The margins enter the target logit linearly, so their gradient is the engine's: on the dense path through the
fused target write, on the chunked and sharded paths through the target values computed before the chunk loop (and
at every soft-target entry by autograd, chunk by chunk). Nothing here reads a tensor value.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mll.functional._engine.checks import (
    check_cosine,
    check_floating,
    check_nonnegative,
    check_scale,
    check_target,
    shape_str,
)
from mll.functional._engine.numerics import Scale
from mll.functional.margin import MarginFamily, MarginParam, MarginParameter, apply_margin

__all__ = ["ADAPTIVE", "adaptive_margin", "adaptive_margin_regularizer"]

#: AdaM-Softmax's margins live in [0, 1], as the authors' code keeps them (it projects them there every step)
ADAPTIVE_MARGIN_RANGE = (0.0, 1.0)


def _adaptive_value_and_slope(cosine: Tensor, w: Tensor | float, margin: Tensor) -> tuple[Tensor, Tensor]:
    value = cosine - margin * w
    return value, value.new_ones(()).expand(value.shape)


#: AdaM-Softmax: ψ = cos θ − m_y·t, with m a learnable margin per class in [0, 1].
ADAPTIVE = MarginFamily(
    "adaptive",
    _adaptive_value_and_slope,
    (MarginParameter("margin", *ADAPTIVE_MARGIN_RANGE, high_inclusive=True),),
    target_logit=lambda th, m: math.cos(th) - m,
    title="AdaM-Softmax",
)


def adaptive_margin(cosine: Tensor, target: Tensor, margin: MarginParam, *, scale: Scale = 1.0) -> Tensor:
    r"""AdaM-Softmax's logits: CosFace's target logit with a learnable margin per class, optionally scaled.

    .. math:: z_{ij} = s\,(\cos\theta_{ij} - m_j\,t_{ij})

    with :math:`t` the one-hot target (class indices) or the soft target. ``margin`` is usually the head's
    ``(C,)`` parameter: its gradient is exact on every path (see the module notes).

    Args:
        cosine (Tensor[*, C]): cosines, e.g. from :func:`cosine_logits`.
        target (Tensor[*] of int or Tensor[*, C] of float): class indices or soft targets.
        margin (float or Tensor): ``m`` in ``[0, 1]``; a ``(C,)`` tensor (one per class, usually requiring grad).
        scale (float or Tensor): ``s``.

    Returns:
        Tensor[*, C]: the scaled logits, in ``cosine``'s dtype.
    """
    check_cosine(cosine)
    margin_ = ADAPTIVE(margin)
    margin_.check(cosine.shape)
    check_scale(scale)
    return apply_margin(cosine, check_target(target, cosine.shape), margin_, scale)


def adaptive_margin_regularizer(margin: Tensor, *, lambda_: float = 70.0) -> Tensor:
    r"""AdaM-Softmax's margin regulariser :math:`L_m = -\frac{\lambda}{C}\sum_{j=1}^{C} m_j`.

    Added to the cross-entropy it rewards larger margins; its gradient is :math:`-\lambda/C` on every margin. The
    authors' code (FaceX-Zoo ``head/AdaM_Softmax.py``) returns :math:`\lambda(1 - \frac{1}{C}\sum_j m_j)`, which is
    this plus the constant λ ("to keep the loss positive"): the same gradients.

    Args:
        margin (Tensor[C]): the per-class margins.
        lambda_ (float): λ >= 0 (70 in FaceX-Zoo's head).

    Returns:
        Tensor: 0-dim, in ``margin``'s dtype (float32 for half precision), with the margins' gradient.
    """
    check_floating(margin, "margin")
    if margin.dim() != 1 or margin.shape[0] == 0:
        raise ValueError(f"margin must have shape (C,) with C >= 1, one per class, but got {shape_str(margin.shape)}")
    lam = check_nonnegative(lambda_, "AdaM-Softmax lambda_")
    m = margin.to(torch.promote_types(margin.dtype, torch.float32))
    return -lam * m.mean()
