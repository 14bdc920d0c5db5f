"""Proxy-based heads: the class weights are the proxies, one learnable vector per class (K with sub-centers).

Each is a :class:`mll.nn._head.Head`: ``head(input)`` gives scaled cosines to the proxies in training and eval mode
alike (labels are accepted and ignored: no margin shapes the logits), and ``head.loss(input, labels)`` is the
paper's loss, computed over class chunks without the N×C cosines.
"""

from __future__ import annotations

import warnings
from typing import Any, Optional

import torch
from torch import Tensor

from mll import functional as MF
from mll.functional.proxy import check_proxy_anchor_args, proxy_anchor_chunked
from mll.nn._head import Head

__all__ = ["ProxyAnchor", "ProxyNCAPlusPlus"]


class ProxyNCAPlusPlus(Head):
    r"""ProxyNCA++: a softmax over the proxies of the negative squared distance divided by a low temperature.

    .. math:: \ell = -\log \frac{\exp(-d^2(\hat x, \hat p_y)/T)}{\sum_{z} \exp(-d^2(\hat x, \hat p_z)/T)}
              = \operatorname{CE}\!\Big(\frac{2}{T}\cos\theta, y\Big)

    "ProxyNCA++: Revisiting and Revitalizing Proxy Neighborhood Component Analysis" (Teh, DeVries & Taylor,
    ECCV 2020, https://arxiv.org/abs/2004.01113). See :func:`mll.functional.proxy_nca_logits`. Of the paper's
    components, two are the loss and live here: the *proxy assignment probability* (the positive proxy in the
    denominator: a plain softmax cross-entropy) and *low temperature scaling* (T = 1/9, i.e. cosines scaled by
    2/T = 18). Proxies are L2-normalised as the features are. The others belong elsewhere:

    - *fast moving proxies* are a learning rate for the proxies far above the backbone's — a parameter group:
      ``torch.optim.Adam([{"params": model.parameters()}, {"params": head.parameters(), "lr": 4e2}], lr=4e-3,
      eps=1.0)`` is the authors' CUB-200 setting;
    - *global max pooling* and the *layer norm* (``nn.LayerNorm(d, elementwise_affine=False)`` on the embedding)
      are parts of the backbone.

    ``loss()`` is the cross-entropy of the logits over class chunks; soft targets (the authors' code smooths its
    labels) and sub-centers (K proxies per class, not in the paper) work as on every cosine head, and the sharded
    form is :class:`mll.nn.ShardedProxyNCAPlusPlus`.

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): proxies per class ``K`` (default 1, the paper's).
        softmax_temperature (float): ``T > 0`` (default 1/9, the paper's); named apart from ``pooling_temperature``,
            the sub-center pooling's γ.
        pooling (str): how sub-centers pool: ``"max"`` or ``"soft"``.
        pooling_temperature (float): γ > 0 of soft pooling (see :func:`mll.functional.cosine_logits`).
        device (torch.device, optional), dtype (torch.dtype, optional): of the proxies, as for ``nn.Linear``.

    Shape:
        - input: ``(*, d)``; labels (ignored by ``forward``): ``(*)`` or ``(*, C)``
        - output: ``(*, C)``, ``(2 / T)·cos θ``

    Attributes:
        weight (Tensor[C*K, d]): the proxies; row ``c*K + k`` is proxy ``k`` of class ``c``.
    """

    needs_labels = False
    has_scale = False

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1,
        softmax_temperature: float = MF.PROXY_NCA_TEMPERATURE, *, pooling: str = "max",
        pooling_temperature: float = 0.1, device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        MF.proxy_nca_scale(softmax_temperature)  # checks T
        self.softmax_temperature = float(softmax_temperature)
        super().__init__(
            in_features, out_features, num_sub_centers, pooling=pooling, pooling_temperature=pooling_temperature,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()

    def logit_scale(self) -> float:
        """``2 / T``."""
        return MF.proxy_nca_scale(self.softmax_temperature)

    def head_options(self) -> dict[str, Any]:
        return {"softmax_temperature": self.softmax_temperature}

    def extra_options(self) -> list[str]:
        return [f"softmax_temperature={self.softmax_temperature:.4g}"]


class ProxyAnchor(Head):
    r"""Proxy-Anchor: each proxy is an anchor that pulls its class's samples in the batch and pushes all others away.

    .. math:: \ell = \frac{1}{|P^+|} \sum_{p \in P^+} \log\Big(1 + \sum_{x \in X_p^+} e^{-\alpha(s(x, p) - \delta)}\Big)
              + \frac{1}{|P|} \sum_{p \in P} \log\Big(1 + \sum_{x \in X_p^-} e^{\alpha(s(x, p) + \delta)}\Big)

    "Proxy Anchor Loss for Deep Metric Learning" (Kim, Kim, Cho & Kwak, CVPR 2020, https://arxiv.org/abs/2003.13911).
    s(x, p) is the cosine of a sample and a proxy, P the C proxies, P⁺ those whose class is in the batch, X_p⁺ the
    batch's samples of p's class and X_p⁻ the rest. ``loss(input, labels)`` is this loss, not a cross-entropy: its
    sums run over the batch for each proxy. It walks the classes in chunks without the N×C cosines (each class's
    terms are exact within its chunk; the chunks add their sums and their counts of classes with a positive) — see
    :func:`mll.functional.chunked_proxy_anchor_loss`; :class:`mll.nn.ShardedProxyAnchor` splits the classes over
    ranks the same way. ``head(input)`` gives the logits α·cos θ in training and eval mode alike (for retrieval or
    classification by the nearest proxy); the dense loss is
    ``mll.functional.proxy_anchor_loss(head.cosine(input), labels, alpha=head.alpha, delta=head.delta)``.

    Class indices only (a proxy's positives are a set); ``loss()`` takes ``reduction="mean"`` only (the loss is one
    number for the batch: averages over proxies, not over samples) and is the same in training and eval mode (no
    state). With ``num_sub_centers = K > 1`` a class has K proxies and s(x, p) is their pooled cosine (not in the
    paper). The authors initialise the proxies with ``kaiming_normal_`` and train them with a learning rate 100×
    the backbone's: a parameter group, as for :class:`ProxyNCAPlusPlus`.

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): proxies per class ``K`` (default 1, the paper's).
        alpha (float): ``α > 0``, the scale (default 32, the paper's).
        delta (float): ``δ >= 0``, the margin (default 0.1, the paper's).
        pooling (str): how sub-centers pool: ``"max"`` or ``"soft"``.
        pooling_temperature (float): γ > 0 of soft pooling.
        device (torch.device, optional), dtype (torch.dtype, optional): of the proxies.

    Shape:
        - input: ``(*, d)``; labels: ``(*)`` class indices
        - output of ``forward``: ``(*, C)``, α·cos θ; of ``loss``: a 0-dim tensor

    Attributes:
        weight (Tensor[C*K, d]): the proxies; row ``c*K + k`` is proxy ``k`` of class ``c``.
    """

    needs_labels = False
    has_scale = False
    soft_targets = False
    plain_eval_loss = False

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, alpha: float = MF.PROXY_ANCHOR_ALPHA,
        delta: float = MF.PROXY_ANCHOR_DELTA, *, pooling: str = "max", pooling_temperature: float = 0.1,
        device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        self.alpha, self.delta = check_proxy_anchor_args(alpha, delta)
        super().__init__(
            in_features, out_features, num_sub_centers, pooling=pooling, pooling_temperature=pooling_temperature,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()

    def logit_scale(self) -> float:
        """α: the loss's own factor of the cosines."""
        return self.alpha

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        # F.cross_entropy(head(x, y), y) would run, and be another loss (said in eager mode: dynamo cannot warn)
        if labels is not None and self.training and not torch.compiler.is_compiling():
            warnings.warn(
                f"{type(self).__name__}(input, labels) returns α·cos θ and ignores the labels: Proxy-Anchor is not a "
                "cross-entropy of these logits. Its loss is head.loss(input, labels) (or "
                "mll.functional.proxy_anchor_loss(head.cosine(input), labels, ...))",
                UserWarning,
                stacklevel=4,  # the caller of head(...): past Module.__call__ and its _call_impl
            )
        return super().forward(input, labels)

    def loss(
        self, input: Tensor, labels: Tensor, *, reduction: str = "mean", chunk_size: Optional[int] = None
    ) -> Tensor:
        """The Proxy-Anchor loss of the batch over class chunks (see the class notes); ``reduction`` must be
        ``"mean"``."""
        return self.chunked_loss(input, labels, reduction, chunk_size)

    def check_loss_reduction(self, reduction: str) -> None:
        if reduction != "mean":
            raise ValueError(
                f"{type(self).__name__}'s loss is one number for the batch (averages over the proxies, not over the "
                f"samples): reduction must be 'mean', but got {reduction!r}"
            )

    def loss_terms(
        self, input: Tensor, labels: Tensor, margin: MF.Margin, reduction: str, chunk_size: Optional[int]
    ) -> Tensor:
        return proxy_anchor_chunked(
            input, self.weight, labels, self.alpha, self.delta, self.num_sub_centers, self.pooling,
            self.pooling_temperature, chunk_size,
        )  # fmt: skip

    def head_options(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "delta": self.delta}

    def extra_options(self) -> list[str]:
        return [f"alpha={self.alpha:g}", f"delta={self.delta:g}"]
