"""Heads whose margin follows the feature norm: AdaFace and MagFace."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from mll import functional as MF
from mll.functional._checks import check_momentum, check_nonnegative, check_positive, check_target
from mll.functional.cosine import Pooling
from mll.functional.feature_norm import (
    MAGFACE_MAGNITUDES,
    MAGFACE_MARGINS,
    _ada_value_and_slope,
    _check_magface_args,
    ada_margin_unchecked,
    adaface_quality,
    mag_margin_unchecked,
)
from mll.functional.margins import ARC_MARGIN_RANGE, MarginParam
from mll.nn._common import (
    all_gather_samples,
    chunked_loss_with,
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

__all__ = ["AdaFace", "MagFace"]


class AdaFace(nn.Module):
    r"""AdaFace head: :math:`s(\cos(\theta_y + g_{angle}) - g_{add})` on the target, margins set by the feature norm.

    "AdaFace: Quality Adaptive Margin for Face Recognition" (Kim et al., CVPR 2022,
    https://arxiv.org/abs/2204.00964). See :func:`mll.functional.ada_margin`. The input must be the
    *un-normalised* features: their norm is the image-quality proxy. In training mode each forward first updates
    the running mean and standard deviation of the (detached) norms (gathered across ranks under
    ``torch.distributed``), then computes the logits with them; eval mode returns plain scaled cosines.

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): sub-centers per class ``K``.
        scale (float, optional): ``s > 0``; ``None`` uses the heuristic for CosFace with margin ``m`` (the margin at
            average quality).
        trainable_scale (bool): learn ``s``.
        margin (float or Tensor): ``m`` in ``[0, π/2)`` (default 0.4); per class as a ``(C,)`` tensor.
        h (float): concentration (default 0.333).
        momentum (float): weight of the old statistics in their update (default 0.99: the paper's α = 0.01).
        pooling (str): how sub-centers pool: ``"max"`` (Sub-center ArcFace) or ``"soft"`` (SoftTriple).
        pooling_temperature (float): γ > 0 of soft pooling (see :func:`mll.functional.cosine_logits`).

    Shape:
        - input: ``(*, d)`` un-normalised features; labels: ``(*)`` class indices or ``(*, C)`` soft targets
        - output: ``(*, C)``

    Attributes:
        norm_mean, norm_std (Tensor): running statistics of the feature norms (0-dim buffers; start at 20 and 100
            as in the paper's code).
    """

    in_features: int
    out_features: int
    num_sub_centers: int
    weight: nn.Parameter
    scale: Tensor
    margin: MarginParam
    norm_mean: Tensor
    norm_std: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_sub_centers: int = 1,
        scale: Optional[float] = None,
        trainable_scale: bool = False,
        margin: MarginParam = 0.4,
        *,
        h: float = 0.333,
        momentum: float = 0.99,
        pooling: Pooling = "max",
        pooling_temperature: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        register_margin(self, "margin", margin, *ARC_MARGIN_RANGE, "AdaFace", out_features, device, dtype)
        self.h = check_positive(h, "AdaFace h")
        check_momentum(momentum)
        self.momentum = float(momentum)
        init_head(
            self, in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_scale=lambda: MF.heuristic_scale(out_features, min(typical_margin(margin), 0.99)),
            pooling=pooling, pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        self.register_buffer("norm_mean", torch.empty((), dtype=statistics_dtype(dtype), device=device))
        self.register_buffer("norm_std", torch.empty((), dtype=statistics_dtype(dtype), device=device))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_class_weight(self.weight)
        self.reset_running_stats()

    def reset_running_stats(self) -> None:
        """Set the norm statistics back to their initial values (mean 20, std 100)."""
        with torch.no_grad():
            self.norm_mean.fill_(20.0)
            self.norm_std.fill_(100.0)

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        cosine, labels = margin_inputs(self, input, labels)
        if labels is None:  # eval mode: no margin
            return cosine * self.scale
        norms = self._update_statistics(input)
        return ada_margin_unchecked(
            cosine, labels, norms, self.margin, self.norm_mean, self.norm_std, self.h, self.scale
        )

    def _update_statistics(self, input: Tensor) -> Tensor:
        """Fold this batch's feature norms (all ranks') into the running statistics; returns the norms ``(*)``."""
        norms = input.detach().norm(dim=-1)
        with torch.no_grad():
            batch = norms.reshape(-1)
            if distributed_world_size() > 1:
                batch = all_gather_samples(batch)
            mean, std = MF.adaface_update(self.norm_mean, self.norm_std, batch, momentum=self.momentum)
            self.norm_mean.copy_(mean)
            self.norm_std.copy_(std)
        return norms

    def loss(
        self, input: Tensor, labels: Tensor, *, reduction: str = "mean", chunk_size: Optional[int] = None
    ) -> Tensor:
        """``F.cross_entropy(self(input, labels), labels)`` over class chunks (updates the statistics like a
        forward): see :func:`mll.functional.margin_cross_entropy`."""
        if not self.training:
            return chunked_loss_with(self, input, labels, reduction, chunk_size, _ada_value_and_slope, (0.0, 0.0))
        labels = check_target(labels, torch.Size((*input.shape[:-1], self.out_features)), name="labels")
        norms = self._update_statistics(input)
        quality = adaface_quality(norms, self.norm_mean, self.norm_std, self.h).unsqueeze(-1)
        params = (self.margin, quality)
        return chunked_loss_with(self, input, labels, reduction, chunk_size, _ada_value_and_slope, params)

    def extra_repr(self) -> str:
        return head_repr(self, f"margin={margin_repr(self.margin)}", f"h={self.h}", f"momentum={self.momentum}")


class MagFace(nn.Module):
    r"""MagFace head: :math:`s\cos(\theta_y + m(a))` with a margin growing with the feature magnitude
    :math:`a = \lVert x\rVert`, plus its magnitude regulariser.

    "MagFace: A Universal Representation for Face Recognition and Quality Assessment" (Meng et al., CVPR 2021,
    https://arxiv.org/abs/2103.06627). See :func:`mll.functional.mag_margin` and
    :func:`mll.functional.magface_regularizer`. The input must be the *un-normalised* features. The regulariser is
    part of the loss: use :meth:`loss` (cross-entropy + ``lambda_g · g(a)``), or add
    ``head.lambda_g * head.regularizer(x)`` to your own. The magnitudes must be able to reach ``[lower, upper]``
    (10–110 by default, as for a face backbone's 512-d features); set them for your features' scale.

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): sub-centers per class ``K``.
        scale (float, optional): ``s > 0``; ``None`` uses the heuristic for ArcFace with the mid-range margin.
        trainable_scale (bool): learn ``s``.
        lower (float): lower end ``l_a`` of the magnitude range (10).
        upper (float): upper end ``u_a > l_a`` (110).
        margin_low (float or Tensor): margin ``l_m`` at ``l_a`` (0.45); per class as a ``(C,)`` tensor.
        margin_high (float or Tensor): margin ``u_m`` at ``u_a`` (0.8); per class as a ``(C,)`` tensor.
        lambda_g (float): weight of the regulariser in :meth:`loss` (35, the paper's).
        pooling (str): how sub-centers pool: ``"max"`` (Sub-center ArcFace) or ``"soft"`` (SoftTriple).
        pooling_temperature (float): γ > 0 of soft pooling (see :func:`mll.functional.cosine_logits`).

    Shape:
        - input: ``(*, d)`` un-normalised features; labels: ``(*)`` class indices or ``(*, C)`` soft targets
        - output: ``(*, C)``
    """

    in_features: int
    out_features: int
    num_sub_centers: int
    weight: nn.Parameter
    scale: Tensor
    margin_low: MarginParam
    margin_high: MarginParam

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_sub_centers: int = 1,
        scale: Optional[float] = None,
        trainable_scale: bool = False,
        *,
        lower: float = MAGFACE_MAGNITUDES[0],
        upper: float = MAGFACE_MAGNITUDES[1],
        margin_low: MarginParam = MAGFACE_MARGINS[0],
        margin_high: MarginParam = MAGFACE_MARGINS[1],
        lambda_g: float = 35.0,
        pooling: Pooling = "max",
        pooling_temperature: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_magface_args(lower, upper, margin_low, margin_high, None)
        register_margin(self, "margin_low", margin_low, *ARC_MARGIN_RANGE, "MagFace", out_features, device, dtype)
        register_margin(self, "margin_high", margin_high, *ARC_MARGIN_RANGE, "MagFace", out_features, device, dtype)
        self.lower, self.upper = float(lower), float(upper)
        self.lambda_g = check_nonnegative(lambda_g, "MagFace lambda_g")
        middle = (typical_margin(margin_low) + typical_margin(margin_high)) / 2
        init_head(
            self, in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_scale=lambda: MF.heuristic_scale(out_features, middle, margin_type="arc"),
            pooling=pooling, pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_class_weight(self.weight)

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        cosine, labels = margin_inputs(self, input, labels)
        if labels is None:  # eval mode: no margin
            return cosine * self.scale
        norms = input.norm(dim=-1)  # with its gradient: the margin depends on the magnitude
        return mag_margin_unchecked(
            cosine, labels, norms, self.lower, self.upper, self.margin_low, self.margin_high, self.scale
        )

    def regularizer(self, input: Tensor) -> Tensor:
        """Mean of :math:`g(a) = a / u_a^2 + 1/a` over the batch (not yet weighted by ``lambda_g``)."""
        return MF.magface_regularizer(input.norm(dim=-1), lower=self.lower, upper=self.upper).mean()

    def loss(self, input: Tensor, labels: Tensor, *, reduction: str = "mean") -> Tensor:
        """Cross-entropy of ``self(input, labels)`` plus ``lambda_g · g(a)`` (per sample for ``reduction="none"``;
        the sum of both for ``"sum"``), as in the paper's training objective (Eq. 5)."""
        ce = dense_loss(self, input, labels, reduction)
        g = MF.magface_regularizer(input.norm(dim=-1), lower=self.lower, upper=self.upper).to(ce.dtype)
        reg = g if reduction == "none" else (g.sum() if reduction == "sum" else g.mean())
        return ce + self.lambda_g * reg

    def extra_repr(self) -> str:
        return head_repr(
            self, f"lower={self.lower}, upper={self.upper}", f"margin_low={margin_repr(self.margin_low)}",
            f"margin_high={margin_repr(self.margin_high)}", f"lambda_g={self.lambda_g}",
        )  # fmt: skip
