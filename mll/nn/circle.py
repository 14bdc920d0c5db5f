"""Circle loss, class-level form: self-paced weights on every logit."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from mll import functional as MF
from mll.functional.circle import circle_family
from mll.nn._head import Head
from mll.nn._state import check_margin_arg, margin_repr, register_margin

__all__ = ["CircleLoss"]


class CircleLoss(Head):
    r"""Class-level Circle loss head: :math:`s\,\alpha_p(\cos\theta_y - \Delta_p)` on the target,
    :math:`s\,\alpha_n(\cos\theta_j - \Delta_n)` on every other class.

    "Circle Loss: A Unified Perspective of Pair Similarity Optimization" (Sun et al., CVPR 2020,
    https://arxiv.org/abs/2002.10857). See :func:`mll.functional.circle_margin`; the cross-entropy of the logits is
    the paper's loss with the class weights as proxies. A head like the others (it returns logits; eval mode gives
    ``s·cos θ``), named after the loss as in FaceX-Zoo. Class indices only. ``loss()`` runs over class chunks.

    Args:
        scale (float): the paper's γ (default 256, its face-recognition setting); no default-scale criterion applies
            to these logits, so ``None`` is refused.
        margin (float or Tensor): the relaxation ``m`` in ``[0, 1)`` (default 0.25), or ``(C,)``.
        detach_weights (bool): the α's are constants in backward (default, the paper's and the authors' gradient), or
            differentiated (the exact derivative of the logits).
    """

    soft_targets = False
    margin: Any

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = 256.0,
        trainable_scale: bool = False, margin: Any = 0.25, *, detach_weights: bool = True, pooling: str = "max",
        pooling_temperature: float = 0.1, device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        family = circle_family(detach_weights)
        if scale is None:
            raise ValueError("CircleLoss has no default scale (its logits are not cosines): pass scale=, e.g. 256")
        check_margin_arg(margin, family.parameters[0], family.label, out_features)
        super().__init__(
            in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            pooling=pooling, pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        register_margin(self, "margin", margin, family.parameters[0], family.label, out_features, device, dtype)
        self.family, self.detach_weights = family, detach_weights
        self.reset_parameters()

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        return self.family(self.margin)

    def head_options(self) -> dict[str, Any]:
        return {"margin": self.initial("margin"), "detach_weights": self.detach_weights}

    def extra_options(self) -> list[str]:
        return [f"margin={margin_repr(self.margin)}", f"detach_weights={self.detach_weights}"]
