"""Circle loss, class-level form: self-paced weights on the target and on every non-target logit.

Each logit is re-weighted by how far it is from its optimum (``α_p = [1 + m − s_p]_+`` for the target, ``α_n =
[s_n + m]_+`` for a non-target) and shifted by its margin (``Δ_p = 1 − m``, ``Δ_n = m``). Unlike the hard-negative
families, the non-target part changes *every* non-target entry, and it does not read the row's target: one
elementwise pass on every path (see :class:`mll.functional.MarginFamily`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from mll.functional._engine.checks import check_cosine, check_scale, check_target, is_soft
from mll.functional._engine.numerics import Scale
from mll.functional.margin import MarginFamily, MarginParam, MarginParameter, apply_margin

__all__ = ["CIRCLE", "CIRCLE_EXACT", "circle_margin"]

#: ``m`` in [0, 1): the relaxation factor (the paper's face-recognition setting: 0.25)
CIRCLE_MARGIN_RANGE = (0.0, 1.0)


@dataclass(frozen=True)
class _Weights:
    """The target and non-target logits with the weights α detached or not: module-level and plain data, so that
    the families pickle."""

    detach: bool

    def target(self, cosine: Tensor, w: Tensor | float, margin: Tensor) -> Any:
        alpha = (1 + margin - cosine).clamp(min=0)  # α_p = [O_p − s_p]_+, O_p = 1 + m
        value = alpha * (cosine - (1 - margin))  # Δ_p = 1 − m
        if self.detach:
            return value, alpha
        return value, torch.where(alpha > 0, 2 - 2 * cosine, 0.0)

    def negatives(self, cosine: Tensor, target: Tensor, margin: Tensor) -> Any:
        alpha = (cosine + margin).clamp(min=0)  # α_n = [s_n − O_n]_+, O_n = −m
        value = alpha * (cosine - margin)  # Δ_n = m
        if self.detach:
            return value, alpha
        return value, torch.where(alpha > 0, 2 * cosine, 0.0)


def _family(detach: bool) -> MarginFamily:
    weights = _Weights(detach)
    return MarginFamily(
        "circle" if detach else "circle_exact",
        weights.target,
        (MarginParameter("margin", *CIRCLE_MARGIN_RANGE),),
        target_logit=None,  # no default scale: the paper's γ is 256 for face recognition
        negatives=weights.negatives,
        class_indices_only=True,
        title="Circle loss",
    )


#: Circle loss with the weights α detached (the paper's and the authors' gradient): ``CIRCLE(margin)``.
CIRCLE = _family(detach=True)
#: Circle loss with the exact derivative of its logits.
CIRCLE_EXACT = _family(detach=False)


def circle_margin(
    cosine: Tensor, target: Tensor, margin: MarginParam = 0.25, *, detach_weights: bool = True, scale: Scale = 1.0
) -> Tensor:
    r"""The class-level Circle loss's logits, for the cross-entropy.

    "Circle Loss: A Unified Perspective of Pair Similarity Optimization" (Sun et al., CVPR 2020,
    https://arxiv.org/abs/2002.10857), Eq. 4–6 with one positive (the target class's weight) and the other classes'
    weights as negatives:

    .. math::
        z_y = s\,\alpha_p(\cos\theta_y - \Delta_p), \quad \alpha_p = [1 + m - \cos\theta_y]_+, \quad \Delta_p = 1 - m,
        \\
        z_j = s\,\alpha_n(\cos\theta_j - \Delta_n), \quad \alpha_n = [\cos\theta_j + m]_+, \quad \Delta_n = m

    (``s`` is the paper's γ), so that the cross-entropy of these logits is the paper's Eq. 4. The weights α are
    constants in backward by default (``detach_weights=True``), as in the authors' and FaceX-Zoo's code: the slope of
    a logit is :math:`s\,\alpha`, the self-paced weighting the paper describes. ``detach_weights=False`` gives the
    exact derivative of the logits (:math:`s(2 - 2\cos\theta_y)` and :math:`s \cdot 2\cos\theta_j`, 0 where α is 0).

    Every non-target logit changes (not only hard ones); none depends on the row's target. Class indices only: the
    class-level form has one positive per sample (soft targets would need a positive weight per class, which the
    paper does not define). Sub-centers pool before the weights. pytorch-metric-learning's ``CircleLoss`` is the
    pair-based form (similarities between embeddings of a batch), not this one.

    Args:
        cosine (Tensor[*, C]): cosines.
        target (Tensor[*] of int): class indices.
        margin (float or Tensor): the relaxation ``m`` in ``[0, 1)`` (default 0.25); per class ``(C,)`` (the margin of
            each sample's target class, for its whole row, as every family's non-target part reads its parameters) or
            per sample ``(*, 1)``.
        detach_weights (bool): the α's are constants in backward (default) or differentiated.
        scale (float or Tensor): ``s`` = γ (the paper: 256 for face recognition).

    Returns:
        Tensor[*, C]: the scaled logits, in ``cosine``'s dtype.
    """
    check_cosine(cosine)
    margin_ = circle_family(detach_weights)(margin)
    margin_.check(cosine.shape)
    check_scale(scale)
    target = check_target(target, cosine.shape)
    if is_soft(target):
        raise ValueError(
            "Circle loss needs class indices (an integer tensor of shape (*)), not soft targets: the class-level form "
            "has one positive class per sample"
        )
    return apply_margin(cosine, target, margin_, scale)


def circle_family(detach_weights: bool) -> MarginFamily:
    """:data:`CIRCLE` or :data:`CIRCLE_EXACT`, with a checked flag."""
    if not isinstance(detach_weights, bool):
        raise TypeError(f"Circle loss detach_weights must be a bool, but got {type(detach_weights).__name__}")
    return CIRCLE if detach_weights else CIRCLE_EXACT
