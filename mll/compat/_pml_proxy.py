"""pml's proxy losses: ProxyAnchor (:func:`mll.functional.chunked_proxy_anchor_loss`), ProxyNCA and SoftTriple
(:func:`mll.functional.margin_cross_entropy`, the latter with soft sub-center pooling)."""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mll import functional as MF
from mll.compat._pml_base import LossDict, PMLLoss, reduced
from mll.compat._pml_inputs import check_count, check_real

__all__ = ["ProxyAnchorLoss", "ProxyNCALoss", "SoftTripleLoss"]


class _ProxiesLoss(PMLLoss):
    """A loss on pml's ``proxies`` ``(num_classes, embedding_size)``: the same layout as mll's ``weight``."""

    parameter_name = "proxies"
    proxies: nn.Parameter

    def _proxies(self, num_classes: Any, embedding_size: Any, default_init: Any) -> None:
        owner = type(self).__name__
        self.num_classes = check_count(owner, "num_classes", num_classes)
        self.embedding_size = check_count(owner, "embedding_size", embedding_size)
        self.proxies = self._parameter((self.num_classes, self.embedding_size), default_init)

    def _regularized_weight(self) -> Tensor:
        return self.proxies


class ProxyAnchorLoss(_ProxiesLoss):
    r"""pml's ``ProxyAnchorLoss``: each proxy pulls its class's samples of the batch and pushes all others away.

    "Proxy Anchor Loss for Deep Metric Learning" (Kim et al., CVPR 2020, https://arxiv.org/abs/2003.13911):

    .. math:: \ell = \frac{1}{|P^+|} \sum_{p \in P^+} \log\Big(1 + \sum_{x \in X_p^+} e^{-\alpha(s(x, p) - \delta)}\Big)
              + \frac{1}{|P|} \sum_{p \in P} \log\Big(1 + \sum_{x \in X_p^-} e^{\alpha(s(x, p) + \delta)}\Big)

    Computed by :func:`mll.functional.chunked_proxy_anchor_loss` (over class chunks, no N×C cosines). With a
    miner's ``indices_tuple``, pml adds each sample's weight minus one to its exponents; that runs on the dense
    :func:`mll.functional.proxy_anchor_loss`, the weight folded into the cosines. The loss is one number for the
    batch (pml's ``DivisorReducer`` over per-proxy terms): ``reducer`` must be None or a ``DivisorReducer``.

    Args:
        num_classes (int): C.
        embedding_size (int): D.
        margin (float): δ >= 0 (0.1).
        alpha (float): α > 0 (32).
        **kwargs: pml's common options; ``weight_init_func`` defaults to pml's ``kaiming_normal_(mode="fan_out")``.

    Attributes:
        proxies (Parameter[C, D]): one proxy per class.
    """

    only_reducers = ("DivisorReducer",)
    sub_losses = ("pos_loss", "neg_loss")

    def __init__(
        self, num_classes: int, embedding_size: int, margin: float = 0.1, alpha: float = 32, **kwargs: Any
    ) -> None:
        owner = type(self).__name__
        margin = check_real(owner, "margin", margin, low=0.0)
        alpha = check_real(owner, "alpha", alpha, low=0.0, low_open=True)
        super().__init__(**kwargs)
        self.margin, self.alpha = margin, alpha
        self._proxies(num_classes, embedding_size, partial(nn.init.kaiming_normal_, mode="fan_out"))

    def _losses(self, embeddings: Tensor, labels: Tensor, weights: Optional[Tensor]) -> LossDict:
        if weights is None:
            loss = MF.chunked_proxy_anchor_loss(embeddings, self.proxies, labels, alpha=self.alpha, delta=self.margin)
        else:
            # pml adds (w − 1) to every exponent of sample i: −α(s − δ) + (w − 1) = −α((s − (w − 1)/α) − δ) on its
            # positive, α(s + δ) + (w − 1) = α((s + (w − 1)/α) + δ) on its negatives
            acc = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
            cos = MF.cosine_logits(embeddings, self.proxies).to(acc)
            shift = ((weights.to(acc) - 1) / self.alpha).unsqueeze(1)
            positive = torch.arange(self.num_classes, device=labels.device) == labels.unsqueeze(1)
            cos = cos + torch.where(positive, -shift, shift)
            loss = MF.proxy_anchor_loss(cos, labels, alpha=self.alpha, delta=self.margin)
        return {"loss": reduced(loss)}

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """The cosines ``(N, C)`` of the embeddings and the proxies, in pml's operations."""
        proxies = F.normalize(self.proxies.to(embeddings.dtype), p=2, dim=1)
        return torch.matmul(F.normalize(embeddings, p=2, dim=1), proxies.t())

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, margin={self.margin:g}, "
            f"alpha={self.alpha:g}"
        )


class ProxyNCALoss(_ProxiesLoss):
    r"""pml's ``ProxyNCALoss``: a softmax over the proxies of :math:`-s\,\lVert \hat x - \hat p_j\rVert^2`.

    "No Fuss Distance Metric Learning using Proxies" (Movshovitz-Attias et al., ICCV 2017,
    https://arxiv.org/abs/1703.07464), as pml computes it — with the positive proxy in the denominator, which is
    ProxyNCA++'s proxy assignment probability: since :math:`\lVert \hat x - \hat p\rVert^2 = 2 - 2\cos\theta`,
    the loss is the cross-entropy of ``2·softmax_scale·cos θ`` (:func:`mll.functional.margin_cross_entropy`),
    i.e. :class:`mll.ProxyNCAPlusPlus` with ``softmax_temperature = 1/softmax_scale``. As pml, a sample whose
    target probability underflows to 0 in the embeddings' dtype is left out (of the mean too).

    Differences from pml: labels outside ``[0, num_classes)`` raise (pml leaves such samples out silently).

    Args:
        num_classes (int): C.
        embedding_size (int): D.
        softmax_scale (float): s > 0 (1).
        **kwargs: pml's common options (its default distance is ``LpDistance(power=2)``).

    Attributes:
        proxies (Parameter[C, D]): one proxy per class.
    """

    distances = (("LpDistance", 2, True),)
    anchors_only = True

    def __init__(self, num_classes: int, embedding_size: int, *, softmax_scale: float = 1, **kwargs: Any) -> None:
        softmax_scale = check_real(type(self).__name__, "softmax_scale", softmax_scale, low=0.0, low_open=True)
        super().__init__(**kwargs)
        self.softmax_scale = softmax_scale
        self._proxies(num_classes, embedding_size, nn.init.normal_)

    def _losses(self, embeddings: Tensor, labels: Tensor, weights: Optional[Tensor]) -> LossDict:
        losses = MF.margin_cross_entropy(
            embeddings, self.proxies, labels, scale=2 * self.softmax_scale, margin=MF.NO_MARGIN(), reduction="none"
        )
        term = self._weighted(losses, weights)
        kept = torch.exp(-losses.detach().to(embeddings.dtype)) != 0  # pml: -log(p) where p > 0 only
        return {"loss": {**term, "losses": term["losses"][kept], "indices": term["indices"][kept]}}

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """The squared distances ``(N, C)`` of the normalised embeddings and proxies (pml's ``LpDistance(power=2)``;
        ``torch.cdist`` in float32 for half precision, where pml goes pair by pair)."""
        dtype = torch.float32 if embeddings.dtype in (torch.float16, torch.bfloat16) else embeddings.dtype
        x = F.normalize(embeddings.to(dtype), p=2, dim=1)
        proxies = F.normalize(self.proxies.to(dtype), p=2, dim=1)
        return (torch.cdist(x, proxies, p=2) ** 2).to(embeddings.dtype)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, "
            f"softmax_scale={self.softmax_scale:g}"
        )


class SoftTripleLoss(PMLLoss):
    r"""pml's ``SoftTripleLoss``: :math:`\lambda(S'_{i,y} - \delta)` on the target, :math:`\lambda S'_{i,j}`
    elsewhere, :math:`S'` the soft-pooled similarity to each class's K centres.

    "SoftTriple Loss: Deep Metric Learning Without Triplet Sampling" (Qian et al., ICCV 2019,
    https://arxiv.org/abs/1909.05235), as pml computes it: without the paper's centre regulariser (pass one as
    ``weight_regularizer``, e.g. pml's ``SparseCentersRegularizer``; :class:`mll.SoftTriple` has it built in).
    Computed by :func:`mll.functional.margin_cross_entropy` with ``pooling="soft"``, ``pooling_temperature=γ`` and
    ``margin=MF.COS(δ)``.

    Args:
        num_classes (int): C.
        embedding_size (int): D.
        centers_per_class (int): K >= 1 (10).
        la (float): λ > 0, the scale (20).
        gamma (float): γ > 0, the softmax temperature over a class's centres (0.1); stored as ``self.gamma = 1/γ``,
            as pml does.
        margin (float): δ in [0, 1) (0.01).
        **kwargs: pml's common options; ``weight_init_func`` defaults to pml's ``kaiming_uniform_(a=√5)``.

    Attributes:
        fc (Parameter[D, C·K]): the centres, column ``c·K + k`` centre k of class c.
    """

    parameter_name = "fc"
    fc: nn.Parameter

    def __init__(
        self, num_classes: int, embedding_size: int, centers_per_class: int = 10, la: float = 20, gamma: float = 0.1,
        margin: float = 0.01, **kwargs: Any,
    ) -> None:  # fmt: skip
        owner = type(self).__name__
        k = check_count(owner, "centers_per_class", centers_per_class)
        la = check_real(owner, "la", la, low=0.0, low_open=True)
        gamma = check_real(owner, "gamma", gamma, low=0.0, low_open=True)
        margin = check_real(owner, "margin", margin, low=0.0, high=1.0)
        super().__init__(**kwargs)
        self.num_classes = check_count(owner, "num_classes", num_classes)
        self.embedding_size = check_count(owner, "embedding_size", embedding_size)
        self.centers_per_class, self.la, self.margin = k, la, margin
        self.gamma, self.pooling_temperature = 1.0 / gamma, gamma
        self.fc = self._parameter(
            (self.embedding_size, self.num_classes * k), partial(nn.init.kaiming_uniform_, a=math.sqrt(5))
        )

    def _regularized_weight(self) -> Tensor:
        return self.fc.t()

    def _losses(self, embeddings: Tensor, labels: Tensor, weights: Optional[Tensor]) -> LossDict:
        losses = MF.margin_cross_entropy(
            embeddings,
            self.fc.t(),
            labels,
            scale=self.la,
            margin=MF.COS(self.margin),
            num_sub_centers=self.centers_per_class,
            pooling="soft",
            pooling_temperature=self.pooling_temperature,
            reduction="none",
        )
        return {"loss": self._weighted(losses, weights)}

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """The relaxed similarities :math:`S'` ``(N, C)`` (unscaled), in pml's operations."""
        sim = torch.matmul(F.normalize(embeddings, p=2, dim=1), F.normalize(self.fc.to(embeddings.dtype), p=2, dim=0))
        sim = sim.view(-1, self.num_classes, self.centers_per_class)
        return torch.sum(F.softmax(sim * self.gamma, dim=2) * sim, dim=2)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, embedding_size={self.embedding_size}, centers_per_class="
            f"{self.centers_per_class}, la={self.la:g}, gamma={self.pooling_temperature:g}, margin={self.margin:g}"
        )
