"""Independent references for the zoo heads of helper "a" (MV-Softmax, NPCFace, ArcNegFace, Circle).

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
