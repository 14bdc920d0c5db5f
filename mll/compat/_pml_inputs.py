"""Checks of :mod:`mll.compat.pml`'s arguments and inputs, and pml's per-sample weights from a miner's tuple.

Every error names the loss, the argument and the expected value. pml's own objects (distances, reducers) are
recognised by their class name and protocol: nothing here imports pml.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional

import torch
from torch import Tensor

__all__ = [
    "INDEX_DTYPES",
    "check_count",
    "check_labels",
    "check_real",
    "class_names",
    "describe",
    "describe_distance",
    "is_pml_reducer",
    "miner_weights",
]

INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def check_real(
    owner: str,
    name: str,
    value: object,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = True,
    unit: str = "",
) -> float:
    """A Python or NumPy real within its range, as a float; the error names the loss, the argument and the range."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool)
    number = float(value) if ok else math.nan  # type: ignore[arg-type]
    inside = (number > low if low_open else number >= low) and (number < high if high_open else number <= high)
    if not (ok and inside):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{owner} {name} must be a real number in {interval}{unit}, but got {value!r}")
    return number


def check_count(owner: str, name: str, value: object, low: int = 1) -> int:
    """A Python or NumPy integer ``>= low``."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < low:
        raise ValueError(f"{owner} {name} must be an integer >= {low}, but got {value!r}")
    return int(value)


def describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of dtype {value.dtype} and shape {tuple(value.shape)}"
    if isinstance(value, type):
        return f"the class {value.__name__} (not an instance)"
    return type(value).__name__


def describe_distance(distance: object) -> str:
    """``LpDistance(normalize_embeddings=True, p=2, power=2)``: a pml distance by its class and settings."""
    shown = ", ".join(
        f"{k}={getattr(distance, k)!r}" for k in ("normalize_embeddings", "p", "power") if hasattr(distance, k)
    )
    return f"{type(distance).__name__}({shown})"


def is_pml_reducer(value: object) -> bool:
    """pml's reducer protocol (its ``BaseReducer``): called as ``reducer(loss_dict, embeddings, labels)``."""
    return hasattr(value, "reduce_the_loss") and hasattr(value, "unpack_loss_info")


def class_names(value: object) -> set[str]:
    return {cls.__name__ for cls in type(value).__mro__}


def check_labels(owner: str, embeddings: Tensor, labels: Any, num_classes: int) -> Tensor:
    """Labels: an integer tensor ``(N,)`` of class indices in ``[0, num_classes)``, on the embeddings' device."""
    if not isinstance(labels, Tensor) or labels.dtype not in INDEX_DTYPES:
        raise TypeError(
            f"{owner} labels must be an integer tensor of class indices of shape (batch_size,), "
            f"but got {describe(labels)}"
        )
    if labels.shape[:1] != embeddings.shape[:1]:
        raise ValueError(
            f"{owner} needs one label per embedding: labels of shape ({embeddings.shape[0]},), "
            f"but got {tuple(labels.shape)} for embeddings of shape {tuple(embeddings.shape)}"
        )
    if labels.dim() != 1:
        raise ValueError(f"{owner} labels must be a 1-D tensor of shape (batch_size,), but got {tuple(labels.shape)}")
    if labels.numel() > 0:
        low, high = (int(v) for v in torch.aminmax(labels))
        if low < 0 or high >= num_classes:
            raise ValueError(
                f"{owner} labels must be class indices in [0, {num_classes}), but got values from {low} to {high}"
            )
    return labels.to(embeddings.device)


def miner_weights(owner: str, indices_tuple: Any, embeddings: Tensor, anchors_only: bool) -> Optional[Tensor]:
    """Each sample's weight: how often the tuple names it over the count of the most named (None: all 1)."""
    if indices_tuple is None:
        return None
    n = embeddings.shape[0]
    if not isinstance(indices_tuple, (tuple, list)) or len(indices_tuple) not in (3, 4):
        length = f" of length {len(indices_tuple)}" if isinstance(indices_tuple, (tuple, list)) else ""
        raise ValueError(
            f"{owner} indices_tuple must be a miner's tuple (anchors, positives, negatives) or "
            f"(anchors1, positives, anchors2, negatives), but got {describe(indices_tuple)}{length}"
        )
    for part in indices_tuple:
        if not isinstance(part, Tensor) or part.dtype not in INDEX_DTYPES or part.dim() != 1:
            raise TypeError(
                f"{owner} indices_tuple must hold 1-D integer tensors of batch indices, but got {describe(part)}"
            )
    if all(part.numel() == 0 for part in indices_tuple):
        return None
    every = torch.cat([part.to(embeddings.device, torch.int64) for part in indices_tuple])
    low, high = (int(v) for v in torch.aminmax(every))
    if low < 0 or high >= n:
        raise ValueError(
            f"{owner} indices_tuple must index the batch: values in [0, {n}), but got values from {low} to {high}"
        )
    # pml weighs every index of the tuple; with a reference set (ProxyNCA's proxies) the anchors only
    named = (
        ([indices_tuple[0]] if len(indices_tuple) == 3 else [indices_tuple[0], indices_tuple[2]])
        if anchors_only
        else list(indices_tuple)
    )
    index = torch.cat([part.to(embeddings.device, torch.int64) for part in named])
    dtype = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
    weights = torch.zeros(n, dtype=dtype, device=embeddings.device)
    if index.numel() == 0:  # (pml fails here: the maximum count of nothing)
        return weights
    unique, counts = torch.unique(index, return_counts=True)
    weights[unique] = counts.to(dtype) / counts.max().to(dtype)
    return weights
