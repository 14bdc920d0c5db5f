"""Which dtype each computation runs in, and which autograd mode a step is in: the small rules every path shares.

- margin trigonometry in float32 for half-precision inputs (:func:`work_dtype`), softmax statistics in float32 or
  float64 (:func:`acc_dtype`), the normalisation's ε per dtype (:func:`weight_eps`);
- whether a tensor the engine just allocated may be written in place (:func:`in_place_ok`), whether a backward
  is itself being differentiated (:func:`double_backward`), and whether it runs batched
  (:func:`refuse_batched_backward`);
- :func:`scratch`: a block's temporaries from buffers reused across the blocks of a row tile (:func:`scratch_pool`);
- :func:`exp_` and :func:`exp`: the exponential of the softmax passes, through ``exp2`` on the CPU;
- :class:`DirectApply`: the engine's autograd Functions skip what ``Function.apply`` spends on binding default
  arguments in eager mode (an ``inspect.signature`` per call: half the cost of a small Function's apply).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Any, Optional, Union

import torch
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake

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


#: log2(e): e^t = 2^(t·log2 e)
LOG2E = 1.4426950408889634
_EXP2 = (torch.float32, torch.float64)


def exp_(t: Tensor) -> Tensor:
    """``t.exp_()``, as ``2^(t·log2 e)`` for float32 and float64 on the CPU: there PyTorch's ``exp2`` runs about three
    times as fast as its ``exp`` (2 threads, float32, blocks of 2^20 numbers: 0.21 against 0.62 ns a number with the
    product's pass, at t from −86 to 0), and where the result is subnormal (t < −87.3: the softmax of a row whose
    logits span more than that, as s = 64 allows) ``exp`` takes a slow path, 14–23 ns a number against 0.36–0.51.
    The product's rounding is one more of the argument's: below the GEMM's that formed it. Differentiable (the
    dense losses' in-place passes record it)."""
    if t.dtype in _EXP2 and t.device.type == "cpu":
        return t.mul_(LOG2E).exp2_()
    return t.exp_()


def exp(t: Tensor) -> Tensor:
    """:func:`exp_` into a new tensor."""
    if t.dtype in _EXP2 and t.device.type == "cpu":
        return torch.exp2(t * LOG2E)
    return torch.exp(t)


#: the dispatch-mode key of ``FakeTensorMode`` (None in a torch without it)
_FAKE_KEY = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "FAKE", None)
_PLAIN = (Tensor, torch.nn.Parameter)


def has_values(*tensors: object) -> bool:
    """Whether every one of ``tensors`` has values to read: False for one on the meta device or a fake tensor, and
    for all while a ``FakeTensorMode`` is active, where every result is fake (shape inference, ``torch.export``'s
    tracing); non-tensors pass. About 0.3 µs for a plain tensor (it runs in every check of a step's values)."""
    if _FAKE_KEY is not None and torch._C._get_dispatch_mode(_FAKE_KEY) is not None:
        return False
    return not any(
        isinstance(t, Tensor) and (t.is_meta or (type(t) not in _PLAIN and is_fake(t)))  # (a subclass may wrap one)
        for t in tensors
    )


def autocast_enabled(device: torch.device) -> bool:
    """``torch.is_autocast_enabled`` for the device's type; False on the meta device, which autocast does not know
    (shape inference runs there)."""
    return device.type != "meta" and torch.is_autocast_enabled(device.type)


def autocast_off(device: torch.device) -> Any:
    """A context with autocast off on the device (nothing to do on the meta device)."""
    return contextlib.nullcontext() if device.type == "meta" else torch.autocast(device.type, enabled=False)


def in_place_ok() -> bool:
    """Whether a tensor the engine just allocated may be written in place: yes in eager mode and under compile.

    No under ``torch.func`` transforms, where in-place ops such as ``scatter_`` have no batching rule (a slow
    per-sample fallback), and when grad mode is on (a backward with ``create_graph=True``), where the tensor is
    part of the graph being recorded.
    """
    return not (torch.is_grad_enabled() or torch._C._are_functorch_transforms_active())


#: the buffers of the active :func:`scratch_pool`, by (slot, dtype, device); None: no pool
_POOL: contextvars.ContextVar[Optional[dict[Any, Tensor]]] = contextvars.ContextVar("mll_scratch_pool", default=None)


@contextlib.contextmanager
def scratch_pool() -> Iterator[None]:
    """Within the block: :func:`scratch` hands out buffers that last for the block and are reused by every call.

    For a loop whose temporaries of one iteration are dead before the next asks for its own — a row tile's groups
    of rows and blocks of classes (``row_tiles.py``). A family's non-target part (CurricularFace's mask and values,
    a few MB per block) then allocates once per step: under glibc's default allocator each fresh allocation of that
    size is mapped and faulted in anew (ArcFace against CurricularFace at N = 1024, C = 10^6, 2 threads: 1.42× the
    time, 1.18× with the buffers reused).
    """
    token = _POOL.set({})
    try:
        yield
    finally:
        _POOL.reset(token)


def scratch(like: Tensor, slot: int) -> Tensor:
    """An uninitialised tensor of ``like``'s shape, dtype, device and layout (row-major, or column-major where
    ``like`` is): ``torch.empty_like`` outside a :func:`scratch_pool`, inside it a view of the pool's buffer
    ``slot``, which the next call for that slot overwrites. A caller that returns two scratch tensors uses two
    slots; the engine numbers them (0: :func:`above`'s mask, 1: a family's values)."""
    if torch.compiler.is_compiling():  # (a traced graph plans its own buffers; no pool is entered there)
        return torch.empty_like(like)
    pool = _POOL.get()
    if pool is None or not in_place_ok() or like.dim() != 2:
        return torch.empty_like(like)
    key = (slot, like.dtype, like.device)
    buf = pool.get(key)
    if buf is None or buf.numel() < like.numel():
        buf = pool[key] = torch.empty(like.numel(), dtype=like.dtype, device=like.device)
    flat = buf[: like.numel()]
    if like.t().is_contiguous() and not like.is_contiguous():  # a class-major block: its columns contiguous
        return flat.view(like.shape[1], like.shape[0]).t()
    return flat.view(like.shape)


def above(values: Tensor, threshold: Tensor) -> Tensor:
    """1 where ``values > threshold`` and 0 elsewhere (NaN: 0), broadcast, in ``values``' dtype and layout: a
    family's hard-negative mask (no autograd) as a number, for arithmetic and ``lerp``. On a CPU ``>`` into a
    boolean tensor and each ``where`` or ``masked_fill`` on it run 4–15 times slower than arithmetic on as many
    numbers (a 64 × 16384 float32 block: 0.18 and 0.63 ms against 0.03–0.05 ms); ``>`` written straight into a
    tensor of the values' dtype costs a copy's time."""
    if in_place_ok() and torch.broadcast_shapes(values.shape, threshold.shape) == values.shape:
        return torch.gt(values, threshold, out=scratch(values, 0))
    return torch.gt(values, threshold).to(values.dtype)


def refuse_batched_backward(loss: str, instead: str) -> None:
    """Raise a clear error when a chunked loss's backward runs under ``torch.func.vmap`` — ``torch.func.jacrev`` or
    a ``vmap`` over a ``vjp`` (per-sample gradients) — where its loop over chunks writes into buffers (``out=``),
    which have no batching rule."""
    if torch.compiler.is_compiling() or not torch._C._are_functorch_transforms_active():
        return
    interpreter = torch._C._functorch.peek_interpreter_stack()
    if interpreter is not None and interpreter.key() == torch._C._functorch.TransformType.Vmap:
        raise RuntimeError(
            f"the {loss}'s backward does not run under torch.func.vmap (torch.func.jacrev, or vmap over a vjp: "
            f"per-sample gradients); take them from the dense path instead: {instead}"
        )


def double_backward() -> bool:
    """Whether this backward is being differentiated: ``create_graph=True``, or nested ``torch.func`` transforms.
    (A single ``torch.func.grad``/``vjp`` runs backward with grad mode on, at transform level 1: that is fine.)"""
    if torch._C._are_functorch_transforms_active():
        level = torch._C._functorch.maybe_current_level()
        return level is not None and level > 1
    return torch.is_grad_enabled()


class DirectApply:
    """Mixin before ``torch.autograd.Function`` for Functions whose arguments are all positional: in eager mode
    ``apply`` goes straight to the C++ apply, without ``Function.apply``'s binding of default arguments (an
    ``inspect.signature`` per call, about 10 µs); under ``torch.func`` transforms and ``torch.compile`` it is
    ``Function.apply`` unchanged."""

    @classmethod
    def apply(cls, *args: Any) -> Any:
        if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
            return super().apply(*args)  # type: ignore[misc]
        return super(torch.autograd.Function, cls).apply(*torch._functorch.utils.unwrap_dead_wrappers(args))  # type: ignore[misc]
