"""L2 normalisation: the forward, the ε per dtype, and its backward folded into a weight gradient in place.

:func:`normalize` is what every path normalises with (features and class weights). The class weights are never
normalised into a copy on the engine's paths: a GEMM runs on the raw rows and each output column is scaled by
``inv = 1 / max(‖w‖, ε)`` (:class:`FoldedCosine` on the dense path, the chunk kernel per chunk). Backward then needs
the normalisation's Jacobian applied to a gradient ``D`` with respect to the raw rows: ``D − w·inv²·(w·D)`` (where
‖w‖ ≤ ε the normalisation is w/ε, linear, and D alone is the gradient). Written out of place that is four C×d passes
and two fresh C×d buffers — more memory traffic than a cosine head's N×C passes when d > N. :func:`fold_normalization_`
does it block by block of rows, each block's dot products and update while the block is in cache, into ``D`` itself:
one read of w and D, one write of D.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mll.functional._engine.numerics import DirectApply, autocast_enabled, in_place_ok, weight_eps

#: F.normalize's ε for float32 and float64
EPS = 1e-12

#: weights of at most this many elements are normalised into a copy instead (a C×d copy of 256 KB costs less than
#: the fold's Python backward: 1.5× slower at C·d = 192, 1.0–1.2× at 51,200, 0.8× from 128,000 on, N = 64–256)
FOLD_MIN_ELEMENTS = 1 << 16

#: elements per block of rows (2 MB of float32): a block of w, of D and the products stay in cache
BLOCK_ELEMENTS = 1 << 19


def fold_normalization_(grad: Tensor, rows: Tensor, inv: Tensor, radial: Tensor) -> Tensor:
    """``grad ← grad − rows·inv²·(rows·grad)`` on the rows where ``radial``, in place; returns ``grad``.

    Args:
        grad (Tensor[R, d]): the gradient with respect to the raw rows (a tensor the caller owns).
        rows (Tensor[R, d]): the raw rows, ``grad``'s dtype.
        inv (Tensor[R]): ``1 / max(‖w‖, ε)``.
        radial (Tensor[R], bool): the rows with ‖w‖ > ε.
    """
    count, width = rows.shape
    if count == 0:
        return grad
    block = max(1, min(count, BLOCK_ELEMENTS // max(width, 1)))
    products = grad.new_empty(block, width)
    dots = grad.new_empty(block)
    for start in range(0, count, block):
        stop = min(start + block, count)
        size = stop - start
        w, d, p, r = rows[start:stop], grad[start:stop], products[:size], dots[:size]
        torch.sum(torch.mul(w, d, out=p), 1, out=r)
        i = inv[start:stop]
        coef = torch.where(radial[start:stop], r.mul_(i).mul_(i).neg_(), 0.0)
        d.addcmul_(w, coef.unsqueeze(1))
    return grad


def normalize(input: Tensor) -> Tensor:
    r"""L2-normalise the last dimension, mapping zero vectors to zero vectors.

    .. math:: \hat x = x / \max(\lVert x \rVert_2, \varepsilon)

    Float32 and float64 use :func:`torch.nn.functional.normalize` unchanged (``eps=1e-12``), so results match
    the ``F.normalize`` floor exactly. Half-precision inputs are normalised in float32 and cast back: the norm
    of a float16 vector overflows past 256 per component, and ``1e-12`` underflows to 0 in float16 (0/0 = NaN for a
    zero vector). For float16 the ε is ``2**-10`` so that the gradient at a zero vector (``1/ε`` times the
    upstream gradient) stays representable.

    Args:
        input (Tensor[*, d]): vectors to normalise.

    Returns:
        Tensor[*, d] of the same dtype: unit norm along the last dimension for norms above ε (float16: vectors
        shorter than ``2**-10`` come out shorter than 1), zero for zero vectors.
    """
    if input.dtype in (torch.float16, torch.bfloat16):
        return F.normalize(input.float(), dim=-1, eps=weight_eps(input.dtype)).to(input.dtype)
    return F.normalize(input, dim=-1, eps=weight_eps(input.dtype))


def folded_cosines(x_hat: Tensor, weight: Tensor) -> Tensor:
    """``x̂ · ŵ_jᵀ`` for every row of ``weight``: for float32/float64 weights that need a gradient, without a
    normalised copy of the weights (see :class:`FoldedCosine`); otherwise (half precision, autocast, a buffer, a
    weight of at most :data:`FOLD_MIN_ELEMENTS` elements) ``F.linear(x̂, normalize(W))``."""
    if (
        x_hat.dtype in (torch.float16, torch.bfloat16)
        or not weight.requires_grad  # (a buffer, such as DeepNCM's means, may change in place before backward)
        or weight.dtype != x_hat.dtype
        or weight.dim() != 2
        or weight.numel() <= FOLD_MIN_ELEMENTS
        or autocast_enabled(x_hat.device)
    ):
        return F.linear(x_hat, normalize(weight))
    cosine, _ = FoldedCosine.apply(x_hat.reshape(-1, x_hat.shape[-1]), weight)
    return cosine.reshape(*x_hat.shape[:-1], weight.shape[0])


class FoldedCosine(DirectApply, torch.autograd.Function):
    r"""``cos = (x̂ Wᵀ) · diag(1 / max(‖w_j‖, ε))``: the cosines with each row's normalisation folded into the GEMM's
    output columns, an N×C pass instead of a C×d normalised copy of W that autograd would keep for backward.

    Backward, with G = ∂L/∂cos · diag(inv): ∂L/∂x̂ = G W, and for each row (ŵ = w·inv, as
    :func:`torch.nn.functional.normalize`'s backward) ∂L/∂w = inv·(dŵ − ŵ(ŵ·dŵ)) = D − w·inv²·(w·D) with D = Gᵀx̂;
    where ‖w‖ ≤ ε the normalisation is w/ε and D alone. The backward is written in differentiable ops (double
    backward, ``torch.func``) and, for eager first derivatives, in place (:func:`fold_normalization_`); returns
    ``(cos, ‖w‖)`` so that the norms can be saved under ``torch.func`` transforms.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x_hat: Tensor, weight: Tensor) -> tuple[Tensor, Tensor]:
        norms = torch.linalg.vector_norm(weight, dim=-1)
        inv = norms.clamp(min=EPS).reciprocal()
        if in_place_ok():  # the GEMM's fresh output, scaled where it lies
            return F.linear(x_hat, weight).mul_(inv), norms
        return F.linear(x_hat, weight) * inv, norms

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, Tensor], output: tuple[Tensor, Tensor]) -> None:
        x_hat, weight = inputs
        ctx.save_for_backward(x_hat, weight, output[1])
        ctx.mark_non_differentiable(output[1])

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_inv: Any) -> tuple[Optional[Tensor], Optional[Tensor]]:
        x_hat, weight, norms = ctx.saved_tensors
        inv = norms.clamp(min=EPS).reciprocal()
        g = grad * inv
        grad_x = g @ weight if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            d = g.transpose(-2, -1) @ x_hat
            if in_place_ok() and not torch.compiler.is_compiling():  # eager first derivatives: in place, by blocks
                return grad_x, fold_normalization_(d, weight, inv, norms > EPS)
            radial = torch.linalg.vecdot(weight, d)
            coef = torch.where(norms > EPS, -radial * inv * inv, 0.0)
            grad_w = d + weight * coef.unsqueeze(-1)
        return grad_x, grad_w
