"""CurricularFace: ArcFace with hard negatives re-weighted by a running statistic."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mll import functional as MF
from mll.functional._engine.checks import UNSET, check_decay, renamed
from mll.functional._engine.chunks import target_cosines
from mll.functional._engine.distributed import all_reduce_sum
from mll.functional.curricular import curricular_update_from_statistics, finite_sum_and_count
from mll.nn._head import Head
from mll.nn._state import margin_repr, register_margin, register_state, statistics_dtype, typical_margin

__all__ = ["CurricularFace"]

_MARGIN = MF.CURRICULAR.parameters[0]


class CurricularFace(Head):
    r"""CurricularFace head: :math:`s\cos(\theta_y + m)` on the target, :math:`s\cos\theta_j(t + \cos\theta_j)` on
    hard negatives.

    "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face Recognition" (Huang et al., CVPR 2020,
    https://arxiv.org/abs/2004.00288). See :func:`mll.functional.curricular_margin`. In training mode each call
    first updates the buffer ``t`` from the batch's mean target cosine (Eq. 9; summed across ranks under
    ``torch.distributed``), then computes the logits with the updated ``t``. Class indices only. Otherwise as the
    margin heads (see :mod:`mll.nn.margin`); ``loss()`` applies the hard-negative re-weighting chunk by chunk.

    Args:
        margin (float or Tensor): ``m`` in ``[0, π/2)`` (default 0.5), or ``(C,)``.
        decay (float): weight of the old ``t`` in its update (default 0.99: the paper's α = 0.01); ``momentum``
            before 0.2 (deprecated).

    Attributes:
        t (Tensor): the running statistic (0-dim buffer, starts at 0).
    """

    soft_targets = False
    shares_statistics = True
    running_stats = ("t",)
    margin: Any
    t: Tensor

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None,
        trainable_scale: bool = False, margin: Any = 0.5, *, decay: float = 0.99, pooling: str = "max",
        pooling_temperature: float = 0.1, device: Any = None, dtype: Any = None, momentum: float = UNSET,
    ) -> None:  # fmt: skip
        decay = renamed(decay, momentum, "momentum", "decay")
        check_decay(decay)
        super().__init__(
            in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_margin=MF.ARC(typical_margin(margin, _MARGIN, "CurricularFace", out_features)), pooling=pooling,
            pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        register_margin(self, "margin", margin, _MARGIN, "CurricularFace", out_features, device, dtype)
        self.decay = float(decay)
        register_state(self, "t", 0.0, statistics_dtype(dtype), device)
        self.reset_parameters()

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        with torch.no_grad():
            if cosine is not None:
                total, count = MF.curricular_statistics(cosine, labels)
            else:
                tau = self.pooling_temperature if self.pooling == "soft" and self.num_sub_centers > 1 else None
                x = MF.normalize(input.detach()).reshape(-1, input.shape[-1])
                target = target_cosines(x, self.weight, labels.reshape(-1, 1), self.num_sub_centers, tau)
                total, count = finite_sum_and_count(target)
            stats = all_reduce_sum(torch.stack([total, count.to(total.dtype)]), self.group)
            self.t.copy_(curricular_update_from_statistics(self.t, stats[0], stats[1], self.decay))
        return MF.CURRICULAR(self.margin, self.t.clone())  # this step's t: the next call updates the buffer

    @property
    def momentum(self) -> float:
        """Deprecated name of :attr:`decay`."""
        return self.decay

    def head_options(self) -> dict[str, Any]:
        return {"margin": self.initial("margin"), "decay": self.decay}

    def extra_options(self) -> list[str]:
        return [f"margin={margin_repr(self.margin)}", f"decay={self.decay}"]
