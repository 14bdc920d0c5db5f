"""AdaM-Softmax: CosFace with a learnable margin per class and the margins' regulariser in ``loss()``."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from mll import functional as MF
from mll.functional._engine.checks import check_nonnegative
from mll.functional.adaptive_margin import ADAPTIVE_MARGIN_RANGE
from mll.nn._head import Head
from mll.nn._state import keep_initial, margin_repr, typical_margin

__all__ = ["AdaMSoftmax"]


class AdaMSoftmax(Head):
    r"""AdaM-Softmax head: :math:`s(\cos\theta_y - m_y)` on the target with learnable per-class margins :math:`m_j`,
    and :math:`L_m = -\frac{\lambda}{C}\sum_j m_j` added by :meth:`loss`.

    "AdaptiveFace: Adaptive Margin and Sampling for Face Recognition" (Liu et al., CVPR 2019), the adaptive margin
    softmax (the paper's hard prototype mining and data sampling are not part of a head). See
    :func:`mll.functional.adaptive_margin` and :func:`mll.functional.adaptive_margin_regularizer`.

    The margins are the parameter ``margin`` of shape ``(C,)``, trained with the network (give it to the optimizer
    with the weights). At the start of every training step they are projected onto ``[0, 1]`` in place, outside
    autograd (on ``.data``, as the authors' code does), so that every step uses valid CosFace margins, with no host
    read (see :meth:`project_margins`). Use :meth:`loss` (cross-entropy plus :meth:`regularizer`, the paper's
    objective; in eval mode the cross-entropy has no margin and the regulariser is still added: a validation loss),
    or add ``head.regularizer()`` to your own cross-entropy of ``head(x, y)``. The forward in eval mode returns
    ``s·cos θ``.

    Args:
        margin (float or Tensor): the margins' initial value, a float in ``[0, 1]`` for every class (0.35: the
            middle of the authors' uniform [0.3, 0.4] initialisation), or a ``(C,)`` tensor.
        lambda_ (float): λ >= 0, the regulariser's weight (70, FaceX-Zoo's default).

    Attributes:
        margin (nn.Parameter): ``(C,)``, the per-class margins.
    """

    regularized = True

    margin: nn.Parameter

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None,
        trainable_scale: bool = False, margin: Any = 0.35, *, lambda_: float = 70.0, pooling: str = "max",
        pooling_temperature: float = 0.1, device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        typical = typical_margin(margin, MF.ADAPTIVE.parameters[0], "AdaM-Softmax", out_features)
        self.lambda_ = check_nonnegative(lambda_, "AdaM-Softmax lambda_")
        super().__init__(
            in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_margin=MF.COS(min(typical, 0.99)), pooling=pooling, pooling_temperature=pooling_temperature,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.margin = nn.Parameter(torch.empty(self.out_features, device=device, dtype=dtype))
        keep_initial(self, "margin", margin)  # a float, or a per-class tensor
        self.reset_parameters()

    @property
    def initial_margin(self) -> float | Tensor:
        """The margins' initial value (what :meth:`reset_parameters` restores)."""
        return self.initial_values["margin"]

    def project_margins(self) -> None:
        """Clamp the margins onto ``[0, 1]`` in place, as the authors' code does before every step.

        On ``.data``: no autograd, and no new version of the parameter, so a graph built earlier in the step (a
        second forward before backward) stays valid — the projection is idempotent, so it changes nothing there."""
        self.margin.data.clamp_(*ADAPTIVE_MARGIN_RANGE)

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        self.project_margins()
        return MF.ADAPTIVE(self.margin)

    def regularizer(self) -> Tensor:
        r""":math:`L_m = -\frac{\lambda}{C}\sum_j m_j` (λ included): what :meth:`loss` adds to the cross-entropy."""
        return MF.adaptive_margin_regularizer(self.margin, lambda_=self.lambda_)

    def head_options(self) -> dict[str, Any]:
        return {"margin": self.initial_values["margin"], "lambda_": self.lambda_}

    def extra_options(self) -> list[str]:
        return [f"margin={margin_repr(self.margin.detach())}", f"lambda_={self.lambda_}"]
