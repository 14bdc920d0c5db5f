"""Choosing the logit scale: the AdaCos criterion (fixed) and the AdaCos update (adaptive)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import Tensor

from mll.functional._checks import (
    check_cosine,
    check_margin,
    check_num_classes,
    check_scale,
    check_target,
    is_soft,
)
from mll.functional._target import work_dtype
from mll.functional.margins import (
    ARC_MARGIN_RANGE,
    COMBINED_M1_RANGE,
    COMBINED_M2_RANGE,
    COMBINED_M3_RANGE,
    COS_MARGIN_RANGE,
    SPHERE_MARGIN_RANGE,
)

__all__ = ["adacos_scale", "heuristic_scale"]

MarginType = Literal["cos", "arc", "combined", "sphere"]


def _penalised_cosine(theta: float, margin: Any, margin_type: MarginType) -> float:
    if margin_type == "cos":
        return math.cos(theta) - margin
    if margin_type == "arc":
        return math.cos(theta + margin)
    m1, m2, m3 = (margin, 0.0, 0.0) if margin_type == "sphere" else margin
    phi = m1 * theta + m2
    k = math.floor(phi / math.pi)
    return (-1) ** k * math.cos(phi) - 2 * k - m3


def heuristic_scale(
    num_classes: int, margin: float | tuple[float, float, float] = 0.0, *, margin_type: MarginType = "cos"
) -> float:
    r"""The AdaCos criterion for a fixed scale, applied to the margin-penalised target logit.

    "AdaCos: Adaptively Scaling Cosine Logits for Effectively Learning Deep Face Representations"
    (Zhang et al., CVPR 2019, https://arxiv.org/abs/1905.00292), Sec. 4.1: choose ``s`` so that a target at
    θ = π/4 against ``C − 1`` orthogonal non-targets gets probability ½:

    .. math:: e^{s\,\psi(\pi/4)} = C - 1 \quad\Rightarrow\quad s = \frac{\ln(C - 1)}{\psi(\pi/4)}

    where ψ is the target logit after the margin: ``cos θ − m`` (``margin_type="cos"``, CosFace) or
    ``cos(θ + m)`` (``"arc"``, ArcFace), :func:`combined_margin`'s ψ (``"combined"``, ``margin=(m1, m2, m3)``) or
    :func:`sphere_margin`'s (``"sphere"``, ``margin=m``, λ = 0). Without a margin this is the 0.1.6 heuristic
    :math:`\sqrt2\ln(C-1)`.
    Applying it to the *penalised* logit matters: 0.1.6 used √2·ln(C − 1) for CosFace too, and with
    ``m = 0.5`` and ``C = 1000`` (s ≈ 9.77) even a perfectly aligned target with orthogonal non-targets gets
    probability e^{4.88} / (e^{4.88} + 999) ≈ 0.12; here s ≈ 33.4 and that probability is ≈ 1.

    Two edges, where the criterion has no positive finite solution, and what we do there:

    * ``C = 2``: with one non-target the criterion holds at ``s = 0`` for every angle (0.1.6 returned 0 and its
      layers output all-zero logits). We use the value for ``C = 3`` (``ln 2`` in the numerator, √2·ln 2 ≈ 0.98
      without a margin).
    * large margins, where ψ(π/4) is small or negative (CosFace ``m ≳ 0.61``, ArcFace ``m ≳ 0.58``): the
      denominator is ``max(ψ(π/4), ψ(0)/4)``, so the scale stays finite for every margin in the valid range
      (CosFace ``[0, 1)``, ArcFace ``[0, π/2)``), where ψ(0) > 0.

    Args:
        num_classes (int): ``C >= 2``.
        margin (float or tuple): the margin ``m``; 0 for margin-free heads; ``(m1, m2, m3)`` for ``"combined"``.
        margin_type (str): ``"cos"``, ``"arc"``, ``"combined"`` or ``"sphere"``.

    Returns:
        float: a positive, finite scale.
    """
    check_num_classes(num_classes, "num_classes")
    if margin_type == "cos":
        check_margin(margin, *COS_MARGIN_RANGE, "CosFace")
    elif margin_type == "arc":
        check_margin(margin, *ARC_MARGIN_RANGE, "ArcFace")
    elif margin_type == "sphere":
        check_margin(margin, *SPHERE_MARGIN_RANGE, "SphereFace")
    elif margin_type == "combined":
        if not (isinstance(margin, tuple) and len(margin) == 3):
            raise ValueError(f"margin must be a tuple (m1, m2, m3) for margin_type='combined', but got {margin!r}")
        for name, value, bounds in zip(
            ("m1", "m2", "m3"), margin, (COMBINED_M1_RANGE, COMBINED_M2_RANGE, COMBINED_M3_RANGE)
        ):
            check_margin(value, *bounds, "combined", name=name)
    else:
        raise ValueError(f"margin_type must be 'cos', 'arc', 'combined' or 'sphere', but got {margin_type!r}")
    if margin_type == "combined" and _penalised_cosine(0.0, margin, margin_type) <= 0:
        _, m2, m3 = margin  # type: ignore[misc]
        raise ValueError(
            f"heuristic_scale has no positive solution for the combined margin (m1, m2, m3) = {margin!r}: the target "
            f"logit of a perfectly aligned feature, cos(m2) - m3 = {math.cos(m2) - m3:.4g}, is not positive; "
            "pass scale= explicitly"
        )
    numerator = math.log(max(num_classes - 1, 2))
    denominator = max(
        _penalised_cosine(math.pi / 4, margin, margin_type), _penalised_cosine(0.0, margin, margin_type) / 4
    )
    return numerator / denominator


def _flatten_samples(cosine: Tensor, target: Tensor | None) -> tuple[Tensor, Tensor | None]:
    num_classes = cosine.shape[-1]
    cosine = cosine.reshape(-1, num_classes)
    if target is not None:
        target = target.reshape(-1, num_classes) if is_soft(target) else target.reshape(-1)
    return cosine, target


def adacos_statistics(cosine: Tensor, target: Tensor | None, scale: float | Tensor) -> tuple[Tensor, Tensor]:
    r"""Per-sample AdaCos statistics: ``log Σ_{k≠y} exp(s·cos θ_k)`` and the target angle θ_y.

    With soft targets ``t`` the non-target sum is weighted by ``1 − t`` and the angle is ``Σ_k t_k θ_k``
    (Wilkinghoff, "Sub-Cluster AdaCos", IJCNN 2021). Without a target the predicted class
    (``argmax cos``) is the target. Splitting the update into per-sample statistics and a reduction
    (:func:`adacos_reduce`) lets a module gather the statistics across ranks before reducing.

    Returns:
        (log_b, theta): two Tensor[N] in float32 (or float64 for float64 input), N = all leading dims.
    """
    cosine, target = _flatten_samples(cosine.detach(), target)
    cosine = cosine.to(work_dtype(cosine.dtype))
    s = scale.detach().to(cosine.dtype) if isinstance(scale, Tensor) else scale
    logits = cosine * s
    if target is None:
        target = cosine.argmax(dim=-1)
    if is_soft(target):
        weight = target.to(cosine.dtype)
        # log(1 − t) is −inf for a full target, which drops it from the sum exactly
        log_b = torch.logsumexp(logits + torch.log1p(-weight.clamp(max=1)), dim=-1)
        theta = (weight * torch.arccos(cosine.clamp(-1, 1))).sum(dim=-1)
        return log_b, theta
    index = target.unsqueeze(-1)
    # −inf at the target removes it from the log-sum-exp: no cancellation of exp(s·cos_y) against the total
    log_b = torch.logsumexp(logits.scatter(-1, index, float("-inf")), dim=-1)
    theta = torch.arccos(cosine.gather(-1, index).squeeze(-1).clamp(-1, 1))
    return log_b, theta


def adacos_reduce(log_b: Tensor, theta: Tensor, *, min_scale: float = 0.5) -> Tensor:
    r"""Reduce per-sample statistics to the new scale: ``ln(B_avg) / cos(min(π/4, θ_med))``, floored.

    ``B_avg = mean_i exp(log_b_i)`` is computed as a log-mean-exp (finite for any scale). The result is
    floored at ``min_scale``: ``ln B_avg`` is negative when the non-targets are far below orthogonal, and for
    two classes AdaCos's fixed point is ``s = 0``. Needs at least one sample (:func:`adacos_scale` and the
    module keep the old scale for an empty batch).
    """
    count = torch.tensor(log_b.numel(), dtype=log_b.dtype, device=log_b.device)
    log_b_avg = torch.logsumexp(log_b, dim=-1) - torch.log(count)
    theta_med = torch.median(theta, dim=-1).values
    new = log_b_avg / torch.cos(torch.clamp(theta_med, max=math.pi / 4))
    # nan_to_num: rows whose every class is fully a target give −inf; the floor then applies
    return torch.nan_to_num(new, nan=min_scale, neginf=min_scale).clamp(min=min_scale)


def adacos_scale(
    cosine: Tensor, target: Tensor | None = None, *, scale: float | Tensor, min_scale: float = 0.5
) -> Tensor:
    r"""The AdaCos dynamic scale update from one batch of cosines.

    "AdaCos: Adaptively Scaling Cosine Logits for Effectively Learning Deep Face Representations"
    (Zhang et al., CVPR 2019, https://arxiv.org/abs/1905.00292), Eq. 15–16:

    .. math::
        B_{avg} = \frac1N \sum_i \sum_{k \ne y_i} e^{s \cos\theta_{ik}}, \qquad
        \tilde s = \frac{\ln B_{avg}}{\cos\big(\min(\pi/4,\ \theta_{med})\big)}

    with ``θ_med`` the median target angle of the batch. Soft targets weight the non-target sum by ``1 − t``
    and the target angle by ``t``; without a target, the predicted class is taken as the target (the
    label-free form). No gradient flows through the result.

    Args:
        cosine (Tensor[*, C]): cosines of the batch.
        target (Tensor[*] of int, Tensor[*, C] of float, or None): class indices, soft targets, or none.
        scale (float or Tensor): the current scale ``s``.
        min_scale (float): floor of the result (see :func:`adacos_reduce`).

    Returns:
        Tensor: the new scale, 0-dim, float32 (float64 for float64 input), no grad.
    """
    check_cosine(cosine)
    check_scale(scale)
    check_scale(min_scale, "min_scale")
    if target is not None:
        target = check_target(target, cosine.shape)
    with torch.no_grad():
        log_b, theta = adacos_statistics(cosine, target, scale)
        if log_b.numel() == 0:  # an empty batch carries no statistics: keep the scale (a static shape check)
            return torch.as_tensor(scale, dtype=log_b.dtype, device=log_b.device).detach().reshape(())
        return adacos_reduce(log_b, theta, min_scale=min_scale)
