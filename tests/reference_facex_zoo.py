"""Independent references for the heads FaceX-Zoo also implements (MV-Softmax, NPCFace, ArcNegFace, Circle loss).

Two kinds, sharing no code with ``mll``:

* ``*_ref``: float64 NumPy, straight from the papers' equations, one sample and one class at a time (explicit
  arccos/cos);
* ``*_authors``: the authors' public forward passes (FaceX-Zoo ``head/*.py`` at commit 16b793a, and
  xiaoboCASIA/SV-X-Softmax ``fc_layers.py`` at 89b536d), re-written in plain torch from their equations — not copied
  — so that the tests can compare logits, losses and autograd gradients on the same weights. Inputs are the weights
  as mll stores them, ``(C, d)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _arc(c: float, m: float) -> float:
    """cos(θ + m), with InsightFace's fallback c − m·sin m past θ + m ≥ π (what mll's ArcFace computes)."""
    theta = math.acos(min(1.0, max(-1.0, c)))
    return math.cos(theta + m) if theta + m < math.pi else c - m * math.sin(m)


# ------------------------------------------------------------------------------------------------ MV-Softmax


def mv_softmax_ref(cos: np.ndarray, labels: np.ndarray, m: float, t: float, margin_type: str, adaptive: bool,
                   s: float = 1.0) -> np.ndarray:  # fmt: skip
    """Wang et al., AAAI 2020: target ψ(θ_y); non-target j with cos θ_j > ψ(θ_y) re-weighted by h."""
    n, c = cos.shape
    out = np.empty_like(cos)
    for i in range(n):
        y = int(labels[i])
        psi = cos[i, y] - m if margin_type == "cos" else _arc(cos[i, y], m)
        for j in range(c):
            v = cos[i, j]
            if j == y:
                out[i, j] = psi
            elif v > psi:  # mis-classified: I_j = 1
                out[i, j] = v + t * (v + 1) if adaptive else v + t
            else:
                out[i, j] = v
    return s * out


def mv_softmax_facex(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, is_am: bool, margin: float,
                     mv_weight: float, scale: float) -> torch.Tensor:  # fmt: skip
    """FaceX-Zoo ``head/MV_Softmax.py``: the adaptive variant with ``mv_weight = 1 + t``; AM's margin only where
    the target cosine exceeds m, Arc's only where it is positive (no fix past π − m)."""
    cos = F.normalize(x) @ F.normalize(weight).t()
    gt = cos.gather(1, labels[:, None])
    if is_am:
        hard = cos > gt - margin
        target = torch.where(gt > margin, gt - margin, gt)
    else:
        shifted = gt * math.cos(margin) - torch.sqrt(1.0 - gt**2) * math.sin(margin)
        hard = cos > shifted
        target = torch.where(gt > 0.0, shifted, gt)
    out = torch.where(hard, mv_weight * cos + mv_weight - 1.0, cos)
    out = out.scatter(1, labels[:, None], target)
    return out * scale


def mv_softmax_svx(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, fc_type: str, margin: float,
                   t: float, scale: float, easy_margin: bool) -> torch.Tensor:  # fmt: skip
    """The paper's authors' ``fc_layers.py`` (SV-X-Softmax), ``fc_type`` ``"MV-AM"`` or ``"MV-Arc"``: the adaptive
    variant (t + 1)·cos + t, cosines clamped to [−1, 1], ``easy_margin`` (their default) keeps the target's cosine
    where it is not positive."""
    cos = (F.normalize(x) @ F.normalize(weight).t()).clamp(-1, 1)
    gt = cos.gather(1, labels[:, None])
    if fc_type == "MV-AM":
        hard = cos > gt - margin
        shifted = gt - margin
    else:
        shifted = gt * math.cos(margin) - torch.sqrt(1.0 - gt**2) * math.sin(margin)
        hard = cos > shifted
    target = torch.where(gt > 0, shifted, gt) if easy_margin else shifted
    out = torch.where(hard, (t + 1.0) * cos + t, cos)
    return out.scatter(1, labels[:, None], target) * scale


# ------------------------------------------------------------------------------------------------ NPCFace


def npcface_ref(cos: np.ndarray, labels: np.ndarray, m: float, m0: float, m1: float, t: float, a: float,
                s: float = 1.0) -> np.ndarray:  # fmt: skip
    """Zeng et al. 2020 with the authors' constants: hard negatives cos θ_j > cos(θ_y + m) become t·cos θ_j + a; the
    target cos(θ_y + m'), m' = m0 + m1 · (mean cosine of the hard negatives, 0 if none)."""
    n, c = cos.shape
    out = np.empty_like(cos)
    for i in range(n):
        y = int(labels[i])
        threshold = _arc(cos[i, y], m)
        hard = [j for j in range(c) if j != y and cos[i, j] > threshold]
        mean = sum(cos[i, j] for j in hard) / len(hard) if hard else 0.0
        for j in range(c):
            out[i, j] = t * cos[i, j] + a if j in hard else cos[i, j]
        out[i, y] = _arc(cos[i, y], m0 + m1 * mean)
    return s * out


def npcface_facex(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.5, m0: float = 0.4,
    m1: float = 0.2, t: float = 1.1, a: float = 0.2, scale: float = 64.0,
) -> torch.Tensor:  # fmt: skip
    """FaceX-Zoo ``head/NPCFace.py`` (on the CPU): cosines clamped to [−1, 1]; the hard mask and the positive margin
    without gradient; the target's margin only where its cosine is positive (no fix past π − m)."""
    cos = (F.normalize(x) @ F.normalize(weight).t()).clamp(-1, 1)
    gt = cos.gather(1, labels[:, None])
    sin = torch.sqrt(1.0 - gt**2)
    threshold = gt * math.cos(margin) - sin * math.sin(margin)
    with torch.no_grad():
        hard = (cos > threshold).scatter(1, labels[:, None], False)
        mean = torch.where(hard, cos, 0.0).sum(1, keepdim=True) / hard.sum(1, keepdim=True).clamp(1, cos.shape[1])
        new_m = m0 + m1 * mean
    target = torch.where(gt > 0, gt * torch.cos(new_m) - sin * torch.sin(new_m), gt)
    out = torch.where(cos > threshold, t * cos + a, cos).scatter(1, labels[:, None], target)
    return out * scale


# ------------------------------------------------------------------------------------------------ ArcNegFace


def arcneg_ref(cos: np.ndarray, labels: np.ndarray, m: float, alpha: float, sigma: float, s: float = 1.0) -> np.ndarray:
    """Liu et al. 2019: target ψ_y = cos(θ_y + m); every non-target t_j·cos θ_j + t_j − 1 with
    t_j = α·exp(−(cos θ_j − ψ_y)²/σ)."""
    n, c = cos.shape
    out = np.empty_like(cos)
    for i in range(n):
        y = int(labels[i])
        psi = _arc(cos[i, y], m)
        for j in range(c):
            t = alpha * math.exp(-((cos[i, j] - psi) ** 2) / sigma)
            out[i, j] = psi if j == y else t * cos[i, j] + t - 1
    return s * out


def arcneg_facex(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.5, alpha: float = 1.2,
    sigma: float = 2.0, scale: float = 64.0,
) -> torch.Tensor:  # fmt: skip
    """FaceX-Zoo ``head/ArcNegFace.py``, its per-sample loop vectorised: the target cos(acos(cos θ_y) + m) where
    θ_y < π − m, else cos θ_y − m·sin(π − m); the re-weighting from the target logit's value (``.item()``), detached."""
    cos = F.normalize(x) @ F.normalize(weight).t()
    gt = cos.gather(1, labels[:, None])
    target = torch.where(gt > math.cos(math.pi - margin), torch.cos(torch.acos(gt) + margin),
                         gt - math.sin(math.pi - margin) * margin)  # fmt: skip
    reweight = (alpha * torch.exp(-((cos - target.detach()) ** 2) / sigma)).detach()
    onehot = (torch.arange(cos.shape[1]) == labels[:, None]).to(cos.dtype)
    return scale * (onehot * target + (1 - onehot) * (reweight * cos + reweight - 1))


# ------------------------------------------------------------------------------------------------ Circle loss


def circle_ref(cos: np.ndarray, labels: np.ndarray, m: float, s: float = 1.0) -> np.ndarray:
    """Sun et al. 2020, class-level: O_p = 1 + m, O_n = −m, Δ_p = 1 − m, Δ_n = m; the target γ·α_p·(s_p − Δ_p),
    α_p = [O_p − s_p]_+, every other class γ·α_n·(s_n − Δ_n), α_n = [s_n − O_n]_+."""
    n, c = cos.shape
    out = np.empty_like(cos)
    for i in range(n):
        for j in range(c):
            v = cos[i, j]
            if j == int(labels[i]):
                out[i, j] = max(1 + m - v, 0.0) * (v - (1 - m))
            else:
                out[i, j] = max(v + m, 0.0) * (v - m)
    return s * out


def circle_facex(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, *, margin: float = 0.25,
                 gamma: float = 256.0) -> torch.Tensor:  # fmt: skip
    """FaceX-Zoo ``head/CircleLoss.py``: cosines clamped to [−1, 1], the α's computed from the detached cosines."""
    cos = (F.normalize(x) @ F.normalize(weight).t()).clamp(-1, 1)
    alpha_p = torch.clamp_min(1 + margin - cos.detach(), 0.0)
    alpha_n = torch.clamp_min(cos.detach() + margin, 0.0)
    positive = torch.arange(cos.shape[1]) == labels[:, None]
    out = torch.where(positive, alpha_p * (cos - (1 - margin)), alpha_n * (cos - margin))
    return out * gamma
