"""Independent float64 references, written in NumPy straight from the papers' equations.

They share no code with ``mll``: explicit arccos/cos on a one-hot mask, Python loops over classes.
"""

from __future__ import annotations

import math

import numpy as np


def as_np(t) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def onehot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return (np.arange(num_classes) == labels[..., None]).astype(np.float64)


def normalize(a: np.ndarray) -> np.ndarray:
    norm = np.sqrt((a * a).sum(-1, keepdims=True))
    return np.divide(a, norm, out=np.zeros_like(a), where=norm > 0)


def cosine(x: np.ndarray, w: np.ndarray, k: int = 1) -> np.ndarray:
    cos = normalize(x) @ normalize(w).T
    if k > 1:
        cos = cos.reshape(*cos.shape[:-1], -1, k).max(-1)
    return cos


def cos_margin(cos: np.ndarray, t: np.ndarray, m: float, s: float = 1.0) -> np.ndarray:
    return s * (cos - m * t)


def arc_margin(cos: np.ndarray, t: np.ndarray, m: float, s: float = 1.0, easy: bool = False) -> np.ndarray:
    theta = np.arccos(np.clip(cos, -1.0, 1.0))
    mt = m * t
    shifted = np.cos(theta + mt)
    if easy:
        return s * np.where(cos > 0, shifted, cos)
    # beyond θ + m·t = π the angle would wrap around: InsightFace's linear fallback
    return s * np.where(theta + mt < math.pi, shifted, cos - mt * np.sin(mt))


def adacos_scale(cos: np.ndarray, t: np.ndarray, s: float, min_scale: float = 0.5) -> float:
    """Eq. 15-16 of AdaCos, looping over samples; soft targets as in Sub-Cluster AdaCos."""
    n, c = cos.shape
    b_sum, angles = 0.0, []
    for i in range(n):
        b_sum += sum((1.0 - t[i, k]) * math.exp(s * cos[i, k]) for k in range(c))
        angles.append(sum(t[i, k] * math.acos(min(1.0, max(-1.0, cos[i, k]))) for k in range(c)))
    b_avg = b_sum / n
    theta_med = sorted(angles)[(n - 1) // 2]  # lower median, torch.median's convention
    return max(math.log(b_avg) / math.cos(min(math.pi / 4, theta_med)), min_scale)


def ncm_update(means: np.ndarray, x: np.ndarray, t: np.ndarray, alpha: float) -> np.ndarray:
    new = means.copy()
    for c in range(means.shape[0]):
        weight = t[:, c].sum()
        if weight > 0:
            batch_mean = (t[:, c : c + 1] * x).sum(0) / weight
            new[c] = alpha * means[c] + (1 - alpha) * batch_mean
    return new
