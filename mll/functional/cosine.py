"""Normalisation and cosine logits."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from mll.functional._checks import UNSET, check_features, check_positive, renamed

__all__ = ["cosine_logits", "normalize"]

_HALF = (torch.float16, torch.bfloat16)

Pooling = Literal["max", "soft"]


def normalize(input: Tensor) -> Tensor:
    r"""L2-normalise the last dimension, mapping zero vectors to zero vectors.

    .. math:: \hat x = x / \max(\lVert x \rVert_2, \varepsilon)

    Float32 and float64 use :func:`torch.nn.functional.normalize` unchanged (``eps=1e-12``), so results match
    the ``F.normalize`` floor exactly. Half-precision inputs are normalised in float32 and cast back: the norm
    of a float16 vector overflows past 256 per component, and ``1e-12`` underflows to 0 in float16 (0/0 = NaN for a
    zero vector). For float16 the ε is ``2**-10`` so that the gradient at a zero vector (``1/ε`` times the
    upstream gradient) stays representable.

    Args:
        input (Tensor[*, d]): vectors to normalise.

    Returns:
        Tensor[*, d] of the same dtype: unit norm along the last dimension for norms above ε (float16: vectors
        shorter than ``2**-10`` come out shorter than 1), zero for zero vectors.
    """
    if input.dtype in _HALF:
        eps = 2.0**-10 if input.dtype == torch.float16 else 1e-12
        return F.normalize(input.float(), dim=-1, eps=eps).to(input.dtype)
    return F.normalize(input, dim=-1, eps=1e-12)


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
    cosine = F.linear(normalize(input), normalize(weight))
    if num_sub_centers > 1:
        cosine = pool_sub_centers(cosine.unflatten(-1, (-1, num_sub_centers)), pooling, pooling_temperature)
    return cosine


def pool_sub_centers(cosine: Tensor, pooling: Pooling, temperature: float) -> Tensor:
    """Pool ``(*, C, K)`` sub-center cosines to ``(*, C)`` (softmax weights in float32 for half precision)."""
    if pooling == "max":
        return cosine.amax(dim=-1)
    weights = torch.softmax(cosine.to(_work(cosine.dtype)) / temperature, dim=-1)
    return (weights * cosine).sum(dim=-1).to(cosine.dtype)


def check_pooling(pooling: object, pooling_temperature: object) -> None:
    if pooling not in ("max", "soft"):
        raise ValueError(f"pooling must be 'max' or 'soft', but got {pooling!r}")
    check_positive(pooling_temperature, "pooling_temperature")


def _work(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype
