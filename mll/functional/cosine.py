"""Normalisation and cosine logits."""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mll.functional._checks import UNSET, check_features, check_positive, renamed
from mll.functional._fold import fold_normalization_
from mll.functional._target import _in_place_ok

__all__ = ["cosine_logits", "normalize"]

_HALF = (torch.float16, torch.bfloat16)
_EPS = 1e-12  # F.normalize's ε, for float32 and float64

Pooling = Literal["max", "soft"]


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
    if input.dtype in _HALF:
        eps = 2.0**-10 if input.dtype == torch.float16 else 1e-12
        return F.normalize(input.float(), dim=-1, eps=eps).to(input.dtype)
    return F.normalize(input, dim=-1, eps=1e-12)


def cosine_logits(
    input: Tensor,
    weight: Tensor,
    num_sub_centers: int = 1,
    *,
    pooling: Pooling = "max",
    pooling_temperature: float = 0.1,
    weight_name: str = "weight",
    temperature: float = UNSET,
) -> Tensor:
    r"""Cosine similarity between features and class weights, pooled over sub-centers.

    .. math:: \cos\theta_{ij} = \max_{k < K} \langle \hat x_i, \hat w_{jK + k} \rangle
              \quad\text{or}\quad
              \sum_{k < K} \operatorname{softmax}_k\!\Big(\frac{c_{ijk}}{\gamma}\Big)\, c_{ijk},
              \quad c_{ijk} = \langle \hat x_i, \hat w_{jK + k} \rangle

    One GEMM on the L2-normalised operands (see :func:`normalize`). With ``num_sub_centers = K > 1`` row
    ``c*K + k`` of ``weight`` is sub-center ``k`` of class ``c`` (the 0.1.6 layout). ``pooling="max"`` keeps each
    class's most similar sub-center, as in "Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy Web
    Faces" (Deng et al., ECCV 2020); ``pooling="soft"`` weighs the sub-centers by a softmax of their cosines with
    temperature γ, as in "SoftTriple Loss: Deep Metric Learning Without Triplet Sampling" (Qian et al., ICCV 2019,
    https://arxiv.org/abs/1909.05235, Eq. 8; γ = 0.1 there): every sub-center gets a gradient, and γ → 0 recovers
    max pooling.

    The result is not clamped: rounding can put it a few ulps outside ``[-1, 1]``; the margin functions are
    written to be finite there.

    Args:
        input (Tensor[*, d]): features; any number of leading dimensions.
        weight (Tensor[C*K, d]): class weights (prototypes).
        num_sub_centers (int): ``K``, sub-centers per class.
        pooling (str): ``"max"`` or ``"soft"``, how sub-centers pool (ignored for ``K = 1``).
        pooling_temperature (float): γ > 0 of soft pooling (``temperature`` before 0.2, deprecated).
        weight_name (str): what to call ``weight`` in error messages.

    Returns:
        Tensor[*, C] of cosines in the GEMM's dtype.
    """
    pooling_temperature = renamed(pooling_temperature, temperature, "temperature", "pooling_temperature")
    check_features(input, weight, num_sub_centers, weight_name=weight_name)
    check_pooling(pooling, pooling_temperature)
    cosine = _cosines(normalize(input), weight)
    if num_sub_centers > 1:
        cosine = pool_sub_centers(cosine.unflatten(-1, (-1, num_sub_centers)), pooling, pooling_temperature)
    return cosine


def _cosines(x_hat: Tensor, weight: Tensor) -> Tensor:
    """``x̂ · ŵ_jᵀ`` for every row of ``weight``: for float32/float64 weights that need a gradient, without a
    normalised copy of the weights (see :class:`_FoldedCosine`); otherwise (half precision, autocast, a buffer)
    ``F.linear(x̂, normalize(W))``."""
    if (
        x_hat.dtype in _HALF
        or not weight.requires_grad  # (a buffer, such as DeepNCM's means, may change in place before backward)
        or weight.dtype != x_hat.dtype
        or weight.dim() != 2
        or torch.is_autocast_enabled(x_hat.device.type)
    ):
        return F.linear(x_hat, normalize(weight))
    cosine, _ = _FoldedCosine.apply(x_hat.reshape(-1, x_hat.shape[-1]), weight)
    return cosine.reshape(*x_hat.shape[:-1], weight.shape[0])


class _FoldedCosine(torch.autograd.Function):
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
        inv = norms.clamp(min=_EPS).reciprocal()
        if _in_place_ok():  # the GEMM's fresh output, scaled where it lies
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
        inv = norms.clamp(min=_EPS).reciprocal()
        g = grad * inv
        grad_x = g @ weight if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:
            d = g.transpose(-2, -1) @ x_hat
            if _in_place_ok() and not torch.compiler.is_compiling():  # eager first derivatives: in place, by blocks
                return grad_x, fold_normalization_(d, weight, inv, norms > _EPS)
            radial = torch.linalg.vecdot(weight, d)
            coef = torch.where(norms > _EPS, -radial * inv * inv, 0.0)
            grad_w = d + weight * coef.unsqueeze(-1)
        return grad_x, grad_w


def pool_sub_centers(cosine: Tensor, pooling: Pooling, temperature: float) -> Tensor:
    """Pool ``(*, C, K)`` sub-center cosines to ``(*, C)`` (softmax weights in float32 for half precision)."""
    if pooling == "max":
        return cosine.amax(dim=-1)
    weights = torch.softmax(cosine.to(_work(cosine.dtype)) / temperature, dim=-1)
    return (weights * cosine).sum(dim=-1).to(cosine.dtype)


def check_pooling(pooling: object, pooling_temperature: object) -> None:
    if pooling not in ("max", "soft"):
        raise ValueError(f"pooling must be 'max' or 'soft', but got {pooling!r}")
    check_positive(pooling_temperature, "pooling_temperature")


def _work(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype
