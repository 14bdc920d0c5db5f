"""ArcNegFace: ArcFace's target, every negative re-weighted by a Gaussian of its distance to the target logit.

A non-target logit becomes ``t_j·cos θ_j + t_j − 1`` with ``t_j = α·exp(−(cos θ_j − ψ(θ_y))²/σ)``: negatives close to
the target's margin logit weigh more (α > 1), far ones less. The family's non-target part (see
:class:`mll.functional.MarginFamily`) runs on every path; the weights ``t_j`` are constants in backward, as in the
authors' code (the slope of a negative logit is ``t_j``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from mll.functional._engine.checks import check_cosine, check_scale, check_target, is_soft
from mll.functional._engine.numerics import Scale
from mll.functional.margin import MarginFamily, MarginParam, MarginParameter, apply_margin
from mll.functional.margins import ARC_MARGIN_RANGE, _arc_value_and_slope

__all__ = ["ARC_NEG", "arcneg_margin"]


def _target(cosine: Tensor, w: Tensor | float, margin: Tensor, alpha: Tensor, sigma: Tensor) -> Any:
    return _arc_value_and_slope(cosine, margin * w, False)


def _negatives(cosine: Tensor, target: Tensor, margin: Tensor, alpha: Tensor, sigma: Tensor) -> Any:
    psi = _arc_value_and_slope(target, margin, False)[0]  # the row's target logit, a statistic
    alpha, sigma = alpha.to(cosine.dtype), sigma.to(cosine.dtype)
    t = alpha * torch.exp(-((cosine - psi) ** 2) / sigma)
    return t * (cosine + 1) - 1, t  # t_j detached: the authors' gradient


#: ArcNegFace: ``ARC_NEG(margin, alpha, sigma)``.
ARC_NEG = MarginFamily(
    "arc_neg",
    _target,
    (
        MarginParameter("margin", *ARC_MARGIN_RANGE),
        MarginParameter("alpha", 0.0, math.inf),
        MarginParameter("sigma", 0.0, math.inf),
    ),
    target_logit=lambda th, m, alpha, sigma: math.cos(th + m),
    negatives=_negatives,
    class_indices_only=True,
    title="ArcNegFace",
)


def arcneg_margin(
    cosine: Tensor, target: Tensor, margin: MarginParam = 0.5, *, alpha: float = 1.2, sigma: float = 2.0,
    scale: Scale = 1.0,
) -> Tensor:  # fmt: skip
    r"""ArcNegFace's logits: ArcFace on the target, every negative re-weighted by its closeness to the target logit.

    "Towards Flops-constrained Face Recognition" (Liu et al., ICCV 2019 workshops (LFR challenge),
    https://arxiv.org/abs/1909.00632), its ArcNegFace loss:

    .. math::
        z_y = s\cos(\theta_y + m), \qquad
        t_j = \alpha\, e^{-(\cos\theta_j - \cos(\theta_y + m))^2 / \sigma}, \qquad
        z_j = s\,(t_j\cos\theta_j + t_j - 1)

    for every non-target j, with :func:`arc_margin`'s target (its fix past π − m, which the authors' code has too).
    As in the authors' code, :math:`t_j` is a constant in backward (it reads the target logit's value with
    ``.item()`` and is ``.detach()``-ed): the slope of :math:`z_j` is :math:`s\,t_j`, and no gradient flows from a
    negative to the target through :math:`t_j`. The gradient is therefore not the derivative of the logits
    (``gradcheck`` fails by design, but for ``sigma → ∞``); the tests hold it to autograd's of the authors' formula.

    Class indices only: the weights are distances to *the* target's logit. Sub-centers pool before the margin.

    Args:
        cosine (Tensor[*, C]): cosines.
        target (Tensor[*] of int): class indices.
        margin (float or Tensor): ``m`` in radians, ``[0, π/2)`` (default 0.5); per class ``(C,)`` or per sample.
        alpha (float): the weight's peak α, ``>= 0`` (default 1.2, the authors' code).
        sigma (float): the Gaussian's width σ, ``> 0`` (default 2, the authors' code).
        scale (float or Tensor): ``s``.

    Returns:
        Tensor[*, C]: the scaled logits, in ``cosine``'s dtype.
    """
    check_cosine(cosine)
    check_arcneg_sigma(sigma)
    margin_ = ARC_NEG(margin, alpha, sigma)
    margin_.check(cosine.shape)
    check_scale(scale)
    target = check_target(target, cosine.shape)
    if is_soft(target):
        raise ValueError(
            "ArcNegFace needs class indices (an integer tensor of shape (*)), not soft targets: its weights are "
            "distances to the target's logit"
        )
    return apply_margin(cosine, target, margin_, scale)


def check_arcneg_sigma(sigma: object) -> None:
    if isinstance(sigma, (int, float)) and not isinstance(sigma, bool) and sigma <= 0:
        raise ValueError(f"ArcNegFace sigma must be in (0, inf), but got {sigma!r}")
