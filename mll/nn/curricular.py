"""CurricularFace: ArcFace with hard negatives re-weighted by a running statistic."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mll import functional as MF
from mll.functional._checks import check_momentum, is_soft
from mll.functional.cosine import Pooling
from mll.functional.curricular import (
    curricular_margin_unchecked,
    curricular_statistics,
    curricular_update_from_statistics,
)
from mll.functional.margins import ARC_MARGIN_RANGE, MarginParam
from mll.nn._common import (
    all_reduce_sum,
    distributed_world_size,
    head_repr,
    init_head,
    margin_repr,
    register_margin,
    reset_class_weight,
    statistics_dtype,
    typical_margin,
)
from mll.nn.margin import dense_loss, margin_inputs

__all__ = ["CurricularFace"]


class CurricularFace(nn.Module):
    r"""CurricularFace head: :math:`s\cos(\theta_y + m)` on the target, :math:`s\cos\theta_j(t + \cos\theta_j)` on
    hard negatives.

    "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face Recognition" (Huang et al., CVPR 2020,
    https://arxiv.org/abs/2004.00288). See :func:`mll.functional.curricular_margin`. In training mode each forward
    first updates the buffer ``t`` from the batch's mean target cosine (Eq. 9; gathered across ranks under
    ``torch.distributed``), then computes the logits with the updated ``t``; eval mode returns plain scaled cosines.
    Class indices only (no soft targets). Unlike the target-only heads this one makes an elementwise pass over all
    N×C cosines and keeps them for backward.

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): sub-centers per class ``K``.
        scale (float, optional): ``s > 0``; ``None`` uses the heuristic for ArcFace with margin ``m``.
        trainable_scale (bool): learn ``s``.
        margin (float or Tensor): ``m`` in ``[0, π/2)`` (default 0.5); per class as a ``(C,)`` tensor.
        momentum (float): weight of the old ``t`` in its update (default 0.99: the paper's α = 0.01).
        pooling (str): how sub-centers pool: ``"max"`` (Sub-center ArcFace) or ``"soft"`` (SoftTriple).
        pooling_temperature (float): γ > 0 of soft pooling (see :func:`mll.functional.cosine_logits`).

    Shape:
        - input: ``(*, d)``; labels: ``(*)`` class indices
        - output: ``(*, C)``

    Attributes:
        t (Tensor): the running statistic (0-dim buffer, starts at 0).
    """

    in_features: int
    out_features: int
    num_sub_centers: int
    weight: nn.Parameter
    scale: Tensor
    margin: MarginParam
    t: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_sub_centers: int = 1,
        scale: Optional[float] = None,
        trainable_scale: bool = False,
        margin: MarginParam = 0.5,
        *,
        momentum: float = 0.99,
        pooling: Pooling = "max",
        pooling_temperature: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        register_margin(self, "margin", margin, *ARC_MARGIN_RANGE, "CurricularFace", out_features, device, dtype)
        check_momentum(momentum)
        self.momentum = float(momentum)
        init_head(
            self, in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_scale=lambda: MF.heuristic_scale(out_features, typical_margin(margin), margin_type="arc"),
            pooling=pooling, pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        self.register_buffer("t", torch.zeros((), dtype=statistics_dtype(dtype), device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_class_weight(self.weight)
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        """Set ``t`` back to 0."""
        with torch.no_grad():
            self.t.zero_()

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        cosine, labels = margin_inputs(self, input, labels)
        if labels is None:  # eval mode: no margin
            return cosine * self.scale
        if is_soft(labels):
            raise ValueError(
                "CurricularFace needs class indices (an integer tensor of shape (*)), not soft targets: its "
                "hard-negative test compares every logit with the target's"
            )
        with torch.no_grad():
            total, count = curricular_statistics(cosine, labels)
            if distributed_world_size() > 1:
                all_reduce_sum(total, count)
            self.t.copy_(curricular_update_from_statistics(self.t, total, count, self.momentum))
        return curricular_margin_unchecked(cosine, labels, self.margin, self.t, self.scale)

    def loss(self, input: Tensor, labels: Tensor, *, reduction: str = "mean") -> Tensor:
        """``F.cross_entropy(self(input, labels), labels, reduction=reduction)`` (updates ``t`` like a forward)."""
        return dense_loss(self, input, labels, reduction)

    def extra_repr(self) -> str:
        return head_repr(self, f"margin={margin_repr(self.margin)}", f"momentum={self.momentum}")
