"""pml's softmax losses with a margin or a temperature: ArcFace, Sub-center ArcFace, CosFace and NormalizedSoftmax,
each a cross-entropy computed by :func:`mll.functional.margin_cross_entropy` (chunked over the classes where the
classes are many, one block of logits otherwise) on pml's weights ``W`` of shape ``(embedding_size, num_classes)``."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mll import functional as MF
from mll.compat._pml_base import LossDict, PMLLoss
from mll.compat._pml_inputs import check_count, check_real

__all__ = ["ArcFaceLoss", "CosFaceLoss", "NormalizedSoftmaxLoss", "SubCenterArcFaceLoss", "WeightLoss", "pml_cosines"]


def pml_cosines(embeddings: Tensor, weight: Tensor) -> Tensor:
    """Cosines ``(N, rows)`` of the embeddings and the columns of pml's ``W`` ``(D, rows)``, in pml's operations and
    the embeddings' dtype, so that ``get_logits`` equals pml's to the last bit (pml's tests compare float16 logits
    at a relative 1e-5, one float16 ulp being 5e-4)."""
    return torch.matmul(F.normalize(embeddings, p=2, dim=1), F.normalize(weight.to(embeddings.dtype), p=2, dim=0))


def positive(owner: str, name: str, value: object) -> float:
    return check_real(owner, name, value, low=0.0, low_open=True)


class WeightLoss(PMLLoss):
    """A loss on pml's ``W`` ``(embedding_size, num_classes·K)``, Gaussian-initialised as pml does."""

    W: nn.Parameter

    def _weight(self, num_classes: Any, embedding_size: Any, sub_centers: int = 1) -> None:
        owner = type(self).__name__
        self.num_classes = check_count(owner, "num_classes", num_classes)
        self.embedding_size = check_count(owner, "embedding_size", embedding_size)
        self.W = self._parameter((self.embedding_size, self.num_classes * sub_centers), nn.init.normal_)

    def _regularized_weight(self) -> Tensor:
        return self.W.t()

    def _cross_entropy(self, embeddings: Tensor, labels: Tensor, weights: Optional[Tensor], **options: Any) -> LossDict:
        losses = MF.margin_cross_entropy(
            embeddings, options.pop("weight", self.W.t()), labels, reduction="none", **options
        )
        return {"loss": self._weighted(losses, weights)}


class ArcFaceLoss(WeightLoss):
    r"""pml's ``ArcFaceLoss``: :math:`s\cos(\theta_y + m)` on the target, :math:`s\cos\theta_j` elsewhere.

    "ArcFace: Additive Angular Margin Loss for Deep Face Recognition" (Deng et al., CVPR 2019,
    https://arxiv.org/abs/1801.07698), with pml's arguments and numbers: past :math:`\theta_y > \pi - m` the target
    logit is :math:`s(\cos\theta_y - m\sin m)`, as in pml 2.9 and :class:`mll.ArcFace`. Computed by
    :func:`mll.functional.margin_cross_entropy` with ``margin=MF.ARC(m)``.

    Differences from pml: the gradient is finite at :math:`\cos\theta_y = \pm 1` (pml's ``acos`` gives NaN there);
    the margin must lie in [0°, 90°) (``MF.ARC``'s range).

    Args:
        num_classes (int): C.
        embedding_size (int): D.
        margin (float): m in **degrees** (pml's unit), in [0, 90); stored as ``self.margin`` in radians, as pml does.
        scale (float): s > 0.
        **kwargs: pml's common options (see :mod:`mll.compat.pml`).

    Attributes:
        W (Parameter[D, C]): pml's class weights, column c for class c.
    """

    def __init__(
        self, num_classes: int, embedding_size: int, margin: float = 28.6, scale: float = 64, **kwargs: Any
    ) -> None:
        self._arc(num_classes, embedding_size, margin, scale, 1, kwargs)

    def _arc(
        self, num_classes: Any, embedding_size: Any, margin: Any, scale: Any, sub_centers: int, kwargs: dict[str, Any]
    ) -> None:
        owner = type(self).__name__
        degrees = check_real(
            owner, "margin", margin, low=0.0, high=90.0, unit=" degrees (pml's unit; mll.ArcFace takes radians)"
        )
        scale = positive(owner, "scale", scale)
        PMLLoss.__init__(self, **kwargs)
        self.margin, self.scale, self.sub_centers = math.radians(degrees), scale, sub_centers
        self._weight(num_classes, embedding_size, sub_centers)

    def _losses(self, embeddings: Tensor, labels: Tensor, weights: Optional[Tensor]) -> LossDict:
        return self._cross_entropy(
            embeddings, labels, weights, scale=self.scale, margin=MF.ARC(self.margin), num_sub_centers=self.sub_centers
        )

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """``scale·cos θ`` ``(N, C)``, no margin (sub-centers: each class's most similar), in pml's operations."""
        cos = pml_cosines(embeddings, self.W)
        if self.sub_centers > 1:
            cos = cos.view(-1, self.num_classes, self.sub_centers).amax(2)
        return cos * self.scale

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin="
            f"{math.degrees(self.margin):g}° ({self.margin:.4g} rad), scale={self.scale:g}"
        )


class SubCenterArcFaceLoss(ArcFaceLoss):
    r"""pml's ``SubCenterArcFaceLoss``: ArcFace on each class's most similar of K sub-centers.

    "Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy Web Faces" (Deng et al., ECCV 2020). As
    :class:`ArcFaceLoss`, with ``num_sub_centers=K`` (max pooling) in the engine; column ``c·K + k`` of ``W`` is
    sub-center k of class c, as in pml (and row ``c·K + k`` of :class:`mll.ArcFace`'s ``weight``).

    Args:
        num_classes (int): C (pml takes it by keyword only; here also by position).
        embedding_size (int): D.
        margin (float): m in degrees, in [0, 90).
        scale (float): s > 0.
        sub_centers (int): K >= 1 (3).
        **kwargs: pml's common options.

    Attributes:
        W (Parameter[D, C·K]): the sub-centers.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        *,
        margin: float = 28.6,
        scale: float = 64,
        sub_centers: int = 3,
        **kwargs: Any,
    ) -> None:
        k = check_count(type(self).__name__, "sub_centers", sub_centers)
        self._arc(num_classes, embedding_size, margin, scale, k, kwargs)

    def get_outliers(
        self, embeddings: Tensor, labels: Tensor, threshold: float = 75, return_dominant_centers: bool = True
    ) -> tuple[Tensor, Tensor]:
        """pml's clean-up: each class's dominant sub-center and the samples farther than ``threshold`` degrees.

        The dominant sub-center of a class is the one nearest to most of its samples in the batch
        (:func:`mll.functional.sub_center_counts`, :func:`mll.functional.dominant_sub_centers`: ties and classes
        absent from the batch take the lowest index, where pml leaves uninitialised memory). A sample is an outlier
        when its cosine to its class's dominant sub-center is below ``cos(threshold°)``, compared in the
        embeddings' dtype as pml compares.

        Args:
            embeddings (Tensor[N, D]): features.
            labels (Tensor[N] of int): class indices.
            threshold (float): degrees, in (0, 180] (75, the paper's).
            return_dominant_centers (bool): kept for pml's signature: pml 2.9 returns the pair either way, and so
                does this method.

        Returns:
            (Tensor[n_outliers] of int64, Tensor[D, C]): the outliers' indices in the batch, grouped by class and
            ascending within a class (pml's order), and the dominant sub-centers as columns.
        """
        owner = type(self).__name__
        degrees = check_real(
            owner, "threshold", threshold, low=0.0, high=180.0, low_open=True, high_open=False, unit=" degrees"
        )
        labels = self._check_labels(embeddings, labels)
        self._cast(embeddings)
        k, c = self.sub_centers, self.num_classes
        with torch.no_grad():
            counts = MF.sub_center_counts(embeddings, self.W.t(), labels, k)
            dominant = MF.dominant_sub_centers(counts)
            centers = self.W[:, torch.arange(c, device=dominant.device) * k + dominant]
            x = F.normalize(embeddings, p=2, dim=1)
            own = F.normalize(centers, p=2, dim=0).t()[labels]
            acc = torch.float64 if x.dtype == torch.float64 else torch.float32
            cos = (x.to(acc) * own.to(acc)).sum(1).to(x.dtype)
            outliers = (cos < math.cos(math.radians(degrees))).nonzero().flatten()
            outliers = outliers[torch.argsort(labels[outliers], stable=True)]
        return outliers, centers


class CosFaceLoss(WeightLoss):
    r"""pml's ``CosFaceLoss``: :math:`s(\cos\theta_y - m)` on the target, :math:`s\cos\theta_j` elsewhere.

    "CosFace: Large Margin Cosine Loss for Deep Face Recognition" (Wang et al., CVPR 2018,
    https://arxiv.org/abs/1801.09414). Computed by :func:`mll.functional.margin_cross_entropy` with
    ``margin=MF.COS(m)``; the margin must lie in [0, 1) (``MF.COS``'s range).

    Args:
        num_classes (int): C.
        embedding_size (int): D.
        margin (float): m in [0, 1), a cosine (0.35).
        scale (float): s > 0 (64).
        **kwargs: pml's common options.

    Attributes:
        W (Parameter[D, C]): the class weights.
    """

    def __init__(
        self, num_classes: int, embedding_size: int, *, margin: float = 0.35, scale: float = 64, **kwargs: Any
    ) -> None:
        owner = type(self).__name__
        margin = check_real(owner, "margin", margin, low=0.0, high=1.0)
        scale = positive(owner, "scale", scale)
        super().__init__(**kwargs)
        self.margin, self.scale = margin, scale
        self._weight(num_classes, embedding_size)

    def _losses(self, embeddings: Tensor, labels: Tensor, weights: Optional[Tensor]) -> LossDict:
        return self._cross_entropy(embeddings, labels, weights, scale=self.scale, margin=MF.COS(self.margin))

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """``scale·cos θ`` ``(N, C)``, no margin, in pml's operations."""
        return pml_cosines(embeddings, self.W) * self.scale

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin:g}, "
            f"scale={self.scale:g}"
        )


class NormalizedSoftmaxLoss(WeightLoss):
    r"""pml's ``NormalizedSoftmaxLoss``: the cross-entropy of :math:`\cos\theta_j / T`.

    "Classification is a Strong Baseline for Deep Metric Learning" (Zhai & Wu, BMVC 2019,
    https://arxiv.org/abs/1811.12649): :class:`mll.ScaledNormalizedLinear` with ``scale = 1/T``. With pml's
    ``distance=DotProductSimilarity(normalize_embeddings=False)`` the embeddings are not normalised (the weights
    always are): the logits are :math:`x^\top \hat w_j / T`. Computed by :func:`mll.functional.margin_cross_entropy`.

    Args:
        num_classes (int): C.
        embedding_size (int): D.
        temperature (float): T > 0 (0.05).
        **kwargs: pml's common options; ``distance`` may be pml's ``DotProductSimilarity`` with
            ``normalize_embeddings`` True (its default) or False.

    Attributes:
        W (Parameter[D, C]): the class weights.
    """

    distances = (("DotProductSimilarity", 1, True), ("DotProductSimilarity", 1, False))

    def __init__(self, num_classes: int, embedding_size: int, temperature: float = 0.05, **kwargs: Any) -> None:
        temperature = positive(type(self).__name__, "temperature", temperature)
        super().__init__(**kwargs)
        self.temperature = temperature
        self._weight(num_classes, embedding_size)

    def _losses(self, embeddings: Tensor, labels: Tensor, weights: Optional[Tensor]) -> LossDict:
        scale = 1 / self.temperature
        if self.normalize_embeddings:
            return self._cross_entropy(embeddings, labels, weights, scale=scale, margin=MF.NO_MARGIN())
        return self._cross_entropy(
            embeddings,
            labels,
            weights,
            weight=MF.normalize(self.W.t()),
            scale=scale,
            margin=MF.NO_MARGIN(),
            normalized=False,
        )

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """``cos θ / T`` (or ``x·ŵ / T``) ``(N, C)``, in pml's operations."""
        w_hat = F.normalize(self.W.to(embeddings.dtype), p=2, dim=0)
        if not self.normalize_embeddings:
            return torch.matmul(embeddings, w_hat) / self.temperature
        return pml_cosines(embeddings, w_hat) / self.temperature

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, temperature="
            f"{self.temperature:g}, normalize_embeddings={self.normalize_embeddings}"
        )
