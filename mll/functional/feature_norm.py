"""Margins driven by the feature norm: AdaFace (norm as image quality) and MagFace (norm as a learned magnitude).

Both read the norm of the *un-normalised* features, which a cosine head otherwise throws away, and both shape only
the target logit, so they run on the same target-only path as ArcFace (see :func:`mll.functional.margin_logits`).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mll.functional._engine.checks import (
    UNSET,
    check_cosine,
    check_decay,
    check_floating,
    check_margin_param,
    check_positive,
    check_scale,
    check_target,
    is_real,
    renamed,
    shape_str,
    values_checkable,
)
from mll.functional._engine.numerics import Scale, work_dtype
from mll.functional.margin import Margin, MarginFamily, MarginParam, MarginParameter, apply_margin
from mll.functional.margins import ARC_MARGIN_RANGE, _angle, _arc_value_and_slope

__all__ = [
    "ADA",
    "MAG",
    "MAG_EASY",
    "ada_margin",
    "adaface_statistics",
    "adaface_update",
    "mag_margin",
    "magface_regularizer",
]

#: AdaFace's clip of the feature norms and the ε of its normalisation and of its angle clip (paper's code)
ADAFACE_NORM_RANGE = (1e-3, 100.0)
ADAFACE_EPS = 1e-3


def _check_norms(norms: object, cosine_shape: torch.Size) -> Tensor:
    check_floating(norms, "norms")
    assert isinstance(norms, Tensor)
    if tuple(norms.shape) != tuple(cosine_shape[:-1]):
        raise ValueError(
            f"norms must have shape {shape_str(cosine_shape[:-1])} (one feature norm per sample), "
            f"but got {shape_str(norms.shape)}"
        )
    return norms


def _check_statistic(value: object, name: str, *, nonnegative: bool = False) -> None:
    """A running statistic: a finite float (``>= 0`` for a standard deviation) or a one-element floating tensor
    (values checked in eager mode)."""
    if isinstance(value, Tensor):
        if not value.is_floating_point() or value.numel() != 1:
            raise ValueError(f"{name} must be a float or a one-element floating tensor, but got {value!r}")
        if not values_checkable(value):
            return
        value = float(value)
    if not is_real(value) or not math.isfinite(value) or (nonnegative and value < 0):  # type: ignore[arg-type, operator]
        bound = " and >= 0" if nonnegative else ""
        raise ValueError(f"{name} must be finite{bound}, but got {value!r}")


def adaface_statistics(norms: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and (unbiased) standard deviation of the clipped feature norms of a batch, no grad.

    Returns two 0-dim tensors. Norms that are not finite (a NaN or infinite feature) are left out; the mean is NaN
    without a finite norm and the standard deviation with fewer than two (then :func:`adaface_update` keeps the
    old values). No host synchronisation: the counts stay tensors.
    """
    with torch.no_grad():
        n = norms.detach().reshape(-1).to(work_dtype(norms.dtype))
        finite = torch.isfinite(n)
        n = torch.where(finite, n.clamp(*ADAFACE_NORM_RANGE), 0.0)
        count = finite.sum().to(n.dtype)
        mean = n.sum() / count  # NaN (0/0) without a finite norm
        squares = torch.where(finite, (n - mean) ** 2, 0.0).sum()
        std = torch.where(count > 1, (squares / (count - 1).clamp(min=1)).sqrt(), math.nan)
        return mean, std


def adaface_update(
    mean: Tensor | float, std: Tensor | float, norms: Tensor, *, decay: float = 0.99, momentum: float = UNSET
) -> tuple[Tensor, Tensor]:
    r"""AdaFace's running norm statistics (Eq. 7–8): ``μ ← decay·μ + (1 − decay)·μ_B``, same for σ.

    The paper's α = 0.01 is ``1 − decay``. Norms that are not finite are left out (a NaN or infinite feature
    cannot poison the statistics); a batch with fewer than two finite norms keeps σ, one with none keeps μ too.

    Args:
        mean (Tensor or float): running mean of the norms.
        std (Tensor or float): running standard deviation of the norms.
        norms (Tensor[*]): feature norms of the batch (``input.norm(dim=-1)``); no gradient is taken.
        decay (float): weight of the old values, ``[0, 1)`` (``momentum`` before 0.2, deprecated).

    Returns:
        (Tensor, Tensor): the new mean and standard deviation (0-dim, no grad).
    """
    check_floating(norms, "norms")
    decay = renamed(decay, momentum, "momentum", "decay")
    check_decay(decay)
    with torch.no_grad():
        batch_mean, batch_std = adaface_statistics(norms)
        dtype, device = batch_mean.dtype, batch_mean.device
        old_mean = torch.as_tensor(mean, dtype=dtype, device=device).detach().reshape(())
        old_std = torch.as_tensor(std, dtype=dtype, device=device).detach().reshape(())
        new_mean = decay * old_mean + (1 - decay) * batch_mean
        new_std = decay * old_std + (1 - decay) * batch_std
        # too few finite norms: keep the old value
        return torch.where(torch.isnan(batch_mean), old_mean, new_mean), torch.where(
            torch.isnan(batch_std), old_std, new_std
        )


def _ada_value_and_slope(cosine: Tensor, w: Tensor | float, margin: Tensor, quality: Tensor) -> tuple[Tensor, Tensor]:
    """cos(θ') − g_add with θ' = θ + g_angle kept inside [ε, π − ε] (never moved past where θ already is).

    g_angle = −m·ẑ·w, g_add = (m·ẑ + m)·w. Written as ``cos + (cos θ' − cos θ) − g_add`` so an entry without a
    margin comes back bit-identical. ∂/∂cos = 1 + (sin θ − sin θ'·dθ'/dθ)·dθ/dcos, with dθ'/dθ = 1 where θ' is
    free or held at θ itself, 0 where the clip holds it at ε or π − ε.
    """
    angle = -margin * quality * w
    add = (margin * quality + margin) * w
    theta, _, dtheta = _angle(cosine)
    shifted = theta + angle
    low = torch.minimum(theta, torch.full_like(theta, ADAFACE_EPS))
    high = torch.maximum(theta, torch.full_like(theta, math.pi - ADAFACE_EPS))
    clipped = torch.minimum(torch.maximum(shifted, low), high)
    value = cosine + (torch.cos(clipped) - torch.cos(theta)) - add
    held = ((shifted < low) & (low != theta)) | ((shifted > high) & (high != theta))
    follows = torch.where(held, torch.zeros_like(theta), torch.ones_like(theta))
    return value, 1 + (torch.sin(theta) - torch.sin(clipped) * follows) * dtheta


def ada_margin(
    cosine: Tensor,
    target: Tensor,
    norms: Tensor,
    margin: MarginParam = 0.4,
    *,
    mean: Tensor | float,
    std: Tensor | float,
    h: float = 0.333,
    scale: Scale = 1.0,
) -> Tensor:
    r"""AdaFace's quality-adaptive margin on the target logit, optionally scaled.

    "AdaFace: Quality Adaptive Margin for Face Recognition" (Kim et al., CVPR 2022,
    https://arxiv.org/abs/2204.00964), Eq. 6–11:

    .. math::
        \widehat{\lVert z\rVert} = \Big\lfloor h\,\frac{\lVert z\rVert - \mu_z}{\sigma_z + \varepsilon}
                                   \Big\rceil_{-1}^{1}, \quad
        g_{angle} = -m\,\widehat{\lVert z\rVert}, \quad g_{add} = m\,\widehat{\lVert z\rVert} + m, \quad
        \psi = \cos(\theta_y + g_{angle}) - g_{add}

    High-norm (good quality) samples, ẑ → 1, get ``cos(θ − m) − 2m`` (emphasising hard samples, like
    CurricularFace); low-norm ones, ẑ → −1, get ArcFace's ``cos(θ + m)``; ẑ = 0 gives CosFace's ``cos θ − m``.
    ``norms`` are the norms of the un-normalised features, clipped to [0.001, 100] and detached (the paper's
    code); ``mean``/``std`` are running statistics (:func:`adaface_update`, updated with the batch *before*
    this call, as the paper does). As in the paper's code the shifted angle is clipped to [ε, π − ε]
    (ε = 10⁻³), which keeps ψ non-increasing in θ; unlike it, the clip applies to the target entries only and
    never moves an angle that is already outside that interval, so entries without a margin are untouched.
    Soft targets scale both ``g`` by ``t``.

    Args:
        cosine (Tensor[*, C]): cosines.
        target (Tensor[*] of int or Tensor[*, C] of float): class indices or soft targets.
        norms (Tensor[*]): feature norms ``‖z‖`` (no gradient flows through them).
        margin (float or Tensor): ``m`` in ``[0, π/2)`` (paper: 0.4); per class ``(C,)`` as a tensor.
        mean (Tensor or float): running mean of the norms (:func:`adaface_update`).
        std (Tensor or float): running standard deviation of the norms.
        h (float): concentration ``h > 0`` (paper: 0.333, so that ~99.7% of ẑ fall in [−1, 1]).
        scale (float or Tensor): ``s``.

    Returns:
        Tensor[*, C]: the scaled logits, in ``cosine``'s dtype.
    """
    check_cosine(cosine)
    norms = _check_norms(norms, cosine.shape)
    check_margin_param(margin, *ARC_MARGIN_RANGE, "AdaFace", cosine.shape)
    check_positive(h, "AdaFace h")
    _check_statistic(mean, "AdaFace mean")
    _check_statistic(std, "AdaFace std", nonnegative=True)
    check_scale(scale)
    margin_ = ada(margin, norms, mean, std, h)
    margin_.check(cosine.shape)
    return apply_margin(cosine, check_target(target, cosine.shape), margin_, scale)


def adaface_quality(norms: Tensor, mean: Tensor | float, std: Tensor | float, h: float) -> Tensor:
    """ẑ = clip(h·(‖z‖ − μ)/(σ + ε), −1, 1), detached, in the working dtype of ``norms``."""
    with torch.no_grad():
        n = norms.detach().to(work_dtype(norms.dtype)).clamp(*ADAFACE_NORM_RANGE)
        mu = torch.as_tensor(mean, dtype=n.dtype, device=n.device)
        sigma = torch.as_tensor(std, dtype=n.dtype, device=n.device)
        return (h * (n - mu) / (sigma + ADAFACE_EPS)).clamp(-1, 1)


#: AdaFace: ψ = cos(θ − m·ẑ·t) − (m·ẑ + m)·t, ẑ the per-sample norm quality (a statistic, in [−1, 1]).
ADA = MarginFamily(
    "ada",
    _ada_value_and_slope,
    (
        MarginParameter("margin", *ARC_MARGIN_RANGE),
        MarginParameter("quality", -1.0, 1.0, high_inclusive=True, statistic=True),
    ),
    target_logit=lambda th, m, q: math.cos(min(max(th - m * q, ADAFACE_EPS), math.pi - ADAFACE_EPS)) - m * q - m,
    title="AdaFace",
)


def ada(margin: MarginParam, norms: Tensor, mean: Tensor | float, std: Tensor | float, h: float) -> Margin:
    """AdaFace's margin for one batch: the family bound to ``margin`` and the quality of ``norms`` ``(*)``."""
    return ADA(margin, adaface_quality(norms, mean, std, h).unsqueeze(-1))


#: MagFace's defaults (paper, Sec. 4.1): magnitudes in [l_a, u_a] = [10, 110] map to margins in [0.45, 0.8]
MAGFACE_MAGNITUDES = (10.0, 110.0)
MAGFACE_MARGINS = (0.45, 0.8)


def _mag_value_and_slope(
    cosine: Tensor, w: Tensor | float, magnitude: Tensor, low: Tensor, high: Tensor, m_low: Tensor, m_high: Tensor
) -> tuple[Tensor, Tensor]:
    margin = (m_high - m_low) / (high - low) * (magnitude - low) + m_low
    return _arc_value_and_slope(cosine, margin * w, False)


def _mag_easy_value_and_slope(
    cosine: Tensor, w: Tensor | float, magnitude: Tensor, low: Tensor, high: Tensor, m_low: Tensor, m_high: Tensor
) -> tuple[Tensor, Tensor]:
    margin = (m_high - m_low) / (high - low) * (magnitude - low) + m_low
    return _arc_value_and_slope(cosine, margin * w, True)


def _mag_target_logit(th: float, a: float, low: float, high: float, m_low: float, m_high: float) -> float:
    return math.cos(th + (m_high - m_low) / (high - low) * (a - low) + m_low)


_MAG_PARAMETERS = (
    MarginParameter("magnitude", 0.0, math.inf, statistic=True),
    MarginParameter("lower", 0.0, math.inf),
    MarginParameter("upper", 0.0, math.inf),
    MarginParameter("margin_low", *ARC_MARGIN_RANGE),
    MarginParameter("margin_high", *ARC_MARGIN_RANGE),
)
#: MagFace: ψ = cos(θ + m(a)·t) with m(a) linear in the clipped magnitude a (ArcFace's fix past π − m).
MAG = MarginFamily("mag", _mag_value_and_slope, _MAG_PARAMETERS, target_logit=_mag_target_logit, title="MagFace")
#: MagFace with ``easy_margin`` (the authors' code's default): the margin only where cos θ > 0.
MAG_EASY = MarginFamily(
    "mag_easy", _mag_easy_value_and_slope, _MAG_PARAMETERS,
    target_logit=lambda th, *p: _mag_target_logit(th, *p) if math.cos(th) > 0 else math.cos(th), title="MagFace",
)  # fmt: skip


def mag(
    norms: Tensor, lower: float, upper: float, margin_low: MarginParam, margin_high: MarginParam, easy_margin: bool
) -> Margin:
    """MagFace's margin for one batch: the magnitudes ``norms`` ``(*)`` clipped to ``[lower, upper]`` (with their
    gradient), as a per-sample parameter."""
    magnitude = norms.to(torch.promote_types(norms.dtype, torch.float32)).clamp(lower, upper).unsqueeze(-1)
    return (MAG_EASY if easy_margin else MAG)(magnitude, float(lower), float(upper), margin_low, margin_high)


def check_magface_args(
    lower: object, upper: object, margin_low: MarginParam, margin_high: MarginParam, shape: torch.Size | None
) -> None:
    lo, hi = check_positive(lower, "MagFace lower"), check_positive(upper, "MagFace upper")
    if not lo < hi:
        raise ValueError(f"MagFace lower must be below upper, but got lower={lo!r}, upper={hi!r}")
    check_margin_param(margin_low, *ARC_MARGIN_RANGE, "MagFace", shape, name="margin_low")
    check_margin_param(margin_high, *ARC_MARGIN_RANGE, "MagFace", shape, name="margin_high")
    if isinstance(margin_low, Tensor) or isinstance(margin_high, Tensor):
        if not values_checkable(margin_low, margin_high):
            return
        increasing = bool((margin_low <= margin_high).all())  # type: ignore[union-attr]  # (a tensor)
    else:
        increasing = margin_low <= margin_high
    if not increasing:
        raise ValueError(
            "MagFace margin_low must not exceed margin_high: the margin must grow with the magnitude, "
            f"but got margin_low={margin_low!r}, margin_high={margin_high!r}"
        )


def mag_margin(
    cosine: Tensor,
    target: Tensor,
    norms: Tensor,
    *,
    lower: float = MAGFACE_MAGNITUDES[0],
    upper: float = MAGFACE_MAGNITUDES[1],
    margin_low: MarginParam = MAGFACE_MARGINS[0],
    margin_high: MarginParam = MAGFACE_MARGINS[1],
    easy_margin: bool = False,
    scale: Scale = 1.0,
) -> Tensor:
    r"""MagFace's magnitude-aware angular margin on the target logit, optionally scaled.

    "MagFace: A Universal Representation for Face Recognition and Quality Assessment" (Meng et al., CVPR 2021,
    https://arxiv.org/abs/2103.06627), Eq. 3 and Sec. 4.1:

    .. math:: a = \operatorname{clip}(\lVert x\rVert, l_a, u_a), \qquad
              m(a) = \frac{u_m - l_m}{u_a - l_a}(a - l_a) + l_m, \qquad \psi = \cos(\theta_y + m(a))

    The target logit is :func:`arc_margin`'s with a per-sample margin (including its fix past π − m). Unlike
    AdaFace, the gradient *does* flow through the magnitude: a larger norm means a larger margin, so the loss
    pulls norms down, and :func:`magface_regularizer` (which the user adds to the loss, weighted by λ_g) pushes
    them up; their balance makes the norm a quality measure. Soft targets scale the margin by ``t``.

    ``easy_margin``: the paper's Eq. 3 applies the margin to every target (``False``, the default here); the
    authors' code (``MagLinear``) defaults to ``easy_margin=True``, which applies it only where cos θ_y > 0 and
    leaves the logit of a target past 90° unchanged. At s = 64 the two differ by up to ~45 on such a logit.

    Args:
        cosine (Tensor[*, C]): cosines.
        target (Tensor[*] of int or Tensor[*, C] of float): class indices or soft targets.
        norms (Tensor[*]): feature magnitudes ``‖x‖`` of the un-normalised features, with their gradient.
        lower (float): ``l_a``, the lower end of the magnitude range (10).
        upper (float): ``u_a > l_a``, the upper end (110).
        margin_low (float or Tensor): ``l_m`` in ``[0, π/2)`` (0.45); per class ``(C,)``.
        margin_high (float or Tensor): ``u_m`` in ``[0, π/2)`` (0.8); per class ``(C,)``.
        easy_margin (bool): the margin only where cos θ > 0 (the authors' code's default).
        scale (float or Tensor): ``s``.

    Returns:
        Tensor[*, C]: the scaled logits, in ``cosine``'s dtype.
    """
    check_cosine(cosine)
    norms = _check_norms(norms, cosine.shape)
    check_magface_args(lower, upper, margin_low, margin_high, cosine.shape)
    check_scale(scale)
    margin_ = mag(norms, lower, upper, margin_low, margin_high, easy_margin)
    margin_.check(cosine.shape)
    return apply_margin(cosine, check_target(target, cosine.shape), margin_, scale)


def magface_regularizer(
    norms: Tensor, *, lower: float = MAGFACE_MAGNITUDES[0], upper: float = MAGFACE_MAGNITUDES[1]
) -> Tensor:
    r"""MagFace's magnitude regulariser, per sample (Eq. 4 and Sec. 4.1): :math:`g(a) = a / u_a^2 + 1 / a`.

    With ``a`` the magnitude clipped to ``[l_a, u_a]``. ``g`` is convex and decreasing on that range, so adding
    ``λ_g · g(a).mean()`` to the loss rewards larger magnitudes (the paper uses λ_g = 35).

    Args:
        norms (Tensor[*]): feature magnitudes ``‖x‖``, with their gradient.
        lower (float): ``l_a``.
        upper (float): ``u_a > l_a``.

    Returns:
        Tensor[*]: ``g(a)`` per sample.
    """
    check_floating(norms, "norms")
    lo, hi = check_positive(lower, "MagFace lower"), check_positive(upper, "MagFace upper")
    if not lo < hi:
        raise ValueError(f"MagFace lower must be below upper, but got lower={lo!r}, upper={hi!r}")
    a = norms.clamp(lo, hi)
    return a / (hi * hi) + 1 / a
