"""SoftTriple: K soft-pooled centres per class, a small margin, and the centre regulariser in ``loss()``."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from mll import functional as MF
from mll.functional._engine.checks import check_nonnegative
from mll.nn._head import Head
from mll.nn._state import margin_repr, register_margin, typical_margin

__all__ = ["SoftTriple"]


class SoftTriple(Head):
    r"""SoftTriple head: :math:`\lambda(S'_{i,y} - \delta)` on the target, :math:`\lambda S'_{i,j}` elsewhere, with
    :math:`S'` the soft-pooled similarity to each class's K centres, and the centre regulariser in :meth:`loss`.

    "SoftTriple Loss: Deep Metric Learning Without Triplet Sampling" (Qian et al., ICCV 2019,
    https://arxiv.org/abs/1909.05235): the SoftTriple loss and its centre regulariser. The paper's
    symbols are this head's arguments: λ = ``scale`` (20), γ = ``pooling_temperature`` (0.1; the softmax over a
    class's centres is of :math:`x^\top w^k/\gamma`), δ = ``margin`` (0.01), τ = ``tau`` (0.2), K =
    ``num_sub_centers`` (10); the defaults are the authors' code's (its ``train.py``). See
    :func:`mll.functional.soft_triple_regularizer` and :func:`mll.functional.soft_triple_distinct_centers`.

    :meth:`loss` is the paper's objective: the cross-entropy of the logits plus
    :math:`\tau \sum_j R_j / (C K (K - 1))` (:meth:`regularizer`; nothing for K = 1), over class chunks on both. For
    the dense path add ``head.regularizer()`` to ``F.cross_entropy(head(x, y), y)``. Eval mode returns the scaled
    soft-pooled cosines ``λ·S'`` and needs no labels. The regulariser merges similar centres of a class, so that
    a large K adapts to the classes' modes: :meth:`distinct_centers` reports how many each class keeps.

    Args:
        num_sub_centers (int): K, centres per class (10).
        scale (float): λ (20; ``None``: mll's default-scale heuristic).
        margin (float or Tensor): δ in ``[0, 1)`` (0.01), or ``(C,)``.
        tau (float): τ >= 0, the regulariser's weight (0.2; 0: no centre term, which :meth:`loss` then skips —
            pytorch-metric-learning's ``SoftTripleLoss``, which has no regulariser).
        pooling (str): ``"soft"`` (SoftTriple's relaxed similarity; ``"max"`` gives a sub-center CosFace with the
            regulariser).
        pooling_temperature (float): γ (0.1).
    """

    margin: Any

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 10, scale: Optional[float] = 20.0,
        trainable_scale: bool = False, margin: Any = 0.01, *, tau: float = 0.2, pooling: str = "soft",
        pooling_temperature: float = 0.1, device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        self_tau = check_nonnegative(tau, "SoftTriple tau")
        typical = typical_margin(margin, MF.COS.parameters[0], "SoftTriple", out_features)  # named as SoftTriple's
        super().__init__(
            in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_margin=MF.COS(typical), pooling=pooling, pooling_temperature=pooling_temperature,
            device=device, dtype=dtype,
        )  # fmt: skip
        register_margin(self, "margin", margin, MF.COS.parameters[0], "SoftTriple", out_features, device, dtype)
        self.tau = self_tau
        self.reset_parameters()

    @property
    def regularized(self) -> bool:  # type: ignore[override]
        """Whether :meth:`loss` adds the centre term: not where it is 0 (τ = 0 — pytorch-metric-learning's
        ``SoftTripleLoss`` has no regulariser — or K = 1)."""
        return self.tau != 0 and self.num_sub_centers > 1

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        return MF.COS(self.margin)

    def regularizer(self) -> Tensor:
        r""":math:`\tau \sum_j R_j / (C K (K - 1))` (0 for K = 1): what :meth:`loss` adds to the cross-entropy."""
        return self.center_term(self.weight, self.out_features)

    def center_term(self, weight: Tensor, num_classes: int) -> Tensor:
        """τ·ΣR_j/(C·K·(K − 1)) over the classes of ``weight`` (a block's rows: its part of the sum), C all classes."""
        k = self.num_sub_centers
        if not self.regularized:  # (0, with a gradient: zeros)
            return weight.sum() * 0.0
        total = MF.soft_triple_regularizer(weight, k).sum()
        return total * (self.tau / (num_classes * k * (k - 1)))

    def distinct_centers(self, max_distance: float = 1e-2) -> Tensor:
        """How many distinct centres each class keeps (``(C,)``, int64): see
        :func:`mll.functional.soft_triple_distinct_centers`."""
        return MF.soft_triple_distinct_centers(self.weight, self.num_sub_centers, max_distance=max_distance)[1]

    def head_options(self) -> dict[str, Any]:
        return {"margin": self.initial("margin"), "tau": self.tau}

    def extra_options(self) -> list[str]:
        return [f"margin={margin_repr(self.margin)}", f"tau={self.tau}"]
