"""Margins as tensors: per class from class frequencies, per sample from a normal distribution.

Every margin function accepts a tensor margin that broadcasts to the logits' shape ``(*, C)``; these helpers make
the two kinds users ask for. They return plain tensors, so they compose with any margin (``arc_margin``,
``cos_margin``, ``combined_margin``, ...).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import torch
from torch import Tensor

from mll.functional._engine.checks import (
    check_floating,
    check_nonnegative,
    check_positive,
    is_int,
    is_real,
    shape_str,
    values_checkable,
)
from mll.functional.margins import MarginParam

__all__ = ["dynamic_margins", "elastic_margins"]


def _is_bool(value: object) -> bool:
    """Python and NumPy bools (NumPy's is not a subclass of ``bool``; numpy is not a dependency)."""
    kind = type(value)
    return isinstance(value, bool) or (kind.__module__ == "numpy" and kind.__name__ in ("bool", "bool_"))


def _check_size(size: object) -> tuple[int, ...]:
    """A shape as torch takes it: one integer or a sequence of them (Python or NumPy), each ``>= 0``."""
    if is_int(size):
        dims: tuple[object, ...] = (size,)
    elif isinstance(size, (str, bytes, Tensor)) or not isinstance(size, Sequence):
        raise TypeError(f"size must be an int or a sequence of ints (a shape), but got {type(size).__name__}")
    else:
        dims = tuple(size)
    if not all(is_int(d) for d in dims):
        raise TypeError(f"size must be an int or a sequence of ints (a shape), but got {size!r}")
    if any(d < 0 for d in dims):  # type: ignore[operator]
        raise ValueError(f"size must have no negative entries, but got {size!r}")
    return tuple(int(d) for d in dims)  # type: ignore[call-overload]


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
    if not isinstance(class_counts, Tensor):
        raise TypeError(f"class_counts must be a tensor of shape (C,), but got {type(class_counts).__name__}")
    if class_counts.dtype == torch.bool or class_counts.is_complex():
        raise TypeError(f"class_counts must have an integer or floating dtype, but got {class_counts.dtype}")
    if class_counts.dim() != 1 or class_counts.numel() == 0:
        raise ValueError(
            f"class_counts must be a non-empty tensor of shape (C,), but got {shape_str(class_counts.shape)}"
        )
    a = check_nonnegative(a, "dynamic_margins a")
    b = check_nonnegative(b, "dynamic_margins b")
    power = check_positive(power, "dynamic_margins power")
    if not _is_bool(rescale):
        raise TypeError(f"dynamic_margins rescale must be a bool, but got {rescale!r}")
    counts = class_counts if class_counts.is_floating_point() else class_counts.float()
    if values_checkable(counts) and not bool((counts >= 1).all()):  # also catches NaN
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
    size: Union[int, Sequence[int]],
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
        size (int or sequence of int): shape of the draw, as ``torch.randn`` takes it.
        bounds (tuple of float): ``(low, high)``, finite: draws are clipped to ``[low, high)``.
        generator (torch.Generator, optional): source of randomness.
        dtype (torch.dtype, optional): of the result (default: ``margin``'s when a tensor, else the default dtype).
        device (torch.device, optional): of the result (default: ``margin``'s when a tensor, else the CPU).

    Returns:
        Tensor: margins of shape ``broadcast(size, margin.shape)``, no grad.
    """
    std = check_nonnegative(std, "ElasticFace std")
    shape = _check_size(size)
    if not (isinstance(bounds, (tuple, list)) and len(bounds) == 2 and all(is_real(v) for v in bounds)):
        raise TypeError(f"bounds must be a pair (low, high) of floats, but got {bounds!r}")
    low, high = float(bounds[0]), float(bounds[1])
    # an infinite bound makes the clip's top (high minus a few ulps) NaN, and every draw with it
    if not (-math.inf < low < high < math.inf):  # NaN fails every comparison (comparisons also trace symbolically)
        raise ValueError(f"bounds must be finite (low, high) with low < high, but got {bounds!r}")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype, but got {dtype!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, but got {type(generator).__name__}")
    if isinstance(margin, Tensor):
        check_floating(margin, "margin")
        try:
            torch.broadcast_shapes(shape, margin.shape)
        except RuntimeError:
            raise ValueError(f"margin of shape {tuple(margin.shape)} must broadcast against size {shape}") from None
        dtype = dtype or margin.dtype
        device = device or margin.device
        if values_checkable(margin) and margin.numel() > 0 and not bool(((margin >= low) & (margin < high)).all()):
            lo, hi = (float(v) for v in torch.aminmax(margin.detach()))
            raise ValueError(
                f"ElasticFace margin (the mean) must lie in bounds [{low:g}, {high:.4g}), "
                f"but got values from {lo:g} to {hi:g}"
            )
    elif not is_real(margin):
        raise TypeError(f"margin must be a float or a tensor, but got {type(margin).__name__}")
    elif not low <= margin < high:
        raise ValueError(f"ElasticFace margin (the mean) must lie in bounds [{low:g}, {high:.4g}), but got {margin!r}")
    dtype = dtype or torch.get_default_dtype()
    # strictly below high in the result's dtype (float32 rounds π/2 up)
    top = high - 4 * torch.finfo(dtype).eps * max(abs(high), 1.0)
    if top < low:
        raise ValueError(f"bounds must be more than a few {dtype} ulps of high apart, but got {bounds!r}")
    if generator is None:  # (``generator=None`` passed explicitly selects an overload that needs concrete sizes:
        noise = torch.randn(shape, dtype=dtype, device=device)  # symbolic batch sizes under torch.compile fail)
    else:
        noise = torch.randn(shape, generator=generator, dtype=dtype, device=device)
    with torch.no_grad():
        mean = margin.detach().to(dtype) if isinstance(margin, Tensor) else float(margin)
        return (mean + std * noise).clamp(low, top)
