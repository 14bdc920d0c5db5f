"""The dense path's autograd: the scale and the margin's target entries written in one pass over the logits.

A margin changes one logit per sample. Written with ``gather``/``scatter`` in plain autograd, that one change
costs several extra passes over the N×C logits (a copy for the scatter, a zero-filled N×C gradient for the
gather, an N×C sum of the two gradients). :class:`ScaledTargetReplace` instead fuses the scale and the
replacement: forward is ``scale * cosine`` (which the floor pays anyway) plus an in-place write of N numbers,
backward is ``scale * grad`` plus an in-place write of N numbers. The margin's derivative at the N target
cosines comes in as ``slope``, computed analytically by each margin (and checked against autograd in the tests).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from mll.functional._engine.numerics import DirectApply, Scale, in_place_ok


def _scatter(fresh: Tensor, index: Tensor, src: Tensor) -> Tensor:
    """Write ``src`` into a tensor this module just allocated, in place where :func:`in_place_ok`."""
    if in_place_ok():
        return fresh.scatter_(-1, index, src)
    return fresh.scatter(-1, index, src)


class ScaledTargetReplace(DirectApply, torch.autograd.Function):
    """``out = scale·cosine``, with ``out[..., y] = scale·value`` and ``∂out[..., y]/∂cosine[..., y] = scale·slope``.

    ``value`` must carry autograd only through quantities other than ``cosine`` (a margin tensor, say): the
    dependence of the target logit on ``cosine`` is supplied by ``slope``, which is treated as a constant.
    First derivatives are exact. A double backward (``create_graph=True``, a gradient penalty) runs but misses
    the margin's curvature ``d slope / d cosine`` at the N target entries; forward-mode AD (``jvp``,
    ``torch.func.hessian``) is not implemented. The dense path (one-hot soft targets) is exact to any order.
    Computing ``slope`` with autograd attached would make ``gather`` keep the whole N×C ``cosine`` alive until
    backward, which is the memory this path exists to save.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(cosine: Tensor, index: Tensor, value: Tensor, slope: Tensor, scale: Scale) -> Tensor:
        out = cosine * scale
        return _scatter(out, index, (value * scale).to(out.dtype))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        cosine, index, value, slope, scale = inputs
        scale_is_tensor = isinstance(scale, Tensor)
        ctx.scale_is_tensor = scale_is_tensor
        ctx.scale = None if scale_is_tensor else scale
        ctx.value_dtype = value.dtype
        ctx.scale_needs_grad = scale_is_tensor and ctx.needs_input_grad[4]
        saved = [index, slope, scale if scale_is_tensor else None]
        if ctx.scale_needs_grad:
            saved += [cosine, value]
        ctx.save_for_backward(*saved)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        index, slope, scale_t, *rest = ctx.saved_tensors
        scale = scale_t if ctx.scale_is_tensor else ctx.scale
        grad_cosine = grad_value = grad_scale = None
        g = grad * scale
        g_target = g.gather(-1, index)
        if ctx.needs_input_grad[2]:
            grad_value = g_target.to(ctx.value_dtype)
        if ctx.needs_input_grad[0]:
            grad_cosine = _scatter(g, index, (g_target * slope).to(g.dtype))
        if ctx.scale_needs_grad:
            cosine, value = rest
            if scale_t.dim() == 0:
                # d out / d scale is the unscaled output: cosine with the target entries replaced by value
                cos_target = cosine.gather(-1, index)
                grad_raw = grad.gather(-1, index)
                grad_scale = (grad * cosine).sum() + (grad_raw * (value.to(grad.dtype) - cos_target)).sum()
            else:
                unscaled = cosine.scatter(-1, index, value.to(cosine.dtype))
                grad_scale = (grad * unscaled).sum_to_size(scale_t.shape)
            grad_scale = grad_scale.to(scale_t.dtype)
        return grad_cosine, None, grad_value, None, grad_scale


def scaled_target_replace(cosine: Tensor, target: Tensor, value: Tensor, slope: Tensor, scale: Scale) -> Tensor:
    """Scale ``cosine`` and replace each sample's target logit by ``scale * value``.

    Args:
        cosine (Tensor[*, C]): cosines.
        target (Tensor[*], int64): class indices.
        value (Tensor[*]): new target cosines (any floating dtype; cast to ``cosine``'s).
        slope (Tensor[*]): derivative of ``value`` with respect to the target cosine.
        scale (float or Tensor): logit scale.
    """
    index = target.unsqueeze(-1)
    return ScaledTargetReplace.apply(cosine, index, value.unsqueeze(-1), slope.unsqueeze(-1), scale)


def gather_target(cosine: Tensor, target: Tensor) -> Tensor:
    """The N target cosines, detached: their gradient is routed through ``slope``, not through ``gather``."""
    return cosine.detach().gather(-1, target.unsqueeze(-1)).squeeze(-1)


class ScaledDense(DirectApply, torch.autograd.Function):
    """``out = scale·value`` with ``∂out/∂cosine = scale·slope`` elementwise: the dense (soft-target) twin.

    The margin's value and slope are computed once without autograd; backward is one product. ``value`` may
    carry autograd through quantities other than ``cosine`` (soft targets that require grad).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(cosine: Tensor, value: Tensor, slope: Tensor, scale: Scale) -> Tensor:
        return (value * scale).to(cosine.dtype)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        cosine, value, slope, scale = inputs
        ctx.scale_is_tensor = isinstance(scale, Tensor)
        ctx.scale = None if ctx.scale_is_tensor else scale
        ctx.dtypes = (cosine.dtype, value.dtype)
        ctx.scale_needs_grad = ctx.scale_is_tensor and ctx.needs_input_grad[3]
        ctx.save_for_backward(slope, scale if ctx.scale_is_tensor else None, value if ctx.scale_needs_grad else None)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        slope, scale_t, value = ctx.saved_tensors
        scale = scale_t if ctx.scale_is_tensor else ctx.scale
        grad_cosine = grad_value = grad_scale = None
        g = grad.to(slope.dtype) * scale
        if ctx.needs_input_grad[1]:
            grad_value = g.to(ctx.dtypes[1])
        if ctx.needs_input_grad[0]:
            in_place = in_place_ok() and grad_value is None  # g is also grad_value's storage otherwise
            grad_cosine = (g.mul_(slope) if in_place else g * slope).to(ctx.dtypes[0])
        if ctx.scale_needs_grad:
            grad_scale = (grad.to(value.dtype) * value).sum_to_size(scale_t.shape).to(scale_t.dtype)
        return grad_cosine, grad_value, None, grad_scale


def scaled_dense_replace(cosine: Tensor, value: Tensor, slope: Tensor, scale: Scale) -> Tensor:
    """``scale·value`` in ``cosine``'s dtype, differentiated with respect to ``cosine`` through ``slope``."""
    return ScaledDense.apply(cosine, value, slope, scale)


class ScaledNegativesReplace(DirectApply, torch.autograd.Function):
    """``out = scale·neg_value`` with ``out[..., y] = scale·value``; ``∂out/∂cosine = scale·neg_slope`` off target and
    ``scale·slope`` at the target. The non-target values and slopes come in computed (no autograd); ``value`` may
    carry autograd through quantities other than ``cosine``. One N×C slope is kept for backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(
        cosine: Tensor, index: Tensor, neg_value: Tensor, neg_slope: Tensor, value: Tensor, slope: Tensor, scale: Scale
    ) -> Tensor:
        owned = in_place_ok() and neg_value.dtype == cosine.dtype and neg_value.is_contiguous()
        if owned and not (isinstance(scale, Tensor) and (scale.requires_grad or scale.dim() > 0)):
            out = neg_value.mul_(scale)  # computed for this call (no graph): its N×C buffer becomes the output
        else:
            out = (neg_value * scale).to(cosine.dtype)
        return _scatter(out, index, (value * scale).to(out.dtype))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        cosine, index, neg_value, neg_slope, value, slope, scale = inputs
        ctx.scale_is_tensor = isinstance(scale, Tensor)
        ctx.scale = None if ctx.scale_is_tensor else scale
        ctx.scale_needs_grad = ctx.scale_is_tensor and ctx.needs_input_grad[6]
        ctx.dtypes = (cosine.dtype, value.dtype)
        ctx.save_for_backward(
            index, neg_slope, slope, scale if ctx.scale_is_tensor else None,
            neg_value if ctx.scale_needs_grad else None, value if ctx.scale_needs_grad else None,
        )  # fmt: skip

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        index, neg_slope, slope, scale_t, neg_value, value = ctx.saved_tensors
        scale = scale_t if ctx.scale_is_tensor else ctx.scale
        grad_cosine = grad_value = grad_scale = None
        g_target = grad.gather(-1, index).to(neg_slope.dtype) * scale  # (a one-element scale, check_scale's contract)
        if ctx.needs_input_grad[4]:
            grad_value = g_target.to(ctx.dtypes[1])
        if ctx.needs_input_grad[0]:
            # one fresh N×C buffer beside the incoming gradient and the kept slopes (not two: scale, then slope)
            g = grad.to(neg_slope.dtype) * neg_slope
            g = g.mul_(scale) if in_place_ok() else g * scale
            grad_cosine = _scatter(g, index, g_target * slope).to(ctx.dtypes[0])
        if ctx.scale_needs_grad:
            unscaled = neg_value.scatter(-1, index, value.to(neg_value.dtype))
            grad_scale = (grad.to(unscaled.dtype) * unscaled).sum_to_size(scale_t.shape).to(scale_t.dtype)
        return grad_cosine, None, None, None, grad_value, None, grad_scale


def scaled_negatives_replace(
    cosine: Tensor, target: Tensor, neg_value: Tensor, neg_slope: Tensor, value: Tensor, slope: Tensor, scale: Scale
) -> Tensor:
    """``scale·neg_value`` with each sample's target logit replaced by ``scale·value`` (see the Function)."""
    index = target.unsqueeze(-1)
    return ScaledNegativesReplace.apply(
        cosine, index, neg_value, neg_slope, value.unsqueeze(-1), slope.unsqueeze(-1), scale
    )
