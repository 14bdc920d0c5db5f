"""DeepNCM: nearest class mean head with running class means."""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

import torch
from torch import Tensor, nn

from mll import functional as MF
from mll.functional._engine.checks import (
    check_chunk_size,
    check_decay,
    check_features,
    check_in_features,
    check_num_classes,
    check_reduction,
    check_scale,
    check_target,
)
from mll.functional._engine.distributed import all_reduce_sum
from mll.functional.chunked import chunked_loss, read_only
from mll.nn._head import agreed
from mll.nn._state import InitialValue, check_fits, float_repr, keep_initial, restore_initial_values

__all__ = ["DeepNCM"]

T = TypeVar("T")


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
    the per-class sums and counts are all-reduced first, so every rank holds the same means. ``loss()`` is the
    cross-entropy over class chunks (it keeps a copy of the means for its backward, O(C·d)), then the update.
    DeepNCM has no sub-centers (a class mean is one vector) and no margin.

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        alpha (float): EMA weight of the *old* mean, in ``[0, 1)`` (default 0.9, as in 0.1.6): the library's
            ``decay`` convention, under DeepNCM's own name.
        scale (float, optional): ``s > 0``; ``None`` uses :func:`mll.functional.heuristic_scale`.

    Shape:
        - input: ``(*, d)``; labels: ``(*)`` class indices or ``(*, C)`` soft targets
        - output: ``(*, C)``

    Attributes:
        means (Tensor[C, d]): buffer of class means.
        scale (Tensor): the scale, a 0-dim buffer (as every head's).
    """

    means: Tensor
    scale: Tensor
    #: each buffer's value at construction (see :class:`mll.nn._head.Head`'s re-initialisation rule)
    initial_values: dict[str, InitialValue]
    num_sub_centers = 1
    #: the process group whose ranks share the class means (None: the default group)
    group: Any = None

    def __init__(
        self, in_features: int, out_features: int, alpha: float = 0.9, scale: Optional[float] = None, *,
        device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        super().__init__()
        check_in_features(in_features)
        check_num_classes(out_features)
        check_decay(alpha, "alpha")
        scale = MF.heuristic_scale(out_features) if scale is None else scale
        check_scale(scale)
        check_fits(float(scale), dtype or torch.get_default_dtype(), f"{type(self).__name__} scale")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.alpha = float(alpha)
        self.register_buffer("means", torch.empty((self.weight_rows(), in_features), device=device, dtype=dtype))
        self.register_buffer("scale", torch.empty((), dtype=dtype or torch.get_default_dtype(), device=device))
        keep_initial(self, "means", 0.0)  # a class never seen has logit 0
        keep_initial(self, "scale", float(scale))
        self._register_load_state_dict_pre_hook(_upgrade_legacy_state, with_module=True)
        self.reset_parameters()

    def weight_rows(self) -> int:
        """How many class means this module holds: ``C`` (a sharded form: its block's)."""
        return self.out_features

    def options(self) -> dict[str, Any]:
        """The constructor's arguments after ``in_features`` and ``out_features`` that rebuild this head (the scale's
        initial value; the means are in the ``state_dict``)."""
        return {"alpha": self.alpha, "scale": self.initial_values["scale"]}

    def reset_parameters(self) -> None:
        """Set the means and the scale back to their initial values (the re-initialisation rule of every head)."""
        restore_initial_values(self)

    def reset_running_stats(self) -> None:
        """Forget every class mean."""
        restore_initial_values(self, ["means"])

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        if not self.training:
            return MF.ncm_logits(input, self.means, self.scale)
        logits, labels = self._agreed(lambda: self._logits_and_labels(input, labels))
        self._update(input, labels)
        return logits

    def _logits_and_labels(self, input: Tensor, labels: Optional[Tensor]) -> tuple[Tensor, Tensor]:
        logits = MF.ncm_logits(input, self.means, self.scale)
        return logits, self._check_labels(labels, logits.shape)

    def _agreed(self, check: Callable[[], T]) -> T:
        # the update all-reduces C×d sums: different sizes on two ranks would crash the collective
        return agreed(check, {"in_features": self.in_features, "out_features": self.out_features}, self.means.device)

    def loss(
        self, input: Tensor, labels: Tensor, *, reduction: str = "mean", chunk_size: Optional[int] = None
    ) -> Tensor:
        """``F.cross_entropy(self(input, labels), labels)`` over class chunks, then the means' update (training)."""
        if self.training:
            labels = self._agreed(lambda: self._loss_checks(input, labels, reduction, chunk_size))
        else:
            labels = self._loss_checks(input, labels, reduction, chunk_size)
        means = self.means.clone() if self.training else self.means  # backward needs the means of the forward

        def loss_of() -> Tensor:
            return chunked_loss(
                input, means.to(input.dtype), labels, self.scale, MF.NO_MARGIN(), 1, "max", 0.1, chunk_size, reduction
            )

        loss = loss_of() if self.training else read_only(loss_of)  # (an eval-mode loss: read, most often)
        if self.training:
            self._update(input, labels)
        return loss

    def _loss_checks(self, input: Tensor, labels: Tensor, reduction: str, chunk_size: Optional[int]) -> Tensor:
        check_features(input, self.means, 1, weight_name="means")
        check_reduction(reduction)
        check_chunk_size(chunk_size)
        shape = torch.Size((*input.shape[:-1], self.out_features))
        return self._check_labels(labels, shape) if self.training else check_target(labels, shape, name="labels")

    def _check_labels(self, labels: Optional[Tensor], shape: torch.Size) -> Tensor:
        if labels is None:
            raise ValueError(
                "DeepNCM needs labels in training mode to update its class means: call head(input, labels), "
                "or call head.eval() for inference"
            )
        return check_target(labels, shape, name="labels")

    def _update(self, input: Tensor, labels: Tensor) -> None:
        with torch.no_grad():
            sums, counts = MF.ncm_batch_statistics(input.detach(), labels, self.out_features)
            all_reduce_sum(sums, self.group)
            all_reduce_sum(counts, self.group)
            self.means.copy_(MF.ncm_update_from_statistics(self.means, sums, counts, self.alpha))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"alpha={self.alpha}, scale={float_repr(self.scale, '.4g')}"
        )


def _upgrade_legacy_state(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # 0.1.6 kept `means` and a scratch `running_means` as Parameters (the scratch copy carries no state) and its
    # scale as a float attribute, not in the state dict.
    state_dict.pop(prefix + "running_means", None)
    scale: Any = module.scale
    state_dict.setdefault(prefix + "scale", scale.detach().clone())
