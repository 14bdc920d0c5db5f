"""Margin-free cosine heads."""

from __future__ import annotations

import math
from typing import Optional

from torch import Tensor, nn

from mll import functional as MF
from mll.functional.cosine import Pooling
from mll.nn._common import chunked_loss, head_cosine, head_repr, init_head, reset_class_weight

__all__ = ["NormalizedLinear", "ScaledNormalizedLinear", "ScaledNormalizedLinearSqrt"]


class NormalizedLinear(nn.Module):
    r"""Cosine similarity between normalised features and normalised class weights.

    .. math:: y_{ij} = \max_k \langle \hat x_i, \hat w_{jK+k} \rangle

    See :func:`mll.functional.cosine_logits`.

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): sub-centers per class ``K`` (default 1).
        pooling (str): how sub-centers pool: ``"max"`` (Sub-center ArcFace) or ``"soft"`` (SoftTriple).
        pooling_temperature (float): γ > 0 of soft pooling (see :func:`mll.functional.cosine_logits`).

    Shape:
        - input: ``(*, d)``; labels (ignored, accepted for a uniform call): ``(*)`` or ``(*, C)``
        - output: ``(*, C)``, cosines in ``[-1, 1]``

    Attributes:
        weight (Tensor[C*K, d]): class weights; row ``c*K + k`` is sub-center ``k`` of class ``c``.
    """

    in_features: int
    out_features: int
    num_sub_centers: int
    weight: nn.Parameter

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_sub_centers: int = 1,
        *,
        pooling: Pooling = "max",
        pooling_temperature: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        init_head(
            self,
            in_features,
            out_features,
            num_sub_centers,
            pooling=pooling,
            pooling_temperature=pooling_temperature,
            device=device,
            dtype=dtype,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_class_weight(self.weight)

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return head_cosine(self, input)

    def extra_repr(self) -> str:
        return head_repr(self)


class ScaledNormalizedLinear(nn.Module):
    r"""Scaled cosine logits, the margin-free base of every head here.

    .. math:: y_{ij} = s \cos\theta_{ij}

    The normalised softmax of "Classification is a Strong Baseline for Deep Metric Learning" (Zhai & Wu,
    BMVC 2019, https://arxiv.org/abs/1811.12649). See :func:`mll.functional.cosine_logits`.

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): sub-centers per class ``K``.
        pooling (str): how sub-centers pool: ``"max"`` (Sub-center ArcFace) or ``"soft"`` (SoftTriple).
        pooling_temperature (float): γ > 0 of soft pooling (see :func:`mll.functional.cosine_logits`).
        scale (float, optional): ``s > 0``; ``None`` uses :func:`mll.functional.heuristic_scale` (√2·ln(C − 1)).
        trainable_scale (bool): learn ``s`` (a Parameter) instead of keeping it fixed (a buffer).

    Shape:
        - input: ``(*, d)``; labels (ignored): ``(*)`` or ``(*, C)``
        - output: ``(*, C)``
    """

    in_features: int
    out_features: int
    num_sub_centers: int
    weight: nn.Parameter
    scale: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_sub_centers: int = 1,
        scale: Optional[float] = None,
        trainable_scale: bool = False,
        *,
        pooling: Pooling = "max",
        pooling_temperature: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        init_head(
            self, in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_scale=lambda: MF.heuristic_scale(out_features),
            pooling=pooling, pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_class_weight(self.weight)

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return head_cosine(self, input) * self.scale

    def loss(
        self, input: Tensor, labels: Tensor, *, reduction: str = "mean", chunk_size: Optional[int] = None
    ) -> Tensor:
        """``F.cross_entropy(self(input, labels), labels)`` over class chunks: see
        :func:`mll.functional.margin_cross_entropy`."""
        return chunked_loss(self, input, labels, reduction, chunk_size, "none")

    def extra_repr(self) -> str:
        return head_repr(self)


class ScaledNormalizedLinearSqrt(nn.Module):
    r"""Scaled cosine logits with the scale multiplied by :math:`\sqrt d`.

    .. math:: y_{ij} = s \sqrt d \cos\theta_{ij}

    The :math:`\sqrt d` makes the logits' range grow like those of a plain linear layer on unit-variance features.

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): sub-centers per class ``K``.
        pooling (str): how sub-centers pool: ``"max"`` (Sub-center ArcFace) or ``"soft"`` (SoftTriple).
        pooling_temperature (float): γ > 0 of soft pooling (see :func:`mll.functional.cosine_logits`).
        scale (float): ``s > 0``, multiplied by √d (default 1, as in 0.1.6).
        trainable_scale (bool): learn ``s``.

    Shape:
        - input: ``(*, d)``; labels (ignored): ``(*)`` or ``(*, C)``
        - output: ``(*, C)``
    """

    in_features: int
    out_features: int
    num_sub_centers: int
    weight: nn.Parameter
    scale: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_sub_centers: int = 1,
        scale: Optional[float] = 1.0,
        trainable_scale: bool = False,
        *,
        pooling: Pooling = "max",
        pooling_temperature: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        init_head(
            self, in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_scale=lambda: 1.0,
            pooling=pooling, pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        self.sqrt_in_features = math.sqrt(in_features)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_class_weight(self.weight)

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return head_cosine(self, input) * (self.scale * self.sqrt_in_features)

    def extra_repr(self) -> str:
        return head_repr(self, "scale multiplied by sqrt(in_features)")
