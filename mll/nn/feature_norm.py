"""Heads whose margin follows the feature norm: AdaFace and MagFace.

The input must be the *un-normalised* features: their norm is what these heads read. Otherwise as the margin heads
(see :mod:`mll.nn.margin`).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mll import functional as MF
from mll.functional._engine.checks import UNSET, check_decay, check_nonnegative, check_positive, renamed
from mll.functional._engine.distributed import all_gather_rows
from mll.functional.feature_norm import MAGFACE_MAGNITUDES, MAGFACE_MARGINS, ada, check_magface_args, mag
from mll.nn._head import Head
from mll.nn._state import margin_repr, register_margin, register_state, statistics_dtype, typical_margin

__all__ = ["AdaFace", "MagFace"]

_ADA_MARGIN = MF.ADA.parameters[0]


class AdaFace(Head):
    r"""AdaFace head: :math:`s(\cos(\theta_y + g_{angle}) - g_{add})` on the target, margins set by the feature norm.

    "AdaFace: Quality Adaptive Margin for Face Recognition" (Kim et al., CVPR 2022,
    https://arxiv.org/abs/2204.00964). See :func:`mll.functional.ada_margin` (and its note on the authors' code,
    which clips every cosine to ±(1 − 10⁻³)). In training mode each call first updates the running mean and
    standard deviation of the (detached) norms (gathered across ranks under ``torch.distributed``), then computes
    the logits with them.

    Args:
        margin (float or Tensor): ``m`` in ``[0, π/2)`` (default 0.4), or ``(C,)``.
        h (float): concentration (default 0.333).
        decay (float): weight of the old statistics in their update (default 0.99: the paper's α = 0.01);
            ``momentum`` before 0.2 (deprecated).

    Attributes:
        norm_mean, norm_std (Tensor): running statistics of the feature norms (0-dim buffers; start at 20 and 100
            as in the paper's code).
    """

    shares_statistics = True
    running_stats = ("norm_mean", "norm_std")
    margin: Any
    norm_mean: Tensor
    norm_std: Tensor

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None,
        trainable_scale: bool = False, margin: Any = 0.4, *, h: float = 0.333, decay: float = 0.99,
        pooling: str = "max", pooling_temperature: float = 0.1, device: Any = None, dtype: Any = None,
        momentum: float = UNSET,
    ) -> None:  # fmt: skip
        decay = renamed(decay, momentum, "momentum", "decay")
        self_h = check_positive(h, "AdaFace h")
        check_decay(decay)
        super().__init__(
            in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_margin=MF.COS(min(typical_margin(margin, _ADA_MARGIN, "AdaFace", out_features), 0.99)),
            pooling=pooling, pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        register_margin(self, "margin", margin, _ADA_MARGIN, "AdaFace", out_features, device, dtype)
        self.h, self.decay = self_h, float(decay)
        # the paper's code starts the norm statistics at mean 20, standard deviation 100
        register_state(self, "norm_mean", 20.0, statistics_dtype(dtype), device)
        register_state(self, "norm_std", 100.0, statistics_dtype(dtype), device)
        self.reset_parameters()

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        norms = input.detach().norm(dim=-1)
        with torch.no_grad():
            batch = all_gather_rows(norms.reshape(-1), group=self.group)
            mean, std = MF.adaface_update(self.norm_mean, self.norm_std, batch, decay=self.decay)
            self.norm_mean.copy_(mean)
            self.norm_std.copy_(std)
        return ada(self.margin, norms, self.norm_mean, self.norm_std, self.h)

    @property
    def momentum(self) -> float:
        """Deprecated name of :attr:`decay`."""
        return self.decay

    def head_options(self) -> dict[str, Any]:
        return {"margin": self.initial("margin"), "h": self.h, "decay": self.decay}

    def extra_options(self) -> list[str]:
        return [f"margin={margin_repr(self.margin)}", f"h={self.h}", f"decay={self.decay}"]


class MagFace(Head):
    r"""MagFace head: :math:`s\cos(\theta_y + m(a))` with a margin growing with the feature magnitude
    :math:`a = \lVert x\rVert`, plus its magnitude regulariser.

    "MagFace: A Universal Representation for Face Recognition and Quality Assessment" (Meng et al., CVPR 2021,
    https://arxiv.org/abs/2103.06627). See :func:`mll.functional.mag_margin` and
    :func:`mll.functional.magface_regularizer`. The regulariser is part of the loss: use :meth:`loss`
    (cross-entropy + ``lambda_g · g(a)``), or add ``head.lambda_g * head.regularizer(x)`` to your own. The
    magnitudes must be able to reach ``[lower, upper]`` (10–110 by default, as for a face backbone's 512-d features);
    set them for your features' scale.

    Args:
        lower (float): lower end ``l_a`` of the magnitude range (10).
        upper (float): upper end ``u_a > l_a`` (110).
        margin_low (float or Tensor): margin ``l_m`` at ``l_a`` (0.45), or ``(C,)``.
        margin_high (float or Tensor): margin ``u_m`` at ``u_a`` (0.8), or ``(C,)``.
        lambda_g (float): weight of the regulariser in :meth:`loss` (35, the paper's).
        easy_margin (bool): the margin only where ``cos θ > 0``. False (the paper's Eq. 3) by default; the
            authors' code defaults to True.
    """

    margin_low: Any
    margin_high: Any

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None,
        trainable_scale: bool = False, *, lower: float = MAGFACE_MAGNITUDES[0],
        upper: float = MAGFACE_MAGNITUDES[1], margin_low: Any = MAGFACE_MARGINS[0],
        margin_high: Any = MAGFACE_MARGINS[1], lambda_g: float = 35.0, easy_margin: bool = False,
        pooling: str = "max", pooling_temperature: float = 0.1, device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        check_magface_args(lower, upper, margin_low, margin_high, None)
        lambda_g = check_nonnegative(lambda_g, "MagFace lambda_g")
        specs = {"margin_low": MF.MAG.parameters[3], "margin_high": MF.MAG.parameters[4]}
        middle = (
            typical_margin(margin_low, specs["margin_low"], "MagFace", out_features)
            + typical_margin(margin_high, specs["margin_high"], "MagFace", out_features)
        ) / 2
        super().__init__(
            in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_margin=MF.ARC(middle), pooling=pooling, pooling_temperature=pooling_temperature,
            device=device, dtype=dtype,
        )  # fmt: skip
        for name, value in (("margin_low", margin_low), ("margin_high", margin_high)):
            register_margin(self, name, value, specs[name], "MagFace", out_features, device, dtype)
        self.lower, self.upper, self.lambda_g = float(lower), float(upper), lambda_g
        self.easy_margin = bool(easy_margin)
        self.reset_parameters()

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        norms = input.norm(dim=-1)  # with its gradient: the margin depends on the magnitude
        return mag(norms, self.lower, self.upper, self.margin_low, self.margin_high, self.easy_margin)

    def regularizer(self, input: Tensor) -> Tensor:
        """Mean of :math:`g(a) = a / u_a^2 + 1/a` over the batch (not yet weighted by ``lambda_g``)."""
        return MF.magface_regularizer(input.norm(dim=-1), lower=self.lower, upper=self.upper).mean()

    def loss(
        self, input: Tensor, labels: Tensor, *, reduction: str = "mean", chunk_size: Optional[int] = None
    ) -> Tensor:
        """Cross-entropy of ``self(input, labels)`` (over class chunks, without the N×C logits) plus
        ``lambda_g · g(a)`` (per sample for ``reduction="none"``; the sum of both for ``"sum"``), as in the paper's
        training objective (Eq. 5)."""
        return self.chunked_loss(input, labels, reduction, chunk_size)

    def loss_terms(
        self, input: Tensor, labels: Tensor, margin: MF.Margin, reduction: str, chunk_size: Optional[int]
    ) -> Tensor:
        ce = super().loss_terms(input, labels, margin, reduction, chunk_size)
        g = MF.magface_regularizer(input.norm(dim=-1), lower=self.lower, upper=self.upper).to(ce.dtype)
        reg = g if reduction == "none" else (g.sum() if reduction == "sum" else g.mean())
        return ce + self.lambda_g * reg

    def head_options(self) -> dict[str, Any]:
        return {
            "lower": self.lower, "upper": self.upper, "margin_low": self.initial("margin_low"),
            "margin_high": self.initial("margin_high"),
            "lambda_g": self.lambda_g, "easy_margin": self.easy_margin,
        }  # fmt: skip

    def extra_options(self) -> list[str]:
        return [
            f"lower={self.lower}, upper={self.upper}", f"margin_low={margin_repr(self.margin_low)}",
            f"margin_high={margin_repr(self.margin_high)}", f"lambda_g={self.lambda_g}",
            f"easy_margin={self.easy_margin}",
        ]  # fmt: skip
