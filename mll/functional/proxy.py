r"""Proxy-based losses: one learnable vector (a proxy) per class, compared with the features by cosine.

**ProxyNCA++** ("ProxyNCA++: Revisiting and Revitalizing Proxy Neighborhood Component Analysis", Teh, DeVries &
Taylor, ECCV 2020, https://arxiv.org/abs/2004.01113) is a softmax over the proxies of −d²(x̂, p̂)/T with the
squared Euclidean distance of unit vectors, d² = 2 − 2 cos θ, and a low temperature T (1/9 in the paper). Since
−d²/T = (2/T)·cos θ − 2/T and the softmax ignores the per-row constant, its loss is the cross-entropy of scaled
cosines with s = 2/T: :func:`proxy_nca_logits` gives them, and the chunked and sharded cross-entropies of the
engine (:func:`margin_cross_entropy`, :func:`sharded_margin_cross_entropy` with ``scale=2/T``) are its loss at
every scale.
"""

from __future__ import annotations

from torch import Tensor

from mll.functional._checks import check_cosine, check_positive

__all__ = ["PROXY_NCA_TEMPERATURE", "proxy_nca_logits", "proxy_nca_scale"]

#: ProxyNCA++'s softmax temperature T: 1/9 in the paper's experiments (the authors' ``scale = 3 = √(1/T)``)
PROXY_NCA_TEMPERATURE = 1.0 / 9.0


def proxy_nca_scale(softmax_temperature: float = PROXY_NCA_TEMPERATURE) -> float:
    """The scale of the cosines that ProxyNCA++'s temperature ``T`` amounts to: ``2 / T`` (18 for T = 1/9)."""
    return 2.0 / check_positive(softmax_temperature, "softmax_temperature")


def proxy_nca_logits(cosine: Tensor, *, softmax_temperature: float = PROXY_NCA_TEMPERATURE) -> Tensor:
    r"""ProxyNCA++ logits: the cosines to the proxies scaled by ``2 / T``.

    "ProxyNCA++: Revisiting and Revitalizing Proxy Neighborhood Component Analysis" (Teh et al., ECCV 2020,
    https://arxiv.org/abs/2004.01113): the proxy assignment probability with low temperature scaling,

    .. math:: p(y \mid x) = \frac{\exp(-d^2(\hat x, \hat p_y)/T)}{\sum_{z} \exp(-d^2(\hat x, \hat p_z)/T)},
              \qquad -\frac{d^2(\hat x, \hat p_j)}{T} = \frac{2}{T}\cos\theta_j - \frac{2}{T},

    a softmax over *every* proxy, the positive one included (ProxyNCA left it out of the denominator: the "++"
    change that makes it a probability). These logits drop the constant −2/T, which no softmax sees, so that they
    are scaled cosines like every head's; ``F.cross_entropy(proxy_nca_logits(cos), y)`` is the paper's loss.

    Args:
        cosine (Tensor[*, C]): cosines to the proxies, e.g. :func:`cosine_logits` of features and proxies.
        softmax_temperature (float): ``T > 0`` (default 1/9, the paper's).

    Returns:
        Tensor[*, C]: ``(2 / T)·cos θ``, in ``cosine``'s dtype.
    """
    check_cosine(cosine)
    return cosine * proxy_nca_scale(softmax_temperature)
