r"""Verification metrics of pairs: InsightFace's protocols on cosine scores.

A pair is *genuine* (same identity) or an *impostor* pair; a score is the pair's cosine similarity, accepted when
high. Definitions, each as InsightFace's ``recognition/arcface_torch`` evaluates:

- ``accuracy`` (LFW, ``eval/verification.py``): the pairs are split, in order, into ``num_folds`` contiguous folds
  (scikit-learn's ``KFold`` without shuffling: the first ``P mod num_folds`` folds one pair longer); on the other
  folds the threshold with the best accuracy is chosen (the first of equals) among ``t = 0, 0.01, …, 3.99`` on the
  squared distance of unit vectors ``‖a − b‖² = 2 − 2 cos``, a pair accepted when its distance is below ``t``; the
  fold's accuracy at that threshold; ``accuracy`` is their mean and ``accuracy_std`` their (population) standard
  deviation;
- the ROC (``eval_ijbc.py``): scikit-learn's ``roc_curve`` — one point per distinct score, collinear points dropped,
  ``(0, 0)`` first;
- ``tar_at_far_{far}`` (IJB-B/C): the true accept rate at the ROC point whose false accept rate is nearest ``far``,
  the highest of equals (at a FAR below ``1/impostors`` that is the TAR at FAR 0);
- ``eer``: the false accept rate where the ROC, linearly interpolated, meets ``FAR = 1 − TAR``;
- ``auc``: the area under the ROC (trapezoids).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch
from torch import Tensor

from mll.metrics import _checks as C
from mll.metrics import _search as S

__all__ = ["FAR_TARGETS", "pair_cosines", "pair_verification_metrics", "plot_roc", "roc_curve", "verification_metrics"]

#: InsightFace's IJB-B/C table: TAR at these FARs
FAR_TARGETS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
#: LFW's threshold grid on the squared distance 2 − 2·cos: 0, 0.01, …, 3.99 (NumPy's ``arange(0, 4, 0.01)``)
DISTANCE_THRESHOLDS = 400
DISTANCE_STEP = 0.01
#: pairs per block of :func:`pair_cosines`
PAIR_BLOCK = 1 << 16


def _check_pairs(scores: object, same: object) -> tuple[Tensor, Tensor]:
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        kind = scores.dtype if isinstance(scores, Tensor) else type(scores).__name__
        raise TypeError(f"scores must be a floating-point torch.Tensor of pair similarities, but got {kind}")
    if not isinstance(same, Tensor) or same.is_floating_point() or same.is_complex():
        kind = same.dtype if isinstance(same, Tensor) else type(same).__name__
        raise TypeError(f"same must be a bool (or 0/1 integer) torch.Tensor, one per pair, but got {kind}")
    if same.shape != scores.shape:
        raise ValueError(
            f"same must have the shape of scores {C.shape_str(scores.shape)}, one per pair, but got shape "
            f"{C.shape_str(same.shape)}"
        )
    C.check_same_device(("scores", scores), ("same", same))
    s, y = scores.reshape(-1).to(torch.float64), same.reshape(-1)
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError("same must hold only True/False (or 1/0), one per pair")
    y = y.bool()
    if not bool(torch.isfinite(s).all()):
        raise ValueError(f"scores has {int((~torch.isfinite(s)).sum())} NaN or infinite value(s): they have no rank")
    genuine = int(y.sum())
    if genuine == 0 or genuine == y.numel():
        raise ValueError(
            f"same must mark both genuine (True) and impostor (False) pairs, but got {genuine} genuine of "
            f"{y.numel()} pairs"
        )
    return s, y


def roc_curve(scores: Tensor, same: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    r"""The ROC of pair scores (accepted when ``score >= threshold``), as scikit-learn's ``roc_curve`` returns it.

    .. math:: \mathrm{TPR}(t) = \frac{\lvert\{p \in G : s_p \ge t\}\rvert}{\lvert G \rvert},\quad
              \mathrm{FPR}(t) = \frac{\lvert\{p \in I : s_p \ge t\}\rvert}{\lvert I \rvert}

    with G the genuine pairs and I the impostor pairs.

    One point per distinct score, from the highest, with the points on a straight line between their neighbours
    dropped (``drop_intermediate=True``) and ``(0, 0)`` at threshold ``inf`` first — the curve InsightFace reads its
    TAR at FAR from.

    Args:
        scores (Tensor[*]): pair similarities.
        same (Tensor[*]): True for genuine pairs (bool, or 0/1 integers); both kinds must occur.

    Returns:
        ``(fpr, tpr, thresholds)``, float64 tensors of one length: false and true accept rates, non-decreasing.
    """
    s, y = _check_pairs(scores, same)
    order = s.argsort(descending=True, stable=True)
    s, y = s[order], y[order]
    last = torch.cat([(s[1:] != s[:-1]).nonzero().flatten(), torch.tensor([len(s) - 1], device=s.device)])
    tps = y.cumsum(0)[last]
    fps = last + 1 - tps
    thresholds = s[last]
    if len(last) > 2:  # a point is kept where the curve turns (a non-zero second difference)
        turns = (fps.diff(2) != 0) | (tps.diff(2) != 0)
        ends = torch.ones(1, dtype=torch.bool, device=s.device)
        keep = torch.cat([ends, turns, ends])
        tps, fps, thresholds = tps[keep], fps[keep], thresholds[keep]
    zero = torch.zeros(1, dtype=tps.dtype, device=s.device)
    tps, fps = torch.cat([zero, tps]), torch.cat([zero, fps])
    thresholds = torch.cat([torch.full((1,), float("inf"), dtype=torch.float64, device=s.device), thresholds])
    fps, tps = fps.to(torch.float64), tps.to(torch.float64)
    return fps / fps[-1], tps / tps[-1], thresholds


def verification_metrics(
    scores: Tensor, same: Tensor, *, num_folds: int = 10, far_targets: Sequence[float] = FAR_TARGETS
) -> dict[str, float]:
    r"""Accuracy at the best threshold (k-fold), TAR at FAR, EER and AUC of pair scores (see the module notes).

    .. math:: \mathrm{TAR@FAR}(f) = \mathrm{TPR}_{i^*},\quad
              i^* = \max \operatorname*{arg\,min}_i \lvert \mathrm{FPR}_i - f \rvert

    Args:
        scores (Tensor[*]): pair cosine similarities (LFW's threshold grid spans ``cos`` in ``(-1, 1]``).
        same (Tensor[*]): True for genuine pairs; both kinds must occur.
        num_folds (int): LFW's folds (10), at most the number of pairs; 1 chooses and tests on all pairs.
        far_targets (sequence of float): FARs in ``(0, 1]`` for the ``tar_at_far_{far:.0e}`` keys (``1e-06`` …).

    Returns:
        dict of floats: ``accuracy``, ``accuracy_std``, ``eer``, ``auc`` and ``tar_at_far_{far:.0e}`` per target.
    """
    s, y = _check_pairs(scores, same)
    C.check_positive_int(num_folds, "num_folds")
    if num_folds > len(s):
        raise ValueError(f"num_folds must be at most the number of pairs ({len(s)}), but got {num_folds}")
    targets = [float(f) for f in far_targets] if isinstance(far_targets, Sequence) else []
    if not targets or not all(0.0 < f <= 1.0 for f in targets):
        raise ValueError(f"far_targets must be a non-empty sequence of rates in (0, 1], but got {far_targets!r}")
    accuracies = _fold_accuracies(2.0 - 2.0 * s, y, int(num_folds))
    fpr, tpr, _ = roc_curve(scores, same)
    out = {"accuracy": float(accuracies.mean()), "accuracy_std": float(accuracies.std(correction=0))}
    for far in targets:
        gap = (fpr - far).abs()
        nearest = len(gap) - 1 - int(gap.flip(0).argmin())  # the last of equals: the highest TAR at that FAR
        out[f"tar_at_far_{far:.0e}"] = float(tpr[nearest])
    out["eer"] = _equal_error_rate(fpr, tpr)
    out["auc"] = float(torch.trapezoid(tpr, fpr))
    return out


def _fold_accuracies(distance: Tensor, same: Tensor, folds: int) -> Tensor:
    """Each fold's test accuracy at the threshold that is best on the other folds (InsightFace's LFW protocol)."""
    thresholds = torch.arange(DISTANCE_THRESHOLDS, dtype=torch.float64, device=distance.device) * DISTANCE_STEP
    n = len(distance)
    sizes = [n // folds + (f < n % folds) for f in range(folds)]
    fold_of = torch.repeat_interleave(torch.arange(folds, device=distance.device),
                                      torch.tensor(sizes, device=distance.device))  # fmt: skip

    def correct(rows: Tensor) -> Tensor:
        """Pairs classified right at every threshold (accepted: distance < t), among ``rows``."""
        genuine, impostor = distance[rows & same].sort().values, distance[rows & ~same].sort().values
        accepted_genuine = torch.searchsorted(genuine, thresholds, side="left")
        accepted_impostor = torch.searchsorted(impostor, thresholds, side="left")
        return accepted_genuine + (len(impostor) - accepted_impostor)

    everyone = torch.ones_like(same)
    total = correct(everyone)
    accuracies = []
    for f in range(folds):
        test = fold_of == f
        on_test = correct(test)
        on_train = total if folds == 1 else total - on_test
        best = int(on_train.argmax())  # the first of equals, as NumPy's argmax
        accuracies.append(float(on_test[best]) / sizes[f])
    return torch.tensor(accuracies, dtype=torch.float64)


def _equal_error_rate(fpr: Tensor, tpr: Tensor) -> float:
    """Where the piecewise-linear ROC crosses FAR = 1 − TAR (``fpr + tpr − 1`` goes from −1 to 1 along it)."""
    gap = fpr + tpr - 1.0
    i = int((gap >= 0).nonzero()[0])
    if i == 0 or gap[i] == 0:
        return float(fpr[i])
    t = -gap[i - 1] / (gap[i] - gap[i - 1])
    return float(fpr[i - 1] + t * (fpr[i] - fpr[i - 1]))


def pair_cosines(first: Tensor, second: Tensor, pairs: Optional[Tensor] = None) -> Tensor:
    r"""Cosine similarity of pairs of embeddings, over blocks of pairs.

    .. math:: s_p = \langle \hat a_{i_p}, \hat b_{j_p} \rangle, \quad \hat x = x / \max(\lVert x \rVert, 10^{-12})

    Args:
        first (Tensor[*, d]): embeddings (any leading shape, flattened).
        second (Tensor[*, d]): embeddings.
        pairs (Tensor[P, 2], optional): integer rows ``(i, j)``: the pair ``first[i]``, ``second[j]``; None: row
            ``i`` of ``first`` with row ``i`` of ``second`` (they must have as many rows). InsightFace's LFW
            layout, alternating rows of one tensor ``e``, is ``pair_cosines(e[0::2], e[1::2])``.

    Returns:
        Tensor[P] of cosines: float64 if an input is float64, else float32 (half precision is upcast).
    """
    a, b = C.check_embeddings(first, "first"), C.check_embeddings(second, "second")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"first and second must have one feature size d, but got {a.shape[1]} and {b.shape[1]}")
    C.check_same_device(("first", a), ("second", b))
    if pairs is None:
        if a.shape[0] != b.shape[0]:
            raise ValueError(
                f"first and second must have as many rows without pairs, but got {a.shape[0]} and {b.shape[0]}"
            )
        left = right = None
    else:
        if not isinstance(pairs, Tensor) or pairs.is_floating_point() or pairs.dim() != 2 or pairs.shape[1] != 2:
            got = C.shape_str(pairs.shape) + f" {pairs.dtype}" if isinstance(pairs, Tensor) else type(pairs).__name__
            raise ValueError(f"pairs must be an integer tensor of shape (P, 2), but got {got}")
        C.check_same_device(("first", a), ("pairs", pairs))
        left, right = pairs[:, 0].long(), pairs[:, 1].long()
        for name, index, rows in (("first", left, a.shape[0]), ("second", right, b.shape[0])):
            if len(index) and (int(index.min()) < 0 or int(index.max()) >= rows):
                raise ValueError(f"pairs index {name} out of range: its indices must be in [0, {rows})")
    dtype = S.similarity_dtype(a, b)
    a, b = S.normalized(a, dtype), S.normalized(b, dtype)
    count = a.shape[0] if left is None else len(left)
    out = torch.empty(count, dtype=dtype, device=a.device)
    for p0 in range(0, count, PAIR_BLOCK):
        p1 = min(count, p0 + PAIR_BLOCK)
        rows_a = a[p0:p1] if left is None else a[left[p0:p1]]
        rows_b = b[p0:p1] if right is None else b[right[p0:p1]]
        out[p0:p1] = (rows_a * rows_b).sum(1)
    return out


def pair_verification_metrics(
    first: Tensor, second: Tensor, same: Tensor, *, pairs: Optional[Tensor] = None, num_folds: int = 10,
    far_targets: Sequence[float] = FAR_TARGETS,
) -> dict[str, float]:  # fmt: skip
    """:func:`verification_metrics` of the cosines :func:`pair_cosines` gives (``same``: one per pair)."""
    scores = pair_cosines(first, second, pairs)
    if not isinstance(same, Tensor) or same.numel() != len(scores):
        got = C.shape_str(same.shape) if isinstance(same, Tensor) else type(same).__name__
        raise ValueError(f"same must hold one value per pair ({len(scores)}), but got {got}")
    return verification_metrics(scores, same.reshape(-1), num_folds=num_folds, far_targets=far_targets)


def plot_roc(scores: Tensor, same: Tensor, *, ax: Any = None, label: Optional[str] = None) -> Any:
    """Draw the ROC (TAR against FAR, FAR on a log scale from 1e-6 as InsightFace's IJB plots) with its AUC in the
    legend; needs matplotlib.

    Args:
        scores (Tensor[*]): pair similarities.
        same (Tensor[*]): True for genuine pairs.
        ax (matplotlib Axes, optional): where to draw (default: a new figure's).
        label (str, optional): the curve's name in the legend.

    Returns:
        the matplotlib Axes.
    """
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - matplotlib is in the dev and demo extras
        raise ImportError("plot_roc needs matplotlib: pip install matplotlib") from error
    fpr, tpr, _ = roc_curve(scores, same)
    if ax is None:
        _, ax = plt.subplots(figsize=(5, 4))
    area = float(torch.trapezoid(tpr, fpr))
    name = f"{label} (AUC {area:.4f})" if label else f"AUC {area:.4f}"
    ax.plot(fpr.cpu().numpy(), tpr.cpu().numpy(), lw=1, label=name)
    ax.set(xscale="log", xlim=(1e-6, 1.0), ylim=(0.0, 1.0), xlabel="false accept rate", ylabel="true accept rate")
    ax.grid(True, which="both", linestyle="--", linewidth=0.5)
    ax.legend(loc="lower right")
    return ax
