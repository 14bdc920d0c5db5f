"""The rows' targets in the kernel's form, and the conversions between the forms users give.

Users give class indices ``(*)``, dense soft targets ``(*, C)`` or few-hot pairs ``(classes, weights)`` of shape
``(*, P)``. The kernel sees :class:`Targets`: class indices and pairs as ``(N, P)`` block-local classes (with their
weights), dense soft targets as ``(N, B)`` slices. The sharded paths move pairs between ranks, so dense soft targets
become pairs of their non-zero entries there (:func:`dense_to_pair`) and every rank pads to the same width
(:func:`pad_pairs`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
from torch import Tensor

from mll.functional._engine.checks import check_pair, check_target

#: class indices ``(*)``, soft targets ``(*, C)``, or few-hot soft targets as a pair ``(classes, weights)``, ``(*, P)``
Target = Union[Tensor, tuple[Tensor, Tensor]]


@dataclass
class Targets:
    """The rows' targets as the kernel sees them in its block of B classes.

    Either ``classes`` — ``(N, P)`` block-local class indices, one or more per row (class indices: P = 1; few-hot
    soft targets: P entries with ``weights``); an index outside ``[0, B)`` is a class of another block, or a
    duplicate merged into an earlier entry — or ``dense``, ``(N, B)`` soft targets sliced per chunk. ``row_sum`` is
    each row's Σ_j t_ij over *all* classes (None: 1, class indices).
    """

    classes: Optional[Tensor] = None
    weights: Optional[Tensor] = None
    dense: Optional[Tensor] = None
    row_sum: Optional[Tensor] = None

    def rows(self, start: int, stop: int) -> Targets:
        """The targets of rows ``[start, stop)``."""
        return Targets(*(None if t is None else t[start:stop] for t in (self.classes, self.weights, self.dense,
                                                                        self.row_sum)))  # fmt: skip


def merge_duplicates(classes: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """Few-hot targets ``(N, P)`` with each class at most once per row: a class listed twice (a mixup of two samples
    of one class) keeps its first entry with the summed weight; later copies get class −1 (no class) and weight 0."""
    if classes.shape[-1] < 2:
        return classes, weights
    same = classes.unsqueeze(-1) == classes.unsqueeze(-2)  # (N, P, P)
    p = classes.shape[-1]
    earlier = torch.ones(p, p, dtype=torch.bool, device=classes.device).tril(-1)
    duplicate = (same & earlier).any(-1)
    summed = (same.to(weights.dtype) * weights.unsqueeze(-2)).sum(-1)
    return torch.where(duplicate, -1, classes), torch.where(duplicate, 0.0, summed).to(weights.dtype)


def kernel_targets(target: Target, lead: tuple[int, ...], num_classes: int, acc: torch.dtype) -> Targets:
    """The targets in the kernel's form: classes ``(N, P)`` (with weights for few-hot pairs), or dense ``(N, C)``."""
    if isinstance(target, (tuple, list)):
        classes, weights = check_pair(target, lead, num_classes)
        n, p = math.prod(lead), classes.shape[-1]  # (the rows counted from lead: P may be 0, no entries)
        weights = weights.reshape(n, p).to(acc)
        merged, merged_weights = merge_duplicates(classes.reshape(n, p), weights)
        return Targets(classes=merged, weights=merged_weights, row_sum=weights.sum(1))
    checked = check_target(target, torch.Size((*lead, num_classes)))
    if checked.requires_grad and torch.is_grad_enabled():  # (under no_grad there is no gradient to drop)
        raise ValueError(
            "margin_cross_entropy does not differentiate soft targets: detach target, or use the dense path "
            "F.cross_entropy(head(input, target), target)"
        )
    return tensor_targets(checked, num_classes, acc)


def tensor_targets(target: Tensor, num_classes: int, acc: torch.dtype) -> Targets:
    """Checked class indices (int64) or dense soft targets, flattened into the kernel's form."""
    if not target.is_floating_point():
        return Targets(classes=target.reshape(-1, 1))
    dense = target.reshape(-1, num_classes)
    return Targets(dense=dense, row_sum=dense.to(acc).sum(1))


def dense_to_pair(soft: Tensor) -> tuple[Tensor, Tensor]:
    """Dense soft targets ``(n, C)`` as their non-zero entries per row, ``(n, P)`` with P the most in any row."""
    nonzero = soft != 0
    p = int(nonzero.sum(1).max()) if soft.shape[0] > 0 else 0
    order = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)[:, :p]
    weights = soft.gather(1, order)
    return torch.where(weights != 0, order, -1), weights


def pad_pairs(classes: Tensor, weights: Tensor, p: int) -> tuple[Tensor, Tensor]:
    """Pad ``(n, P_r)`` entries to ``(n, p)`` with class −1, weight 0 (every rank gathers the same width)."""
    extra = p - classes.shape[1]
    if extra <= 0:
        return classes, weights
    return (
        torch.cat([classes, classes.new_full((classes.shape[0], extra), -1)], 1),
        torch.cat([weights, weights.new_zeros((weights.shape[0], extra))], 1),
    )
