"""Argument and input checks of :mod:`mll.metrics`: each message names the argument, what was expected, what came."""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "check_embeddings",
    "check_ks",
    "check_labels",
    "check_positive_int",
    "check_same_device",
    "flat_labels",
    "shape_str",
]


def shape_str(shape: Sequence[int]) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def is_int(value: object) -> bool:
    """Python and NumPy integers, not bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_positive_int(value: object, name: str, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not is_int(value) or int(value) < 1:  # type: ignore[call-overload]
        expected = "None or an integer >= 1" if allow_none else "an integer >= 1"
        raise ValueError(f"{name} must be {expected}, but got {value!r}")


def check_ks(ks: object, name: str) -> tuple[int, ...]:
    """A non-empty sequence of distinct integers >= 1 (an int alone is taken as one k), sorted."""
    if is_int(ks):
        ks = (ks,)
    if not isinstance(ks, Sequence) or isinstance(ks, str) or len(ks) == 0:
        raise ValueError(f"{name} must be a non-empty sequence of integers >= 1, but got {ks!r}")
    for k in ks:
        if not is_int(k) or int(k) < 1:
            raise ValueError(f"{name} must hold integers >= 1, but got {k!r} in {ks!r}")
    return tuple(sorted({int(k) for k in ks}))


def check_embeddings(tensor: object, name: str, *, allow_empty: bool = False) -> Tensor:
    """A floating-point tensor ``(*, d)`` with d >= 1 and at least one row (unless ``allow_empty``), flattened to
    ``(N, d)``; rows with NaN or infinite values are refused: a similarity with such a row has no defined rank."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (*, d), but got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(
            f"{name} must have a floating-point dtype (float16, bfloat16, float32 or float64), but got {tensor.dtype}"
        )
    if tensor.dim() < 1 or tensor.shape[-1] < 1:
        raise ValueError(f"{name} must have shape (*, d) with d >= 1 features, but got shape {shape_str(tensor.shape)}")
    flat = tensor.detach().reshape(-1, tensor.shape[-1])  # metrics are read, never differentiated
    if flat.shape[0] == 0 and not allow_empty:
        raise ValueError(f"{name} is empty (shape {shape_str(tensor.shape)}): it needs at least one row")
    bad = ~torch.isfinite(flat).all(dim=1)
    if bool(bad.any()):
        rows = bad.nonzero().flatten()
        raise ValueError(
            f"{name} has {rows.numel()} row(s) with NaN or infinite values (first: row {int(rows[0])} of the "
            f"flattened (N, d) view); a similarity with such a row has no rank"
        )
    return flat


def check_labels(labels: object, name: str, leading: Sequence[int], embeddings_name: str) -> Tensor:
    """Integer (or bool) labels of shape ``leading`` (the embeddings' leading dimensions), flattened, as int64."""
    if not isinstance(labels, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of integer labels, but got {type(labels).__name__}")
    if labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"{name} must have an integer dtype (class labels), but got {labels.dtype}")
    if tuple(labels.shape) != tuple(leading):
        raise ValueError(
            f"{name} must have shape {shape_str(leading)}, one label per row of {embeddings_name}, "
            f"but got shape {shape_str(labels.shape)}"
        )
    return flat_labels(labels)


def flat_labels(labels: Tensor) -> Tensor:
    return labels.reshape(-1).to(torch.int64)


def check_same_device(*named: tuple[str, Optional[Tensor]]) -> None:
    tensors = [(name, t) for name, t in named if t is not None]
    first_name, first = tensors[0]
    for name, t in tensors[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}: pass them on one device")
