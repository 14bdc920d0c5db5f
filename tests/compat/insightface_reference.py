"""InsightFace's Partial FC loss, written again from its equations (arcface_torch: ``losses.py``,
``partial_fc_v2.py``) in one process over the global batch and all classes, float64 — the independent reference that
``mll.compat.insightface`` is held to. Nothing here calls mll.

Forward: cos_ij = x̂_i·ŵ_j clamped to [−1, 1]; with a filtering threshold τ > 0 the non-target cosines above τ
become 0 (a 0/1 mask, no gradient); ArcFace's target logit cos(arccos(c) + m2) is written in without autograd (the
gradient passes straight through); CosFace's is c − m3; logits s·(…); p = softmax; loss_i = −ln max(p_iy, 1e-30);
L = mean. Backward of the cross-entropy: (p − onehot)/N for every row, the clamp ignored. With Partial FC the softmax
runs over the kept classes only: on each rank the block's positives plus the top ``int(rate·block)`` of uniform
scores drawn from that rank's generator (positives scored 2).

``exact=True`` is the margin cross-entropy with ArcFace's exact derivative (autograd through arccos) and its
continuation cos θ − m·sin m past θ > π − m, and no clamp.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


class TheirCrossEntropy(torch.autograd.Function):
    """DistCrossEntropyFunc's equations in one process: the clamped log in forward, softmax − one-hot in backward."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:
        p = torch.softmax(logits, dim=1)
        target = p.gather(1, labels[:, None]).squeeze(1)
        ctx.save_for_backward(p, labels)
        return -target.clamp(min=1e-30).log().mean()

    @staticmethod
    def backward(ctx, grad: Tensor):
        p, labels = ctx.saved_tensors
        onehot = torch.zeros_like(p).scatter_(1, labels[:, None], 1.0)
        return (p - onehot) / p.shape[0] * grad, None


def their_sample(positive: Tensor, rate: float, generator: torch.Generator) -> Tensor:
    """PartialFC_V2.sample: sorted block-local kept classes."""
    index_positive = positive.nonzero().squeeze(1)
    num_sample = int(rate * positive.numel())
    if num_sample - index_positive.numel() < 0:
        return index_positive
    perm = torch.rand(positive.numel(), generator=generator)
    perm[index_positive] = 2.0
    return torch.topk(perm, k=num_sample)[1].sort()[0]


def kept_classes(y: Tensor, blocks: list[tuple[int, int]], rate: float, seeds: list[int]) -> Optional[Tensor]:
    """The union of every rank's sample (global class indices), each rank's generator seeded with ``seeds[r]``."""
    if rate >= 1:
        return None
    parts = []
    for (start, stop), seed in zip(blocks, seeds):
        positive = torch.zeros(stop - start, dtype=torch.bool)
        mine = y[(y >= start) & (y < stop)] - start
        positive[mine] = True
        parts.append(their_sample(positive, rate, torch.Generator().manual_seed(seed)) + start)
    return torch.cat(parts)


def their_logits(
    cos: Tensor, labels: Tensor, *, s: float, m2: float = 0.0, m3: float = 0.0, threshold: float = 0.0,
    exact: bool = False,
) -> Tensor:  # fmt: skip
    """CombinedMarginLoss.forward: cosines (N, B) and block-local labels (−1: the class is in another block) in,
    scaled logits out (the filter, then the target logit of the rows whose class is here)."""
    labels = labels.reshape(-1)
    target = (torch.arange(cos.shape[1]) == labels[:, None]) & (labels >= 0)[:, None]
    if threshold > 0:
        with torch.no_grad():
            keep = ~((cos > threshold) & ~target)
        cos = cos * keep
    c = cos.gather(1, labels.clamp(min=0)[:, None])
    if m3 > 0:
        new = c - m3
    elif exact:
        theta = torch.acos(c)
        new = torch.where(theta + m2 < math.pi, torch.cos(theta + m2), c - m2 * math.sin(m2))
    else:
        with torch.no_grad():
            shifted = torch.cos(torch.acos(c) + m2)
        new = c + (shifted - c).detach()
    return torch.where(target, new, cos) * s


def insightface_loss(
    x: Tensor, weight: Tensor, y: Tensor, *, s: float, m2: float = 0.0, m3: float = 0.0, threshold: float = 0.0,
    exact: bool = False, kept: Optional[Tensor] = None,
) -> Tensor:  # fmt: skip
    cos = (F.normalize(x, dim=1) @ F.normalize(weight, dim=1).T).clamp(-1, 1)
    if kept is not None:
        cos, y = cos[:, kept], torch.searchsorted(kept, y)
    logits = their_logits(cos, y, s=s, m2=m2, m3=m3, threshold=threshold, exact=exact)
    if exact:
        return F.cross_entropy(logits, y)
    return TheirCrossEntropy.apply(logits, y)
