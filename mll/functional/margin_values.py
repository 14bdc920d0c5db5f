"""Margins as tensors: per class from class frequencies, per sample from a normal distribution.

Every margin function accepts a tensor margin that broadcasts to the logits' shape ``(*, C)``; these helpers make
the two kinds users ask for. They return plain tensors, so they compose with any margin (``arc_margin``,
``cos_margin``, ``combined_margin``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from mll.functional._checks import (
    _is_real,
    check_floating,
    check_nonnegative,
    check_positive,
    shape_str,
    values_checkable,
)
from mll.functional.margins import MarginParam

__all__ = ["dynamic_margins", "elastic_margins"]


def dynamic_margins(
    class_counts: Tensor,
    a: float = 0.45,
    b: float = 0.05,
    *,
    power: float = 0.25,
    rescale: bool = True,
) -> Tensor:
    r"""Per-class margins that shrink with the class's frequency: :math:`m_c = a\,n_c^{-\lambda} + b`.

    The dynamic margins of the winning Google Landmark Recognition 2020 solution ("Supporting large-scale image
    recognition with out-of-domain samples", Henkel & Singer, 2020, https://arxiv.org/abs/2010.01650, Sec. 3.2):
    rare classes, whose few samples cannot pin down a tight cluster, get larger margins. With ``rescale=True``
    (the solution's code) :math:`n_c^{-\lambda}` is first min–max scaled to [0, 1], so the margins span exactly
    ``[b, a + b]`` (0.05–0.5 by default); with ``rescale=False`` the formula is applied as written.

    Args:
        class_counts (Tensor[C]): samples per class, ``>= 1`` (a class without samples has no defined margin).
        a (float): spread ``>= 0``.
        b (float): offset ``>= 0`` (the margin of the most frequent class when rescaled).
        power (float): λ ``> 0``.
        rescale (bool): min–max scale :math:`n^{-\lambda}` to [0, 1] first.

    Returns:
        Tensor[C]: margins in the floating dtype of ``class_counts`` (float32 for integer counts), ready for any
        head's ``margin`` argument (check that they fall in that head's range).
    """
    if not isinstance(class_counts, Tensor) or class_counts.dim() != 1 or class_counts.numel() == 0:
        got = shape_str(class_counts.shape) if isinstance(class_counts, Tensor) else type(class_counts).__name__
        raise ValueError(f"class_counts must be a non-empty tensor of shape (C,), but got {got}")
    check_nonnegative(a, "dynamic_margins a")
    check_nonnegative(b, "dynamic_margins b")
    check_positive(power, "dynamic_margins power")
    counts = class_counts if class_counts.is_floating_point() else class_counts.float()
    if not bool((counts >= 1).all()):
        raise ValueError(f"class_counts must all be >= 1, but got a minimum of {float(counts.min()):g}")
    weight = counts.pow(-power)
    if rescale:
        span = weight.max() - weight.min()
        # all classes equally frequent: no spread, every class gets b
        weight = torch.where(span > 0, (weight - weight.min()) / span.clamp(min=torch.finfo(weight.dtype).tiny), 0.0)
    return a * weight + b


def elastic_margins(
    margin: MarginParam,
    std: float,
    size: Sequence[int],
    *,
    bounds: tuple[float, float] = (0.0, math.pi / 2),
    generator: Optional[torch.Generator] = None,
    dtype: Optional[torch.dtype] = None,
    device: Optional[torch.device | str] = None,
) -> Tensor:
    r"""Margins drawn from :math:`\mathcal N(m, \sigma^2)`, one per entry of ``size``: ElasticFace's margin.

    "ElasticFace: Elastic Margin Loss for Deep Face Recognition" (Boutros et al., CVPRW 2022,
    https://arxiv.org/abs/2109.09416), Eq. 4–5: a fresh margin per sample and step, so the decision boundary
    extends and retracts. Pass the result as a per-sample margin, ``size=(N, 1)``, to :func:`arc_margin`
    (ElasticFace-Arc) or :func:`cos_margin` (ElasticFace-Cos). The draws are clipped to ``bounds`` — the margin
    range of the head they go to (the paper does not clip; with σ ≪ m a clip is rare, and it keeps every margin
    valid). Give a seeded ``generator`` for reproducible draws.

    Args:
        margin (float or Tensor): the mean ``m``; a tensor broadcasts against ``size`` (per-class means gathered at
            the labels, say).
        std (float): σ ``>= 0``.
        size (sequence of int): shape of the draw.
        bounds (tuple of float): ``(low, high)``: draws are clipped to ``[low, high)``.
        generator (torch.Generator, optional): source of randomness.
        dtype (torch.dtype, optional): of the result (default: ``margin``'s when a tensor, else the default dtype).
        device (torch.device, optional): of the result (default: ``margin``'s when a tensor, else the CPU).

    Returns:
        Tensor: margins of shape ``broadcast(size, margin.shape)``, no grad.
    """
    check_nonnegative(std, "ElasticFace std")
    low, high = bounds
    if not (_is_real(low) and _is_real(high) and low < high):
        raise ValueError(f"bounds must be (low, high) with low < high, but got {bounds!r}")
    if isinstance(margin, Tensor):
        check_floating(margin, "margin")
        dtype = dtype or margin.dtype
        device = device or margin.device
        inside = not values_checkable() or bool(((margin >= low) & (margin < high)).all())
    elif not _is_real(margin):
        raise TypeError(f"margin must be a float or a tensor, but got {type(margin).__name__}")
    else:
        inside = low <= margin < high
    if not inside:
        raise ValueError(f"ElasticFace margin (the mean) must lie in bounds [{low:g}, {high:.4g}), but got {margin!r}")
    dtype = dtype or torch.get_default_dtype()
    noise = torch.randn(tuple(size), generator=generator, dtype=dtype, device=device)
    with torch.no_grad():
        mean = margin.detach().to(dtype) if isinstance(margin, Tensor) else margin
        # strictly below high in the result's dtype (float32 rounds π/2 up)
        top = float(high) - 4 * torch.finfo(dtype).eps * max(abs(float(high)), 1.0)
        return (mean + std * noise).clamp(float(low), top)
