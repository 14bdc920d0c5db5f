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


def _angles(cos: np.ndarray) -> np.ndarray:
    return np.arccos(np.clip(cos, -1.0, 1.0))


def combined_margin(cos, t, m1, m2, m3, s=1.0):
    """ArcFace paper Eq. 4, cos(m1·θ + m2) − m3, continued past π as SphereFace's ψ; soft t interpolates."""
    theta = _angles(cos)
    phi = (1 + (m1 - 1) * t) * theta + m2 * t
    k = np.floor(phi / math.pi)
    return s * ((-1.0) ** k * np.cos(phi) - 2 * k - m3 * t)


def sphere_margin(cos, t, m, lam=0.0, s=1.0):
    """SphereFace Eq. 6 with the annealing (λ cos θ + ψ) / (1 + λ)."""
    psi = combined_margin(cos, t, m, 0.0, 0.0)
    return s * (lam * cos + psi) / (1 + lam)


def curricular_margin(cos, labels, m, t, s=1.0):
    """CurricularFace Eq. 7-8, one sample at a time."""
    n, c = cos.shape
    out = np.empty_like(cos)
    for i in range(n):
        y = labels[i]
        theta_y = math.acos(min(1.0, max(-1.0, cos[i, y])))
        threshold = math.cos(theta_y + m)
        for j in range(c):
            if j == y:
                out[i, j] = math.cos(theta_y + m) if theta_y + m < math.pi else cos[i, y] - m * math.sin(m)
            elif cos[i, j] > threshold:
                out[i, j] = cos[i, j] * (t + cos[i, j])
            else:
                out[i, j] = cos[i, j]
    return s * out


def ada_margin(cos, t, norms, m, mean, std, h=0.333, s=1.0, eps=1e-3):
    """AdaFace Eq. 6-11 (norms clipped to [0.001, 100], the shifted angle kept in [ε, π − ε])."""
    z = np.clip(h * (np.clip(norms, 1e-3, 100) - mean) / (std + eps), -1, 1)[:, None]
    theta = _angles(cos)
    shifted = theta - m * z * t
    shifted = np.clip(shifted, np.minimum(theta, eps), np.maximum(theta, math.pi - eps))
    return s * (np.cos(shifted) - (m * z + m) * t)


def mag_margin(cos, t, norms, lower=10.0, upper=110.0, m_low=0.45, m_high=0.8, s=1.0, easy=False):
    """MagFace Eq. 3 with the linear m(a) of Sec. 4.1 and ArcFace's fix past π − m; with ``easy`` the authors'
    code's default instead: the margin only where cos θ > 0, the cosine unchanged elsewhere."""
    a = np.clip(norms, lower, upper)
    m = ((m_high - m_low) / (upper - lower) * (a - lower) + m_low)[:, None] * t
    theta = _angles(cos)
    if easy:
        return s * np.where(cos > 0, np.cos(theta + m), cos)
    return s * np.where(theta + m < math.pi, np.cos(theta + m), cos - m * np.sin(m))


def soft_pool(cos_k: np.ndarray, gamma: float) -> np.ndarray:
    """SoftTriple Eq. 8: Σ_k softmax_k(c_k / γ) c_k over the last axis."""
    e = np.exp((cos_k - cos_k.max(-1, keepdims=True)) / gamma)
    return (e / e.sum(-1, keepdims=True) * cos_k).sum(-1)


# ---------------------------------------------------------------- AdaM-Softmax, SoftTriple, L-Softmax (heads)


def cross_entropy(logits: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Per-row cross-entropy with (soft) targets ``t``, log-sum-exp by hand."""
    top = logits.max(1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(1))
    return lse * t.sum(1) - (t * logits).sum(1)


def adam_softmax(x, w, margins, t, s, lam):
    """AdaptiveFace: s(cos θ_j − m_j t_j) and the loss mean(CE) − λ/C Σ m_j."""
    cos = normalize(x) @ normalize(w).T
    logits = s * (cos - margins[None, :] * t)
    return logits, cross_entropy(logits, t).mean() - lam * margins.mean()


def soft_pool_by_class(cos_k: np.ndarray, k: int, gamma: float) -> np.ndarray:
    """SoftTriple's relaxed similarity: Σ_k softmax_k(cos/γ)·cos over each class's K centres (a loop over classes)."""
    n, ck = cos_k.shape
    out = np.zeros((n, ck // k))
    for c in range(ck // k):
        block = cos_k[:, c * k : (c + 1) * k]
        p = np.exp((block - block.max(1, keepdims=True)) / gamma)
        out[:, c] = (p / p.sum(1, keepdims=True) * block).sum(1)
    return out


def center_regularizer(w: np.ndarray, k: int, eps: float = 1e-5) -> np.ndarray:
    """Σ_{t<t'} sqrt(2 + ε − 2 ŵ_t·ŵ_t') per class, two loops."""
    w = normalize(w)
    out = np.zeros(w.shape[0] // k)
    for c in range(len(out)):
        for t in range(k):
            for u in range(t + 1, k):
                out[c] += math.sqrt(2 + eps - 2 * float(w[c * k + t] @ w[c * k + u]))
    return out


def soft_triple(x, w, t, k, lam, gamma, delta, tau):
    """SoftTriple: λ(S' − δ t) and the loss mean(CE) + τ ΣR/(C K (K − 1))."""
    s_prime = soft_pool_by_class(normalize(x) @ normalize(w).T, k, gamma)
    logits = lam * (s_prime - delta * t)
    c = s_prime.shape[1]
    reg = tau * center_regularizer(w, k).sum() / (c * k * (k - 1)) if k > 1 else 0.0
    return logits, cross_entropy(logits, t).mean() + reg


def large_margin(x, w, t, m, lam, s):
    """L-Softmax: ‖w_j‖‖x‖cos θ_j, and at a target ‖w_y‖‖x‖(λ cos θ + ψ(θ))/(1 + λ), ψ(θ) = (−1)^k cos(mθ) − 2k
    on [kπ/m, (k+1)π/m] (k found by a loop); soft targets t give the margin 1 + (m − 1)t."""
    norms = np.sqrt((x * x).sum(1))[:, None] * np.sqrt((w * w).sum(1))[None, :]
    cos = np.clip((x @ w.T) / norms, -1, 1)
    logits = norms * cos
    for i in range(x.shape[0]):
        for j in range(w.shape[0]):
            if t[i, j] == 0:
                continue
            mm = 1 + (m - 1) * t[i, j]
            theta = math.acos(cos[i, j])
            k = 0
            while theta > (k + 1) * math.pi / mm:
                k += 1
            psi = (-1) ** k * math.cos(mm * theta) - 2 * k
            logits[i, j] = norms[i, j] * (lam * cos[i, j] + psi) / (1 + lam)
    return s * logits
