"""Margins on the target logit: CosFace, ArcFace, the combined margin and SphereFace's A-Softmax.

Every margin runs through :func:`mll.functional.margin_logits`, which picks the cheapest exact path; all paths give
the same logits for one-hot targets:

* **class indices** ``target: Tensor[*]`` (integers): the margin's trigonometry runs on the N target cosines
  only and is written back in place (see ``_engine/dense.py``): O(N) extra work, no N×C one-hot, no N×C arccos;
* **soft targets** ``target: Tensor[*, C]`` (floats, e.g. mixup): the margin is interpolated per entry by its
  target weight ``t`` (``m·t`` for additive margins); few-hot targets take the same fused scatter as class
  indices on their non-zero entries (eager mode), others the dense N×C path.

Each family is a :class:`mll.functional.MarginFamily` (see ``margin.py``): a value-and-slope function
``fn(cos, w, *params) -> (ψ, ∂ψ/∂cos)``, its parameters' ranges and its target logit for the default scale. The
tests hold each slope to the autograd derivative of its value and each value to an independent float64 reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mll.functional._engine.checks import check_cosine, check_lambda, check_scale, check_target
from mll.functional._engine.numerics import Scale
from mll.functional.margin import Margin, MarginFamily, MarginParam, MarginParameter, apply_margin

__all__ = [
    "ARC",
    "ARC_EASY",
    "COMBINED",
    "COS",
    "NO_MARGIN",
    "SPHERE",
    "arc_margin",
    "combined_margin",
    "cos_margin",
    "sphere_margin",
]

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


def _none_fn(cosine: Tensor, w: Tensor | float) -> tuple[Tensor, Tensor]:
    return cosine, torch.ones_like(cosine)


def _cos_fn(cosine: Tensor, w: Tensor | float, margin: Tensor) -> tuple[Tensor, Tensor]:
    value = cosine - margin * w
    return value, value.new_ones(()).expand(value.shape)


def _arc_fn(cosine: Tensor, w: Tensor | float, margin: Tensor) -> tuple[Tensor, Tensor]:
    return _arc_value_and_slope(cosine, margin * w, False)


def _arc_easy_fn(cosine: Tensor, w: Tensor | float, margin: Tensor) -> tuple[Tensor, Tensor]:
    return _arc_value_and_slope(cosine, margin * w, True)


#: The plain scaled cosine: no margin (eval mode, ScaledNormalizedLinear, AdaCos, DeepNCM).
NO_MARGIN = MarginFamily("none", _none_fn, (), target_logit=math.cos, identity=True)
#: CosFace: ψ = cos θ − m·t.
COS = MarginFamily(
    "cos", _cos_fn, (MarginParameter("margin", *COS_MARGIN_RANGE),), target_logit=lambda th, m: math.cos(th) - m,
    title="CosFace", shift=True,
)  # fmt: skip
#: ArcFace: ψ = cos(θ + m·t), cos θ − m·t·sin(m·t) past θ > π − m·t.
ARC = MarginFamily(
    "arc", _arc_fn, (MarginParameter("margin", *ARC_MARGIN_RANGE),), target_logit=lambda th, m: math.cos(th + m),
    title="ArcFace",
)  # fmt: skip
#: ArcFace with ``easy_margin``: the margin only where cos θ > 0.
ARC_EASY = MarginFamily(
    "arc_easy", _arc_easy_fn, (MarginParameter("margin", *ARC_MARGIN_RANGE),),
    target_logit=lambda th, m: math.cos(th + m) if math.cos(th) > 0 else math.cos(th), title="ArcFace",
)  # fmt: skip


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
    margin_ = COS(margin)
    margin_.check(cosine.shape)
    check_scale(scale)
    return apply_margin(cosine, check_target(target, cosine.shape), margin_, scale)


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
    only (see the module notes in ``mll/functional/_engine/dense.py``). A margin tensor that requires grad (MagFace's
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
    margin_ = (ARC_EASY if easy_margin else ARC)(margin)
    margin_.check(cosine.shape)
    check_scale(scale)
    return apply_margin(cosine, check_target(target, cosine.shape), margin_, scale)


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
    (``w = 0``, or m1 = 1, m2 = m3 = 0) comes back bit-identical. ∂ψ/∂cos = (−1)^k·m1·sin φ / sin θ, written as
    ``1 + (sin θ − (−1)^k·m1·sin φ)·dθ/dcos`` so that it is exactly 1 without a margin.

    At |cos θ| = 1 (where sin θ is clamped at √ε, see :func:`_angle`) the slope is the limit of the derivative as
    θ → 0 or π: with sin φ = sin(m1θ)·cos m2 + cos(m1θ)·sin m2, the first part tends to m1²·cos m2 (m1² for
    SphereFace, ArcFace's cos m for m1 = 1); the second part diverges for m2 > 0 and is left out there, as
    :func:`arc_margin` leaves out its cot θ·sin m. Both stay finite in every dtype.
    """
    a = 1 + (m1 - 1) * w
    b = m2 * w
    theta, sin, dtheta = _angle(cosine)
    phi = a * theta + b
    k = torch.floor(phi / math.pi).clamp(min=0)
    sign = 1 - 2 * torch.remainder(k, 2)
    value = cosine + (sign * torch.cos(phi) - 2 * k - torch.cos(theta)) - m3 * w
    clamped = (1 - cosine) * (1 + cosine) < torch.finfo(cosine.dtype).eps
    lead = torch.where(clamped, torch.sin(a * theta) * torch.cos(b), torch.sin(phi))
    return value, 1 + (torch.sin(theta) - sign * a * lead) * torch.where(clamped, -1 / sin, dtheta)


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
#: SphereFace's multiplicative margin m ≥ 1 (the paper uses integers, 4 by default; real values are fine here)
SPHERE_MARGIN_RANGE = COMBINED_M1_RANGE


def _combined_target_logit(theta: float, m1: float, m2: float, m3: float) -> float:
    phi = m1 * theta + m2
    k = math.floor(phi / math.pi)
    return (-1) ** k * math.cos(phi) - 2 * k - m3


#: InsightFace's combined margin: ψ = cos(m1·θ + m2) − m3, continued past π as SphereFace's A-Softmax.
COMBINED = MarginFamily(
    "combined",
    _combined_value_and_slope,
    (
        MarginParameter("m1", *COMBINED_M1_RANGE),
        MarginParameter("m2", *COMBINED_M2_RANGE),
        MarginParameter("m3", *COMBINED_M3_RANGE),
    ),
    target_logit=_combined_target_logit,
)
#: SphereFace's A-Softmax, annealed: (λ cos θ + ψ(θ)) / (1 + λ) with ψ the combined margin (m, 0, 0).
SPHERE = MarginFamily(
    "sphere",
    _sphere_value_and_slope,
    (MarginParameter("margin", *SPHERE_MARGIN_RANGE), MarginParameter("lambda_", 0.0, math.inf)),
    target_logit=lambda th, m, lam: (lam * math.cos(th) + _combined_target_logit(th, m, 0.0, 0.0)) / (1 + lam),
    title="SphereFace",
)


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
    margin_ = COMBINED(m1, m2, m3)
    margin_.check(cosine.shape)
    check_scale(scale)
    return apply_margin(cosine, check_target(target, cosine.shape), margin_, scale)


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
    check_lambda(lambda_)
    lam = lambda_.detach().reshape(()) if isinstance(lambda_, Tensor) else float(lambda_)
    margin_ = SPHERE(margin, lam)
    margin_.check(cosine.shape)
    check_scale(scale)
    return apply_margin(cosine, check_target(target, cosine.shape), margin_, scale)


#: the families the string arguments ``margin_type=...`` name (the older, string-based API)
FAMILIES = {family.name: family for family in (NO_MARGIN, COS, ARC, ARC_EASY, COMBINED, SPHERE)}


def resolve_margin(margin: object, margin_type: object, easy_margin: object = False) -> Margin:
    """A :class:`Margin` from either a bound margin, or a float/tensor ``margin`` with a ``margin_type`` name
    (``"cos"`` by default; ``"arc"`` with ``easy_margin`` is ``"arc_easy"``; ``"none"`` ignores ``margin``)."""
    if isinstance(margin, Margin):
        if margin_type is not None:
            raise ValueError(f"margin_type is only for a float margin; margin={margin!r} already names its family")
        return margin
    name = "cos" if margin_type is None else margin_type
    family = FAMILIES.get(name) if isinstance(name, str) else None
    if family is None:
        raise ValueError(f"margin_type must be one of {sorted(FAMILIES)}, but got {margin_type!r}")
    if family is ARC and easy_margin:
        family = ARC_EASY
    if not family.parameters:
        return family()
    if len(family.parameters) != 1:
        raise ValueError(
            f"the {family.name} margin has parameters {[p.name for p in family.parameters]}: pass margin="
            f"{family.name.upper()}(...) instead of margin_type={name!r}"
        )
    return family(margin)  # type: ignore[arg-type]
