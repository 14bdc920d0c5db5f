"""L-Softmax: the multiplicative angular margin on the un-normalised linear layer."""

from __future__ import annotations

from typing import Any, Optional

import torch.nn.functional as F
from torch import Tensor

from mll import functional as MF
from mll.functional._engine.checks import check_features, check_lambda, check_num_sub_centers
from mll.functional.chunked import chunked_loss
from mll.functional.large_margin import large_margin
from mll.nn._head import Head
from mll.nn._state import float_repr, margin_repr, register_margin, register_state, typical_margin

__all__ = ["LargeMarginSoftmax"]


class LargeMarginSoftmax(Head):
    r"""L-Softmax head: :math:`\lVert w_y\rVert\lVert x\rVert\,\psi(\theta_y)` on the target,
    :math:`w_j^\top x` elsewhere, all times ``scale``.

    "Large-Margin Softmax Loss for Convolutional Neural Networks" (Liu et al., ICML 2016,
    https://arxiv.org/abs/1612.02295), as pytorch-metric-learning's ``LargeMarginSoftmaxLoss`` computes it. See
    :func:`mll.functional.large_margin_logits`. Unlike the cosine heads, neither the features nor the weights are
    normalised: the norms are part of the logits (and get their gradient), as in the paper.

    **Eval mode** returns ``scale · x·Wᵀ``, the margin-free logits this head trains (pml's ``get_logits``), not
    ``s·cos θ``: with class weights of different norms the two rank the classes differently, and the classifier the
    loss trained is the linear one. For retrieval, normalise the features yourself as for any head. ``loss()`` in
    eval mode is the cross-entropy of those logits.

    One weight vector per class (the logits are dot products, not pooled cosines): ``num_sub_centers`` must be 1.

    Args:
        scale (float): a factor on every logit (1: the paper's and pml's logits).
        margin (float or Tensor): m in ``[1, 10)`` (4, pml's default; the paper uses integers 2–4), or ``(C,)``.
        lambda_ (float or Tensor): the annealing weight λ >= 0 of the target logit
            ``(λ‖w‖‖x‖cos θ + ‖w‖‖x‖ψ(θ)) / (1 + λ)`` (0: no annealing, pml's); a 0-dim tensor buffer, so that
            annealing it changes no compiled graph.
    """

    margin: Any
    lambda_: Tensor

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = 1.0,
        trainable_scale: bool = False, margin: Any = 4.0, *, lambda_: float = 0.0, pooling: str = "max",
        pooling_temperature: float = 0.1, device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        check_num_sub_centers(num_sub_centers)
        if int(num_sub_centers) != 1:
            raise ValueError(
                "LargeMarginSoftmax has one weight vector per class (its logits are dot products x·w_j, not pooled "
                f"cosines): num_sub_centers must be 1, but got {num_sub_centers!r}"
            )
        check_lambda(lambda_, "L-Softmax lambda_")
        spec = MF.LARGE_MARGIN.parameters[2]
        super().__init__(
            in_features, out_features, 1, scale=scale, trainable_scale=trainable_scale,
            default_margin=MF.SPHERE(typical_margin(margin, spec, "L-Softmax", out_features), 0.0), pooling=pooling,
            pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        register_margin(self, "margin", margin, spec, "L-Softmax", out_features, device, dtype)
        lam = float(lambda_.detach().cpu()) if isinstance(lambda_, Tensor) else float(lambda_)
        register_state(self, "lambda_", lam, self.scale.dtype, device)
        self.reset_parameters()

    def cosine(self, input: Tensor) -> Tensor:
        """The logits before the margin and the scale: the dot products ``x·Wᵀ`` ``(*, C)`` (not cosines — this
        head's margin reads the norms; see :func:`mll.functional.large_margin_logits`)."""
        check_features(input, self.weight, 1)
        return F.linear(input, self.weight)

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        return large_margin(input, self.weight, self.margin, self.lambda_)

    def loss_terms(
        self, input: Tensor, labels: Tensor, margin: MF.Margin, reduction: str, chunk_size: Optional[int]
    ) -> Tensor:
        return chunked_loss(
            input, self.weight, labels, self.logit_scale(), margin, 1, self.pooling, self.pooling_temperature,
            chunk_size, reduction, normalized=False,
        )  # fmt: skip

    def head_options(self) -> dict[str, Any]:
        return {"margin": self.initial("margin"), "lambda_": self.initial_values["lambda_"]}

    def extra_options(self) -> list[str]:
        return [f"margin={margin_repr(self.margin)}", f"lambda_={float_repr(self.lambda_)}"]
