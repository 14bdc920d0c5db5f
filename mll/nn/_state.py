"""What a head stores besides its weights, and the one rule that restores it: every value it starts with.

A head's state is its weights (drawn at random) and a few small tensors — the scale, per-class margins, running
statistics, annealed weights — each registered here together with its *initial value*: a float, or a tensor kept on
the CPU, in a plain attribute (``initial_values``), never in the ``state_dict`` (whose keys stay those that 0.1.6 and
0.2 checkpoints hold). :func:`restore_initial_values` writes them back, so that ``reset_parameters()`` gives every
head the state it had when it was built — after training, and after ``to_empty()`` from the meta device, where the
tensors were never filled. No value is read from a tensor of the head here: a head on the meta device builds, prints
and reports its options.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from mll import functional as MF
from mll.functional._engine.checks import check_num_classes, check_scale

__all__ = [
    "InitialValue",
    "float_repr",
    "keep_initial",
    "margin_repr",
    "register_margin",
    "register_scale",
    "register_state",
    "restore_initial_values",
    "statistics_dtype",
    "typical_margin",
]

#: a tensor's value at construction: one float for every entry, or a tensor of its shape (on the CPU)
InitialValue = Union[float, Tensor]


def statistics_dtype(dtype: Optional[torch.dtype]) -> torch.dtype:
    """Running statistics are kept in float64 for float64 heads, else float32 (an EMA stalls in half precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def keep_initial(module: nn.Module, name: str, value: InitialValue) -> None:
    """Remember the initial value of the parameter or buffer ``name`` (a float, or a tensor copied to the CPU)."""
    initial = value.detach().to("cpu", copy=True) if isinstance(value, Tensor) else float(value)
    if "initial_values" not in vars(module):
        module.initial_values = {}  # type: ignore[assignment]
    module.initial_values[name] = initial  # type: ignore[index, operator]


def restore_initial_values(module: nn.Module, names: Optional[Iterable[str]] = None) -> None:
    """Write every remembered initial value (or those of ``names``) back into the module's tensors, in place
    (a tensor on the meta device stays as it is)."""
    initial: dict[str, InitialValue] = vars(module).get("initial_values", {})
    with torch.no_grad():
        for name in initial if names is None else names:
            tensor, value = getattr(module, name), initial[name]
            if isinstance(value, Tensor):
                tensor.copy_(value)
            else:
                tensor.fill_(value)


def register_state(module: nn.Module, name: str, value: float, dtype: torch.dtype, device: Any = None) -> None:
    """A 0-dim buffer (a running statistic, an annealed weight) and its initial value."""
    module.register_buffer(name, torch.full((), float(value), dtype=dtype, device=device))
    keep_initial(module, name, value)


def check_margin_arg(value: object, parameter: MF.MarginParameter, title: str, num_classes: int) -> None:
    """A margin argument as the user gave it to the head ``title``: a float in the parameter's range, or a tensor of
    shape ``(C,)`` whose values are in it (read here: a tensor on the meta device has none)."""
    if not isinstance(value, Tensor):
        parameter.check(value, title)
        return
    check_num_classes(num_classes)
    if tuple(value.shape) != (num_classes,):
        raise ValueError(
            f"{title} {parameter.name} must be a float or a tensor of shape ({num_classes},), one per class, "
            f"but got shape {tuple(value.shape)}"
        )
    if value.is_meta:
        raise ValueError(
            f"{title} {parameter.name} is a tensor on the meta device: its values are needed (they are checked, solve "
            "the default scale and are what reset_parameters restores); give it on the CPU — the head's own tensors "
            "are made on the meta device all the same"
        )
    parameter.check(value, title, (num_classes,))


def typical_margin(value: Any, parameter: MF.MarginParameter, title: str, num_classes: int) -> float:
    """A margin argument, checked as the head ``title``'s (see :func:`check_margin_arg`), as one float (the mean of
    a per-class tensor): what a head's default scale is solved for."""
    check_margin_arg(value, parameter, title, num_classes)
    return float(value.detach().double().mean()) if isinstance(value, Tensor) else float(value)


def register_margin(
    module: nn.Module, name: str, value: object, parameter: MF.MarginParameter, title: str, num_classes: int,
    device: Any = None, dtype: Any = None,
) -> None:  # fmt: skip
    """Store a margin hyper-parameter: a float as a plain attribute, a per-class tensor ``(C,)`` as a buffer (saved in
    the state dict, moved by ``.to()``) on the head's device, float64 for float64 heads and float32 otherwise, with
    its initial value."""
    check_margin_arg(value, parameter, title, num_classes)
    if isinstance(value, Tensor):
        device = torch.empty(0, device=device).device  # the head's: None is the default device (meta under its context)
        stored = value.detach().to(device=device, dtype=statistics_dtype(dtype) if dtype is not None else None)
        module.register_buffer(name, stored.clone())
        keep_initial(module, name, value.detach().to(stored.dtype))
    else:
        setattr(module, name, float(value))  # type: ignore[arg-type]


def register_scale(module: nn.Module, scale: float, trainable: bool, device: Any, dtype: Any) -> None:
    """``module.scale``: a 0-dim Parameter when trainable, else a buffer (saved, moved, never optimised), with its
    initial value; 0.1.6's shape-(1,) scale loads into it. A scale that its dtype rounds to infinity or zero is
    refused."""
    if not isinstance(trainable, bool):
        raise TypeError(f"trainable_scale must be a bool, but got {type(trainable).__name__}")
    check_scale(scale)
    dtype = dtype or torch.get_default_dtype()
    check_fits(float(scale), dtype, f"{type(module).__name__} scale")
    value = torch.tensor(float(scale), dtype=dtype, device=device)
    if trainable:
        module.scale = nn.Parameter(value)
    else:
        module.register_buffer("scale", value)
    keep_initial(module, "scale", float(scale))
    module._register_load_state_dict_pre_hook(_upgrade_legacy_scale, with_module=True)


def check_fits(value: float, dtype: torch.dtype, name: str) -> None:
    """A positive float that stays positive and finite in ``dtype`` (1e39 is infinite in float32, 1e5 in float16)."""
    stored = float(torch.tensor(value, dtype=dtype, device="cpu"))
    if not (math.isfinite(stored) and stored > 0):
        info = torch.finfo(dtype)
        raise ValueError(
            f"{name} must fit the head's dtype {dtype} (between {info.tiny:.4g} and {info.max:.4g}), but got "
            f"{value!r}, which is {stored!r} in {dtype}"
        )


def float_repr(tensor: Tensor, spec: str = "g") -> str:
    """A one-element tensor's value for ``extra_repr`` (``meta`` on the meta device, where it has none)."""
    return "meta" if tensor.is_meta else format(float(tensor.detach()), spec)


def margin_repr(value: object) -> str:
    if isinstance(value, Tensor):
        if value.is_meta:
            return f"per-class[{value.numel()}] on meta"
        return f"per-class[{value.numel()}] in [{float(value.min()):.4g}, {float(value.max()):.4g}]"
    return f"{value}"


def _upgrade_legacy_scale(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # 0.1.6 stored the scale as a Parameter of shape (1,); ours is 0-dim.
    key = prefix + "scale"
    value = state_dict.get(key)
    if isinstance(value, Tensor) and value.shape == (1,):
        state_dict[key] = value.reshape(())
