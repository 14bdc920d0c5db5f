r"""L-Softmax: SphereFace's multiplicative angular margin on *un-normalised* features and weights.

"Large-Margin Softmax Loss for Convolutional Neural Networks" (Liu, Wen, Yu & Yang, ICML 2016,
https://arxiv.org/abs/1612.02295). The logits are the last layer's own, :math:`f_j = \lVert w_j\rVert\lVert x\rVert
\cos\theta_j = w_j^\top x`, and the target's angle gets the margin:
:math:`f_y = \lVert w_y\rVert\lVert x\rVert\,\psi(\theta_y)` with
:math:`\psi(\theta) = (-1)^k\cos(m\theta) - 2k` for :math:`\theta \in [k\pi/m, (k+1)\pi/m]`.

On the engine: with the features and weights used as they are (the chunk kernel's ``normalize_weight=False``, the
losses' ``normalized=False``), the kernel's "cosines" are the dot products :math:`d_{ij} = w_j^\top x_i`, which are
already the non-target logits. Only the target entry changes, and it is a margin family whose parameters are the
feature norm :math:`a_i = \lVert x_i\rVert` (per sample) and the weight norm :math:`b_j = \lVert w_j\rVert` (per
class): :math:`f_y = a b\,\psi(d / ab)`. Both norms carry their gradient (autograd through the family's value, as
MagFace's magnitude), and the slope in ``d`` is :math:`\psi'(\cos\theta)`; so the gradients are exact on the dense,
chunked and sharded paths, with no N×C tensor of norms: the per-class norms are one ``(C,)`` vector, read at the
targets.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mll.functional._engine.checks import check_cosine, check_features, check_lambda, check_scale, check_target
from mll.functional._engine.numerics import Scale
from mll.functional.margin import Margin, MarginFamily, MarginParam, MarginParameter, apply_margin
from mll.functional.margins import SPHERE_MARGIN_RANGE, _combined_target_logit, _sphere_value_and_slope

__all__ = ["LARGE_MARGIN", "large_margin_logits"]


def _large_margin_value_and_slope(
    dot: Tensor, w: Tensor | float, norm_input: Tensor, norm_weight: Tensor, margin: Tensor, lambda_: Tensor
) -> tuple[Tensor, Tensor]:
    """f = P·ψ_λ(d/P) with P = ‖x‖‖w‖, written as ``d + P·(ψ − c) + (P − P̄)·c·(1 − ψ')`` with c = d/P̄ and ψ, ψ'
    computed without autograd at c (P̄: P detached): the value is P̄·ψ(c), its derivative in P is ψ − c·ψ' (through
    autograd on the norms), its slope in d is ψ'; an entry without a margin (ψ = c, ψ' = 1) is ``d`` exactly. A zero
    feature or weight (P̄ = 0) gives c = 0 and the value d = 0."""
    p = norm_input * norm_weight
    p0 = p.detach()
    c = torch.where(p0 > 0, dot / torch.where(p0 > 0, p0, 1.0), 0.0).clamp(-1, 1)
    with torch.no_grad():
        psi, slope = _sphere_value_and_slope(c, w, margin.detach(), lambda_.detach())
    value = dot + p * (psi - c) + (p - p0) * c * (1 - slope)
    return value, slope


#: L-Softmax: the target's dot product ‖x‖‖w_y‖cos θ becomes ‖x‖‖w_y‖·(λ cos θ + ψ(θ))/(1 + λ), ψ SphereFace's.
LARGE_MARGIN = MarginFamily(
    "large_margin",
    _large_margin_value_and_slope,
    (
        MarginParameter("norm_input", 0.0, math.inf, statistic=True),
        MarginParameter("norm_weight", 0.0, math.inf, statistic=True),
        MarginParameter("margin", *SPHERE_MARGIN_RANGE),
        MarginParameter("lambda_", 0.0, math.inf),
    ),
    target_logit=lambda th, a, b, m, lam: (
        a * b * (lam * math.cos(th) + _combined_target_logit(th, m, 0.0, 0.0)) / (1 + lam)
    ),
    title="L-Softmax",
)


def large_margin_logits(
    input: Tensor, weight: Tensor, target: Tensor, margin: MarginParam = 4.0, *, lambda_: float | Tensor = 0.0,
    scale: Scale = 1.0,
) -> Tensor:  # fmt: skip
    r"""L-Softmax's logits: the linear layer's :math:`w_j^\top x`, with the target's angle multiplied by ``margin``.

    "Large-Margin Softmax Loss for Convolutional Neural Networks" (Liu et al., ICML 2016,
    https://arxiv.org/abs/1612.02295), with the annealing weight λ of its optimisation:

    .. math:: f_y = \lVert w_y\rVert\lVert x\rVert\,\frac{\lambda\cos\theta_y + \psi(\theta_y)}{1 + \lambda},
              \qquad f_j = \lVert w_j\rVert\lVert x\rVert\cos\theta_j = w_j^\top x \ (j \ne y),

    :math:`\psi(\theta) = (-1)^k\cos(m\theta) - 2k` on :math:`[k\pi/m, (k+1)\pi/m]` (SphereFace's form, real
    :math:`m \ge 1`, :func:`sphere_margin`), all times ``scale``. λ = 0 (the default) is pytorch-metric-learning's
    ``LargeMarginSoftmaxLoss``. Soft targets interpolate :math:`m \to 1 + (m - 1)t`. Gradients are exact in the
    features and the weights (through the norms too), finite at :math:`\cos\theta = \pm 1` and for zero vectors.

    Args:
        input (Tensor[*, d]): features, *not* normalised.
        weight (Tensor[C, d]): class weights, not normalised (one row per class).
        target (Tensor[*] of int or Tensor[*, C] of float): class indices or soft targets.
        margin (float or Tensor): m in ``[1, 10)`` (the paper: an integer, 2–4); per class ``(C,)``.
        lambda_ (float or Tensor): λ >= 0.
        scale (float or Tensor): a factor on every logit (pml's ``scale``; 1).

    Returns:
        Tensor[*, C]: the logits, in the dtype of ``input @ weight.T``.
    """
    check_features(input, weight, 1)
    check_lambda(lambda_, "L-Softmax lambda_")
    check_scale(scale)
    dots = torch.nn.functional.linear(input, weight)
    check_cosine(dots)
    margin_ = large_margin(input, weight, margin, lambda_)
    margin_.check(dots.shape)
    return apply_margin(dots, check_target(target, dots.shape), margin_, scale)


def large_margin(input: Tensor, weight: Tensor, margin: MarginParam, lambda_: float | Tensor) -> Margin:
    """The family bound for one batch: the feature norms ``(*, 1)`` and the weight norms ``(C,)`` with their
    gradients (in float32 for half precision, where a norm would overflow), the margin and λ."""
    dtype = torch.promote_types(input.dtype, torch.float32)
    norm_input = input.to(dtype).norm(dim=-1, keepdim=True)
    norm_weight = weight.to(dtype).norm(dim=-1)
    lam = lambda_.detach().reshape(()) if isinstance(lambda_, Tensor) else float(lambda_)
    return LARGE_MARGIN(norm_input, norm_weight, margin, lam)
