"""ArcNegFace: ArcFace with every negative re-weighted by its closeness to the target logit."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from mll import functional as MF
from mll.functional.arcneg import check_arcneg_sigma
from mll.nn._head import Head
from mll.nn._state import margin_repr, register_margin, typical_margin

__all__ = ["ArcNegFace"]


class ArcNegFace(Head):
    r"""ArcNegFace head: :math:`s\cos(\theta_y + m)` on the target, :math:`s(t_j\cos\theta_j + t_j - 1)` elsewhere.

    "Towards Flops-constrained Face Recognition" (Liu et al., ICCV 2019 workshops, https://arxiv.org/abs/1909.00632).
    See :func:`mll.functional.arcneg_margin`: :math:`t_j = \alpha e^{-(\cos\theta_j - \cos(\theta_y + m))^2/\sigma}`,
    a constant in backward (the authors' gradient). Class indices only. Otherwise as the margin heads (see
    :mod:`mll.nn.margin`); ``loss()`` re-weights the negatives chunk by chunk.

    Args:
        margin (float or Tensor): ``m`` in radians, ``[0, π/2)`` (default 0.5), or ``(C,)``.
        alpha (float): the weight's peak, ``>= 0`` (default 1.2).
        sigma (float): the Gaussian's width, ``> 0`` (default 2).
    """

    soft_targets = False
    margin: Any

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None,
        trainable_scale: bool = False, margin: Any = 0.5, *, alpha: float = 1.2, sigma: float = 2.0,
        pooling: str = "max", pooling_temperature: float = 0.1, device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        family = MF.ARC_NEG
        m_spec, a_spec, s_spec = family.parameters
        typical = typical_margin(margin, m_spec, family.label, out_features)
        a_spec.check(alpha, family.label)
        s_spec.check(sigma, family.label)
        check_arcneg_sigma(sigma)
        super().__init__(
            in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_margin=MF.ARC(typical), pooling=pooling, pooling_temperature=pooling_temperature,
            device=device, dtype=dtype,
        )  # fmt: skip
        register_margin(self, "margin", margin, m_spec, family.label, out_features, device, dtype)
        self.alpha, self.sigma = float(alpha), float(sigma)
        self.reset_parameters()

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        return MF.ARC_NEG(self.margin, self.alpha, self.sigma)

    def head_options(self) -> dict[str, Any]:
        return {"margin": self.initial("margin"), "alpha": self.alpha, "sigma": self.sigma}

    def extra_options(self) -> list[str]:
        return [f"margin={margin_repr(self.margin)}", f"alpha={self.alpha}", f"sigma={self.sigma}"]
