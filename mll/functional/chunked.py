"""Margin cross-entropy over class chunks: the N×C logits never exist at once.

The single-process front of the engine's chunk kernel (``_engine/kernel.py``): checks the arguments, flattens the
samples, puts the targets in the kernel's form and reduces the per-sample losses. Peak extra memory is
O(N·chunk·K + chunk·K·d) instead of the dense path's several N×C buffers and the normalised copy of W. It also holds
the memory budget the fronts choose their chunks and the kernel's kept logits by.
"""

from __future__ import annotations

import math
from contextvars import ContextVar
from typing import Any, Callable, Literal, Optional, TypeVar, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from mll.functional._engine.checks import (
    UNSET,
    check_chunk_size,
    check_features,
    check_num_sub_centers,
    check_pooling,
    check_reduction,
    check_scale,
    is_int,
    renamed,
)
from mll.functional._engine.chunks import Spec, prepare
from mll.functional._engine.compiled import chunk_kernel, outside_graph
from mll.functional._engine.kernel import chunked_ce
from mll.functional._engine.normalization import normalize
from mll.functional._engine.numerics import Scale, acc_dtype
from mll.functional._engine.plan import Plan, chunk_classes, dense_first, plan
from mll.functional._engine.row_tiles import row_tiled_ce
from mll.functional._engine.targets import Target, Targets, kernel_targets, tensor_targets
from mll.functional.cosine import Pooling, pooled_cosines
from mll.functional.margin import Margin, MarginParam, apply_margin, param_tensor
from mll.functional.margins import resolve_margin

__all__ = ["loss_plan", "margin_cross_entropy"]

Reduction = Literal["mean", "sum", "none"]


def default_chunk_size(batch: int, num_classes: int, num_sub_centers: int, device: Any = "cpu") -> int:
    """Classes per chunk of the chunk kernel: about 2**18 logits on the CPU (2**22 on an accelerator), at least 512
    classes, at least 1 and at most C (see ``docs/chunked.md``)."""
    return chunk_classes(batch, num_classes, num_sub_centers, device)


def loss_plan(
    batch: int, num_classes: int, num_sub_centers: int = 1, *, dtype: torch.dtype = torch.float32,
    device: Any = "cpu", reduction: Reduction = "mean", requires_grad: bool = True, plain: bool = True,
    chunk_size: Optional[int] = None, held: int = 0,
) -> Plan:  # fmt: skip
    """The path :func:`margin_cross_entropy` (and every head's ``loss()`` in training mode; in eval mode, as with
    ``requires_grad=False``: see :func:`read_only`) takes for a batch of ``batch`` rows over ``num_classes`` classes —
    ``"dense"``, ``"keep"``, ``"row_tiles"`` or ``"recompute"`` — with its chunk, tile and memory budget
    (see ``docs/chunked.md``: how the path is chosen). ``plain``: plain scaled cosine logits with class indices (no
    sub-centers, non-target part or dense soft targets, which hold four logits-sized buffers per chunk; a row tile holds
    one whatever the logits). ``held``: bytes the step holds besides a tile — with an existing ``.grad`` on the
    weight, the C·K×d weight gradient (4 bytes a number; 8 in float64) that the row tiles form beside it."""
    for name, value, least in (("batch", batch, 0), ("num_classes", num_classes, 1), ("held", held, 0)):
        if not is_int(value) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, but got {value!r}")
    check_num_sub_centers(num_sub_centers)
    check_chunk_size(chunk_size)
    check_reduction(reduction)
    scalar = reduction != "none" and requires_grad and torch.is_grad_enabled() and chunk_kernel() != "compiled"
    buffers = 1 if plain and num_sub_centers == 1 else 4
    return plan(batch, num_classes, num_sub_centers, buffers, dtype, device, scalar_loss=scalar, chunk=chunk_size,
                held=held, dense=True, tile_buffers=1)  # fmt: skip


def logits_buffers(spec: Spec) -> int:
    """How many logits-sized tensors a chunk of ``spec`` holds: 1 for plain scaled cosines, 4 with sub-centers, a
    non-target part or dense soft targets (their cosines, pooled cosines and slopes)."""
    return 1 if spec.plain else 4


def flat_param(param: MarginParam, lead: tuple[int, ...], num_classes: int, dtype: torch.dtype, device: Any) -> Tensor:
    """A margin parameter that broadcasts to ``(*lead, C)``, on the flattened samples: 0-dim, ``(C,)``, ``(N, 1)``
    or ``(N, C)``."""
    p = param_tensor(param, dtype, device)
    if p.dim() <= 1:
        return p
    return p.expand(*lead, p.shape[-1]).reshape(-1, p.shape[-1])


def margin_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Target,
    *,
    scale: Scale,
    margin: Union[Margin, float, Tensor] = 0.0,
    margin_type: Optional[str] = None,
    easy_margin: bool = False,
    num_sub_centers: int = 1,
    pooling: Pooling = "max",
    pooling_temperature: float = 0.1,
    chunk_size: Optional[int] = None,
    reduction: Reduction = "mean",
    temperature: float = UNSET,
    normalized: bool = True,
) -> Tensor:
    r"""Cross-entropy of a margin head, computed over class chunks without the N×C logits.

    Equals ``F.cross_entropy(margin_logits(cosine_logits(input, weight, K), target, margin, scale=s), target)`` —
    the dense head's loss — in value and in the gradients of ``input``, ``weight``, a tensor ``scale`` and margin
    parameters that require grad (MagFace's magnitude), for every :class:`MarginFamily`. Softmax statistics
    accumulate in float32 for float16/bfloat16 inputs (float64 for float64).

    Memory: the dense path keeps several N×C buffers (logits, log-probabilities, their gradients) and a C·K×d
    normalised copy of the weights; this one keeps O(N) statistics between forward and backward and one chunk of
    N×chunk·K logits plus chunk·K×d normalised weights at a time. Backward recomputes each chunk's logits (a
    fourth GEMM). It runs eagerly under ``torch.compile`` (a graph break), works under ``torch.func.grad``, and
    raises a clear error under ``torch.func.vmap`` or a double backward.

    Args:
        input (Tensor[*, d]): features.
        weight (Tensor[C*K, d]): class weights.
        target: class indices ``(*)``, soft targets ``(*, C)``, or few-hot soft targets as a pair
            ``(classes, weights)`` of shape ``(*, P)`` each (mixup: P = 2), the same as the dense targets with
            ``t[i, classes[i, p]] += weights[i, p]`` but O(N·P) margin work instead of O(N·C).
        scale (float or Tensor): ``s``.
        margin (Margin, float or Tensor): a bound margin family such as ``ARC(0.5)`` or ``COMBINED(1.0, 0.3, 0.2)``;
            or, with ``margin_type``, the value of a one-parameter margin (a tensor ``(C,)`` gives one per class).
        margin_type (str, optional): the family of a float ``margin``: ``"cos"`` (default), ``"arc"`` or
            ``"none"``; any family's name.
        easy_margin (bool): ArcFace's easy margin (with ``margin_type="arc"``).
        num_sub_centers (int): ``K``.
        pooling (str): ``"max"`` or ``"soft"`` sub-center pooling (see :func:`cosine_logits`).
        pooling_temperature (float): γ of soft pooling (``temperature`` before 0.2, deprecated).
        chunk_size (int, optional): classes per chunk; default ``2**18 // (N·K)`` on the CPU (1 MB of logits per
            chunk), ``2**22 // (N·K)`` on an accelerator.
        reduction (str): ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(*)``).
        normalized (bool): True (every cosine head): features and weights are L2-normalised, the family sees
            cosines; False: both are used as they are, the family sees the dot products x·w (L-Softmax:
            ``margin=LARGE_MARGIN(‖x‖, ‖w‖, m, λ)``, see :func:`large_margin_logits`).

    Returns:
        Tensor: the loss, float32 for half-precision inputs.
    """
    pooling_temperature = renamed(pooling_temperature, temperature, "temperature", "pooling_temperature")
    margin_ = resolve_margin(margin, margin_type, easy_margin)
    check_features(input, weight, num_sub_centers)
    check_pooling(pooling, pooling_temperature)
    check_scale(scale)
    check_chunk_size(chunk_size)
    check_reduction(reduction)
    num_classes = weight.shape[0] // num_sub_centers
    lead = tuple(input.shape[:-1])
    margin_.check((*lead, num_classes))
    acc = acc_dtype(input.dtype)
    targets = kernel_targets(target, lead, num_classes, acc)
    return chunked_loss(input, weight, targets, scale, margin_, num_sub_centers, pooling, pooling_temperature,
                        chunk_size, reduction, normalized)  # fmt: skip


def chunked_loss(
    input: Tensor,
    weight: Tensor,
    targets: Targets | Tensor,
    scale: Scale,
    margin: Margin,
    num_sub_centers: int,
    pooling: str,
    pooling_temperature: float,
    chunk_size: Optional[int],
    reduction: str,
    normalized: bool = True,
) -> Tensor:
    """:func:`margin_cross_entropy` after its checks: ``targets`` in the kernel's form, or class indices (int64,
    checked) or dense soft targets (checked) as a tensor. ``normalized=False``: the features and weights as they
    are, so that the margin family sees the dot products x·w (L-Softmax)."""
    num_classes = weight.shape[0] // num_sub_centers
    lead = tuple(input.shape[:-1])
    n, acc = math.prod(lead), acc_dtype(input.dtype)
    if isinstance(targets, Tensor):
        soft = targets.is_floating_point()
    else:
        soft = targets.weights is not None or targets.dense is not None
    if margin.family.class_indices_only and soft:
        raise ValueError(
            f"{margin.family.label} needs class indices (an integer tensor of shape (*)), not soft targets"
        )
    soft_with_grad = isinstance(targets, Tensor) and targets.is_floating_point() and targets.requires_grad
    if soft_with_grad and torch.is_grad_enabled():
        # a head's soft targets that need a gradient (margin_cross_entropy's were refused by kernel_targets): on every
        # path, as the kernels hold targets as constants and their gradient would be N×C
        raise ValueError(
            "the chunked loss does not differentiate soft targets: detach the targets (labels), or use the dense "
            "path F.cross_entropy(head(input, target), target)"
        )
    if n > 0 and dense_first(n, num_classes, int(num_sub_centers), chunk_size):
        # a small step: decided before the kernel's preparation, whose fixed cost is what this path avoids (and
        # numbers for parameters stay numbers, as in a head's forward)
        if not isinstance(targets, Tensor):
            target = _dense_target(targets, num_classes, None)
        elif targets.is_floating_point():  # dense soft targets, flattened
            target = targets.reshape(-1, num_classes)
        else:  # class indices
            target = targets if targets.dim() == 1 else targets.reshape(-1)
        bound = margin
        if any(isinstance(p, Tensor) for p in margin.params):
            flat = tuple(flat_param(p, lead, num_classes, acc, input.device) for p in margin.params)
            bound = Margin(margin.family, flat)
        logits = _dense_logits(input, weight, target, bound, scale, num_sub_centers, pooling, pooling_temperature,
                               normalized)  # fmt: skip
        target = target.to(acc) if target.is_floating_point() else target
        losses = F.cross_entropy(logits if logits.dtype == acc else logits.to(acc), target, reduction=reduction)
        return losses.reshape(lead) if reduction == "none" else losses
    if isinstance(targets, Tensor):
        targets = tensor_targets(targets, num_classes, acc)
    params = tuple(flat_param(p, lead, num_classes, acc, input.device) for p in margin.params)
    x = (normalize(input) if normalized else input).reshape(-1, input.shape[-1])
    if n == 0:  # an empty batch: empty per-sample losses (the mean is NaN, as F.cross_entropy's)
        losses = x.sum(-1).to(acc) + 0.0 * weight.sum()
    else:
        tau = float(pooling_temperature) if pooling == "soft" and num_sub_centers > 1 else None
        spec = Spec(margin.family, targets, int(num_sub_centers), 1, tau, normalize_weight=normalized)
        choice = plan(n, num_classes, int(num_sub_centers), logits_buffers(spec), input.dtype, x.device,
                      scalar_loss=not spec.compiled and scalar_loss(reduction, input, weight, scale, params),
                      chunk=chunk_size, held=accumulating_bytes(weight), dense=True,
                      tile_buffers=1)  # fmt: skip
        assert choice.path != "dense"  # dense_first said no: the plan agrees
        spec.chunk, spec.keep = choice.chunk, choice.path == "keep"
        value = prepare(spec, x, weight, params)
        if choice.path == "row_tiles":
            loss = row_tiled_ce(x, weight, scale, value, spec, choice.rows, reduction, n, *params)
            return loss.to(input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32)
        losses, *_ = chunked_ce(x, weight, scale, value, spec, *params)
    return _reduced(losses, input.dtype, lead, reduction)


def _reduced(losses: Tensor, dtype: torch.dtype, lead: tuple[int, ...], reduction: str) -> Tensor:
    losses = losses.to(dtype if dtype in (torch.float32, torch.float64) else torch.float32)
    if reduction == "none":
        return losses.reshape(lead)
    return losses.sum() if reduction == "sum" else losses.mean()


def _dense_logits(
    input: Tensor, weight: Tensor, target: Tensor, margin: Margin, scale: Scale, num_sub_centers: int, pooling: str,
    pooling_temperature: float, normalized: bool,
) -> Tensor:  # fmt: skip
    """The dense path's logits for the flattened rows and their targets (:func:`_dense_target`): what a head's
    forward computes (the reference every path equals)."""
    flat = input if input.dim() == 2 else input.reshape(-1, input.shape[-1])
    if normalized:
        cos = pooled_cosines(flat, weight, num_sub_centers, pooling, pooling_temperature)
    else:
        cos = F.linear(flat, weight)
    return apply_margin(cos, target, margin, scale)


def _dense_target(targets: Targets, num_classes: int, dtype: Optional[torch.dtype]) -> Tensor:
    """Kernel-form targets as ``F.cross_entropy`` takes them: class indices ``(N,)`` or soft targets ``(N, C)`` (a
    few-hot pair's entries added into their classes)."""
    if targets.dense is not None:
        return targets.dense if dtype is None else targets.dense.to(dtype)
    assert targets.classes is not None
    if targets.weights is None:
        return targets.classes[:, 0]
    inside = targets.classes >= 0
    dense = torch.zeros(
        targets.classes.shape[0], num_classes, dtype=targets.weights.dtype, device=targets.classes.device
    )
    dense.scatter_add_(1, targets.classes.clamp(min=0), torch.where(inside, targets.weights, 0.0))
    return dense if dtype is None else dense.to(dtype)


def accumulating_bytes(weight: Tensor) -> int:
    """The bytes of the weight gradient the row tiles form beside an existing ``.grad`` (autograd then adds it in);
    the chunk kernel adds its chunks into ``.grad`` directly."""
    grad = weight.grad if weight.is_leaf and weight.requires_grad else None
    return 0 if grad is None else weight.numel() * (8 if weight.dtype == torch.float64 else 4)


def scalar_loss(reduction: str, *inputs: Any) -> bool:
    """Whether a loss ends the graph and can form its gradient during the forward: reduced to one number, a gradient
    to build, in eager mode outside ``torch.func`` transforms, and not a head's eval-mode loss (:func:`read_only`)."""
    return (
        reduction in ("mean", "sum")
        and torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and not torch._C._are_functorch_transforms_active()
        and not _READ_ONLY.get()
        and any(isinstance(t, Tensor) and t.requires_grad for t in _flat(inputs))
    )


#: set while a head computes its loss in eval mode (:func:`read_only`)
_READ_ONLY: ContextVar[bool] = ContextVar("mll_read_only_loss", default=False)
T = TypeVar("T")


def read_only(call: Callable[[], T], *, eager: bool = False) -> T:
    """``call()`` — a head's ``loss()`` in eval mode — without forming the gradient during the forward.

    An eval-mode loss is read far more often than differentiated (a validation loss computed outside
    ``torch.no_grad()``), and the paths that form the gradient on the way (the row tiles, Proxy-Anchor's one pass)
    pay two more GEMMs and the weight gradient's C×d buffer for it: ArcFace, N = 1024, C = 2·10^4, d = 512, one
    thread, 2.19× the time of the same loss under ``no_grad``. Here the budget picks between the other paths, whose
    forward is one GEMM; a backward, if one comes (an attack on the inputs), runs theirs (the chunk kernel's two or
    three GEMMs: at most 4/3 of the row tiles' three). The values are the same to rounding.

    Compiled, a traced loss never forms the gradient in its forward, and ``call`` is traced as it is; ``eager``: it
    runs outside the graph there (a graph break) with the flag set — the class-sharded losses, which leave the graph
    for their collectives and would form it there."""
    if torch.compiler.is_compiling():
        return outside_graph(_flagged, _EAGER)(call) if eager else call()
    return _flagged(call)


def _flagged(call: Callable[[], T]) -> T:
    token = _READ_ONLY.set(True)
    try:
        return call()
    finally:
        _READ_ONLY.reset(token)


_EAGER: list[Any] = []  # _flagged outside the graph (outside_graph)


def _flat(items: Any) -> Any:
    for item in items:
        if isinstance(item, (tuple, list)):
            yield from _flat(item)
        else:
            yield item
