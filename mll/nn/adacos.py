"""AdaCos heads: a fixed heuristic scale, or one adapted to every training batch."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mll import functional as MF
from mll.functional._checks import check_scale, check_target
from mll.functional.cosine import Pooling
from mll.nn._common import (
    all_gather_samples,
    distributed_world_size,
    head_cosine,
    head_repr,
    init_head,
    reset_class_weight,
)

__all__ = ["AdaCos", "FixedAdaCos"]


class FixedAdaCos(nn.Module):
    r"""Scaled cosine logits with AdaCos's fixed scale :math:`\sqrt2\ln(C-1)`.

    "AdaCos: Adaptively Scaling Cosine Logits for Effectively Learning Deep Face Representations"
    (Zhang et al., CVPR 2019, https://arxiv.org/abs/1905.00292), Sec. 4.1. See
    :func:`mll.functional.heuristic_scale`.

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): sub-centers per class ``K``.
        pooling (str): how sub-centers pool: ``"max"`` (Sub-center ArcFace) or ``"soft"`` (SoftTriple).
        pooling_temperature (float): γ > 0 of soft pooling (see :func:`mll.functional.cosine_logits`).
        scale (float, optional): override the heuristic with a fixed ``s > 0`` (0.1.6 crashed when given one).

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
        *,
        pooling: Pooling = "max",
        pooling_temperature: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        init_head(
            self, in_features, out_features, num_sub_centers, scale=scale,
            default_scale=lambda: MF.heuristic_scale(out_features),
            pooling=pooling, pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_class_weight(self.weight)

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return head_cosine(self, input) * self.scale

    def extra_repr(self) -> str:
        return head_repr(self, show_trainable=False)


class AdaCos(nn.Module):
    r"""Scaled cosine logits whose scale follows AdaCos's dynamic update in training mode.

    "AdaCos: Adaptively Scaling Cosine Logits for Effectively Learning Deep Face Representations"
    (Zhang et al., CVPR 2019, https://arxiv.org/abs/1905.00292), Eq. 15–16; see
    :func:`mll.functional.adacos_scale`. In training mode each forward first updates the ``scale`` buffer from
    the batch (no gradient flows through it), then returns ``scale · cos θ`` with the *updated* scale. In eval
    mode the scale is frozen. Labels are optional: without them the predicted class stands in for the target.
    Under ``torch.distributed`` the statistics of every rank's batch are gathered first, so all ranks hold the
    same scale (the one a single process would compute on the global batch).

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): sub-centers per class ``K``.
        pooling (str): how sub-centers pool: ``"max"`` (Sub-center ArcFace) or ``"soft"`` (SoftTriple).
        pooling_temperature (float): γ > 0 of soft pooling (see :func:`mll.functional.cosine_logits`).
        scale (float, optional): initial scale; ``None`` uses √2·ln(C − 1).
        min_scale (float): floor of the adapted scale (see :func:`mll.functional.adacos_reduce`).

    Shape:
        - input: ``(*, d)``; labels (optional): ``(*)`` or ``(*, C)``
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
        *,
        min_scale: float = 0.5,
        pooling: Pooling = "max",
        pooling_temperature: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_scale(min_scale, "min_scale")
        self.min_scale = float(min_scale)
        init_head(
            self, in_features, out_features, num_sub_centers, scale=scale,
            default_scale=lambda: MF.heuristic_scale(out_features),
            pooling=pooling, pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        self.initial_scale = float(self.scale)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_class_weight(self.weight)
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        """Set the scale back to its initial value."""
        with torch.no_grad():
            self.scale.fill_(self.initial_scale)

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        cosine = head_cosine(self, input)
        if self.training:
            if labels is not None:
                labels = check_target(labels, cosine.shape, name="labels")
            with torch.no_grad():
                log_b, theta = MF.adacos_statistics(cosine, labels, self.scale)
                if distributed_world_size() > 1:
                    log_b, theta = all_gather_samples(log_b), all_gather_samples(theta)
                if log_b.numel() > 0:  # an empty (global) batch keeps the scale
                    self.scale.copy_(MF.adacos_reduce(log_b, theta, min_scale=self.min_scale))
        return cosine * self.scale

    def extra_repr(self) -> str:
        return head_repr(self, f"min_scale={self.min_scale}", show_trainable=False)
