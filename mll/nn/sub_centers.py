"""Sub-center ArcFace's clean-up step for any head with sub-centers."""

from __future__ import annotations

import copy
import math
from typing import NamedTuple

import torch
from torch import Tensor, nn

from mll import functional as MF
from mll.functional._engine.checks import INDEX_DTYPES, is_int, values_checkable
from mll.functional._engine.numerics import autocast_enabled
from mll.functional.sub_centers import check_dominant, check_max_angle

__all__ = ["SubCenterCleanup", "clean_sub_centers", "keep_dominant_sub_centers"]


def _sub_center_head(head: object) -> tuple[int, int, Tensor]:
    """``(K, C, weight)`` of a head with sub-centers, whose ``weight`` holds all ``C*K`` rows."""
    k, num_classes = getattr(head, "num_sub_centers", None), getattr(head, "out_features", None)
    weight = getattr(head, "weight", None)
    if not (isinstance(head, nn.Module) and is_int(k) and is_int(num_classes) and isinstance(weight, Tensor)):
        raise TypeError(
            "head must be a head of this library with num_sub_centers, out_features and a weight of shape "
            f"(out_features * num_sub_centers, d), but got {type(head).__name__}"
        )
    k, num_classes = int(k), int(num_classes)  # type: ignore[arg-type]
    if weight.dim() != 2 or weight.shape[0] != num_classes * k:
        # a sharded head holds only its own classes' rows
        raise ValueError(
            f"head.weight must have shape (out_features * num_sub_centers, d) = ({num_classes * k}, d), "
            f"but got {tuple(weight.shape)}"
        )
    return k, num_classes, weight


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
    k, num_classes, old = _sub_center_head(head)
    dominant = check_dominant(dominant, num_classes, k)
    clean = copy.deepcopy(head)
    rows = torch.arange(num_classes, device=dominant.device) * k + dominant
    with torch.no_grad():
        weight = old.detach()[rows.to(old.device)].clone()
    clean.weight = nn.Parameter(weight, requires_grad=old.requires_grad)
    setattr(clean, "num_sub_centers", 1)  # noqa: B010 (an attribute mypy sees as a Module's)
    return clean


def _check_features_and_labels(features: object, labels: object, weight: Tensor, num_classes: int) -> None:
    d = weight.shape[1]
    if not isinstance(features, Tensor):
        raise TypeError(f"features must be a tensor of shape (N, {d}), but got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"features must have a floating-point dtype, but got {features.dtype}")
    if features.dim() != 2 or features.shape[1] != d:
        raise ValueError(
            f"features must have shape (N, {d}) (d: the head's in_features), but got {tuple(features.shape)}"
        )
    if features.dtype != weight.dtype and not autocast_enabled(features.device):
        raise TypeError(
            f"features must have the head's dtype {weight.dtype} outside autocast, but got {features.dtype}"
        )
    if features.device != weight.device:
        raise ValueError(f"features must be on the head's device {weight.device}, but are on {features.device}")
    n = features.shape[0]
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a tensor of class indices of shape ({n},), but got {type(labels).__name__}")
    if labels.dtype not in INDEX_DTYPES:
        raise TypeError(f"labels must be class indices of an integer dtype, but got {labels.dtype}")
    if tuple(labels.shape) != (n,):
        raise ValueError(f"labels must have shape ({n},), one per row of features, but got {tuple(labels.shape)}")
    if labels.device != features.device:
        raise ValueError(f"labels must be on the device of features ({features.device}), but are on {labels.device}")
    if values_checkable(labels) and n > 0:
        lo, hi = (int(v) for v in torch.aminmax(labels))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"labels must be class indices in [0, {num_classes}), but got values from {lo} to {hi}")


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
    k, num_classes, weight = _sub_center_head(head)
    weight = weight.detach()
    _check_features_and_labels(features, labels, weight, num_classes)
    max_angle = check_max_angle(max_angle)
    if not is_int(batch_size) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, but got {batch_size!r}")
    batch_size = int(batch_size)
    counts = torch.zeros(num_classes, k, dtype=torch.int64, device=weight.device)
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
