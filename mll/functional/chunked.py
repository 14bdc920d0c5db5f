"""Margin cross-entropy over class chunks: the N×C logits never exist at once.

Forward walks the classes in chunks, normalising each weight chunk on the fly, applying the margin to the targets
that fall in the chunk, and keeping an online log-sum-exp (running max and rescaled sum) per sample. It saves only
O(N) statistics. Backward walks the chunks again, recomputes each chunk's logits, and writes the chunk's slice of
the weight gradient and adds its share of the feature gradient. Peak extra memory is O(N·chunk·K + chunk·K·d)
instead of the dense path's several N×C buffers and the normalised copy of W.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mll.functional._checks import check_features, check_margin_param, check_scale, check_target, is_soft
from mll.functional._target import Scale
from mll.functional.cosine import Pooling, check_pooling, normalize
from mll.functional.margins import (
    ARC_MARGIN_RANGE,
    COS_MARGIN_RANGE,
    MarginParam,
    ValueAndSlope,
    _arc_fn,
    _at_target,
    _cos_fn,
    _param,
)

__all__ = ["margin_cross_entropy"]

MarginType = Literal["cos", "arc", "none"]
Reduction = Literal["mean", "sum", "none"]

#: the default chunk keeps one chunk's N×chunk·K float32 logits near this many elements (1 MB): small enough that
#: a chunk's few buffers stay a few percent of the dense path's memory from C = 10^5, large enough (1024 classes at
#: N = 256) that each chunk is still an efficient GEMM and the Python loop over chunks costs little
CHUNK_ELEMENTS = 1 << 18


def default_chunk_size(batch: int, num_classes: int, num_sub_centers: int) -> int:
    """Classes per chunk: ``2**18 // (N·K)`` (1 MB of float32 logits per chunk), at least 1, at most C."""
    return max(1, min(num_classes, CHUNK_ELEMENTS // max(1, batch * num_sub_centers)))


def _flat_param(param: Tensor, lead: torch.Size, num_classes: int) -> Tensor:
    """A margin parameter that broadcasts to ``(*lead, C)``, on the flattened samples: 0-dim, ``(C,)``, ``(N, 1)``
    or ``(N, C)``."""
    if param.dim() <= 1:
        return param
    return param.expand(*lead, param.shape[-1]).reshape(-1, param.shape[-1])


def _chunk_params(params: tuple[Tensor, ...], start: int, stop: int) -> list[Tensor]:
    """Each parameter's columns for classes [start, stop) (per-sample and scalar parameters as they are)."""
    return [p if p.dim() == 0 or p.shape[-1] == 1 else p[..., start:stop] for p in params]


class _ChunkedMarginCE(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor,
        target: Tensor,
        scale: Scale,
        fn: ValueAndSlope,
        params: tuple[Tensor, ...],
        num_sub_centers: int,
        chunk: int,
        tau: Optional[float],
    ) -> Tensor:
        n, k = x.shape[0], num_sub_centers
        num_classes = weight.shape[0] // k
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32  # softmax statistics
        s = scale.detach().to(acc) if isinstance(scale, Tensor) else scale
        soft = is_soft(target)
        running_max = torch.full((n,), -math.inf, dtype=acc, device=x.device)
        running_sum = torch.zeros(n, dtype=acc, device=x.device)
        target_logit = torch.zeros(n, dtype=acc, device=x.device)  # Σ_j t_ij z_ij (one-hot: z_iy)
        for start in range(0, num_classes, chunk):
            stop = min(start + chunk, num_classes)
            z, _, _ = _chunk_logits(x, weight, target, soft, start, stop, k, s, fn, params, acc, tau=tau)
            if soft:
                target_logit += (target[:, start:stop].to(acc) * z).sum(1)
            else:
                local = target - start
                inside = (local >= 0) & (local < stop - start)
                picked = z.gather(1, local.clamp(0, stop - start - 1).unsqueeze(1)).squeeze(1)
                target_logit = torch.where(inside, picked, target_logit)
            new_max = torch.maximum(running_max, z.amax(1))
            running_sum = running_sum * torch.exp(running_max - new_max) + torch.exp(z - new_max[:, None]).sum(1)
            running_max = new_max
        lse = running_max + torch.log(running_sum)
        if soft:
            lse = lse * target.to(acc).sum(1)  # −Σ_j t_j log p_j = (Σ_j t_j)·lse − Σ_j t_j z_j
        ctx.save_for_backward(x, weight, target, running_max + torch.log(running_sum))
        ctx.scale, ctx.scale_is_tensor = scale, isinstance(scale, Tensor)
        ctx.fn, ctx.params, ctx.k, ctx.chunk, ctx.acc = fn, params, k, chunk, acc
        ctx.tau = tau
        return (lse - target_logit).to(x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        x, weight, target, lse = ctx.saved_tensors
        k, chunk, acc = ctx.k, ctx.chunk, ctx.acc
        scale = ctx.scale
        s = scale.detach().to(acc) if ctx.scale_is_tensor else scale
        soft = is_soft(target)
        n, num_classes = x.shape[0], weight.shape[0] // k
        g = grad.to(acc)
        grad_x = torch.zeros(x.shape, dtype=acc, device=x.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if ctx.needs_input_grad[1] else None
        grad_s = (
            torch.zeros((), dtype=acc, device=x.device) if ctx.scale_is_tensor and ctx.needs_input_grad[3] else None
        )
        weight_sum = target.to(acc).sum(1) if soft else torch.ones(n, dtype=acc, device=x.device)
        for start in range(0, num_classes, chunk):
            stop = min(start + chunk, num_classes)
            z, slope, (w_hat, norms, cos_k, pooled) = _chunk_logits(
                x, weight, target, soft, start, stop, k, s, ctx.fn, ctx.params, acc, keep=True, tau=ctx.tau
            )
            p = torch.exp_(z - lse[:, None])
            if soft:
                dz = p * weight_sum[:, None] - target[:, start:stop].to(acc)
            else:
                dz = p
                local = target - start
                inside = ((local >= 0) & (local < stop - start)).to(acc)
                dz.scatter_add_(1, local.clamp(0, stop - start - 1).unsqueeze(1), -inside.unsqueeze(1))
            dz *= g[:, None]
            if grad_s is not None:
                grad_s += (dz * z).sum() / s
            if soft:
                dcos = dz.mul_(slope).mul_(s)
            else:
                dcos = dz.mul_(s)
                target_index = (target - start).clamp(0, stop - start - 1).unsqueeze(1)
                dcos.scatter_(1, target_index, dcos.gather(1, target_index) * slope.unsqueeze(1))
            if k > 1 and ctx.tau is None:  # max-pool: split among ties as amax does
                view = cos_k.view(n, stop - start, k)
                winners = (view == pooled.unsqueeze(-1)).to(acc)
                dcos = (winners * (dcos / winners.sum(-1)).unsqueeze(-1)).view(n, -1)
            elif k > 1:  # soft pooling S = Σ p_k c_k: ∂S/∂c_k = p_k·(1 + (c_k − S)/τ)
                view = cos_k.view(n, stop - start, k)
                p_k = torch.softmax(view / ctx.tau, dim=-1)
                dcos = (dcos.unsqueeze(-1) * p_k * (1 + (view - pooled.unsqueeze(-1)) / ctx.tau)).view(n, -1)
            rows = slice(start * k, stop * k)
            if grad_x is not None:
                grad_x += dcos @ w_hat.to(acc)
            if grad_w is not None:
                d_hat = dcos.T @ x.to(acc)
                # backward of w / max(‖w‖, ε): project out the radial part where the norm is above ε
                w_acc = w_hat.to(acc)
                radial = (w_acc * d_hat).sum(1, keepdim=True)
                grad_w[rows] = torch.where(norms > _eps(weight.dtype), d_hat - w_acc * radial, d_hat) / norms.clamp(
                    min=_eps(weight.dtype)
                )
        return (
            None if grad_x is None else grad_x.to(x.dtype),
            None if grad_w is None else grad_w.to(weight.dtype),
            None,
            None if grad_s is None else grad_s.to(scale.dtype),
            None,
            None,
            None,
            None,
            None,
        )


def _eps(dtype: torch.dtype) -> float:
    return 2.0**-10 if dtype == torch.float16 else 1e-12


def _chunk_logits(
    x: Tensor,
    weight: Tensor,
    target: Tensor,
    soft: bool,
    start: int,
    stop: int,
    k: int,
    s: Any,
    fn: ValueAndSlope,
    params: tuple[Tensor, ...],
    acc: torch.dtype,
    keep: bool = False,
    tau: Optional[float] = None,
) -> tuple[Tensor, Tensor, Any]:
    """Scaled margin logits of classes [start, stop) in the accumulation dtype, their slope ∂z/(s·∂cos) (N×chunk
    for soft targets; for class indices N numbers, the slope at each row's target entry, 1 elsewhere), and (with
    ``keep``) what backward needs: normalised weight rows, their norms, sub-center cosines, pooled cosines."""
    rows = weight[start * k : stop * k]
    norms = rows.detach().to(acc).norm(dim=1, keepdim=True)
    w_hat = normalize(rows.detach())
    cos_k = F.linear(x, w_hat).to(acc)
    if k == 1:
        pooled = cos_k
    elif tau is None:
        pooled = cos_k.view(x.shape[0], stop - start, k).amax(-1)
    else:
        view = cos_k.view(x.shape[0], stop - start, k)
        pooled = (torch.softmax(view / tau, dim=-1) * view).sum(-1)
    width = stop - start
    if soft:
        value, slope = fn(pooled, target[:, start:stop].to(acc), *_chunk_params(params, start, stop))
        return value * s, slope, (w_hat, norms, cos_k, pooled) if keep else None
    # class indices: the margin touches at most one entry per row; its slope comes back as N numbers
    local = target - start
    inside = (local >= 0) & (local < width)
    index = local.clamp(0, width - 1).unsqueeze(1)
    t = pooled.gather(1, index).squeeze(1)
    shape = torch.Size((x.shape[0], -1))
    v, sl = fn(t, 1.0, *(_at_target(p, shape, target) for p in params))
    z = pooled * s
    z.scatter_(1, index, (torch.where(inside, v, t) * s).unsqueeze(1))
    return z, torch.where(inside, sl, torch.ones_like(sl)), (w_hat, norms, cos_k, pooled) if keep else None


def margin_cross_entropy(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    scale: Scale,
    margin: float | Tensor = 0.0,
    margin_type: MarginType = "cos",
    easy_margin: bool = False,
    num_sub_centers: int = 1,
    pooling: Pooling = "max",
    temperature: float = 0.1,
    chunk_size: Optional[int] = None,
    reduction: Reduction = "mean",
) -> Tensor:
    r"""Cross-entropy of a margin head, computed over class chunks without the N×C logits.

    Equals ``F.cross_entropy(ψ, target, reduction=...)`` with ψ the head's logits —
    ``cos_margin(cosine_logits(input, weight, K), target, m, scale=s)`` for ``margin_type="cos"``,
    :func:`arc_margin` for ``"arc"``, plain ``s·cos θ`` for ``"none"`` — with the exact gradient (no
    straight-through shortcut) for the features, the weights and a tensor scale. Softmax statistics accumulate in
    float32 for float16/bfloat16 inputs (float64 for float64).

    Memory: the dense path keeps several N×C buffers (logits, log-probabilities, their gradients) and a C·K×d
    normalised copy of the weights; this one keeps O(N) statistics between forward and backward and one chunk of
    N×chunk·K logits plus chunk·K×d normalised weights at a time (see the docs for the formulas).

    Args:
        input (Tensor[*, d]): features.
        weight (Tensor[C*K, d]): class weights.
        target (Tensor[*] of int or Tensor[*, C] of float): class indices or soft targets.
        scale (float or Tensor): ``s``.
        margin (float or Tensor): ``m`` (ignored for ``"none"``); a tensor of shape ``(C,)`` gives one per class.
        margin_type (str): ``"cos"`` (CosFace), ``"arc"`` (ArcFace) or ``"none"``.
        easy_margin (bool): ArcFace's easy margin.
        num_sub_centers (int): ``K``.
        pooling (str): ``"max"`` or ``"soft"`` sub-center pooling (see :func:`cosine_logits`).
        temperature (float): γ of soft pooling.
        chunk_size (int, optional): classes per chunk; default ``2**18 // (N·K)`` (1 MB of logits per chunk).
        reduction (str): ``"mean"``, ``"sum"`` or ``"none"`` (shape ``(*)``).

    Returns:
        Tensor: the loss, float32 for half-precision inputs.
    """
    check_features(input, weight, num_sub_centers)
    check_pooling(pooling, temperature)
    check_scale(scale)
    num_classes = weight.shape[0] // num_sub_centers
    if margin_type == "cos":
        check_margin_param(margin, *COS_MARGIN_RANGE, "CosFace", torch.Size((num_classes,)))
        fn: ValueAndSlope = _cos_fn
    elif margin_type == "arc":
        check_margin_param(margin, *ARC_MARGIN_RANGE, "ArcFace", torch.Size((num_classes,)))
        fn = _arc_fn(easy_margin)
    elif margin_type == "none":
        margin, fn = 0.0, _cos_fn
    else:
        raise ValueError(f"margin_type must be 'cos', 'arc' or 'none', but got {margin_type!r}")
    return chunked_margin_loss(
        input, weight, target, scale, fn, (margin,), num_sub_centers=num_sub_centers, pooling=pooling,
        temperature=temperature, chunk_size=chunk_size, reduction=reduction,
    )  # fmt: skip


def chunked_margin_loss(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    scale: Scale,
    fn: ValueAndSlope,
    params: Sequence[MarginParam],
    *,
    num_sub_centers: int = 1,
    pooling: Pooling = "max",
    temperature: float = 0.1,
    chunk_size: Optional[int] = None,
    reduction: Reduction = "mean",
) -> Tensor:
    """:func:`margin_cross_entropy` for any target-only margin ``fn(cos, w, *params)`` of
    :mod:`mll.functional.margins` (the heads' ``loss()`` use it); ``params`` must not require grad."""
    check_features(input, weight, num_sub_centers)
    check_pooling(pooling, temperature)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', but got {reduction!r}")
    num_classes = weight.shape[0] // num_sub_centers
    lead = input.shape[:-1]
    target = check_target(target, torch.Size((*lead, num_classes)))
    x = normalize(input).reshape(-1, input.shape[-1])
    flat_target = target.reshape(-1, num_classes) if is_soft(target) else target.reshape(-1)
    if chunk_size is None:
        chunk_size = default_chunk_size(x.shape[0], num_classes, num_sub_centers)
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be an integer >= 1, but got {chunk_size!r}")
    if target.requires_grad:
        raise ValueError(
            "margin_cross_entropy does not differentiate soft targets: detach target, or use the dense path "
            "F.cross_entropy(head(input, target), target)"
        )
    if any(isinstance(p, Tensor) and p.requires_grad for p in params):
        raise ValueError(
            "the chunked loss does not differentiate margins: detach them, or use the dense path "
            "F.cross_entropy(head(input, target), target)"
        )
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    flat = tuple(_flat_param(_param(p, acc, x.device).detach(), lead, num_classes) for p in params)
    if x.shape[0] == 0:  # an empty batch: empty per-sample losses (the mean is NaN, as F.cross_entropy's)
        losses = x.sum(-1) + 0.0 * weight.sum()
    else:
        tau = float(temperature) if pooling == "soft" else None
        losses = _ChunkedMarginCE.apply(x, weight, flat_target, scale, fn, flat, num_sub_centers, chunk_size, tau)
    if reduction == "none":
        return losses.reshape(lead)
    return losses.sum() if reduction == "sum" else losses.mean()
