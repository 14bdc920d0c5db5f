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

from mll.functional._engine.checks import INDEX_DTYPES, check_features, check_target, is_real, is_soft, values_checkable
from mll.functional._engine.normalization import normalize

__all__ = ["dominant_sub_centers", "sub_center_counts", "sub_center_outliers"]

# how many offending classes an error message lists
_SHOWN = 8


def check_max_angle(max_angle: object) -> float:
    """An angle in ``(0, π]`` radians (Python or NumPy real), returned as a float."""
    if not is_real(max_angle):
        raise TypeError(f"max_angle must be a float in (0, π] radians, but got {type(max_angle).__name__}")
    angle = float(max_angle)  # type: ignore[arg-type]
    if not 0 < angle <= math.pi:  # NaN fails too
        # the paper states its threshold in degrees (75°)
        hint = (
            f"; for {angle:g}° pass math.radians({angle:g}) = {math.radians(angle):.4g}"
            if math.pi < angle <= 180
            else ""
        )
        raise ValueError(f"max_angle must be in (0, π] radians, but got {angle!r}{hint}")
    return angle


def check_dominant(dominant: object, num_classes: int, num_sub_centers: int) -> Tensor:
    """One sub-center index in ``[0, K)`` per class, returned as int64 (``gather`` needs it)."""
    expected = f"a tensor of sub-center indices of shape ({num_classes},), one per class"
    if not isinstance(dominant, Tensor):
        raise TypeError(f"dominant must be {expected}, but got {type(dominant).__name__}")
    if dominant.dtype not in INDEX_DTYPES:
        raise TypeError(f"dominant must be {expected} (an integer dtype), but got dtype {dominant.dtype}")
    if tuple(dominant.shape) != (num_classes,):
        raise ValueError(
            f"dominant must have shape ({num_classes},), one sub-center per class, but got {tuple(dominant.shape)}"
        )
    if values_checkable(dominant) and dominant.numel() > 0:
        outside = (dominant < 0) | (dominant >= num_sub_centers)
        if bool(outside.any()):
            classes = outside.nonzero().flatten().tolist()
            shown = ", ".join(f"dominant[{c}] = {int(dominant[c])}" for c in classes[:_SHOWN])
            raise ValueError(
                f"dominant must hold sub-center indices in [0, {num_sub_centers}), "
                f"but got {shown}{', ...' if len(classes) > _SHOWN else ''}"
            )
    return dominant.long()


def _target_sub_center_cosines(input: Tensor, weight: Tensor, target: Tensor, num_sub_centers: int) -> Tensor:
    """Cosines between each sample and the K sub-centers of its own class: ``(N, K)``, float32 or float64."""
    check_features(input, weight, num_sub_centers)
    num_sub_centers = int(num_sub_centers)  # a NumPy integer too: sizes and messages want a Python int
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
    num_sub_centers = int(num_sub_centers)
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
    if not isinstance(counts, Tensor):
        raise TypeError(f"counts must be a tensor of shape (C, K), but got {type(counts).__name__}")
    if counts.dtype == torch.bool or counts.is_complex():
        raise TypeError(f"counts must have an integer or floating dtype, but got {counts.dtype}")
    if counts.dim() != 2 or counts.shape[1] == 0:
        raise ValueError(f"counts must be a tensor of shape (C, K) with K >= 1, but got {tuple(counts.shape)}")
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
    threshold = math.cos(check_max_angle(max_angle))
    check_features(input, weight, num_sub_centers)
    num_sub_centers = int(num_sub_centers)
    dominant = check_dominant(dominant, weight.shape[0] // num_sub_centers, num_sub_centers)
    cos = _target_sub_center_cosines(input, weight, target, num_sub_centers)
    picked = cos.gather(1, dominant[target.reshape(-1).long()].unsqueeze(1)).squeeze(1)
    return (picked < threshold).reshape(target.shape)
