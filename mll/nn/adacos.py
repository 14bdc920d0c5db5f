"""AdaCos heads: a fixed heuristic scale, or one adapted to every training batch."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mll import functional as MF
from mll.functional._engine.checks import check_scale
from mll.functional._engine.distributed import all_gather_rows
from mll.functional.scale import adacos_statistics_chunked
from mll.nn._head import Head

__all__ = ["AdaCos", "FixedAdaCos"]


class FixedAdaCos(Head):
    r"""Scaled cosine logits with AdaCos's fixed scale :math:`\sqrt2\ln(C-1)`.

    "AdaCos: Adaptively Scaling Cosine Logits for Effectively Learning Deep Face Representations"
    (Zhang et al., CVPR 2019, https://arxiv.org/abs/1905.00292), Sec. 4.1. See
    :func:`mll.functional.heuristic_scale`; otherwise as :class:`ScaledNormalizedLinear` (whose Args apply), with a
    fixed scale (``scale=`` overrides the heuristic; 0.1.6 crashed when given one).
    """

    needs_labels = False
    show_trainable = False

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None, *,
        pooling: str = "max", pooling_temperature: float = 0.1, device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        super().__init__(
            in_features, out_features, num_sub_centers, scale=scale, pooling=pooling,
            pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()


class AdaCos(Head):
    r"""Scaled cosine logits whose scale follows AdaCos's dynamic update in training mode.

    "AdaCos: Adaptively Scaling Cosine Logits for Effectively Learning Deep Face Representations"
    (Zhang et al., CVPR 2019, https://arxiv.org/abs/1905.00292), Eq. 15–16; see
    :func:`mll.functional.adacos_scale`. In training mode each call first updates the ``scale`` buffer from the
    batch (no gradient flows through it), then uses the *updated* scale; eval mode freezes it. Labels are optional:
    without them the predicted class stands in for the target. Under ``torch.distributed`` the statistics of every
    rank's batch are gathered first, so all ranks hold the same scale (the one a single process would compute on
    the global batch). ``loss()`` computes the same statistics chunk by chunk (one extra pass over the classes,
    without gradients), then the chunked cross-entropy. Otherwise as :class:`ScaledNormalizedLinear`.

    Args:
        scale (float, optional): initial scale; ``None`` uses √2·ln(C − 1).
        min_scale (float): floor of the adapted scale (see :func:`mll.functional.adacos_reduce`).
    """

    needs_labels = False
    show_trainable = False
    shares_statistics = True
    running_stats = ("scale",)

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None, *,
        min_scale: float = 0.5, pooling: str = "max", pooling_temperature: float = 0.1, device: Any = None,
        dtype: Any = None,
    ) -> None:  # fmt: skip
        check_scale(min_scale, "min_scale")
        super().__init__(
            in_features, out_features, num_sub_centers, scale=scale, pooling=pooling,
            pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        self.min_scale = float(min_scale)
        self.reset_parameters()

    def logit_scale(self) -> Tensor:
        """This step's scale: a copy of the buffer, which the next training call updates in place while this call's
        graph may still need the value (two views through the head before one backward)."""
        return self.scale.clone()

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        # labels may be None here: AdaCos's label-free form takes the predicted class as the target
        with torch.no_grad():
            if cosine is not None:
                log_b, theta = MF.adacos_statistics(cosine, labels, self.scale)
            else:
                tau = self.pooling_temperature if self.pooling == "soft" and self.num_sub_centers > 1 else None
                log_b, theta = adacos_statistics_chunked(
                    input, self.weight, labels, self.scale, num_sub_centers=self.num_sub_centers, tau=tau
                )
            log_b, theta = all_gather_rows(log_b, group=self.group), all_gather_rows(theta, group=self.group)
            if log_b.numel() > 0:  # an empty (global) batch keeps the scale
                new = MF.adacos_reduce(log_b, theta, min_scale=self.min_scale)
                # rows with a non-finite feature are left out; with none left, the scale stays
                self.scale.copy_(torch.where(torch.isnan(new), self.scale, new.to(self.scale.dtype)))
        return MF.NO_MARGIN()

    def head_options(self) -> dict[str, Any]:
        return {"min_scale": self.min_scale}

    def extra_options(self) -> list[str]:
        return [f"min_scale={self.min_scale}"]
