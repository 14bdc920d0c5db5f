"""Nearest class mean (DeepNCM): logits against running class means, and their update."""

from __future__ import annotations

import torch
from torch import Tensor

from mll.functional._engine.checks import (
    UNSET,
    check_decay,
    check_floating,
    check_scale,
    check_target,
    is_soft,
    renamed,
    shape_str,
)
from mll.functional._engine.numerics import Scale, autocast_off
from mll.functional.cosine import cosine_logits

__all__ = ["ncm_batch_statistics", "ncm_logits", "ncm_update", "ncm_update_from_statistics"]


def ncm_logits(input: Tensor, means: Tensor, scale: Scale) -> Tensor:
    r"""Scaled cosine similarity to the class means.

    "DeepNCM: Deep Nearest Class Mean Classifiers" (Guerriero et al., ICLR 2018 workshop,
    https://openreview.net/forum?id=rkPLZ4JPM), with cosine instead of Euclidean distance as in the 0.1.6 release:

    .. math:: z_{ic} = s\,\langle \hat x_i, \hat\mu_c \rangle

    A class whose mean is still zero (never seen) gets logit 0, not NaN.

    Args:
        input (Tensor[*, d]): features.
        means (Tensor[C, d]): class means.
        scale (float or Tensor): ``s``.

    Returns:
        Tensor[*, C].
    """
    check_scale(scale)
    check_floating(means, "means")
    return cosine_logits(input, means.to(input.dtype), weight_name="means") * scale


def ncm_batch_statistics(input: Tensor, target: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Per-class feature sums and (soft) counts of one batch: ``(Tensor[C, d], Tensor[C])``.

    Class indices use ``index_add`` (O(N·d)); soft targets a ``tᵀx`` GEMM. No Python loop over classes. A sample
    with a non-finite feature (NaN, ±inf) is left out — it counts for no class — so one bad row cannot poison the
    running means.
    """
    features = input.reshape(-1, input.shape[-1])
    dtype = torch.promote_types(features.dtype, torch.float32)
    features = features.to(dtype)
    finite = torch.isfinite(features).all(-1)
    features = torch.where(finite.unsqueeze(-1), features, 0.0)
    if is_soft(target):
        weights = target.reshape(-1, num_classes).to(dtype) * finite.unsqueeze(-1)
        # class means are state: accumulate them in float32 or better even under autocast
        with autocast_off(features.device):
            return weights.transpose(0, 1) @ features, weights.sum(dim=0)
    labels = target.reshape(-1)
    # in place on the zeros allocated here (an out-of-place index_add would copy all C×d of them)
    sums = features.new_zeros(num_classes, features.shape[-1]).index_add_(0, labels, features)
    counts = features.new_zeros(num_classes).index_add(0, labels, finite.to(dtype))
    return sums, counts


def ncm_update_from_statistics(means: Tensor, sums: Tensor, counts: Tensor, decay: float) -> Tensor:
    """EMA of the class means towards ``sums / counts`` for classes with a positive count; others unchanged."""
    # μ + w·(x̄ − μ) with w = 1 − α for classes present and 0 otherwise (lerp returns μ exactly at w = 0):
    # one C×d temporary besides the result and the sums, which matters at 10^5+ classes
    batch_mean = sums / counts.clamp(min=torch.finfo(counts.dtype).tiny).unsqueeze(-1)
    weight = ((counts > 0).to(sums.dtype) * (1 - decay)).unsqueeze(-1)
    return torch.lerp(means.to(sums.dtype), batch_mean, weight).to(means.dtype)


def ncm_update(means: Tensor, input: Tensor, target: Tensor, decay: float = 0.9, *, momentum: float = UNSET) -> Tensor:
    r"""New class means: an exponential moving average of per-class batch means, for classes in the batch.

    .. math:: \mu_c \leftarrow \alpha\,\mu_c + (1 - \alpha)\,\bar x_c \quad\text{if class } c \text{ is in the batch}

    ``decay`` is α, the weight of the *old* mean (the 0.1.6 ``alpha``; every running statistic here uses this
    convention, as an EMA's decay does; torch's BatchNorm
    weights the new value instead). With soft targets, :math:`\bar x_c = \sum_i t_{ic} x_i / \sum_i t_{ic}` over
    samples with weight on ``c``. Pure: returns a new tensor; vectorised over classes.

    Args:
        means (Tensor[C, d]): current class means.
        input (Tensor[*, d]): features (no gradient flows to them).
        target (Tensor[*] of int or Tensor[*, C] of float): class indices or soft targets.
        decay (float): α in ``[0, 1)`` (``momentum`` before 0.2, deprecated).

    Returns:
        Tensor[C, d]: the updated means, in ``means``' dtype.
    """
    check_floating(means, "means")
    check_floating(input, "input")
    decay = renamed(decay, momentum, "momentum", "decay")
    check_decay(decay)
    if means.dim() != 2 or input.dim() < 1 or input.shape[-1] != means.shape[-1]:
        raise ValueError(
            f"means must have shape (C, d) and input shape (*, d) with the same d, but got means "
            f"{shape_str(means.shape)} and input {shape_str(input.shape)}"
        )
    target = check_target(target, torch.Size((*input.shape[:-1], means.shape[0])))
    with torch.no_grad():
        sums, counts = ncm_batch_statistics(input.detach(), target, means.shape[0])
        return ncm_update_from_statistics(means, sums, counts, decay)
