"""pml's multiplicative angular margins: L-Softmax and SphereFace, a cross-entropy computed by
:func:`mll.functional.margin_cross_entropy` on the un-normalised dot products with a margin family of their own
(pml's integer multiple-angle formula, for every integer m where ``MF.LARGE_MARGIN`` takes m < 10)."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional

import torch
from torch import Tensor

from mll import functional as MF
from mll.compat._pml_base import LossDict
from mll.compat._pml_inputs import check_real
from mll.compat._pml_margin import WeightLoss, pml_cosines, positive

__all__ = ["LargeMarginSoftmaxLoss", "SphereFaceLoss", "multiple_angle_margin"]


def _chebyshev(cos: Tensor, m: int) -> tuple[Tensor, Tensor]:
    """``cos(mθ) = T_m(cos θ)`` and its derivative ``m·U_{m−1}(cos θ)``, by the Chebyshev recurrences
    ``P_{n+1} = 2c·P_n − P_{n−1}``: the paper's multiple-angle formula (Eq. 7), exact for integer m."""
    t_prev, t = torch.ones_like(cos), cos
    u_prev, u = torch.zeros_like(cos), torch.ones_like(cos)
    for _ in range(m - 1):
        t_prev, t = t, 2 * cos * t - t_prev
        u_prev, u = u, 2 * cos * u - u_prev
    return t, m * u


def _multiple_angle_value_and_slope(
    dot: Tensor, w: Any, norm_input: Tensor, norm_weight: Tensor, *, m: int
) -> tuple[Tensor, Tensor]:
    """f = P·ψ(d/P), P = ‖x‖‖w‖, ψ(θ) = (−1)^k cos(mθ) − 2k with k = ⌊θ/(π/m)⌋. The value is P̄·ψ(c) (P̄: P
    detached, c = d/P̄); written as ``P̄ψ + (P − P̄)(ψ − cψ')`` its derivative in P (autograd, through the norms)
    is ψ − cψ', and the slope in d is ψ'(c). ψ is C¹ in θ, so the side taken at k's boundaries does not matter."""
    p = norm_input * norm_weight
    p0 = p.detach()
    with torch.no_grad():
        c = torch.where(p0 > 0, dot / torch.where(p0 > 0, p0, 1.0), 0.0)
        k = torch.floor(torch.acos(c.clamp(-1, 1)) / (math.pi / m))
        sign = 1 - 2 * torch.remainder(k, 2)
        t, dt = _chebyshev(c, m)
        psi, slope = sign * t - 2 * k, sign * dt
    return p0 * psi + (p - p0) * (psi - c * slope), slope


def multiple_angle_margin(m: int) -> MF.MarginFamily:
    """pml's ``LargeMarginSoftmaxLoss`` margin as a margin family of :mod:`mll.functional`: the target's dot product
    ``‖x‖‖w‖cos θ`` becomes ``‖x‖‖w‖ψ(θ)`` with an integer ``m >= 1`` (any, where ``MF.LARGE_MARGIN`` takes
    ``m < 10``). Its parameters are the feature norms ``(N, 1)`` and the weight norms ``(C,)`` (or ``1.0``:
    SphereFace's normalised weights); class indices only."""
    return MF.MarginFamily(
        f"pml_multiple_angle_{m}",
        partial(_multiple_angle_value_and_slope, m=m),
        (
            MF.MarginParameter("norm_input", 0.0, math.inf, statistic=True),
            MF.MarginParameter("norm_weight", 0.0, math.inf, statistic=True),
        ),
        class_indices_only=True,
        title="pml's L-Softmax",
    )


class LargeMarginSoftmaxLoss(WeightLoss):
    r"""pml's ``LargeMarginSoftmaxLoss`` (L-Softmax): :math:`s\lVert w_y\rVert\lVert x\rVert\psi(\theta_y)` on the
    target, :math:`s\,w_j^\top x` elsewhere, :math:`\psi(\theta) = (-1)^k\cos(m\theta) - 2k`.

    "Large-Margin Softmax Loss for Convolutional Neural Networks" (Liu et al., ICML 2016,
    https://arxiv.org/abs/1612.02295). Neither the embeddings nor the weights are normalised. Computed by
    :func:`mll.functional.margin_cross_entropy` with ``normalized=False`` and :func:`multiple_angle_margin`
    (``cos(mθ)`` by the Chebyshev recurrence, pml's multiple-angle formula): exact gradients, through the norms
    too, finite at :math:`\cos\theta = \pm 1`.

    Args:
        num_classes (int): C.
        embedding_size (int): D.
        margin (float): m; pml uses ``int(margin)``, which must be >= 1 (4).
        scale (float): s > 0 (1).
        **kwargs: pml's common options.

    Attributes:
        W (Parameter[D, C]): the class weights.
    """

    #: SphereFace: the weights normalised, the embeddings not
    normalize_weights = False

    def __init__(
        self, num_classes: int, embedding_size: int, margin: float = 4, scale: float = 1, **kwargs: Any
    ) -> None:
        owner = type(self).__name__
        margin = int(check_real(owner, "margin", margin, low=1.0, unit=" (pml uses int(margin))"))
        scale = positive(owner, "scale", scale)
        super().__init__(**kwargs)
        self.margin, self.scale = margin, scale
        self._family = multiple_angle_margin(margin)
        self._weight(num_classes, embedding_size)

    def _losses(self, embeddings: Tensor, labels: Tensor, weights: Optional[Tensor]) -> LossDict:
        acc = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
        norm_input = torch.linalg.vector_norm(embeddings, dim=1, keepdim=True, dtype=acc)
        if self.normalize_weights:
            weight, norm_weight = MF.normalize(self.W.t()), 1.0
        else:
            weight, norm_weight = self.W.t(), torch.linalg.vector_norm(self.W, dim=0, dtype=acc)
        margin = self._family(norm_input, norm_weight)
        return self._cross_entropy(
            embeddings, labels, weights, weight=weight, scale=self.scale, margin=margin, normalized=False
        )

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """``scale·‖w‖‖x‖cos θ`` ``(N, C)`` (SphereFace: ``scale·‖x‖cos θ``), no margin, in pml's operations."""
        cos = pml_cosines(embeddings, self.W)
        norms = torch.norm(embeddings, p=2, dim=1).unsqueeze(1)
        if not self.normalize_weights:
            norms = torch.norm(self.W.to(embeddings.dtype), p=2, dim=0).unsqueeze(0) * norms
        return cos * norms * self.scale

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin}, "
            f"scale={self.scale:g}"
        )


class SphereFaceLoss(LargeMarginSoftmaxLoss):
    r"""pml's ``SphereFaceLoss``: :math:`s\lVert x\rVert\psi(\theta_y)` on the target,
    :math:`s\lVert x\rVert\cos\theta_j` elsewhere (the weights normalised, the embeddings not).

    "SphereFace: Deep Hypersphere Embedding for Face Recognition" (Liu et al., CVPR 2017,
    https://arxiv.org/abs/1704.08063), as pml computes it: L-Softmax (see :class:`LargeMarginSoftmaxLoss`) on the
    normalised weights, so the logits scale with ``‖x‖`` — unlike :class:`mll.SphereFace`, whose features are
    normalised and scaled by a fixed s. Arguments as :class:`LargeMarginSoftmaxLoss` (m = 4, s = 1).
    """

    normalize_weights = True
