r"""SoftTriple: K centres per class, soft-pooled similarities, a small margin, and a regulariser that merges centres.

"SoftTriple Loss: Deep Metric Learning Without Triplet Sampling" (Qian, Shang, Sun, Hu, Li & Jin, ICCV 2019,
https://arxiv.org/abs/1909.05235). The logits are the engine's: soft sub-center pooling of the K centres of each
class (the relaxed similarity :math:`S'_{i,c} = \sum_k \operatorname{softmax}_k(x_i^\top w_c^k/\gamma)\,x_i^\top
w_c^k`, ``pooling="soft"`` with ``pooling_temperature`` γ) with CosFace's margin δ on the target and the scale λ.
What SoftTriple adds is the centre regulariser here: for each class the sum of the distances between its unit-norm
centres,

.. math:: R_j = \sum_{t < t'} \lVert w_j^t - w_j^{t'} \rVert_2 = \sum_{t < t'} \sqrt{2 - 2\,w_j^{t\top} w_j^{t'}},
          \qquad \text{added to the loss as } \frac{\tau \sum_j R_j}{C K (K - 1)},

an L2,1-norm-like penalty that pulls similar centres of a class together until they coincide: set K large and the
regulariser chooses how many distinct centres a class keeps (the paper's "adaptive number of centers"). Identical
centres are a kink of the distance, so the square root is taken of ``2 + ε − 2 w^t·w^{t'}`` (ε = 1e-5, the authors'
code), which keeps values and gradients finite there.

The regulariser is a sum over classes of per-class terms, so it chunks and shards trivially: each chunk (or rank)
computes its own classes' terms from its own rows, and the terms add up. :func:`soft_triple_regularizer` walks the
classes in chunks, forward and backward, without a normalised copy of the C·K×d weights.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mll.functional._engine.checks import check_floating, check_num_sub_centers, check_positive, is_int, shape_str
from mll.functional._engine.chunks import chunk_bounds
from mll.functional._engine.numerics import DirectApply, acc_dtype, autocast_enabled, autocast_off, weight_eps
from mll.functional._engine.numerics import double_backward as _double_backward

__all__ = ["soft_triple_distinct_centers", "soft_triple_regularizer"]

#: the ε under the square root of the centre distances (the authors' code: 1e-5)
SOFT_TRIPLE_EPS = 1e-5
#: classes per chunk of the regulariser: a chunk's K×K Gram matrices and K×d normalised rows
CHUNK_ROWS = 1 << 16


def _check_weight(weight: object, num_sub_centers: object) -> tuple[Tensor, int]:
    check_floating(weight, "weight")
    assert isinstance(weight, Tensor)
    check_num_sub_centers(num_sub_centers)
    k = int(num_sub_centers)  # type: ignore[call-overload]
    if weight.dim() != 2 or weight.shape[0] % k != 0:
        raise ValueError(
            f"weight must have shape (num_classes * num_sub_centers, d) with num_sub_centers={k}, but got "
            f"{shape_str(weight.shape)}"
        )
    return weight, k


def _distances(rows: Tensor, k: int, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """A chunk's centres ``(B·K, d)``: normalised ``(B, K, d)``, norms ``(B, K, 1)``, and ``sqrt(2 + ε − 2 ŵ·ŵ')``
    ``(B, K, K)``, in the accumulation dtype. The radicand is floored at ε (which it is up to rounding) with the
    unfloored root's derivative where autograd follows it, as the chunked backward does."""
    acc = acc_dtype(rows.dtype)
    w = rows.to(acc).reshape(-1, k, rows.shape[-1])
    norms = w.norm(dim=-1, keepdim=True)
    w_hat = w / norms.clamp(min=weight_eps(rows.dtype))
    gram = torch.bmm(w_hat, w_hat.transpose(1, 2))
    radicand = 2 + eps - 2 * gram
    return w_hat, norms, gram, (radicand + (radicand.clamp(min=eps) - radicand).detach()).sqrt()


def _pair_sums(dist: Tensor) -> Tensor:
    """Each class's ``Σ_{t<t'} D_{tt'}`` from its ``(B, K, K)`` distances."""
    return dist.triu(1).sum((1, 2))


def _lean_distances(rows: Tensor, k: int, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`_distances`' normalised centres, norms and distances where no autograd follows (the Functions'
    forwards and backwards), in fewer operations: ``2 + ε − 2·ŵŵᵀ`` in one ``baddbmm``, its floor and root in
    place."""
    w = rows.detach().to(acc_dtype(rows.dtype)).reshape(-1, k, rows.shape[-1])
    norms = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    w_hat = w / norms.clamp(min=weight_eps(rows.dtype))
    base = torch.full((1, 1, 1), 2 + eps, dtype=w.dtype, device=w.device)
    return w_hat, norms, torch.baddbmm(base, w_hat, w_hat.transpose(1, 2), alpha=-2).clamp_(min=eps).sqrt_()


def _center_rows_grad(w_hat: Tensor, norms: Tensor, dist: Tensor, grad: Tensor, tiny: float) -> Tensor:
    """The closed-form gradient of ``grad · R`` for a chunk's centres ``(B, K, d)``, from :func:`_lean_distances`'
    values and the classes' upstream gradient ``(B,)``."""
    # ∂R/∂ŵ_t = −Σ_{t' ≠ t} ŵ_{t'} / D_{tt'} (each pair once, and D symmetric)
    coef = dist.reciprocal().mul_(grad.view(-1, 1, 1)).neg_()
    coef.diagonal(0, 1, 2).zero_()
    d_hat = torch.bmm(coef, w_hat)
    # backward of w / ‖w‖: project out the radial part (where the norm is above the normalisation's ε)
    radial = (w_hat * d_hat).sum(-1, keepdim=True)
    return torch.where(norms > tiny, d_hat - w_hat * radial, d_hat).div_(norms.clamp(min=tiny))


class _CenterDistances(torch.autograd.Function):
    """Per class, ``Σ_{t<t'} sqrt(2 + ε − 2 ŵ_t·ŵ_{t'})`` over class chunks, forward and backward."""

    @staticmethod
    def forward(weight: Tensor, k: int, eps: float, chunk: int) -> Tensor:
        acc = acc_dtype(weight.dtype)
        width = weight.shape[0] // k
        out = torch.zeros(width, dtype=acc, device=weight.device)
        for start, stop in chunk_bounds(width, chunk):
            out[start:stop] = _pair_sums(_lean_distances(weight[start * k : stop * k], k, eps)[2])
        return out

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        weight, k, eps, chunk = inputs
        ctx.k, ctx.eps, ctx.chunk = k, eps, chunk
        ctx.save_for_backward(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Optional[Tensor], None, None, None]:
        if _double_backward():
            raise RuntimeError(
                "the SoftTriple regulariser gives first derivatives only: backward with create_graph=True is not "
                "supported"
            )
        (weight,) = ctx.saved_tensors
        k, eps = ctx.k, ctx.eps
        acc = acc_dtype(weight.dtype)
        out = torch.zeros(weight.shape, dtype=acc, device=weight.device)
        g = grad.to(acc)
        for start, stop in chunk_bounds(weight.shape[0] // k, ctx.chunk):
            w_hat, norms, dist = _lean_distances(weight[start * k : stop * k], k, eps)
            rows = _center_rows_grad(w_hat, norms, dist, g[start:stop], weight_eps(weight.dtype))
            out[start * k : stop * k] = rows.reshape(-1, weight.shape[-1])
        return out.to(weight.dtype), None, None, None


def soft_triple_regularizer(
    weight: Tensor, num_sub_centers: int, *, eps: float = SOFT_TRIPLE_EPS, chunk_size: Optional[int] = None
) -> Tensor:
    r"""SoftTriple's centre regulariser, per class: :math:`R_j = \sum_{t<t'} \sqrt{2 + \varepsilon - 2\,
    \hat w_j^{t\top} \hat w_j^{t'}}`.

    "SoftTriple Loss: Deep Metric Learning Without Triplet Sampling" (Qian et al., ICCV 2019,
    https://arxiv.org/abs/1909.05235), the regulariser of its "adaptive number of centers", with the
    authors' ε under the square root (the distance between unit vectors is :math:`\sqrt{2 - 2\cos}`). The loss adds
    :math:`\tau \sum_j R_j / (C K (K - 1))`. Computed over chunks of classes, forward and backward (a custom
    gradient, first derivatives only; weights of at most 2^16 elements without ``chunk_size``: autograd's own
    operations, which also give a double backward), in float32 for half-precision weights: no normalised copy of
    the weights and no C×K×K buffer. A zero row is a zero centre, as :func:`normalize` makes it (its gradient is
    :func:`normalize`'s, ``1/ε`` times the upstream one).

    Args:
        weight (Tensor[C*K, d]): the class centres, row ``c*K + k`` centre k of class c (any norm).
        num_sub_centers (int): ``K``.
        eps (float): ε > 0 under the square root (1e-5).
        chunk_size (int, optional): classes per chunk (default: 2**16 // K² rounded, at least 1).

    Returns:
        Tensor[C]: :math:`R_j`, float32 (float64 for float64 weights); zeros for ``K = 1``.
    """
    weight, k = _check_weight(weight, num_sub_centers)
    eps = check_positive(eps, "eps")
    if chunk_size is not None and (not is_int(chunk_size) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an integer >= 1, but got {chunk_size!r}")
    if chunk_size is None and weight.numel() <= FEW_ELEMENTS:
        if autocast_enabled(weight.device):  # the Gram matrix in the accumulation dtype, not bf16
            with autocast_off(weight.device):
                return _few_center_distances(weight, k, eps)
        return _few_center_distances(weight, k, eps)
    chunk = max(1, CHUNK_ROWS // (k * k)) if chunk_size is None else int(chunk_size)
    return _CenterDistances.apply(weight, k, eps, chunk)


#: weights of at most this many elements (and no ``chunk_size``) take :func:`_few_center_distances`
FEW_ELEMENTS = 1 << 16


def _few_center_distances(weight: Tensor, k: int, eps: float) -> Tensor:
    """:class:`_CenterDistances` for a few centres, in one piece (no chunks: a normalised copy costs nothing there):
    the same values and first derivatives, and a double backward (:class:`_FewCenterDistances`); under
    ``torch.func`` transforms and ``torch.compile``, autograd's own operations (forward mode and every transform
    included)."""
    if torch._C._are_functorch_transforms_active() or torch.compiler.is_compiling():
        return _center_term_ops(weight, k, eps)
    return _FewCenterDistances.apply(weight, k, eps)[0]


def _center_term_ops(weight: Tensor, k: int, eps: float) -> Tensor:
    """The regulariser in autograd's own operations (see :func:`_distances`): what a double backward differentiates."""
    return _pair_sums(_distances(weight, k, eps)[3])


class _FewCenterDistances(DirectApply, torch.autograd.Function):
    """The regulariser of a few centres: the forward keeps the normalised centres, their norms and the distances,
    and the backward is :class:`_CenterDistances`'s closed form on them — half the time of autograd's thirty nodes
    for six classes of ten centres. A backward that is itself differentiated (``create_graph=True``) recomputes the
    forward in autograd's operations (:func:`_center_term_ops`) and differentiates that, so second derivatives stay
    exact."""

    @staticmethod
    def forward(weight: Tensor, k: int, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        w_hat, norms, dist = _lean_distances(weight, k, eps)
        return _pair_sums(dist), w_hat, norms, dist

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        weight, k, eps = inputs
        _, w_hat, norms, dist = output
        ctx.mark_non_differentiable(w_hat, norms, dist)
        ctx.k, ctx.eps = k, eps
        ctx.save_for_backward(weight, w_hat, norms, dist)

    @staticmethod
    def backward(ctx: Any, grad: Tensor, *_: Any) -> tuple[Optional[Tensor], None, None]:
        weight, w_hat, norms, dist = ctx.saved_tensors
        if _double_backward():
            with torch.enable_grad():
                out = _center_term_ops(weight, ctx.k, ctx.eps)
                (d_weight,) = torch.autograd.grad(out, weight, grad, create_graph=True)
            return d_weight, None, None
        rows = _center_rows_grad(w_hat, norms, dist, grad, weight_eps(weight.dtype)).reshape(weight.shape)
        return rows if rows.dtype == weight.dtype else rows.to(weight.dtype), None, None


def soft_triple_distinct_centers(
    weight: Tensor, num_sub_centers: int, *, max_distance: float = 1e-2
) -> tuple[Tensor, Tensor]:
    """Which centres the regulariser has merged: the paper's adaptive number of centres, read off the weights.

    Greedily, per class: centre k is *merged* when it lies within ``max_distance`` (Euclidean, between the
    normalised centres: ``sqrt(2 − 2 cos)``) of an earlier centre of its class that is not itself merged. The
    centres that are not merged are the class's distinct centres; their number is what the regulariser chose.
    Nothing is removed: the heads keep K centres per class (a tensor needs the same K for every class), and a merged
    centre only duplicates a distinct one.

    Args:
        weight (Tensor[C*K, d]): the class centres.
        num_sub_centers (int): ``K``.
        max_distance (float): ``> 0``; the distance under which two centres count as one (1e-2 ≈ 0.57°).

    Returns:
        (Tensor[C, K] of bool, Tensor[C] of int64): the merged centres, and the number of distinct centres per class.
    """
    weight, k = _check_weight(weight, num_sub_centers)
    limit = check_positive(max_distance, "max_distance")
    with torch.no_grad():
        merged = torch.zeros(weight.shape[0] // k, k, dtype=torch.bool, device=weight.device)
        for start, stop in chunk_bounds(weight.shape[0] // k, max(1, CHUNK_ROWS // (k * k))):
            _, _, gram, _ = _distances(weight[start * k : stop * k].detach(), k, 0.0)
            close = (2 - 2 * gram).clamp(min=0).sqrt() <= limit
            block = merged[start:stop]
            for t in range(1, k):  # K is small: a loop over centres, vectorised over classes
                earlier = close[:, t, :t] & ~block[:, :t]
                block[:, t] = earlier.any(-1)
        return merged, k - merged.sum(-1)
