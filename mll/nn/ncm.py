"""DeepNCM: nearest class mean head with running class means."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor, nn

from mll import functional as MF
from mll.functional._checks import check_in_features, check_momentum, check_num_classes, check_scale, check_target
from mll.nn._common import all_reduce_sum, distributed_world_size

__all__ = ["DeepNCM"]


class DeepNCM(nn.Module):
    r"""Scaled cosine similarity to running class means, updated by an exponential moving average.

    "DeepNCM: Deep Nearest Class Mean Classifiers" (Guerriero et al., ICLR 2018 workshop,
    https://openreview.net/forum?id=rkPLZ4JPM). See :func:`mll.functional.ncm_logits` and
    :func:`mll.functional.ncm_update`.

    .. math:: z_{ic} = s\,\langle \hat x_i, \hat\mu_c \rangle, \qquad
              \mu_c \leftarrow \alpha\,\mu_c + (1-\alpha)\,\bar x_c \ \text{(classes in the batch)}

    In training mode the logits use the means *before* this batch's update (as in 0.1.6), then the ``means``
    buffer is updated under ``no_grad``; labels are required there. In eval mode the means are frozen and labels
    are optional. The means start at zero: a class never seen has logit 0 (finite). Under ``torch.distributed``
    the per-class sums and counts are all-reduced first, so every rank holds the same means.

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        alpha (float): EMA weight of the *old* mean, in ``[0, 1)`` (default 0.9, as in 0.1.6).
        scale (float, optional): ``s > 0``; ``None`` uses :func:`mll.functional.heuristic_scale`.

    Shape:
        - input: ``(*, d)``; labels: ``(*)`` class indices or ``(*, C)`` soft targets
        - output: ``(*, C)``

    Attributes:
        means (Tensor[C, d]): buffer of class means.
    """

    means: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        alpha: float = 0.9,
        scale: Optional[float] = None,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        check_in_features(in_features)
        check_num_classes(out_features)
        check_momentum(alpha, "alpha")
        scale = MF.heuristic_scale(out_features) if scale is None else scale
        check_scale(scale)
        self.in_features, self.out_features = in_features, out_features
        self.alpha, self.scale = float(alpha), float(scale)
        self.register_buffer("means", torch.zeros((out_features, in_features), device=device, dtype=dtype))
        self._register_load_state_dict_pre_hook(_upgrade_legacy_state, with_module=True)

    def reset_running_stats(self) -> None:
        """Forget every class mean."""
        self.means.zero_()

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        logits = MF.ncm_logits(input, self.means, self.scale)
        if self.training:
            if labels is None:
                raise ValueError(
                    "DeepNCM needs labels in training mode to update its class means: call head(input, labels), "
                    "or call head.eval() for inference"
                )
            labels = check_target(labels, logits.shape, name="labels")
            with torch.no_grad():
                sums, counts = MF.ncm_batch_statistics(input.detach(), labels, self.out_features)
                if distributed_world_size() > 1:
                    all_reduce_sum(sums, counts)
                self.means.copy_(MF.ncm_update_from_statistics(self.means, sums, counts, self.alpha))
        return logits

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"alpha={self.alpha}, scale={self.scale:.4g}"
        )


def _upgrade_legacy_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # 0.1.6 kept `means` and a scratch `running_means` as Parameters; the scratch copy carries no state.
    state_dict.pop(prefix + "running_means", None)
