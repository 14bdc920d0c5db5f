"""Proxy-based heads: the class weights are the proxies, one learnable vector per class (K with sub-centers).

Each is a :class:`mll.nn._head.Head`: ``head(input)`` gives scaled cosines to the proxies in training and eval mode
alike (labels are accepted and ignored: no margin shapes the logits), and ``head.loss(input, labels)`` is the
paper's loss, computed over class chunks without the N×C cosines.
"""

from __future__ import annotations

from typing import Any

from mll import functional as MF
from mll.nn._head import Head

__all__ = ["ProxyNCAPlusPlus"]


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

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1,
        softmax_temperature: float = MF.PROXY_NCA_TEMPERATURE, *, pooling: str = "max",
        pooling_temperature: float = 0.1, device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        MF.proxy_nca_scale(softmax_temperature)  # checks T
        self.softmax_temperature = float(softmax_temperature)
        super().__init__(
            in_features, out_features, num_sub_centers, pooling=pooling, pooling_temperature=pooling_temperature,
            has_scale=False, device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()

    def logit_scale(self) -> float:
        """``2 / T``."""
        return MF.proxy_nca_scale(self.softmax_temperature)

    def head_options(self) -> dict[str, Any]:
        return {"softmax_temperature": self.softmax_temperature}

    def extra_options(self) -> list[str]:
        return [f"softmax_temperature={self.softmax_temperature:.4g}"]
