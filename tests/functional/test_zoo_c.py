"""The proxy losses of ``mll.functional.proxy`` against float64 references written from the papers, the authors'
code (re-implemented here from its equations) and pytorch-metric-learning (called directly, on the same proxies).

ProxyNCA++ (Teh et al., ECCV 2020): the reference computes the squared distances of the unit vectors explicitly,
−‖x̂ − p̂‖²/T, and its log-softmax over every proxy.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mll
from mll import functional as MF

N, D, C = 7, 5, 6
TOL = {"rtol": 1e-10, "atol": 1e-10}


def _data(seed: int = 0, n: int = N, c: int = C, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=dtype)
    w = torch.randn(c, D, generator=g, dtype=dtype)
    y = torch.randint(0, c, (n,), generator=g)
    return x, w, y


# ---------------------------------------------------------------------------------------------- references


def reference_proxy_nca_log_probs(x: torch.Tensor, proxies: torch.Tensor, temperature: float) -> torch.Tensor:
    """ProxyNCA++'s log proxy assignment probabilities, float64, from the paper: a softmax over *all* proxies of
    the negative squared Euclidean distance between unit vectors divided by the temperature."""
    xh = x.double() / x.double().norm(dim=1, keepdim=True)
    ph = proxies.double() / proxies.double().norm(dim=1, keepdim=True)
    d2 = ((xh[:, None, :] - ph[None, :, :]) ** 2).sum(-1)  # (N, C)
    z = -d2 / temperature
    return z - torch.logsumexp(z, dim=1, keepdim=True)


def reference_proxy_nca_loss(x, proxies, target, temperature):
    logp = reference_proxy_nca_log_probs(x, proxies, temperature)
    if target.is_floating_point():
        return -(target.double() * logp).sum(1).mean()
    return -logp.gather(1, target[:, None]).mean()


def authors_proxy_nca_prob(x, proxies, target, scale):
    """The forward of ``ProxyNCA_prob`` in euwern/proxynca_pp (loss.py), re-implemented from its equations: both sides
    normalised and multiplied by ``scale = √(1/T)``, the squared distances as ‖a‖² + ‖b‖² − 2ab clamped at 0, and
    Σ −t·log_softmax(−D) with one-hot t, averaged over the batch."""
    p = scale * F.normalize(proxies, p=2, dim=-1)
    xs = scale * F.normalize(x, p=2, dim=-1)
    d = (xs.pow(2).sum(1, keepdim=True) + p.pow(2).sum(1)[None, :] - 2 * xs @ p.T).clamp(min=0.0)
    t = (target[:, None] == torch.arange(p.shape[0])).to(x.dtype)
    return (-t * F.log_softmax(-d, -1)).sum(-1).mean()


# ---------------------------------------------------------------------------------------------- ProxyNCA++


def test_proxy_nca_logits_are_the_papers_log_probabilities_up_to_a_row_constant() -> None:
    x, w, _ = _data()
    for temperature in (1 / 9, 0.5, 1.0):
        logits = MF.proxy_nca_logits(MF.cosine_logits(x, w), softmax_temperature=temperature)
        torch.testing.assert_close(logits, MF.cosine_logits(x, w) * (2 / temperature), rtol=0, atol=0)
        torch.testing.assert_close(
            torch.log_softmax(logits, 1), reference_proxy_nca_log_probs(x, w, temperature), **TOL
        )
    assert MF.proxy_nca_scale() == pytest.approx(18.0) and pytest.approx(1 / 9) == MF.PROXY_NCA_TEMPERATURE


@pytest.mark.parametrize("temperature", [1 / 9, 0.3])
@pytest.mark.parametrize("soft", [False, True])
def test_proxy_nca_head_loss_is_the_papers_loss(temperature, soft) -> None:
    """Dense logits and the chunked ``loss()`` equal the reference; gradients equal autograd of the reference."""
    x, w, y = _data(1)
    target = torch.softmax(torch.randn(N, C, dtype=torch.float64), 1) if soft else y
    head = mll.ProxyNCAPlusPlus(D, C, softmax_temperature=temperature, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    xs = [x.clone().requires_grad_(True) for _ in range(3)]
    want = reference_proxy_nca_loss(xs[0], head.weight, target, temperature)
    dense = F.cross_entropy(head(xs[1], target), target)
    chunked = head.loss(xs[2], target, chunk_size=4)
    torch.testing.assert_close(dense, want, **TOL)
    torch.testing.assert_close(chunked, want, **TOL)
    grads = [torch.autograd.grad(v, [xi, head.weight]) for v, xi in zip((want, dense, chunked), xs)]
    for got in grads[1:]:
        for a, b in zip(got, grads[0]):
            torch.testing.assert_close(a, b, **TOL)


def test_proxy_nca_matches_the_authors_code() -> None:
    """euwern/proxynca_pp's ``ProxyNCA_prob`` with scale 3 (T = 1/9): the same loss and gradients as our default head,
    in float64 (their distance expansion differs from 2 − 2cos only by rounding)."""
    x, w, y = _data(2, n=12, c=9)
    head = mll.ProxyNCAPlusPlus(D, 9, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    pa = w.clone().requires_grad_(True)
    theirs = authors_proxy_nca_prob(xa, pa, y, scale=3.0)
    ours = head.loss(xb, y)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(theirs, [xa, pa])
    gb = torch.autograd.grad(ours, [xb, head.weight])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_proxy_nca_matches_pytorch_metric_learning() -> None:
    """pml 2.9's ``ProxyNCALoss`` already puts the positive proxy in the denominator (a softmax over all proxies of
    −softmax_scale·d²): with ``softmax_scale = 1/T`` it is ProxyNCA++'s loss, on the same proxies."""
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, w, y = _data(3, n=12, c=9)
    peer = losses.ProxyNCALoss(num_classes=9, embedding_size=D, softmax_scale=9.0)
    with torch.no_grad():
        peer.proxies.data = w.clone()
    head = mll.ProxyNCAPlusPlus(D, 9, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(w)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    theirs = peer(xa, y)
    ours = head.loss(xb, y)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    ga = torch.autograd.grad(theirs, [xa, peer.proxies])
    gb = torch.autograd.grad(ours, [xb, head.weight])
    for a, b in zip(ga, gb):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_proxy_nca_logits_check_their_arguments() -> None:
    with pytest.raises(ValueError, match=r"softmax_temperature must be a positive finite float, but got 0"):
        MF.proxy_nca_logits(torch.zeros(2, 3), softmax_temperature=0)
    with pytest.raises(ValueError, match=r"cosine must have shape \(\*, C\) with C >= 2"):
        MF.proxy_nca_logits(torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"softmax_temperature must be a positive finite float"):
        mll.ProxyNCAPlusPlus(D, C, softmax_temperature=float("inf"))


def test_proxy_nca_logits_under_vmap_and_compile() -> None:
    cos = torch.rand(2, N, C, dtype=torch.float64) * 2 - 1
    looped = torch.stack([MF.proxy_nca_logits(c) for c in cos])
    torch.testing.assert_close(torch.func.vmap(MF.proxy_nca_logits)(cos), looped, rtol=0, atol=0)
    compiled = torch.compile(MF.proxy_nca_logits, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(cos[0]), looped[0], rtol=0, atol=0)
