"""Margins on the target logit: CosFace, ArcFace, the combined margin and SphereFace's A-Softmax.

Every margin runs through :func:`apply_margin`, which picks the cheapest exact path; all paths give the same logits
for one-hot targets:

* **class indices** ``target: Tensor[*]`` (integers): the margin's trigonometry runs on the N target cosines
  only and is written back in place (see ``_target.py``): O(N) extra work, no N×C one-hot, no N×C arccos;
* **soft targets** ``target: Tensor[*, C]`` (floats, e.g. mixup): the margin is interpolated per entry by its
  target weight ``t`` (``m·t`` for additive margins); few-hot targets take the same fused scatter as class
  indices on their non-zero entries (eager mode), others the dense N×C path.

A margin is defined once, as a function ``fn(cos, w, *params) -> (ψ, ∂ψ/∂cos)`` written in torch ops: ``w`` is
the entry's target weight and ``params`` the margin's hyper-parameters (floats, or tensors that broadcast to
``(*, C)``: per class, per sample), read at the entries being shaped. The tests hold each slope to the autograd
derivative of its value and each value to an independent float64 reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Callable, Union

import torch
from torch import Tensor

from mll.functional._checks import (
    check_cosine,
    check_margin_param,
    check_nonnegative,
    check_scale,
    check_target,
    is_soft,
    values_checkable,
)
from mll.functional._target import (
    Scale,
    _ScaledTargetReplace,
    gather_target,
    scaled_dense_replace,
    scaled_target_replace,
    work_dtype,
)

__all__ = ["arc_margin", "combined_margin", "cos_margin", "sphere_margin"]

#: Valid ranges. CosFace: ``m < 1`` keeps a perfectly aligned target positive. ArcFace: ``m < π/2`` keeps
#: ``cos(0 + m) > 0`` and makes the fallback past ``π − m`` monotone in ``m``.
COS_MARGIN_RANGE = (0.0, 1.0)
ARC_MARGIN_RANGE = (0.0, math.pi / 2)


def _sin_from_cos(cosine: Tensor) -> Tensor:
    # sin θ = sqrt(1 − cos²θ), clamped away from 0 so neither it nor its gradient is infinite at cos = ±1
    # (where the clamp is active its gradient is 0, and the analytic slope below says the same).
    # (1 − c)(1 + c) rather than 1 − c²: no cancellation near |c| = 1
    eps = torch.finfo(cosine.dtype).eps
    return ((1 - cosine) * (1 + cosine)).clamp(min=eps).sqrt()


def _arc_value(cosine: Tensor, margin: Tensor | float, easy_margin: bool) -> Tensor:
    r"""ψ(θ) = cos(θ + m) = cosθ·cos m − sinθ·sin m where it is monotone, else the established fallback.

    Past θ > π − m, cos(θ + m) rises again and would reward a worse feature. Like InsightFace and
    pytorch-metric-learning we use cosθ − m·sin m there; with ``easy_margin`` the margin is applied only where
    cosθ > 0 and the cosine passes through elsewhere.
    """
    m = torch.as_tensor(margin, dtype=cosine.dtype, device=cosine.device)
    cos_m, sin_m = torch.cos(m), torch.sin(m)
    shifted = cosine * cos_m - _sin_from_cos(cosine) * sin_m
    if easy_margin:
        return torch.where(cosine > 0, shifted, cosine)
    return torch.where(cosine > -cos_m, shifted, cosine - m * sin_m)


def _arc_value_and_slope(cosine: Tensor, margin: Tensor, easy_margin: bool) -> tuple[Tensor, Tensor]:
    """:func:`_arc_value` and its derivative ∂ψ/∂cos, without autograd, for both paths.

    ``margin`` is a 0-dim tensor (class indices: applied to the N target cosines) or ``m·t`` of the same shape as
    ``cosine`` (soft targets). One function for both keeps class indices and one-hot soft targets bit-identical.
    On the shifted branch ∂ψ/∂cos = cos m + sin m · cosθ / sinθ (0 in place of the ratio where the clamp on sin²θ
    is active, as autograd of :func:`_arc_value` gives); 1 on the fallback branches. The tests hold the value to
    :func:`_arc_value` and the slope to its autograd derivative.
    """
    cos_m, sin_m = torch.cos(margin), torch.sin(margin)
    eps = torch.finfo(cosine.dtype).eps
    sin2 = (1 - cosine) * (1 + cosine)
    sin = sin2.clamp(min=eps).sqrt()
    shifted = cosine * cos_m - sin * sin_m
    shifted_slope = torch.where(sin2 >= eps, cosine / sin, 0.0) * sin_m + cos_m
    if easy_margin:
        keep, fallback = cosine > 0, cosine
    else:
        keep, fallback = cosine > -cos_m, cosine - margin * sin_m
    return torch.where(keep, shifted, fallback), torch.where(keep, shifted_slope, 1.0)


MarginParam = Union[float, Tensor]
#: a margin's value and slope on the entries it shapes: ``fn(cos, w, *params) -> (ψ, ∂ψ/∂cos)`` where ``w`` is the
#: target weight of each entry (1 for class indices, ``t`` for soft targets) and ``params`` are the margin's
#: hyper-parameters read at those entries
ValueAndSlope = Callable[..., tuple[Tensor, Tensor]]


def _param(value: MarginParam, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.tensor(value, dtype=dtype, device=device)


def _at_target(param: Tensor, shape: torch.Size, target: Tensor) -> Tensor:
    """A parameter that broadcasts to the logits' shape ``(*, C)``, read at each sample's target class: ``(*)``."""
    if param.dim() == 0:
        return param
    if param.shape[-1] == 1:  # one value per sample
        return param.expand(*shape[:-1], 1).squeeze(-1)
    return param.expand(shape).gather(-1, target.unsqueeze(-1)).squeeze(-1)


def _at_entries(param: Tensor, shape: torch.Size, index: Tensor) -> Tensor:
    """A parameter that broadcasts to ``shape``, read at flat indices (no copy of the broadcast tensor)."""
    if param.dim() == 0:
        return param
    return param.expand(shape)[torch.unravel_index(index, shape)]


def apply_margin(
    cosine: Tensor, target: Tensor, fn: ValueAndSlope, params: Sequence[MarginParam], scale: Scale
) -> Tensor:
    """Scale ``cosine`` and shape the target entries with a margin, on the cheapest exact path.

    * class indices: ``fn`` runs on the N target cosines, which are written back in place (fused with the scale);
    * few-hot soft targets in eager mode: the same on the non-zero entries only;
    * other soft targets: ``fn`` runs on all N×C entries with ``w = t`` (every margin is the identity at ``w = 0``).

    ``fn`` computes the value with autograd attached to ``params`` and ``w`` (soft targets or margins that require
    grad get their gradient through it) but never to the cosine, whose derivative is the returned slope.
    """
    dtype = work_dtype(cosine.dtype)
    ps = [_param(p, dtype, cosine.device) for p in params]
    soft = is_soft(target)
    # the value needs a graph only for margins (MagFace) or soft targets that require grad: skipping autograd's
    # bookkeeping elsewhere keeps the dozens of small O(N) ops of a margin cheap
    graph = torch.is_grad_enabled() and (any(p.requires_grad for p in ps) or (soft and target.requires_grad))
    if soft:
        index = _soft_nonzero(target)
        if index is not None:
            flat = cosine.reshape(1, -1)
            with torch.set_grad_enabled(graph):
                at = [_at_entries(p, cosine.shape, index) for p in ps]
                value, slope = fn(flat.detach()[0, index].to(dtype), target.reshape(-1)[index].to(dtype), *at)
            out = _ScaledTargetReplace.apply(
                flat, index.unsqueeze(0), value.unsqueeze(0), slope.detach().unsqueeze(0), scale
            )
            return out.reshape(cosine.shape)
        with torch.set_grad_enabled(graph):
            value, slope = fn(cosine.detach().to(dtype), target.to(dtype), *ps)
        return scaled_dense_replace(cosine, value, slope.detach(), scale)
    with torch.set_grad_enabled(graph):
        at = [_at_target(p, cosine.shape, target) for p in ps]
        value, slope = fn(gather_target(cosine, target).to(dtype), 1.0, *at)
    return scaled_target_replace(cosine, target, value, slope.detach(), scale)


#: soft targets with at most this fraction of non-zero entries take the sparse path in eager mode
SPARSE_FRACTION = 1 / 8


def _soft_nonzero(target: Tensor) -> Tensor | None:
    """Flat indices of the non-zero soft-target entries when few enough for the sparse path, else None.

    Few-hot soft targets (mixup, CutMix: two classes per row) leave most of the N×C entries at t = 0, where
    every margin here is the identity with slope 1. In eager mode the margin then runs on those entries only,
    through the same fused scatter as class indices: O(nnz) trigonometry instead of O(N·C). The number of
    entries is data-dependent, so under ``torch.compile`` and ``torch.func`` (and for dense targets such as
    label smoothing, or targets that require grad) the dense path runs instead; both give identical logits.
    """
    if target.requires_grad or not values_checkable():
        return None
    index = target.reshape(-1).nonzero().squeeze(-1)
    return index if index.numel() <= SPARSE_FRACTION * target.numel() else None


def _cos_value_and_slope(cosine: Tensor, margin: Tensor) -> tuple[Tensor, Tensor]:
    return cosine - margin, torch.ones_like(cosine)


def _cos_fn(cosine: Tensor, w: Tensor | float, margin: Tensor) -> tuple[Tensor, Tensor]:
    value = cosine - margin * w
    return value, value.new_ones(()).expand(value.shape)


def _arc_fn(easy_margin: bool) -> ValueAndSlope:
    return lambda cosine, w, margin: _arc_value_and_slope(cosine, margin * w, easy_margin)


def cos_margin(cosine: Tensor, target: Tensor, margin: MarginParam, *, scale: Scale = 1.0) -> Tensor:
    r"""CosFace's additive cosine margin on the target logit, optionally scaled.

    "CosFace: Large Margin Cosine Loss for Deep Face Recognition" (Wang et al., CVPR 2018,
    https://arxiv.org/abs/1801.09414), Eq. 4:

    .. math:: \psi_{ij} = s\,(\cos\theta_{ij} - m\,t_{ij})

    with :math:`t` the one-hot target (class indices) or the soft target (e.g. mixup weights).

    Args:
        cosine (Tensor[*, C]): cosines, e.g. from :func:`cosine_logits`.
        target (Tensor[*] of int or Tensor[*, C] of float): class indices or soft targets.
        margin (float or Tensor): ``m`` in ``[0, 1)``; a tensor that broadcasts to ``(*, C)`` gives margins per
            class ``(C,)`` (see :func:`dynamic_margins`), per sample ``(*, 1)`` or per entry.
        scale (float or Tensor): ``s``, multiplied in (fused, no extra pass over the logits).

    Returns:
        Tensor[*, C]: the scaled logits with the margin applied, in ``cosine``'s dtype.
    """
    check_cosine(cosine)
    check_margin_param(margin, *COS_MARGIN_RANGE, "CosFace", cosine.shape)
    check_scale(scale)
    return cos_margin_unchecked(cosine, check_target(target, cosine.shape), margin, scale)


def cos_margin_unchecked(cosine: Tensor, target: Tensor, margin: MarginParam, scale: Scale) -> Tensor:
    """:func:`cos_margin` without argument checks, for modules that validated their inputs already."""
    return apply_margin(cosine, target, _cos_fn, (margin,), scale)


def arc_margin(
    cosine: Tensor, target: Tensor, margin: MarginParam, *, easy_margin: bool = False, scale: Scale = 1.0
) -> Tensor:
    r"""ArcFace's additive angular margin on the target logit, optionally scaled.

    "ArcFace: Additive Angular Margin Loss for Deep Face Recognition" (Deng et al., CVPR 2019,
    https://arxiv.org/abs/1801.07698), Eq. 3:

    .. math:: \psi_{ij} = s\,\cos(\theta_{ij} + m\,t_{ij})

    computed as :math:`\cos\theta\cos m - \sin\theta\sin m` with :math:`\sin\theta` clamped away from 0, so
    values and gradients are finite at :math:`\cos\theta = \pm 1` in every dtype (trigonometry in float32 for
    float16/bfloat16). At exactly :math:`|\cos\theta| = 1`, :math:`\sin\theta` is taken as √ε of the working
    dtype (1.5e-8 in float64, 3.5e-4 in float32): a change of at most √ε·sin m, below the angular resolution of
    a floating-point cosine there (the next float32 below 1 is already θ ≈ 3.5e-4).
    Past :math:`\theta > \pi - m` the logit would rise again with θ; there it is :math:`\cos\theta - m\sin m`
    (InsightFace's fix), which keeps it non-increasing in θ and in ``m``.
    With ``easy_margin=True`` the margin applies only where :math:`\cos\theta > 0` (not monotone at θ = π/2).

    The gradient is the exact derivative of the value above (no straight-through shortcut); first derivatives
    only (see the module notes in ``mll/functional/_target.py``). A margin tensor that requires grad (MagFace's
    magnitude-dependent margin) gets its gradient too.

    Args:
        cosine (Tensor[*, C]): cosines, e.g. from :func:`cosine_logits`.
        target (Tensor[*] of int or Tensor[*, C] of float): class indices or soft targets.
        margin (float or Tensor): ``m`` in radians, in ``[0, π/2)``; a tensor that broadcasts to ``(*, C)`` gives
            margins per class ``(C,)``, per sample ``(*, 1)`` or per entry.
        easy_margin (bool): apply the margin only to targets with positive cosine.
        scale (float or Tensor): ``s``, multiplied in (fused, no extra pass over the logits).

    Returns:
        Tensor[*, C]: the scaled logits with the margin applied, in ``cosine``'s dtype.
    """
    check_cosine(cosine)
    check_margin_param(margin, *ARC_MARGIN_RANGE, "ArcFace", cosine.shape)
    check_scale(scale)
    return arc_margin_unchecked(cosine, check_target(target, cosine.shape), margin, easy_margin, scale)


def arc_margin_unchecked(
    cosine: Tensor, target: Tensor, margin: MarginParam, easy_margin: bool, scale: Scale
) -> Tensor:
    """:func:`arc_margin` without argument checks, for modules that validated their inputs already."""
    return apply_margin(cosine, target, _arc_fn(easy_margin), (margin,), scale)


def _angle(cosine: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """θ = atan2(sin θ, cos θ) with sin θ clamped to ≥ √ε as in :func:`_sin_from_cos`, sin θ, and dθ/dcos.

    atan2 rather than arccos: accurate near θ = 0 and π. dθ/dcos is −1/sin θ, except where the clamp holds sin θ
    (|cos θ| within ε/2 of 1) and θ = atan2(√ε, cos θ) moves only through its second argument: there it is
    −sin/(sin² + cos²), tiny, as autograd of this θ gives. Slopes built on it are the exact derivatives of the
    values, finite everywhere, at cos = ±1 too.
    """
    eps = torch.finfo(cosine.dtype).eps
    sin2 = (1 - cosine) * (1 + cosine)
    sin = sin2.clamp(min=eps).sqrt()
    dtheta = torch.where(sin2 >= eps, -1 / sin, -sin / (sin * sin + cosine * cosine))
    return torch.atan2(sin, cosine), sin, dtheta


def _combined_value_and_slope(
    cosine: Tensor, w: Tensor | float, m1: Tensor, m2: Tensor, m3: Tensor
) -> tuple[Tensor, Tensor]:
    r"""ψ = (−1)^k cos φ − 2k − m3 with φ = m1·θ + m2 and k = ⌊φ/π⌋: cos(m1·θ + m2) − m3 while φ ≤ π, continued
    past π as SphereFace continues cos(mθ), so ψ keeps decreasing in θ. Soft targets interpolate every margin
    towards none: m1 → 1 + (m1 − 1)·t, m2 → m2·t, m3 → m3·t.

    Written as ``cos + (ψ(θ) − cos θ)`` with both cosines of the same computed angle, so an entry without a margin
    (``w = 0``, or m1 = 1, m2 = m3 = 0) comes back bit-identical. ∂ψ/∂cos = 1 + (sin θ − (−1)^k·m1·sin φ)·dθ/dcos,
    which is (−1)^k·m1·sin φ / sin θ away from cos = ±1 (see :func:`_angle` there).
    """
    a = 1 + (m1 - 1) * w
    theta, _, dtheta = _angle(cosine)
    phi = a * theta + m2 * w
    k = torch.floor(phi / math.pi).clamp(min=0)
    sign = 1 - 2 * torch.remainder(k, 2)
    value = cosine + (sign * torch.cos(phi) - 2 * k - torch.cos(theta)) - m3 * w
    return value, 1 + (torch.sin(theta) - sign * a * torch.sin(phi)) * dtheta


def _sphere_value_and_slope(cosine: Tensor, w: Tensor | float, m: Tensor, lam: Tensor) -> tuple[Tensor, Tensor]:
    zero = m.new_zeros(())
    value, slope = _combined_value_and_slope(cosine, w, m, zero, zero)
    # SphereFace's annealing (λ cos θ + ψ(θ)) / (1 + λ), written as a change to cos θ so w = 0 is bit-exact
    return cosine + (value - cosine) / (1 + lam), (lam + slope) / (1 + lam)


#: valid ranges of the combined margin's three parts: m1 ≥ 1 multiplies the angle (SphereFace), m2 adds to it
#: (ArcFace), m3 subtracts from the cosine (CosFace)
COMBINED_M1_RANGE = (1.0, 10.0)
COMBINED_M2_RANGE = ARC_MARGIN_RANGE
COMBINED_M3_RANGE = COS_MARGIN_RANGE


def combined_margin(
    cosine: Tensor,
    target: Tensor,
    m1: MarginParam = 1.0,
    m2: MarginParam = 0.0,
    m3: MarginParam = 0.0,
    *,
    scale: Scale = 1.0,
) -> Tensor:
    r"""InsightFace's combined margin :math:`\cos(m_1\theta + m_2) - m_3` on the target logit, optionally scaled.

    "ArcFace: Additive Angular Margin Loss for Deep Face Recognition" (Deng et al., CVPR 2019,
    https://arxiv.org/abs/1801.07698), Eq. 4 (SphereFace, ArcFace and CosFace in one):

    .. math:: \psi(\theta) = (-1)^k \cos(m_1\theta + m_2) - 2k - m_3, \qquad
              k = \lfloor (m_1\theta + m_2)/\pi \rfloor

    For :math:`m_1\theta + m_2 \le \pi` this is the paper's :math:`\cos(m_1\theta + m_2) - m_3`; past π,
    where the cosine would rise again and reward a worse feature, it continues the way SphereFace's A-Softmax
    does (Liu et al., CVPR 2017, Eq. 6), so ψ is continuous and strictly decreasing in θ over [0, π] and
    non-increasing in each margin. (ArcFace's own fix past π − m, ``cos θ − m sin m``, is what
    :func:`arc_margin` uses; the two agree below π − m.) ``m1 = 1, m2 = m3 = 0`` leaves the logits unchanged;
    ``(1, 0, m)`` is CosFace and ``(m, 0, 0)`` SphereFace (see :func:`sphere_margin`).
    Soft targets ``t`` interpolate each margin from none: :math:`(1 + (m_1 - 1)t,\ m_2 t,\ m_3 t)`.
    The gradient is ∂ψ/∂cos θ = (−1)^k m1 sin φ / sin θ, finite at cos θ = ±1 (sin θ clamped at √ε).

    Args:
        cosine (Tensor[*, C]): cosines, e.g. from :func:`cosine_logits`.
        target (Tensor[*] of int or Tensor[*, C] of float): class indices or soft targets.
        m1 (float or Tensor): multiplicative angular margin in ``[1, 10)``.
        m2 (float or Tensor): additive angular margin (radians) in ``[0, π/2)``.
        m3 (float or Tensor): additive cosine margin in ``[0, 1)``. Each may be a tensor that broadcasts to
            ``(*, C)``: per class ``(C,)``, per sample ``(*, 1)``.
        scale (float or Tensor): ``s``.

    Returns:
        Tensor[*, C]: the scaled logits, in ``cosine``'s dtype.
    """
    check_cosine(cosine)
    check_margin_param(m1, *COMBINED_M1_RANGE, "combined", cosine.shape, name="m1")
    check_margin_param(m2, *COMBINED_M2_RANGE, "combined", cosine.shape, name="m2")
    check_margin_param(m3, *COMBINED_M3_RANGE, "combined", cosine.shape, name="m3")
    check_scale(scale)
    return combined_margin_unchecked(cosine, check_target(target, cosine.shape), m1, m2, m3, scale)


def combined_margin_unchecked(
    cosine: Tensor, target: Tensor, m1: MarginParam, m2: MarginParam, m3: MarginParam, scale: Scale
) -> Tensor:
    """:func:`combined_margin` without argument checks."""
    return apply_margin(cosine, target, _combined_value_and_slope, (m1, m2, m3), scale)


#: SphereFace's multiplicative margin m ≥ 1 (the paper uses integers, 4 by default; real values are fine here)
SPHERE_MARGIN_RANGE = COMBINED_M1_RANGE


def sphere_margin(
    cosine: Tensor, target: Tensor, margin: MarginParam = 4.0, *, lambda_: float | Tensor = 0.0, scale: Scale = 1.0
) -> Tensor:
    r"""SphereFace's A-Softmax angular margin on the target logit, optionally scaled and annealed.

    "SphereFace: Deep Hypersphere Embedding for Face Recognition" (Liu et al., CVPR 2017,
    https://arxiv.org/abs/1704.08063), Eq. 6 and Sec. 3.4:

    .. math:: \psi(\theta) = (-1)^k \cos(m\theta) - 2k, \quad \theta \in [k\pi/m, (k+1)\pi/m], \qquad
              \text{target logit} = s\,\frac{\lambda\cos\theta + \psi(\theta)}{1 + \lambda}

    The naive :math:`\cos(m\theta)` is not monotone in θ (it rises again past π/m); ψ is, and it equals
    :math:`\cos(m\theta)` on [0, π/m]. λ is SphereFace's annealing weight (the paper's training starts near
    λ = 1000 and decays it to a minimum of about 5, blending the plain cosine back in; 0 is the pure
    A-Softmax). The paper multiplies by the feature norm ‖x‖; as in the later normalised variants (and every other
    head here) the scale is a fixed ``s``. Soft targets interpolate ``m → 1 + (m − 1)·t``.

    Args:
        cosine (Tensor[*, C]): cosines.
        target (Tensor[*] of int or Tensor[*, C] of float): class indices or soft targets.
        margin (float or Tensor): ``m`` in ``[1, 10)``; per class ``(C,)`` or per sample ``(*, 1)`` as a tensor.
        lambda_ (float or Tensor): annealing weight ``λ >= 0`` (a 0-dim tensor: no recompilation when it changes
            under ``torch.compile``).
        scale (float or Tensor): ``s``.

    Returns:
        Tensor[*, C]: the scaled logits, in ``cosine``'s dtype.
    """
    check_cosine(cosine)
    check_margin_param(margin, *SPHERE_MARGIN_RANGE, "SphereFace", cosine.shape)
    check_lambda(lambda_)
    check_scale(scale)
    return sphere_margin_unchecked(cosine, check_target(target, cosine.shape), margin, lambda_, scale)


def check_lambda(lambda_: object) -> None:
    """SphereFace's λ: a finite float >= 0, or a one-element floating tensor (its value checked in eager mode)."""
    if isinstance(lambda_, Tensor):
        if not lambda_.is_floating_point() or lambda_.numel() != 1:
            raise ValueError(
                f"SphereFace lambda_ must be a float or a one-element floating tensor, but got {lambda_!r}"
            )
        if values_checkable() and not bool(torch.isfinite(lambda_).all() & (lambda_ >= 0).all()):
            raise ValueError(f"SphereFace lambda_ must be finite and >= 0, but got {float(lambda_):g}")
        return
    check_nonnegative(lambda_, "SphereFace lambda_")


def sphere_margin_unchecked(
    cosine: Tensor, target: Tensor, margin: MarginParam, lambda_: float | Tensor, scale: Scale
) -> Tensor:
    """:func:`sphere_margin` without argument checks."""
    lam = lambda_.detach().reshape(()) if isinstance(lambda_, Tensor) else float(lambda_)
    return apply_margin(cosine, target, _sphere_value_and_slope, (margin, lam), scale)
