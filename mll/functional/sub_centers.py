"""Sub-center ArcFace's clean-up: find each class's dominant sub-center and the samples far from it.

"Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy Web Faces" (Deng et al., ECCV 2020), Sec. 3.2:
after training with K sub-centers, most clean samples of a class gather around one *dominant* sub-center; noisy
samples sit on the others or far from all. The clean-up keeps the dominant sub-center of each class and drops the
samples whose angle to it exceeds a threshold (75° in the paper), then trains on with one center per class.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mll.functional._checks import check_features, check_target, is_soft, shape_str
from mll.functional.cosine import normalize

__all__ = ["dominant_sub_centers", "sub_center_counts", "sub_center_outliers"]


def _target_sub_center_cosines(input: Tensor, weight: Tensor, target: Tensor, num_sub_centers: int) -> Tensor:
    """Cosines between each sample and the K sub-centers of its own class: ``(N, K)``, float32 or float64."""
    check_features(input, weight, num_sub_centers)
    num_classes = weight.shape[0] // num_sub_centers
    target = check_target(target, torch.Size((*input.shape[:-1], num_classes)))
    if is_soft(target):
        raise ValueError("sub-center clean-up needs class indices (an integer tensor of shape (*)), not soft targets")
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    x = normalize(input.detach()).reshape(-1, input.shape[-1]).to(dtype)
    w = weight.detach().view(num_classes, num_sub_centers, -1)[target.reshape(-1)]  # (N, K, d): only the targets'
    return torch.einsum("nd,nkd->nk", x, normalize(w).to(dtype))


def sub_center_counts(input: Tensor, weight: Tensor, target: Tensor, num_sub_centers: int) -> Tensor:
    """How many samples of each class have each of its sub-centers as their nearest: ``counts[c, k]``.

    Sum the counts of several batches (or ranks) before :func:`dominant_sub_centers`.

    Args:
        input (Tensor[*, d]): features.
        weight (Tensor[C*K, d]): class weights (row ``c*K + k`` is sub-center k of class c).
        target (Tensor[*] of int): class indices.
        num_sub_centers (int): ``K``.

    Returns:
        Tensor[C, K] of int64.
    """
    cos = _target_sub_center_cosines(input, weight, target, num_sub_centers)
    num_classes = weight.shape[0] // num_sub_centers
    flat = target.reshape(-1).long() * num_sub_centers + cos.argmax(dim=-1)
    counts = torch.zeros(num_classes * num_sub_centers, dtype=torch.int64, device=weight.device)
    counts.index_add_(0, flat, torch.ones_like(flat))
    return counts.view(num_classes, num_sub_centers)


def dominant_sub_centers(counts: Tensor) -> Tensor:
    """The sub-center with the most samples in each class: ``argmax_k counts[c, k]`` (ties and empty classes: the
    lowest index).

    Args:
        counts (Tensor[C, K]): from :func:`sub_center_counts`.

    Returns:
        Tensor[C] of int64.
    """
    if not isinstance(counts, Tensor) or counts.dim() != 2:
        got = shape_str(counts.shape) if isinstance(counts, Tensor) else type(counts).__name__
        raise ValueError(f"counts must be a tensor of shape (C, K), but got {got}")
    # argmax returns the first maximum
    return counts.argmax(dim=-1)


def sub_center_outliers(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    dominant: Tensor,
    num_sub_centers: int,
    *,
    max_angle: float = math.radians(75),
) -> Tensor:
    """Samples whose angle to their class's dominant sub-center exceeds ``max_angle`` (likely label noise).

    Args:
        input (Tensor[*, d]): features.
        weight (Tensor[C*K, d]): class weights.
        target (Tensor[*] of int): class indices.
        dominant (Tensor[C] of int): from :func:`dominant_sub_centers`.
        num_sub_centers (int): ``K``.
        max_angle (float): radians, in ``(0, π]`` (paper: 75°).

    Returns:
        Tensor[*] of bool: True for samples to drop.
    """
    if not isinstance(max_angle, (int, float)) or not (0 < max_angle <= math.pi):
        raise ValueError(f"max_angle must be in (0, π] radians, but got {max_angle!r}")
    num_classes = weight.shape[0] // num_sub_centers
    if not isinstance(dominant, Tensor) or tuple(dominant.shape) != (num_classes,):
        got = shape_str(dominant.shape) if isinstance(dominant, Tensor) else type(dominant).__name__
        raise ValueError(f"dominant must have shape ({num_classes},), one sub-center per class, but got {got}")
    cos = _target_sub_center_cosines(input, weight, target, num_sub_centers)
    picked = cos.gather(1, dominant[target.reshape(-1).long()].unsqueeze(1)).squeeze(1)
    return (picked < math.cos(max_angle)).reshape(target.shape)
