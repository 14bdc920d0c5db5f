"""Choosing the logit scale: the AdaCos criterion (fixed) and the AdaCos update (adaptive)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mll.functional._engine.checks import check_cosine, check_num_classes, check_scale, check_target, is_soft
from mll.functional._engine.numerics import exp_, work_dtype
from mll.functional.margin import Margin
from mll.functional.margins import COMBINED, FAMILIES, resolve_margin

__all__ = ["adacos_scale", "heuristic_scale"]


def heuristic_scale(
    num_classes: int,
    margin: Margin | float | tuple[float, float, float] = 0.0,
    *,
    margin_type: str | None = None,
) -> float:
    r"""The AdaCos criterion for a fixed scale, applied to the margin-penalised target logit.

    "AdaCos: Adaptively Scaling Cosine Logits for Effectively Learning Deep Face Representations"
    (Zhang et al., CVPR 2019, https://arxiv.org/abs/1905.00292), Sec. 4.1: choose ``s`` so that a target at
    θ = π/4 against ``C − 1`` orthogonal non-targets gets probability ½:

    .. math:: e^{s\,\psi(\pi/4)} = C - 1 \quad\Rightarrow\quad s = \frac{\ln(C - 1)}{\psi(\pi/4)}

    where ψ is the target logit after the margin: the family's ``target_logit`` (see :class:`MarginFamily`), with
    per-class or per-sample parameters at their mean. ``margin`` is a bound margin (``ARC(0.5)``), or a float with
    ``margin_type`` (``"cos"`` by default, ``"arc"``, ``"sphere"``; ``"combined"`` takes ``(m1, m2, m3)``).
    Without a margin this is the 0.1.6 heuristic :math:`\sqrt2\ln(C-1)`.
    Applying it to the *penalised* logit matters: 0.1.6 used √2·ln(C − 1) for CosFace too, and with
    ``m = 0.5`` and ``C = 1000`` (s ≈ 9.77) even a perfectly aligned target with orthogonal non-targets gets
    probability e^{4.88} / (e^{4.88} + 999) ≈ 0.12; here s ≈ 33.4 and that probability is ≈ 1.

    Two edges, where the criterion has no positive finite solution, and what we do there:

    * ``C = 2``: with one non-target the criterion holds at ``s = 0`` for every angle (0.1.6 returned 0 and its
      layers output all-zero logits). We use the value for ``C = 3`` (``ln 2`` in the numerator, √2·ln 2 ≈ 0.98
      without a margin).
    * large margins, where ψ(π/4) is small or negative (CosFace ``m ≳ 0.61``, ArcFace ``m ≳ 0.58``): the
      denominator is ``max(ψ(π/4), ψ(0)/4)``, so the scale stays finite wherever a perfectly aligned target keeps
      a positive logit, ψ(0) > 0 (every CosFace and ArcFace margin in range). Where ψ(0) ≤ 0 (a combined margin
      with cos m2 ≤ m3) there is no solution: a clear error asks for ``scale=``.

    Args:
        num_classes (int): ``C >= 2``.
        margin (Margin, float or tuple): the margin; 0 for margin-free heads.
        margin_type (str, optional): the family of a float ``margin`` (see above).

    Returns:
        float: a positive, finite scale.
    """
    check_num_classes(num_classes, "num_classes")
    if isinstance(margin, tuple):
        if margin_type not in (None, "combined"):
            raise ValueError(f"a tuple margin (m1, m2, m3) is for margin_type='combined', but got {margin_type!r}")
        bound = COMBINED(*margin)
    elif margin_type == "combined":
        raise ValueError(f"margin must be a tuple (m1, m2, m3) for margin_type='combined', but got {margin!r}")
    else:
        if margin_type is not None and margin_type not in FAMILIES:
            raise ValueError(f"margin_type must be one of {sorted(FAMILIES)}, but got {margin_type!r}")
        # "sphere" with a float: the margin m, without annealing (λ = 0)
        sphere = margin_type == "sphere"
        bound = FAMILIES["sphere"](margin, 0.0) if sphere else resolve_margin(margin, margin_type)  # type: ignore[arg-type]
    family = bound.family
    if family.target_logit is None:
        raise ValueError(f"the {family.name} margin has no closed-form target logit for heuristic_scale: pass scale=")
    params = bound.typical()

    def psi(theta: float) -> float:
        return float(family.target_logit(theta, *params))  # type: ignore[misc]

    if not psi(0.0) > 0:
        raise ValueError(
            f"heuristic_scale has no positive solution for the margin {bound!r}: the target logit of a perfectly "
            f"aligned feature, {psi(0.0):.4g}, is not positive; pass scale= explicitly"
        )
    return math.log(max(num_classes - 1, 2)) / max(psi(math.pi / 4), psi(0.0) / 4)


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


def adacos_statistics_chunked(
    input: Tensor, weight: Tensor, target: Tensor | None, scale: float | Tensor, *, num_sub_centers: int = 1,
    tau: float | None = None, chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """:func:`adacos_statistics` of ``cosine_logits(input, weight, K)`` computed chunk by chunk (the same numbers,
    without the N×C cosines): an online log-sum-exp over the non-target logits (label-free: over all but the running
    best class), and the target angles from the same pass. ``target`` is checked already (int64 or soft)."""
    from mll.functional._engine.chunks import chunk_cosines
    from mll.functional._engine.normalization import normalize
    from mll.functional.chunked import default_chunk_size

    x = normalize(input.detach()).reshape(-1, input.shape[-1])
    n, k = x.shape[0], num_sub_centers
    num_classes = weight.shape[0] // k
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    s = scale.detach().to(dtype) if isinstance(scale, Tensor) else scale
    chunk = default_chunk_size(n, num_classes, k, x.device) if chunk_size is None else chunk_size
    soft = target is not None and is_soft(target)
    flat = None if target is None else (target.reshape(n, num_classes) if soft else target.reshape(n))
    run_max = torch.full((n,), -math.inf, dtype=dtype, device=x.device)
    run_sum = torch.zeros(n, dtype=dtype, device=x.device)
    theta = torch.zeros(n, dtype=dtype, device=x.device)
    best = torch.full((n,), -math.inf, dtype=dtype, device=x.device)  # label-free: the running best cosine
    for start, stop, cos in chunk_cosines(x, weight, k, tau, chunk):
        logits = cos * s
        if flat is None:  # leave out each row's best class so far; the one it displaces joins the others
            chunk_best, where = cos.max(1)
            logits = logits.scatter(1, where.unsqueeze(1), -math.inf)
            displaced = torch.where(chunk_best > best, best, chunk_best) * s
            best = torch.maximum(best, chunk_best)
            logits = torch.cat([logits, displaced.unsqueeze(1)], 1)
        elif soft:
            t = flat[:, start:stop].to(dtype)
            logits = logits + torch.log1p(-t.clamp(max=1))
            theta += (t * torch.arccos(cos.clamp(-1, 1))).sum(1)
        else:
            local = flat - start
            inside = (local >= 0) & (local < stop - start)
            col = local.clamp(0, stop - start - 1).unsqueeze(1)
            theta = torch.where(inside, torch.arccos(cos.gather(1, col).squeeze(1).clamp(-1, 1)), theta)
            logits = logits.scatter(1, col, torch.where(inside.unsqueeze(1), -math.inf, logits.gather(1, col)))
        new_max = torch.maximum(run_max, logits.amax(1))
        shift = torch.where(torch.isfinite(new_max), new_max, 0.0)
        run_sum = run_sum * torch.exp(run_max - shift) + exp_(logits - shift[:, None]).sum(1)
        run_max = torch.where(torch.isfinite(new_max), new_max, run_max)
    if flat is None:
        theta = torch.arccos(best.clamp(-1, 1))
    return run_max + torch.log(run_sum), theta


def adacos_reduce(log_b: Tensor, theta: Tensor, *, min_scale: float = 0.5) -> Tensor:
    r"""Reduce per-sample statistics to the new scale: ``ln(B_avg) / cos(min(π/4, θ_med))``, floored.

    ``B_avg = mean_i exp(log_b_i)`` is computed as a log-mean-exp (finite for any scale). The result is
    floored at ``min_scale``: ``ln B_avg`` is negative when the non-targets are far below orthogonal, and for
    two classes AdaCos's fixed point is ``s = 0``.

    Samples whose statistics are not finite (a NaN or infinite feature) are left out, so one bad row cannot move the
    scale; with no sample left (or an empty batch) the result is NaN, and :func:`adacos_scale` and the module keep
    the old scale. No host synchronisation: the count stays a tensor.
    """
    valid = torch.isfinite(theta) & ~torch.isnan(log_b) & (log_b != math.inf)
    count = valid.sum(-1).to(log_b.dtype)
    log_b_avg = torch.logsumexp(torch.where(valid, log_b, -math.inf), dim=-1) - torch.log(count)
    theta_med = torch.nanmedian(torch.where(valid, theta, math.nan), dim=-1).values
    new = log_b_avg / torch.cos(torch.clamp(theta_med, max=math.pi / 4))
    # rows whose every class is fully a target give −inf: the floor applies; no valid row at all: NaN
    floored = torch.nan_to_num(new, nan=min_scale, neginf=min_scale).clamp(min=min_scale)
    return torch.where(count > 0, floored, math.nan)


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
        old = torch.as_tensor(scale, dtype=log_b.dtype, device=log_b.device).detach().reshape(())
        if log_b.numel() == 0:  # an empty batch carries no statistics: keep the scale (a static shape check)
            return old
        new = adacos_reduce(log_b, theta, min_scale=min_scale)
        return torch.where(torch.isnan(new), old, new)  # no finite sample: keep the scale
