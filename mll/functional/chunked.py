"""Margin cross-entropy over class chunks: the N×C logits never exist at once.

The single-process front of the engine's chunk kernel (``_engine/kernel.py``): checks the arguments, flattens the
samples, puts the targets in the kernel's form and reduces the per-sample losses. Peak extra memory is
O(N·chunk·K + chunk·K·d) instead of the dense path's several N×C buffers and the normalised copy of W. It also holds
the memory budget the fronts choose their chunks and the kernel's kept logits by.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor

from mll.functional._engine.checks import (
    UNSET,
    check_chunk_size,
    check_features,
    check_pooling,
    check_reduction,
    check_scale,
    renamed,
)
from mll.functional._engine.chunks import Spec, prepare
from mll.functional._engine.kernel import chunked_ce
from mll.functional._engine.normalization import normalize
from mll.functional._engine.numerics import Scale, acc_dtype
from mll.functional._engine.targets import Target, Targets, kernel_targets, tensor_targets
from mll.functional.cosine import Pooling
from mll.functional.margin import Margin, MarginParam, param_tensor
from mll.functional.margins import resolve_margin

__all__ = ["margin_cross_entropy"]

Reduction = Literal["mean", "sum", "none"]

#: the default chunk keeps one chunk's N×chunk·K float32 logits near this many elements, per device type. CPU: 1 MB,
#: measured on a 2-core machine — a chunk's buffers stay in cache and a few percent of the dense path's memory from
#: C = 10^5, and 1024 classes at N = 256 are still an efficient GEMM. Accelerators: 16 MB, chosen, not yet measured —
#: a GPU needs larger GEMMs to fill its cores and pays a kernel launch per elementwise op of a chunk, and 2^22
#: elements are still ≤ 5% of the dense path's logits from C = 10^5 at N ≥ 512 / K
CHUNK_ELEMENTS = 1 << 18
ACCELERATOR_CHUNK_ELEMENTS = 1 << 22


#: ``loss()`` keeps a block's logits from forward to backward — no recomputation, three GEMMs instead of four —
#: while they take at most this many bytes (per device type): on the CPU 16 MB, i.e. up to C = 16384 classes at
#: N = 256 (K = 1); from C = 10^5 at N = 256 the logits are recomputed and the memory stays O(N·chunk). On an
#: accelerator 64 MB (chosen, not yet measured).
KEEP_BYTES = 1 << 24
ACCELERATOR_KEEP_BYTES = 1 << 26


def keeps_logits(batch: int, num_classes: int, num_sub_centers: int, plain: bool, dtype: torch.dtype,
                 device: Any = "cpu") -> bool:  # fmt: skip
    """Whether the chunk kernel keeps a block's logits between forward and backward: their bytes — the N×C·K
    logits in the accumulation dtype, four times that for a margin that keeps more per chunk (sub-centers, a
    non-target part, dense soft targets) — within :data:`KEEP_BYTES` (accelerators :data:`ACCELERATOR_KEEP_BYTES`).
    Never while ``torch.compile`` traces the kernel."""
    if torch.compiler.is_compiling():  # a traced kernel cannot hand its chunks from forward to backward
        return False
    budget = KEEP_BYTES if torch.device(device).type == "cpu" else ACCELERATOR_KEEP_BYTES
    per_logit = torch.finfo(acc_dtype(dtype)).bits // 8 * (1 if plain else 4)
    return batch * num_classes * num_sub_centers * per_logit <= budget


def default_chunk_size(batch: int, num_classes: int, num_sub_centers: int, device: Any = "cpu") -> int:
    """Classes per chunk: ``E // (N·K)`` with E = 2**18 on the CPU (1 MB of float32 logits per chunk) and 2**22 on an
    accelerator (CUDA and the others), at least 1, at most C."""
    elements = CHUNK_ELEMENTS if torch.device(device).type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    return max(1, min(num_classes, elements // max(1, batch * num_sub_centers)))


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
    x = (normalize(input) if normalized else input).reshape(-1, input.shape[-1])
    n, acc = x.shape[0], acc_dtype(input.dtype)
    if isinstance(targets, Tensor):
        targets = tensor_targets(targets, num_classes, acc)
    if margin.family.class_indices_only and (targets.weights is not None or targets.dense is not None):
        raise ValueError(
            f"{margin.family.label} needs class indices (an integer tensor of shape (*)), not soft targets"
        )
    params = tuple(flat_param(p, lead, num_classes, acc, x.device) for p in margin.params)
    if n == 0:  # an empty batch: empty per-sample losses (the mean is NaN, as F.cross_entropy's)
        losses = x.sum(-1).to(acc) + 0.0 * weight.sum()
    else:
        chunk = default_chunk_size(n, num_classes, num_sub_centers, x.device) if chunk_size is None else int(chunk_size)
        tau = float(pooling_temperature) if pooling == "soft" and num_sub_centers > 1 else None
        spec = Spec(margin.family, targets, int(num_sub_centers), chunk, tau, normalize_weight=normalized)
        spec.keep = keeps_logits(n, num_classes, num_sub_centers, spec.plain, input.dtype, x.device)
        value = prepare(spec, x, weight, params)
        losses, *_ = chunked_ce(x, weight, scale, value, spec, *params)
    losses = losses.to(input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32)
    if reduction == "none":
        return losses.reshape(lead)
    return losses.sum() if reduction == "sum" else losses.mean()
