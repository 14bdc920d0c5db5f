"""Which dtype each computation runs in, and which autograd mode a step is in: the small rules every path shares.

- margin trigonometry in float32 for half-precision inputs (:func:`work_dtype`), softmax statistics in float32 or
  float64 (:func:`acc_dtype`), the normalisation's ε per dtype (:func:`weight_eps`);
- whether a tensor the engine just allocated may be written in place (:func:`in_place_ok`), and whether a backward
  is itself being differentiated (:func:`double_backward`).
"""

from __future__ import annotations

from typing import Union

import torch
from torch import Tensor

#: a logit scale: a Python float, or a one-element tensor (trainable, or a running statistic such as AdaCos's)
Scale = Union[float, Tensor]

_HALF = (torch.float16, torch.bfloat16)


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """Margin trigonometry runs in float32 for half-precision inputs and in the input's dtype otherwise."""
    return torch.float32 if dtype in _HALF else dtype


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics in float64 for float64 input, float32 otherwise (half precision included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_eps(dtype: torch.dtype) -> float:
    """The ε of :func:`mll.functional.normalize` for rows of ``dtype``: ``2**-10`` for float16 (so that the gradient
    at a zero vector, 1/ε times the upstream gradient, stays representable), ``1e-12`` otherwise (F.normalize's)."""
    return 2.0**-10 if dtype == torch.float16 else 1e-12


def in_place_ok() -> bool:
    """Whether a tensor the engine just allocated may be written in place: yes in eager mode and under compile.

    No under ``torch.func`` transforms, where in-place ops such as ``scatter_`` have no batching rule (a slow
    per-sample fallback), and when grad mode is on (a backward with ``create_graph=True``), where the tensor is
    part of the graph being recorded.
    """
    return not (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active())


def double_backward() -> bool:
    """Whether this backward is being differentiated: ``create_graph=True``, or nested ``torch.func`` transforms.
    (A single ``torch.func.grad``/``vjp`` runs backward with grad mode on, at transform level 1: that is fine.)"""
    if torch._C._are_functorch_transforms_active():
        level = torch._C._functorch.maybe_current_level()
        return level is not None and level > 1
    return torch.is_grad_enabled()
