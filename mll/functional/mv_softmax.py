"""MV-Softmax: a CosFace or ArcFace target, mis-classified non-target logits raised (four families).

A non-target class j is *mis-classified* for a sample when its cosine beats the target's margin logit,
``cos θ_j > ψ(θ_y)``; MV-Softmax raises exactly those logits, by a constant (the fixed variant) or by an amount that
grows with the cosine (the adaptive one). The families have a non-target part (see
:class:`mll.functional.MarginFamily`): the dense path makes one elementwise pass over the N×C cosines, the chunked and
sharded losses apply it chunk by chunk. No N×C one-hot, no N×C arccos.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mll.functional._engine.checks import check_cosine, check_scale, check_target, is_soft
from mll.functional._engine.numerics import Scale, above, in_place_ok, scratch
from mll.functional.margin import MarginFamily, MarginParam, MarginParameter, apply_margin
from mll.functional.margins import ARC_MARGIN_RANGE, COS_MARGIN_RANGE, _arc_value_and_slope

__all__ = ["MV_ARC", "MV_ARC_FIXED", "MV_COS", "MV_COS_FIXED", "mv_margin"]


def _cos_target(cosine: Tensor, margin: Tensor) -> tuple[Tensor, Tensor]:
    value = cosine - margin
    return value, value.new_ones(()).expand(value.shape)


def _arc_target(cosine: Tensor, margin: Tensor) -> tuple[Tensor, Tensor]:
    return _arc_value_and_slope(cosine, margin, False)


@dataclass(frozen=True)
class _Variant:
    """One of the four variants' functions: module-level and plain data, so that the families pickle."""

    arc: bool
    adaptive: bool

    def target(self, cosine: Tensor, margin: Tensor) -> tuple[Tensor, Tensor]:
        return _arc_target(cosine, margin) if self.arc else _cos_target(cosine, margin)

    def value_and_slope(self, cosine: Tensor, w: Tensor | float, margin: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        return self.target(cosine, margin * w)

    def negatives(self, cosine: Tensor, target: Tensor, margin: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        # I_k = 1 where ψ(θ_y) − cos θ_k < 0: the row's decision boundary (ArcFace's with its fix past π − m)
        # (the mask as a number, ``above``: arithmetic and lerps, exact at I_k = 0 and 1)
        boundary, _ = self.target(target, margin)
        hard = above(cosine, boundary)
        t = t.to(cosine.dtype)
        if self.adaptive:  # h = e^{s t (cos θ_k + 1) I_k}: logit (t + 1) cos θ_k + t, slope t + 1
            shifted = (
                torch.mul(cosine, t + 1, out=scratch(cosine, 1)).add_(t) if in_place_ok() else (t + 1) * cosine + t
            )
            value = torch.lerp(cosine, shifted, hard, out=shifted if in_place_ok() else None)
            return value, hard.mul_(t).add_(1) if in_place_ok() else hard * t + 1
        # fixed: h = e^{s t I_k}, logit cos θ_k + t
        return torch.addcmul(cosine, hard, t), cosine.new_ones(()).expand(cosine.shape)

    def target_logit(self, theta: float, m: float, t: float) -> float:
        return math.cos(theta + m) if self.arc else math.cos(theta) - m


def _family(arc: bool, adaptive: bool) -> MarginFamily:
    variant = _Variant(arc, adaptive)
    return MarginFamily(
        f"mv_{'arc' if arc else 'cos'}{'' if adaptive else '_fixed'}",
        variant.value_and_slope,
        (
            MarginParameter("margin", *(ARC_MARGIN_RANGE if arc else COS_MARGIN_RANGE)),
            MarginParameter("t", 0.0, math.inf),
        ),
        target_logit=variant.target_logit,
        negatives=variant.negatives,
        class_indices_only=True,
        title="MV-Softmax",
    )


#: MV-AM-Softmax-a: CosFace's target, mis-classified logits (t + 1)·cos θ_j + t.
MV_COS = _family(arc=False, adaptive=True)
#: MV-AM-Softmax-f: CosFace's target, mis-classified logits cos θ_j + t.
MV_COS_FIXED = _family(arc=False, adaptive=False)
#: MV-Arc-Softmax-a: ArcFace's target, mis-classified logits (t + 1)·cos θ_j + t.
MV_ARC = _family(arc=True, adaptive=True)
#: MV-Arc-Softmax-f: ArcFace's target, mis-classified logits cos θ_j + t.
MV_ARC_FIXED = _family(arc=True, adaptive=False)

_FAMILIES = {("cos", True): MV_COS, ("cos", False): MV_COS_FIXED, ("arc", True): MV_ARC, ("arc", False): MV_ARC_FIXED}


def mv_family(margin_type: str, adaptive: bool) -> MarginFamily:
    """The MV-Softmax family of a target margin (``"cos"`` or ``"arc"``) and a variant, with checked arguments."""
    if margin_type not in ("cos", "arc"):
        raise ValueError(
            f"MV-Softmax margin_type must be 'cos' (AM-Softmax) or 'arc' (ArcFace), but got {margin_type!r}"
        )
    if not isinstance(adaptive, bool):
        raise TypeError(f"MV-Softmax adaptive must be a bool, but got {type(adaptive).__name__}")
    return _FAMILIES[margin_type, adaptive]


def mv_margin(
    cosine: Tensor, target: Tensor, margin: MarginParam = 0.35, *, t: MarginParam = 0.2, margin_type: str = "cos",
    adaptive: bool = True, scale: Scale = 1.0,
) -> Tensor:  # fmt: skip
    r"""MV-Softmax's logits: a margin on the target, mis-classified non-target logits raised.

    "Mis-classified Vector Guided Softmax Loss for Face Recognition" (Wang et al., AAAI 2020,
    https://arxiv.org/abs/1912.00833), the loss with the indicator :math:`I_j` and the re-weighting :math:`h`:

    .. math::
        z_y = s\,\psi(\theta_y), \qquad
        z_j = \begin{cases} s\cos\theta_j & \cos\theta_j \le \psi(\theta_y) \\
                            s\,(\cos\theta_j + t) & \text{mis-classified, fixed (MV-X-Softmax-f)} \\
                            s\,((t + 1)\cos\theta_j + t) & \text{mis-classified, adaptive (MV-X-Softmax-a)}
              \end{cases}

    with :math:`\psi(\theta) = \cos\theta - m` (``margin_type="cos"``, MV-AM-Softmax) or :math:`\cos(\theta + m)`
    (``"arc"``, MV-Arc-Softmax, with :func:`arc_margin`'s fix past π − m). The paper writes the change as a factor
    :math:`h(t, \theta_j, I_j)` on :math:`e^{s\cos\theta_j}`: :math:`e^{s t I_j}` (fixed) and
    :math:`e^{s\,t(\cos\theta_j + 1) I_j}` (adaptive); FaceX-Zoo's ``mv_weight`` is ``1 + t``. ``t = 0`` gives
    CosFace / ArcFace. The mis-classification test compares with the row's target logit :math:`\psi(\theta_y)` as
    computed, a statistic (no gradient flows through it, as in the authors' code); the raised logits have the exact
    slope (1 or t + 1).

    Class indices only: the test compares every logit with *the* target's, which soft targets do not define.
    Sub-centers pool before the margin, as for every head (see :func:`cosine_logits`).

    Args:
        cosine (Tensor[*, C]): cosines.
        target (Tensor[*] of int): class indices.
        margin (float or Tensor): ``m``: ``[0, 1)`` for ``"cos"``, radians in ``[0, π/2)`` for ``"arc"``; per class
            ``(C,)`` or per sample ``(*, 1)``.
        t (float or Tensor): ``t >= 0`` (the authors' code: 0.2); per class ``(C,)`` (read at each row's target class)
            or per sample ``(*, 1)``.
        margin_type (str): ``"cos"`` or ``"arc"``.
        adaptive (bool): the adaptive variant (default, as the authors' code) or the fixed one.
        scale (float or Tensor): ``s``.

    Returns:
        Tensor[*, C]: the scaled logits, in ``cosine``'s dtype.
    """
    check_cosine(cosine)
    family = mv_family(margin_type, adaptive)
    margin_ = family(margin, t)
    margin_.check(cosine.shape)
    check_scale(scale)
    target = check_target(target, cosine.shape)
    if is_soft(target):
        raise ValueError(
            "MV-Softmax needs class indices (an integer tensor of shape (*)), not soft targets: its mis-classification "
            "test compares every logit with the target's"
        )
    return apply_margin(cosine, target, margin_, scale)
