"""Argument and input checks shared by the functional core.

Shape and dtype checks always run (shapes are static under ``vmap`` and ``torch.compile``).
Checks that read tensor *values* (label range, negative soft targets) run only in eager mode:
they need a host synchronisation and would break tracing and ``torch.func`` transforms.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any

import torch
from torch import Tensor

from mll.functional._engine.numerics import autocast_enabled, has_values

INDEX_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


_VALUE_CHECKS = [True]


class value_checks:
    """Turn the checks of input *values* on (the default) or off, for the whole process; also a context manager.

    The shapes, dtypes and arguments are always checked (no cost). The values — labels within ``[0, C)``, soft
    targets finite and non-negative, per-class margins within their range — need the numbers on the host: free on a
    CPU, but on a GPU each is a device synchronisation that stalls the step until the GPU has caught up. With checks
    off, a training step of every head (``head(x, y)``, ``head.loss(x, y)`` and their backward) reads nothing back
    from the device; a bad value is then no longer named (an out-of-range label may give an indexing error, a
    device-side assertion on CUDA, or a wrong loss). Check a pipeline with them on, then turn them off where the
    synchronisations cost::

        mll.functional.value_checks(False)          # from here on
        with mll.functional.value_checks(False):    # or for a block
            loss = head.loss(features, labels)

    The class-sharded losses read a few integers per step regardless (the ranks' row counts and their agreement).
    """

    def __init__(self, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise TypeError(f"value_checks takes a bool, but got {type(enabled).__name__}")
        self.previous = _VALUE_CHECKS[0]
        _VALUE_CHECKS[0] = enabled

    def __enter__(self) -> value_checks:
        return self

    def __exit__(self, *exc: object) -> None:
        _VALUE_CHECKS[0] = self.previous


def values_checkable(*tensors: object) -> bool:
    """Whether data-dependent checks may run on ``tensors``: switched on (:class:`value_checks`), in eager mode,
    outside any ``torch.func`` transform, and none of them a tensor without values — on the meta device or a fake
    tensor (shape inference: the step then runs on shapes alone, as PyTorch's own layers do)."""
    if not _VALUE_CHECKS[0] or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    return has_values(*tensors)


def shape_str(shape: tuple[int, ...] | torch.Size) -> str:
    return "(" + ", ".join(str(int(s)) for s in shape) + ")"


def check_floating(tensor: object, name: str) -> Tensor:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, but got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, but got {tensor.dtype}")
    return tensor


def check_features(input: Tensor, weight: Tensor, num_sub_centers: int, *, weight_name: str = "weight") -> None:
    check_floating(input, "input")
    check_floating(weight, weight_name)
    if weight.dim() != 2:
        raise ValueError(
            f"{weight_name} must have shape (num_classes * num_sub_centers, in_features), "
            f"but got {shape_str(weight.shape)}"
        )
    if input.dim() < 1:
        raise ValueError("input must have shape (*, in_features), but got a 0-dim tensor")
    if input.shape[-1] != weight.shape[-1]:
        raise ValueError(
            f"input must have shape (*, {weight.shape[-1]}) to match {weight_name}'s in_features, "
            f"but got {shape_str(input.shape)}"
        )
    check_num_sub_centers(num_sub_centers)
    if weight.shape[0] % num_sub_centers != 0:
        raise ValueError(
            f"{weight_name} has {weight.shape[0]} rows, which is not a multiple of num_sub_centers={num_sub_centers}"
        )
    if input.dtype != weight.dtype and not autocast_enabled(input.device):
        raise TypeError(
            f"input and {weight_name} must have the same dtype outside autocast, "
            f"but got {input.dtype} and {weight.dtype}"
        )


def is_int(value: object) -> bool:
    """Python and NumPy integers, not bools."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: object) -> bool:
    """Python and NumPy reals, not bools or tensors."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_num_sub_centers(num_sub_centers: object) -> None:
    if not is_int(num_sub_centers) or num_sub_centers < 1:  # type: ignore[operator]
        raise ValueError(f"num_sub_centers must be an integer >= 1, but got {num_sub_centers!r}")


def check_num_classes(num_classes: object, name: str = "out_features") -> None:
    if not is_int(num_classes) or num_classes < 2:  # type: ignore[operator]
        raise ValueError(f"{name} must be an integer >= 2 (number of classes), but got {num_classes!r}")


def check_in_features(in_features: object) -> None:
    if not is_int(in_features) or in_features < 1:  # type: ignore[operator]
        raise ValueError(f"in_features must be an integer >= 1, but got {in_features!r}")


def check_scale(scale: object, name: str = "scale") -> None:
    """A Python number must be positive and finite; a tensor must be floating (values checked in eager)."""
    if isinstance(scale, Tensor):
        if not scale.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, but got {scale.dtype}")
        if scale.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-element tensor, but got shape {shape_str(scale.shape)}")
        if values_checkable(scale) and scale.numel() > 0:
            bad = ~(torch.isfinite(scale) & (scale > 0))
            if bool(bad.any()):
                raise ValueError(f"{name} must be positive and finite, but got {scale.detach().cpu().tolist()}")
        return
    if not is_real(scale):
        raise TypeError(f"{name} must be a positive float or a tensor, but got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):  # type: ignore[arg-type, operator]
        raise ValueError(f"{name} must be positive and finite, but got {scale!r}")


def _interval(low: float, high: float, high_inclusive: bool) -> str:
    return f"[{low:g}, {high:.4g}{']' if high_inclusive else ')'}"


#: the upper end of every additive angular margin's range (ArcFace and its kin): a margin is in radians there
ANGULAR_MARGIN_MAX = math.pi / 2


def _units(high: float, value: float) -> str:
    """What follows an angular margin's error: " (in radians)", or where the value reads as degrees (as
    pytorch-metric-learning takes them) " (in radians: did you give degrees? 28.6° = 0.499 rad)"; else nothing."""
    if high != ANGULAR_MARGIN_MAX:
        return ""
    if high <= value < 360 and math.isfinite(value):
        return f" (in radians: did you give degrees? {value:g}° = {math.radians(value):.3g} rad)"
    return " (in radians)"


def check_margin(
    margin: object, low: float, high: float, kind: str, *, name: str = "margin", high_inclusive: bool = False
) -> None:
    """A Python (or NumPy) real in ``[low, high)`` (``[low, high]`` with ``high_inclusive``)."""
    if not is_real(margin):
        raise TypeError(f"{kind} {name} must be a float, but got {type(margin).__name__}")
    ok = low <= margin <= high if high_inclusive else low <= margin < high  # type: ignore[operator]
    if not (math.isfinite(margin) and ok):  # type: ignore[arg-type]
        units = _units(high, float(margin))  # type: ignore[arg-type]
        raise ValueError(f"{kind} {name} must be in {_interval(low, high, high_inclusive)}, but got {margin!r}{units}")


def check_margin_param(
    margin: object,
    low: float,
    high: float,
    kind: str,
    cosine_shape: torch.Size | tuple[int, ...] | None,
    *,
    name: str = "margin",
    high_inclusive: bool = False,
    check_values: bool = True,
) -> None:
    """A margin is a float or a floating tensor that broadcasts to the logits' shape ``(*, C)``.

    ``(C,)`` gives one margin per class, ``(*, 1)`` one per sample, ``(*, C)`` one per entry. With
    ``cosine_shape=None`` (a module's constructor, before any input) a tensor must have shape ``(C,)`` for some C;
    the caller checks C. Tensor values are range-checked in eager mode only.
    """
    if not isinstance(margin, Tensor):
        check_margin(margin, low, high, kind, name=name, high_inclusive=high_inclusive)
        return
    if not margin.is_floating_point():
        raise TypeError(f"{kind} {name} must be a float or a floating-point tensor, but got dtype {margin.dtype}")
    if cosine_shape is None:
        if margin.dim() != 1:
            raise ValueError(
                f"{kind} {name} must be a float or a tensor of shape (C,) (one per class), "
                f"but got shape {shape_str(margin.shape)}"
            )
    else:
        try:
            broadcast = tuple(torch.broadcast_shapes(margin.shape, cosine_shape))
        except RuntimeError:
            broadcast = None
        if broadcast != tuple(cosine_shape):
            raise ValueError(
                f"{kind} {name} must be a float or a tensor that broadcasts to the logits' shape "
                f"{shape_str(cosine_shape)}: (C,) per class, (*, 1) per sample, but got shape {shape_str(margin.shape)}"
            )
    if check_values and values_checkable(margin) and margin.numel() > 0:
        lo, hi = (float(v) for v in torch.aminmax(margin.detach()))
        ok = low <= lo and (hi <= high if high_inclusive else hi < high)
        if not (ok and math.isfinite(lo) and math.isfinite(hi)):
            raise ValueError(
                f"{kind} {name} must be in {_interval(low, high, high_inclusive)}, but got values from {lo:g} to "
                f"{hi:g}{_units(high, hi)}"
            )


def check_cosine(cosine: object) -> Tensor:
    """Cosines (or logits) of shape ``(*, C)``: a floating tensor with a class dimension of at least 2."""
    check_floating(cosine, "cosine")
    assert isinstance(cosine, Tensor)
    if cosine.dim() < 1 or cosine.shape[-1] < 2:
        raise ValueError(f"cosine must have shape (*, C) with C >= 2 classes, but got {shape_str(cosine.shape)}")
    return cosine


def is_soft(target: Tensor) -> bool:
    """Soft targets are floating point with a class dimension; class indices are integers."""
    return target.is_floating_point()


def check_target(target: object, cosine_shape: torch.Size, *, name: str = "target") -> Tensor:
    """Validate ``target`` against logits of shape ``(*, C)``.

    Returns the target, with integer class indices converted to int64 (``gather`` needs it).
    """
    lead, num_classes = tuple(cosine_shape[:-1]), cosine_shape[-1]

    def expected() -> str:  # built only to raise: under torch.compile the shapes may be symbolic
        return (
            f"class indices of shape {shape_str(lead)} (an integer dtype) or soft targets of shape "
            f"{shape_str(tuple(cosine_shape))} (a floating dtype)"
        )

    if not isinstance(target, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of {expected()}, but got {type(target).__name__}")
    if target.is_floating_point():
        if tuple(target.shape) != tuple(cosine_shape):
            raise ValueError(f"{name} must be {expected()}, but got a float tensor of shape {shape_str(target.shape)}")
        if values_checkable(target) and not bool((torch.isfinite(target) & (target >= 0)).all()):  # NaN and ±inf too
            raise ValueError(
                f"soft {name} must be non-negative and finite (not NaN or inf), but got values from "
                f"{target.min().item():g} to {target.max().item():g}"
            )
        return target
    if target.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be {expected()}, but got dtype {target.dtype}")
    if tuple(target.shape) != lead:
        raise ValueError(f"{name} must be {expected()}, but got an integer tensor of shape {shape_str(target.shape)}")
    if values_checkable(target) and target.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(target))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"{name} must hold class indices in [0, {num_classes}), but got values from {lo} to {hi}")
    return target.long()


def check_nonnegative(value: object, name: str) -> float:
    """A finite Python (or NumPy) real ``>= 0``, returned as a float."""
    if not is_real(value) or not (0 <= value < math.inf):  # type: ignore[operator]
        raise ValueError(f"{name} must be a finite float >= 0, but got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_positive(value: object, name: str) -> float:
    """A finite Python (or NumPy) real ``> 0``, returned as a float."""
    if not is_real(value) or not (0 < value < math.inf):  # type: ignore[operator]
        raise ValueError(f"{name} must be a positive finite float, but got {value!r}")
    return float(value)  # type: ignore[arg-type]


def check_decay(decay: object, name: str = "decay") -> None:
    """An EMA decay: the weight of the *old* value, a float in ``[0, 1)``."""
    if not is_real(decay) or not (0.0 <= decay < 1.0):  # type: ignore[operator]
        raise ValueError(f"{name} must be a float in [0, 1) (the weight of the old value), but got {decay!r}")


#: the default of a deprecated argument: not given
UNSET: Any = object()


def renamed(value: object, old: object, old_name: str, new_name: str) -> Any:
    """An argument renamed in 0.2: ``value`` (the new name's), or the old name's when given, with a warning."""
    if old is UNSET:
        return value
    warnings.warn(
        f"{old_name} is deprecated and will be removed in 0.3: use {new_name} (same meaning)",
        DeprecationWarning,
        stacklevel=3,
    )
    return old


def check_sample_rate(sample_rate: object) -> None:
    if not is_real(sample_rate) or not (0.0 < sample_rate <= 1.0):  # type: ignore[operator]
        raise ValueError(f"sample_rate must be a float in (0, 1], but got {sample_rate!r}")


def check_generator(generator: object) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, but got {type(generator).__name__}")


def check_feature_grad_scale(feature_grad_scale: object) -> None:
    if feature_grad_scale is not None and not (
        is_real(feature_grad_scale) and math.isfinite(feature_grad_scale) and feature_grad_scale >= 0  # type: ignore[arg-type, operator]
    ):
        raise ValueError(f"feature_grad_scale must be None or a finite float >= 0, but got {feature_grad_scale!r}")


def check_lambda(lambda_: object, name: str = "SphereFace lambda_") -> None:
    """An annealing weight λ (SphereFace's, L-Softmax's: ``name``): a finite float >= 0, or a one-element floating
    tensor (its value checked in eager mode)."""
    if isinstance(lambda_, Tensor):
        if not lambda_.is_floating_point() or lambda_.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-element floating tensor, but got {lambda_!r}")
        if values_checkable(lambda_) and not bool(torch.isfinite(lambda_).all() & (lambda_ >= 0).all()):
            raise ValueError(f"{name} must be finite and >= 0, but got {float(lambda_):g}")
        return
    check_nonnegative(lambda_, name)


def check_pooling(pooling: object, pooling_temperature: object) -> None:
    if pooling not in ("max", "soft"):
        raise ValueError(f"pooling must be 'max' or 'soft', but got {pooling!r}")
    check_positive(pooling_temperature, "pooling_temperature")


def check_chunk_size(chunk_size: object) -> None:
    if chunk_size is not None and (not is_int(chunk_size) or chunk_size < 1):  # type: ignore[operator]
        raise ValueError(f"chunk_size must be None or an integer >= 1, but got {chunk_size!r}")


def check_reduction(reduction: object) -> None:
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', but got {reduction!r}")


def check_pair(target: Any, lead: tuple[int, ...], num_classes: int) -> tuple[Tensor, Tensor]:
    """A few-hot target ``(classes, weights)``: integer classes in ``[0, C)`` and finite non-negative floating weights,
    both of shape ``(*, P)``."""
    if len(target) != 2:
        raise ValueError(
            f"target as a sequence must be a pair (classes, weights), but got a {type(target).__name__} of length "
            f"{len(target)}"
        )
    classes, weights = target
    if (
        not isinstance(classes, Tensor)
        or classes.is_floating_point()
        or classes.is_complex()
        or classes.dtype == torch.bool
    ):
        raise TypeError(f"target's classes must be an integer tensor of shape (*, P), but got {_describe(classes)}")
    if not isinstance(weights, Tensor) or not weights.is_floating_point():
        raise TypeError(
            f"target's weights must be a floating-point tensor of shape (*, P), but got {_describe(weights)}"
        )
    if classes.dim() != len(lead) + 1 or tuple(classes.shape[:-1]) != lead or weights.shape != classes.shape:
        raise ValueError(
            f"target's classes and weights must both have shape (*, P) with * = {shape_str(lead)}, "
            f"but got {shape_str(classes.shape)} and {shape_str(weights.shape)}"
        )
    if weights.requires_grad and torch.is_grad_enabled():
        raise ValueError("the chunked and sharded losses do not differentiate soft targets: detach the weights")
    if classes.numel() > 0:
        lo, hi = (int(v) for v in torch.aminmax(classes))
        if lo < 0 or hi >= num_classes:
            raise ValueError(f"target's classes must be in [0, {num_classes}), but got values from {lo} to {hi}")
        if not bool((torch.isfinite(weights) & (weights >= 0)).all()):
            raise ValueError(
                f"target's weights must be non-negative and finite, but got values from {float(weights.min()):g} "
                f"to {float(weights.max()):g}"
            )
    return classes.long(), weights


def _describe(value: object) -> str:
    return f"dtype {value.dtype}" if isinstance(value, Tensor) else type(value).__name__
