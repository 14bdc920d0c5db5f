r"""InsightFace's margins as margin families: its ArcFace (the gradient passed straight through) and its filter.

InsightFace's ``CombinedMarginLoss`` (``recognition/arcface_torch/losses.py``), the margin of its Partial FC
training, takes cosines and labels and returns logits. Its ArcFace (``m1 = 1, m3 = 0``) differs from the paper's
and from :data:`mll.functional.ARC` in two ways, both kept by :data:`INSIGHTFACE_ARC`:

* **straight through.** It overwrites the target cosine with :math:`\cos(\arccos c + m)` without autograd (in place,
  under ``torch.no_grad``), so the gradient reaching the target cosine is the scale alone, as if the margin were a
  constant shift: :math:`\partial\psi/\partial\cos = 1` where :data:`ARC`'s is the exact
  :math:`\cos m + \sin m\cos\theta/\sin\theta` (``docs/from-insightface.md`` compares the two);
* **no fix past** :math:`\pi - m`: the target logit is :math:`\cos(\theta + m)` at every angle, and rises again
  past :math:`\theta > \pi - m`, where :data:`ARC` continues with :math:`\cos\theta - m\sin m`.

Its CosFace (``m3 > 0``) is :data:`mll.functional.COS`: linear, so its gradient is already exact. With
``interclass_filtering_threshold > 0`` it sets every non-target cosine above the threshold to 0 (a zero logit,
no gradient) before the margin: the ``*_FILTERED`` families, whose non-target part (see
:class:`mll.functional.MarginFamily`) does that chunk by chunk on every path.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from mll.functional._engine.numerics import above, in_place_ok, scratch
from mll.functional.margin import MarginFamily, MarginParameter
from mll.functional.margins import ARC_MARGIN_RANGE, COS_MARGIN_RANGE, _arc_value_and_slope

__all__ = ["ARC_FILTERED", "COS_FILTERED", "INSIGHTFACE_ARC", "INSIGHTFACE_ARC_FILTERED"]


def _straight_arc(cosine: Tensor, margin: Tensor) -> tuple[Tensor, Tensor]:
    """ψ = cos(arccos c + m) with slope 1: InsightFace's ArcFace. Its cosines are clamped to [−1, 1] first (so is
    the arccos's argument here), and the clamp passes no gradient outside it; ψ = c exactly where m·t = 0."""
    value = torch.cos(torch.acos(cosine.clamp(-1.0, 1.0)) + margin)
    plain = margin == 0  # the identity, as every family at t = 0
    return torch.where(plain, cosine, value), torch.where(plain | (cosine.abs() <= 1), 1.0, 0.0).to(cosine.dtype)


def _cos(cosine: Tensor, margin: Tensor) -> tuple[Tensor, Tensor]:
    value = cosine - margin
    return value, value.new_ones(()).expand(value.shape)


@dataclass(frozen=True)
class _Variant:
    """One family's functions: module-level and plain data, so that the families pickle."""

    kind: str  # "straight_arc", "arc" (exact, as ARC) or "cos"

    def target(self, cosine: Tensor, margin: Tensor) -> tuple[Tensor, Tensor]:
        if self.kind == "straight_arc":
            return _straight_arc(cosine, margin)
        if self.kind == "arc":
            return _arc_value_and_slope(cosine, margin, False)
        return _cos(cosine, margin)

    def value_and_slope(self, cosine: Tensor, w: Tensor | float, margin: Tensor) -> tuple[Tensor, Tensor]:
        return self.target(cosine, margin * w)

    def filtered_value_and_slope(
        self, cosine: Tensor, w: Tensor | float, margin: Tensor, threshold: Tensor
    ) -> tuple[Tensor, Tensor]:
        return self.target(cosine, margin * w)

    def negatives(self, cosine: Tensor, target: Tensor, margin: Tensor, threshold: Tensor) -> tuple[Tensor, Tensor]:
        # a non-target cosine above the threshold becomes 0 (InsightFace multiplies it by a 0/1 mask: no gradient)
        # (the mask as a number, ``above``: a lerp to 0 and 1 − mask, exact)
        dirty = above(cosine, threshold.to(cosine.dtype))
        zero = torch.zeros((), dtype=cosine.dtype, device=cosine.device).expand_as(dirty)
        if not in_place_ok():
            return torch.lerp(cosine, zero, dirty), torch.rsub(dirty, 1)
        return torch.lerp(cosine, zero, dirty, out=scratch(cosine, 1)), dirty.neg_().add_(1)

    def target_logit(self, theta: float, m: float, *threshold: float) -> float:
        if self.kind == "cos":
            return math.cos(theta) - m
        if self.kind == "arc" and theta > math.pi - m:
            return math.cos(theta) - m * math.sin(m)
        return math.cos(theta + m)


_THRESHOLD = MarginParameter("interclass_filtering_threshold", 0.0, math.inf)


def _family(kind: str, filtered: bool) -> MarginFamily:
    variant = _Variant(kind)
    margin = MarginParameter("margin", *(COS_MARGIN_RANGE if kind == "cos" else ARC_MARGIN_RANGE))
    title = {"straight_arc": "InsightFace's ArcFace", "arc": "ArcFace", "cos": "CosFace"}[kind]
    if not filtered:
        return MarginFamily("insightface_arc", variant.value_and_slope, (margin,), target_logit=variant.target_logit,
                            title=title)  # fmt: skip
    name = {"straight_arc": "insightface_arc_filtered", "arc": "arc_filtered", "cos": "cos_filtered"}[kind]
    return MarginFamily(
        name, variant.filtered_value_and_slope, (margin, _THRESHOLD), target_logit=variant.target_logit,
        negatives=variant.negatives, class_indices_only=True, title=f"{title} with inter-class filtering",
    )  # fmt: skip


#: InsightFace's ArcFace: ψ = cos(θ + m·t) at every angle, ∂ψ/∂cos = 1 (straight through).
INSIGHTFACE_ARC = _family("straight_arc", filtered=False)
#: :data:`INSIGHTFACE_ARC`, and non-target cosines above ``interclass_filtering_threshold`` set to 0.
INSIGHTFACE_ARC_FILTERED = _family("straight_arc", filtered=True)
#: :data:`mll.functional.ARC` (exact gradient, the fix past π − m), non-target cosines above the threshold set to 0.
ARC_FILTERED = _family("arc", filtered=True)
#: :data:`mll.functional.COS`, non-target cosines above ``interclass_filtering_threshold`` set to 0.
COS_FILTERED = _family("cos", filtered=True)
