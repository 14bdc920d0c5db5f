"""Margin-free cosine heads: the plain, the scaled, and the √d-scaled normalised linear layer.

Each is a :class:`mll.nn._head.Head` without a margin: ``head(input)`` gives the (scaled) cosines in training and
eval mode alike (labels are accepted and ignored), and ``head.loss(input, labels)`` is their cross-entropy over class
chunks, without the N×C logits.
"""

from __future__ import annotations

import math
from typing import Any, Optional

from torch import Tensor

from mll.nn._head import Head

__all__ = ["NormalizedLinear", "ScaledNormalizedLinear", "ScaledNormalizedLinearSqrt"]


class NormalizedLinear(Head):
    r"""Cosine similarity between normalised features and normalised class weights.

    .. math:: y_{ij} = \max_k \langle \hat x_i, \hat w_{jK+k} \rangle

    See :func:`mll.functional.cosine_logits`. No scale: ``loss()`` is the cross-entropy of the cosines themselves.

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

    needs_labels = False
    has_scale = False

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, *, pooling: str = "max",
        pooling_temperature: float = 0.1, device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        super().__init__(
            in_features, out_features, num_sub_centers, pooling=pooling, pooling_temperature=pooling_temperature,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()

    def logit_scale(self) -> float:
        return 1.0


class ScaledNormalizedLinear(Head):
    r"""Scaled cosine logits, the margin-free base of every head here.

    .. math:: y_{ij} = s \cos\theta_{ij}

    The normalised softmax of "Classification is a Strong Baseline for Deep Metric Learning" (Zhai & Wu,
    BMVC 2019, https://arxiv.org/abs/1811.12649). See :func:`mll.functional.cosine_logits`.

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): sub-centers per class ``K``; row ``c*K + k`` of ``weight`` is sub-center k of class c.
        scale (float, optional): ``s > 0``; ``None`` uses :func:`mll.functional.heuristic_scale` (√2·ln(C − 1), or
            the head's margin-penalised criterion for the margin heads).
        trainable_scale (bool): learn ``s`` (a 0-dim Parameter) instead of keeping it fixed (a buffer).
        pooling (str): how sub-centers pool: ``"max"`` (Sub-center ArcFace) or ``"soft"`` (SoftTriple).
        pooling_temperature (float): γ > 0 of soft pooling (see :func:`mll.functional.cosine_logits`).
        device (torch.device, optional): of the parameters and buffers, as for ``nn.Linear``.
        dtype (torch.dtype, optional): of the parameters and buffers.

    Shape:
        - input: ``(*, d)``; labels (ignored): ``(*)`` or ``(*, C)``
        - output: ``(*, C)``
    """

    needs_labels = False

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None,
        trainable_scale: bool = False, *, pooling: str = "max", pooling_temperature: float = 0.1,
        device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        super().__init__(
            in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            pooling=pooling, pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()


class ScaledNormalizedLinearSqrt(Head):
    r"""Scaled cosine logits with the scale multiplied by :math:`\sqrt d`.

    .. math:: y_{ij} = s \sqrt d \cos\theta_{ij}

    The :math:`\sqrt d` makes the logits' range grow like those of a plain linear layer on unit-variance features.
    As :class:`ScaledNormalizedLinear`, with ``scale`` 1 by default (as in 0.1.6).
    """

    needs_labels = False

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = 1.0,
        trainable_scale: bool = False, *, pooling: str = "max", pooling_temperature: float = 0.1,
        device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        super().__init__(
            in_features, out_features, num_sub_centers, scale=1.0 if scale is None else scale,
            trainable_scale=trainable_scale, pooling=pooling, pooling_temperature=pooling_temperature,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.sqrt_in_features = math.sqrt(in_features)
        self.reset_parameters()

    def logit_scale(self) -> Tensor:
        return self.scale * self.sqrt_in_features

    def extra_options(self) -> list[str]:
        return ["scale multiplied by sqrt(in_features)"]
