"""Normalisation and cosine logits."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from mll.functional._engine.checks import UNSET, check_features, check_pooling, renamed
from mll.functional._engine.normalization import folded_cosines, normalize
from mll.functional._engine.numerics import work_dtype

__all__ = ["cosine_logits", "normalize"]

Pooling = Literal["max", "soft"]


def cosine_logits(
    input: Tensor,
    weight: Tensor,
    num_sub_centers: int = 1,
    *,
    pooling: Pooling = "max",
    pooling_temperature: float = 0.1,
    weight_name: str = "weight",
    temperature: float = UNSET,
) -> Tensor:
    r"""Cosine similarity between features and class weights, pooled over sub-centers.

    .. math:: \cos\theta_{ij} = \max_{k < K} \langle \hat x_i, \hat w_{jK + k} \rangle
              \quad\text{or}\quad
              \sum_{k < K} \operatorname{softmax}_k\!\Big(\frac{c_{ijk}}{\gamma}\Big)\, c_{ijk},
              \quad c_{ijk} = \langle \hat x_i, \hat w_{jK + k} \rangle

    One GEMM on the L2-normalised operands (see :func:`normalize`). With ``num_sub_centers = K > 1`` row
    ``c*K + k`` of ``weight`` is sub-center ``k`` of class ``c`` (the 0.1.6 layout). ``pooling="max"`` keeps each
    class's most similar sub-center, as in "Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy Web
    Faces" (Deng et al., ECCV 2020); ``pooling="soft"`` weighs the sub-centers by a softmax of their cosines with
    temperature γ, as in "SoftTriple Loss: Deep Metric Learning Without Triplet Sampling" (Qian et al., ICCV 2019,
    https://arxiv.org/abs/1909.05235, Eq. 8; γ = 0.1 there): every sub-center gets a gradient, and γ → 0 recovers
    max pooling.

    The result is not clamped: rounding can put it a few ulps outside ``[-1, 1]``; the margin functions are
    written to be finite there.

    Args:
        input (Tensor[*, d]): features; any number of leading dimensions.
        weight (Tensor[C*K, d]): class weights (prototypes).
        num_sub_centers (int): ``K``, sub-centers per class.
        pooling (str): ``"max"`` or ``"soft"``, how sub-centers pool (ignored for ``K = 1``).
        pooling_temperature (float): γ > 0 of soft pooling (``temperature`` before 0.2, deprecated).
        weight_name (str): what to call ``weight`` in error messages.

    Returns:
        Tensor[*, C] of cosines in the GEMM's dtype.
    """
    pooling_temperature = renamed(pooling_temperature, temperature, "temperature", "pooling_temperature")
    check_features(input, weight, num_sub_centers, weight_name=weight_name)
    check_pooling(pooling, pooling_temperature)
    return pooled_cosines(input, weight, num_sub_centers, pooling, pooling_temperature)


def pooled_cosines(input: Tensor, weight: Tensor, num_sub_centers: int, pooling: str, temperature: float) -> Tensor:
    """:func:`cosine_logits` after its checks (the losses' dense paths, whose callers checked their arguments)."""
    cosine = folded_cosines(normalize(input), weight)
    if num_sub_centers > 1:
        cosine = pool_sub_centers(cosine.unflatten(-1, (-1, num_sub_centers)), pooling, temperature)  # type: ignore[arg-type]
    return cosine


def pool_sub_centers(cosine: Tensor, pooling: Pooling, temperature: float) -> Tensor:
    """Pool ``(*, C, K)`` sub-center cosines to ``(*, C)`` (softmax weights in float32 for half precision)."""
    if pooling == "max":
        return cosine.amax(dim=-1)
    weights = torch.softmax(cosine.to(work_dtype(cosine.dtype)) / temperature, dim=-1)
    return (weights * cosine).sum(dim=-1).to(cosine.dtype)
