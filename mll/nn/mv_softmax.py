"""MV-Softmax: CosFace or ArcFace with mis-classified non-target logits raised."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from mll import functional as MF
from mll.functional.mv_softmax import mv_family
from mll.nn._head import Head
from mll.nn._state import check_margin_arg, margin_repr, register_margin, typical_margin

__all__ = ["MVSoftmax"]


class MVSoftmax(Head):
    r"""MV-Softmax head: :math:`s\,\psi(\theta_y)` on the target, mis-classified logits raised by ``t``.

    "Mis-classified Vector Guided Softmax Loss for Face Recognition" (Wang et al., AAAI 2020,
    https://arxiv.org/abs/1912.00833). See :func:`mll.functional.mv_margin`. One class for the paper's four
    variants: ``margin_type="cos"`` (MV-AM-Softmax, :math:`\psi = \cos\theta - m`) or ``"arc"`` (MV-Arc-Softmax,
    :math:`\psi = \cos(\theta + m)`), ``adaptive=True`` (``-a``: a mis-classified logit becomes
    :math:`(t + 1)\cos\theta_j + t`) or ``False`` (``-f``: :math:`\cos\theta_j + t`). Class indices only. Otherwise
    as the margin heads (see :mod:`mll.nn.margin`); ``loss()`` raises the mis-classified logits chunk by chunk.

    Args:
        margin (float or Tensor): ``m``: ``[0, 1)`` for ``"cos"``, radians in ``[0, π/2)`` for ``"arc"``, or ``(C,)``;
            default 0.35 (``"cos"``, the authors' code) or 0.5 (``"arc"``).
        t (float or Tensor): ``t >= 0`` (default 0.2, the authors' code), or ``(C,)``.
        margin_type (str): ``"cos"`` or ``"arc"``.
        adaptive (bool): the adaptive variant (default) or the fixed one.
    """

    soft_targets = False
    margin: Any
    t: Any

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None,
        trainable_scale: bool = False, margin: Any = None, *, t: Any = 0.2, margin_type: str = "cos",
        adaptive: bool = True, pooling: str = "max", pooling_temperature: float = 0.1, device: Any = None,
        dtype: Any = None,
    ) -> None:  # fmt: skip
        family = mv_family(margin_type, adaptive)
        if margin is None:
            margin = 0.35 if margin_type == "cos" else 0.5
        m_spec, t_spec = family.parameters
        typical = typical_margin(margin, m_spec, family.label, out_features)  # before the default scale reads it
        check_margin_arg(t, t_spec, family.label, out_features)
        base = MF.COS if margin_type == "cos" else MF.ARC
        super().__init__(
            in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_margin=base(typical), pooling=pooling, pooling_temperature=pooling_temperature,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.family, self.margin_type, self.adaptive = family, margin_type, adaptive
        register_margin(self, "margin", margin, m_spec, family.label, out_features, device, dtype)
        register_margin(self, "t", t, t_spec, family.label, out_features, device, dtype)
        self.reset_parameters()

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        return self.family(self.margin, self.t)

    def head_options(self) -> dict[str, Any]:
        return {
            "margin": self.initial("margin"), "t": self.initial("t"), "margin_type": self.margin_type,
            "adaptive": self.adaptive,
        }  # fmt: skip

    def extra_options(self) -> list[str]:
        return [
            f"margin={margin_repr(self.margin)}", f"t={margin_repr(self.t)}", f"margin_type={self.margin_type!r}",
            f"adaptive={self.adaptive}",
        ]  # fmt: skip
