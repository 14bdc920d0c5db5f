"""Heads with an additive margin on the target logit: CosFace and ArcFace."""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from mll import functional as MF
from mll.functional._checks import check_margin, check_target
from mll.functional.margins import (
    ARC_MARGIN_RANGE,
    COS_MARGIN_RANGE,
    arc_margin_unchecked,
    cos_margin_unchecked,
)
from mll.nn._common import chunked_loss, head_repr, init_head, reset_class_weight

__all__ = ["ArcFace", "CosFace"]


def _missing_labels(name: str) -> ValueError:
    return ValueError(
        f"{name} needs labels in training mode to apply its margin: call head(input, labels) with class "
        "indices of shape (*) or soft targets of shape (*, C), or call head.eval() for inference"
    )


class CosFace(nn.Module):
    r"""Large margin cosine head: :math:`s(\cos\theta_y - m)` on the target, :math:`s\cos\theta_j` elsewhere.

    "CosFace: Large Margin Cosine Loss for Deep Face Recognition" (Wang et al., CVPR 2018,
    https://arxiv.org/abs/1801.09414). See :func:`mll.functional.cos_margin`. The margin applies in training
    mode; in eval mode the head returns plain scaled cosines and needs no labels.

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): sub-centers per class ``K``.
        scale (float, optional): ``s > 0``; ``None`` uses :func:`mll.functional.heuristic_scale` for this margin.
        trainable_scale (bool): learn ``s``.
        margin (float): ``m`` in ``[0, 1)`` (default 0.5, as in 0.1.6; the paper uses 0.35).

    Shape:
        - input: ``(*, d)``; labels: ``(*)`` class indices or ``(*, C)`` soft targets
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
        margin: float = 0.5,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_margin(margin, *COS_MARGIN_RANGE, "CosFace")
        self.margin = float(margin)
        init_head(
            self, in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_scale=lambda: MF.heuristic_scale(out_features, self.margin, margin_type="cos"),
            device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_class_weight(self.weight)

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        cosine = MF.cosine_logits(input, self.weight, self.num_sub_centers)
        if not self.training:
            return cosine * self.scale
        if labels is None:
            raise _missing_labels(type(self).__name__)
        labels = check_target(labels, cosine.shape, name="labels")
        return cos_margin_unchecked(cosine, labels, self.margin, self.scale)

    def loss(
        self, input: Tensor, labels: Tensor, *, reduction: str = "mean", chunk_size: Optional[int] = None
    ) -> Tensor:
        """``F.cross_entropy(self(input, labels), labels)`` over class chunks: see
        :func:`mll.functional.margin_cross_entropy`."""
        return chunked_loss(self, input, labels, reduction, chunk_size, "cos", self.margin)

    def extra_repr(self) -> str:
        return head_repr(self, f"margin={self.margin}")


class ArcFace(nn.Module):
    r"""Additive angular margin head: :math:`s\cos(\theta_y + m)` on the target, :math:`s\cos\theta_j` elsewhere.

    "ArcFace: Additive Angular Margin Loss for Deep Face Recognition" (Deng et al., CVPR 2019,
    https://arxiv.org/abs/1801.07698). See :func:`mll.functional.arc_margin` for the numerics (finite at
    cos = ±1, monotone past π − m). The margin applies in training mode; eval mode needs no labels.

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): sub-centers per class ``K`` (Sub-center ArcFace for ``K > 1``).
        scale (float, optional): ``s > 0``; ``None`` uses :func:`mll.functional.heuristic_scale` for this margin.
        trainable_scale (bool): learn ``s``.
        margin (float): ``m`` in radians, in ``[0, π/2)`` (default 0.5).
        easy_margin (bool): apply the margin only where ``cos θ > 0``.

    Shape:
        - input: ``(*, d)``; labels: ``(*)`` class indices or ``(*, C)`` soft targets
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
        margin: float = 0.5,
        easy_margin: bool = False,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_margin(margin, *ARC_MARGIN_RANGE, "ArcFace")
        self.margin, self.easy_margin = float(margin), bool(easy_margin)
        init_head(
            self, in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_scale=lambda: MF.heuristic_scale(out_features, self.margin, margin_type="arc"),
            device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_class_weight(self.weight)

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        cosine = MF.cosine_logits(input, self.weight, self.num_sub_centers)
        if not self.training:
            return cosine * self.scale
        if labels is None:
            raise _missing_labels(type(self).__name__)
        labels = check_target(labels, cosine.shape, name="labels")
        return arc_margin_unchecked(cosine, labels, self.margin, self.easy_margin, self.scale)

    def loss(
        self, input: Tensor, labels: Tensor, *, reduction: str = "mean", chunk_size: Optional[int] = None
    ) -> Tensor:
        """``F.cross_entropy(self(input, labels), labels)`` over class chunks: see
        :func:`mll.functional.margin_cross_entropy`."""
        return chunked_loss(self, input, labels, reduction, chunk_size, "arc", self.margin, self.easy_margin)

    def extra_repr(self) -> str:
        return head_repr(self, f"margin={self.margin}", f"easy_margin={self.easy_margin}")
