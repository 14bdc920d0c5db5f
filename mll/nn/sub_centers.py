"""Sub-center ArcFace's clean-up step for any head with sub-centers."""

from __future__ import annotations

import copy
import math
from typing import NamedTuple, cast

import torch
from torch import Tensor, nn

from mll import functional as MF

__all__ = ["SubCenterCleanup", "clean_sub_centers", "keep_dominant_sub_centers"]


class SubCenterCleanup(NamedTuple):
    """What :func:`clean_sub_centers` returns."""

    #: a copy of the head with one center per class: each class's dominant sub-center
    head: nn.Module
    #: ``(C,)`` index of the dominant sub-center of each class
    dominant: Tensor
    #: ``(C, K)`` samples per class and nearest sub-center
    counts: Tensor
    #: ``(N,)`` True for samples farther than ``max_angle`` from their class's dominant sub-center (likely noise)
    outliers: Tensor


def keep_dominant_sub_centers(head: nn.Module, dominant: Tensor) -> nn.Module:
    """A copy of ``head`` (same class, hyper-parameters, buffers) with only the given sub-center of each class.

    Args:
        head (nn.Module): any head of this library with ``num_sub_centers = K``.
        dominant (Tensor[C] of int): the sub-center to keep per class.

    Returns:
        nn.Module: the copy, with ``num_sub_centers = 1`` and ``weight`` of shape ``(C, d)``; ``head`` is untouched.
    """
    k, num_classes = int(head.num_sub_centers), int(head.out_features)  # type: ignore[arg-type]
    if not isinstance(dominant, Tensor) or tuple(dominant.shape) != (num_classes,):
        raise ValueError(f"dominant must have shape ({num_classes},), one sub-center per class, but got {dominant!r}")
    if bool(((dominant < 0) | (dominant >= k)).any()):
        raise ValueError(f"dominant must hold sub-center indices in [0, {k}), but got values outside")
    clean = copy.deepcopy(head)
    old = cast(Tensor, head.weight)
    rows = torch.arange(num_classes, device=dominant.device) * k + dominant
    with torch.no_grad():
        weight = old.detach()[rows.to(old.device)].clone()
    clean.weight = nn.Parameter(weight, requires_grad=old.requires_grad)
    setattr(clean, "num_sub_centers", 1)  # noqa: B010 (an attribute mypy sees as a Module's)
    return clean


@torch.no_grad()
def clean_sub_centers(
    head: nn.Module,
    features: Tensor,
    labels: Tensor,
    *,
    max_angle: float = math.radians(75),
    batch_size: int = 65536,
) -> SubCenterCleanup:
    """Sub-center ArcFace's clean-up: keep each class's dominant sub-center and flag the samples far from it.

    "Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy Web Faces" (Deng et al., ECCV 2020), Sec. 3.2:
    after training with K sub-centers, assign every training sample to the nearest sub-center of its class; the
    sub-center with the most samples is the class's dominant one. Samples whose angle to it exceeds ``max_angle``
    (75° in the paper) are likely mislabelled: drop them from the training set, then train on with the returned
    one-center head. See :func:`mll.functional.sub_center_counts`, :func:`mll.functional.dominant_sub_centers` and
    :func:`mll.functional.sub_center_outliers` to do the same in a streaming or distributed loop.

    Args:
        head (nn.Module): a trained head with sub-centers (any head here; ``weight`` of shape ``(C*K, d)``).
        features (Tensor[N, d]): features of the training set (the backbone's output).
        labels (Tensor[N] of int): their class indices.
        max_angle (float): radians, in ``(0, π]``.
        batch_size (int): samples per step (bounds the ``(batch, K, d)`` temporary).

    Returns:
        SubCenterCleanup: ``(head, dominant, counts, outliers)``.
    """
    k = int(head.num_sub_centers)  # type: ignore[arg-type]
    if features.dim() != 2 or labels.shape != features.shape[:1]:
        raise ValueError(
            f"features must have shape (N, d) and labels shape (N,), but got {tuple(features.shape)} "
            f"and {tuple(labels.shape)}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, but got {batch_size!r}")
    weight = cast(Tensor, head.weight).detach()
    counts = torch.zeros(weight.shape[0] // k, k, dtype=torch.int64, device=weight.device)
    for start in range(0, features.shape[0], batch_size):
        part = slice(start, start + batch_size)
        counts += MF.sub_center_counts(features[part], weight, labels[part], k)
    dominant = MF.dominant_sub_centers(counts)
    outliers = [
        MF.sub_center_outliers(features[part], weight, labels[part], dominant, k, max_angle=max_angle)
        for part in (slice(s, s + batch_size) for s in range(0, features.shape[0], batch_size))
    ]
    mask = torch.cat(outliers) if outliers else torch.zeros(0, dtype=torch.bool, device=features.device)
    return SubCenterCleanup(keep_dominant_sub_centers(head, dominant), dominant, counts, mask)
