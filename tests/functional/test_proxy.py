"""The proxy losses of ``mll.functional.proxy`` against float64 references written from the papers, the authors'
code (re-implemented here from its equations) and pytorch-metric-learning (called directly, on the same proxies).

ProxyNCA++ (Teh et al., ECCV 2020): the reference computes the squared distances of the unit vectors explicitly,
−‖x̂ − p̂‖²/T, and its log-softmax over every proxy. Proxy-Anchor (Kim et al., CVPR 2020): the reference loops over
the proxies and sums over each one's sets of positive and negative samples, as the paper writes it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

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


# ---------------------------------------------------------------------------------------------- Proxy-Anchor


def reference_proxy_anchor(cos: torch.Tensor, y: torch.Tensor, alpha: float = 32.0, delta: float = 0.1):
    """The paper's loss in float64, proxy by proxy: P⁺ the proxies with a positive in the batch, X_p⁺ / X_p⁻ the
    samples of p's class / of the other classes."""
    cos = cos.double()
    n, c = cos.shape
    labels = y.tolist()
    positive_proxies = sorted(set(labels))
    pos_terms = []
    for p in positive_proxies:
        members = [i for i in range(n) if labels[i] == p]
        pos_terms.append(torch.log(1 + torch.exp(-alpha * (cos[members, p] - delta)).sum()))
    neg_terms = []
    for p in range(c):
        others = [i for i in range(n) if labels[i] != p]
        neg_terms.append(torch.log(1 + torch.exp(alpha * (cos[others, p] + delta)).sum()))
    pos = torch.stack(pos_terms).sum() / len(positive_proxies) if positive_proxies else cos.sum() * 0
    return pos + torch.stack(neg_terms).sum() / c


def authors_proxy_anchor(x, proxies, target, mrg=0.1, alpha=32.0):
    """The forward of ``Proxy_Anchor`` in tjddus9597/Proxy-Anchor-CVPR2020 (code/losses.py), re-implemented from its
    equations: ``l2_norm`` with 1e-12 under the square root, one-hot positives and their complement, e^{−α(cos − mrg)}
    and e^{α(cos + mrg)} masked and summed per proxy, log(1 + ·) summed and divided by the number of proxies with a
    positive and by the number of classes."""

    def l2_norm(a):
        return a / torch.sqrt((a * a).sum(1) + 1e-12)[:, None]

    cos = l2_norm(x) @ l2_norm(proxies).T
    p_one_hot = (target[:, None] == torch.arange(proxies.shape[0])).to(x.dtype)
    n_one_hot = 1 - p_one_hot
    pos_exp = torch.exp(-alpha * (cos - mrg))
    neg_exp = torch.exp(alpha * (cos + mrg))
    num_valid = int((p_one_hot.sum(0) != 0).sum())
    p_sum = torch.where(p_one_hot == 1, pos_exp, torch.zeros_like(pos_exp)).sum(0)
    n_sum = torch.where(n_one_hot == 1, neg_exp, torch.zeros_like(neg_exp)).sum(0)
    return torch.log(1 + p_sum).sum() / num_valid + torch.log(1 + n_sum).sum() / proxies.shape[0]


@pytest.mark.parametrize("alpha, delta", [(32.0, 0.1), (8.0, 0.0), (64.0, 0.3)])
def test_proxy_anchor_loss_is_the_papers(alpha, delta) -> None:
    x, w, y = _data(4, n=11, c=8)
    y[:3] = 5  # several samples of one class; some classes have none
    x.requires_grad_(True)
    got = MF.proxy_anchor_loss(MF.cosine_logits(x, w), y, alpha=alpha, delta=delta)
    want = reference_proxy_anchor(MF.cosine_logits(x, w), y, alpha, delta)
    torch.testing.assert_close(got, want, **TOL)
    torch.testing.assert_close(torch.autograd.grad(got, x)[0], torch.autograd.grad(want, x)[0], **TOL)


@pytest.mark.parametrize("k, pooling", [(1, "max"), (3, "max"), (3, "soft")])
@pytest.mark.parametrize("chunk_size", [1, 3, 8, None])
def test_chunked_proxy_anchor_equals_the_dense_loss(k, pooling, chunk_size) -> None:
    """Value and gradients of features and proxies, float64, 1e-10: chunks of one class, uneven chunks, one chunk."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, D, generator=g, dtype=torch.float64, requires_grad=True)  # leading dimensions
    w = torch.randn(8 * k, D, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 8, (2, 5), generator=g)
    opts = {"num_sub_centers": k, "pooling": pooling, "pooling_temperature": 0.2}
    dense = MF.proxy_anchor_loss(MF.cosine_logits(x, w, **opts), y, alpha=16.0, delta=0.2)
    chunked = MF.chunked_proxy_anchor_loss(x, w, y, alpha=16.0, delta=0.2, chunk_size=chunk_size, **opts)
    torch.testing.assert_close(chunked, dense, **TOL)
    for a, b in zip(torch.autograd.grad(chunked, [x, w]), torch.autograd.grad(dense, [x, w])):
        torch.testing.assert_close(a, b, **TOL)


@given(
    n=st.integers(0, 9),
    c=st.integers(2, 9),
    k=st.integers(1, 2),
    chunk=st.integers(1, 10),
    alpha=st.floats(0.5, 200.0),
    delta=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**16),
)
def test_chunked_equals_dense_for_any_batch(n, c, k, chunk, alpha, delta, seed) -> None:
    """Any batch size (an empty one included: loss 0), class count, chunking and α (up to 200, where e^{α(1 + δ)}
    overflows float64 without the shift) give the dense loss and gradients."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(c * k, D, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, c, (n,), generator=g)
    dense = MF.proxy_anchor_loss(MF.cosine_logits(x, w, k), y, alpha=alpha, delta=delta)
    chunked = MF.chunked_proxy_anchor_loss(x, w, y, alpha=alpha, delta=delta, num_sub_centers=k, chunk_size=chunk)
    assert torch.isfinite(dense)
    torch.testing.assert_close(chunked, dense, rtol=1e-10, atol=1e-10)
    for a, b in zip(torch.autograd.grad(chunked, [x, w]), torch.autograd.grad(dense, [x, w])):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    if n == 0:
        assert float(dense.detach()) == 0.0


def test_proxy_anchor_matches_the_authors_code() -> None:
    """tjddus9597/Proxy-Anchor-CVPR2020's ``Proxy_Anchor`` forward on the same proxies: loss and gradients."""
    x, w, y = _data(6, n=16, c=10)
    y[:4] = 3
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    wa, wb = w.clone().requires_grad_(True), w.clone().requires_grad_(True)
    theirs = authors_proxy_anchor(xa, wa, y)
    ours = MF.chunked_proxy_anchor_loss(xb, wb, y, chunk_size=3)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(theirs, [xa, wa]), torch.autograd.grad(ours, [xb, wb])):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_proxy_anchor_matches_pytorch_metric_learning() -> None:
    """pml 2.9's ``ProxyAnchorLoss`` (margin 0.1, alpha 32) called directly with our proxies: loss and gradients."""
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    x, w, y = _data(7, n=16, c=10)
    y[:4] = 3
    peer = losses.ProxyAnchorLoss(num_classes=10, embedding_size=D, margin=0.1, alpha=32)
    with torch.no_grad():
        peer.proxies.data = w.clone()
    head = mll.ProxyAnchor(D, 10, dtype=torch.float64)
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


def test_proxy_anchor_gradcheck() -> None:
    x, w, y = _data(8, n=5, c=4)
    x.requires_grad_(True)
    w.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w: MF.proxy_anchor_loss(MF.cosine_logits(x, w), y), (x, w))
    assert torch.autograd.gradcheck(lambda x, w: MF.chunked_proxy_anchor_loss(x, w, y, chunk_size=3), (x, w))
    assert torch.autograd.gradcheck(
        lambda x, w: MF.chunked_proxy_anchor_loss(x, w, y, num_sub_centers=2, pooling="soft", chunk_size=1),
        (x, torch.randn(8, D, dtype=torch.float64, requires_grad=True)),
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [32.0, 1000.0])
def test_proxy_anchor_is_finite_at_cos_plus_minus_one(dtype, alpha) -> None:
    """Cosines exactly ±1 (and a few ulps beyond, as rounding gives) in every dtype, with the default α and with an α
    whose exponentials overflow every dtype unshifted: finite loss and gradients, equal to the float64 loss."""
    cos = torch.tensor([[1.0, -1.0, 0.3], [-1.0, 1.0, 1.0], [1.0, 1.0, -1.0], [0.0, -1.0, 1.0]], dtype=dtype)
    cos = cos.requires_grad_(True)
    y = torch.tensor([0, 1, 1, 2])
    loss = MF.proxy_anchor_loss(cos, y, alpha=alpha)
    (grad,) = torch.autograd.grad(loss, cos)
    assert loss.dtype == (dtype if dtype in (torch.float32, torch.float64) else torch.float32)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    want = reference_proxy_anchor(cos.detach().double(), y, alpha) if alpha < 100 else None
    if want is not None:
        torch.testing.assert_close(loss.double(), want, rtol=1e-6, atol=1e-6)
    # chunked, features equal and opposite to proxies
    w = torch.randn(3, D, dtype=torch.float64)
    x = torch.stack([w[0], -w[1], w[2], -w[0]]).to(dtype).requires_grad_(True)
    wd = w.to(dtype).requires_grad_(True)
    chunked = MF.chunked_proxy_anchor_loss(x, wd, y, alpha=alpha, chunk_size=2)
    gx, gw = torch.autograd.grad(chunked, [x, wd])
    assert torch.isfinite(chunked) and torch.isfinite(gx).all() and torch.isfinite(gw).all()


def test_proxy_anchor_large_alpha_matches_an_exact_log_sum_exp() -> None:
    """α = 1000: the shifted log-sums equal ``softplus(logsumexp(z))`` computed by torch in float64."""
    x, w, y = _data(9)
    cos = MF.cosine_logits(x, w)
    alpha, delta = 1000.0, 0.1
    positive = y[:, None] == torch.arange(C)
    pos = F.softplus(torch.logsumexp(torch.where(positive, -alpha * (cos - delta), -math.inf), 0))
    neg = F.softplus(torch.logsumexp(torch.where(~positive, alpha * (cos + delta), -math.inf), 0))
    want = pos.sum() / positive.any(0).sum() + neg.sum() / C
    torch.testing.assert_close(MF.proxy_anchor_loss(cos, y, alpha=alpha, delta=delta), want, **TOL)


@pytest.mark.slow
def test_proxy_anchor_under_vmap_grad_and_compile() -> None:
    g = torch.Generator().manual_seed(10)
    cos = torch.rand(2, N, C, generator=g, dtype=torch.float64) * 2 - 1
    y = torch.randint(0, C, (2, N), generator=g)
    looped = torch.stack([MF.proxy_anchor_loss(cos[i], y[i]) for i in range(2)])
    torch.testing.assert_close(torch.func.vmap(MF.proxy_anchor_loss)(cos, y), looped, rtol=1e-12, atol=1e-12)
    compiled = torch.compile(MF.proxy_anchor_loss, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(cos[0], y[0]), looped[0], rtol=1e-12, atol=1e-12)
    per_batch = torch.func.vmap(torch.func.grad(MF.proxy_anchor_loss))(cos, y)
    for i in range(2):
        c = cos[i].clone().requires_grad_(True)
        torch.testing.assert_close(per_batch[i], torch.autograd.grad(MF.proxy_anchor_loss(c, y[i]), c)[0])
    # the chunked loss: torch.func.grad works, vmap says why not
    x, w, yy = _data(11)
    grad = torch.func.grad(lambda a: MF.chunked_proxy_anchor_loss(a, w, yy, chunk_size=2))(x)
    xr = x.clone().requires_grad_(True)
    want = torch.autograd.grad(MF.chunked_proxy_anchor_loss(xr, w, yy, chunk_size=2), xr)[0]
    torch.testing.assert_close(grad, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match=r"does not run under torch.func.vmap"):
        torch.func.vmap(lambda a: MF.chunked_proxy_anchor_loss(a, w, yy, chunk_size=2))(
            x.unsqueeze(0).expand(2, -1, -1)
        )
    # a step small enough for the dense path (no chunk size) runs under vmap: the dense loss per batch
    batched = torch.func.vmap(lambda a: MF.chunked_proxy_anchor_loss(a, w, yy))(torch.stack([x, 2 * x]))
    torch.testing.assert_close(batched, torch.stack([MF.chunked_proxy_anchor_loss(v, w, yy) for v in (x, 2 * x)]))
    # and compiles with fullgraph=True (the chunk loop unrolls), value and gradients
    wr = w.clone().requires_grad_(True)
    compiled_chunked = torch.compile(
        lambda a, b: MF.chunked_proxy_anchor_loss(a, b, yy, chunk_size=2), fullgraph=True, backend="aot_eager"
    )
    got = compiled_chunked(x, wr)
    want = MF.chunked_proxy_anchor_loss(x, wr, yy, chunk_size=2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(got, wr)[0], torch.autograd.grad(want, wr)[0], rtol=1e-12, atol=0)


def test_proxy_anchor_refuses_a_double_backward() -> None:
    x, w, y = _data(12)
    x.requires_grad_(True)
    loss = MF.chunked_proxy_anchor_loss(x, w, y, chunk_size=2)
    with pytest.raises(RuntimeError, match=r"first derivatives only"):
        torch.autograd.grad(loss, x, create_graph=True)
    # a step small enough for the cost model's dense path (no chunk size): the dense loss, to any order
    (grad,) = torch.autograd.grad(MF.chunked_proxy_anchor_loss(x, w, y), x, create_graph=True)
    (want,) = torch.autograd.grad(MF.proxy_anchor_loss(MF.cosine_logits(x, w), y), x, create_graph=True)
    torch.testing.assert_close(grad, want)
    assert grad.requires_grad


def test_proxy_anchor_checks_its_arguments() -> None:
    cos = torch.zeros(3, 4)
    y = torch.tensor([0, 1, 3])
    with pytest.raises(ValueError, match=r"Proxy-Anchor alpha must be a positive finite float, but got 0"):
        MF.proxy_anchor_loss(cos, y, alpha=0)
    with pytest.raises(ValueError, match=r"Proxy-Anchor delta must be a finite float >= 0, but got -0.1"):
        MF.proxy_anchor_loss(cos, y, delta=-0.1)
    with pytest.raises(ValueError, match=r"Proxy-Anchor needs class indices \(an integer tensor of shape \(3\)\)"):
        MF.proxy_anchor_loss(cos, torch.full((3, 4), 0.25))
    with pytest.raises(ValueError, match=r"target must hold class indices in \[0, 4\), but got values from 0 to 4"):
        MF.proxy_anchor_loss(cos, torch.tensor([0, 1, 4]))
    x, w = torch.randn(3, D), torch.randn(4, D)
    with pytest.raises(ValueError, match=r"input must have shape \(\*, 5\)"):
        MF.chunked_proxy_anchor_loss(torch.randn(3, D + 1), w, y)
    with pytest.raises(ValueError, match=r"chunk_size must be None or an integer >= 1, but got 0"):
        MF.chunked_proxy_anchor_loss(x, w, y, chunk_size=0)
    with pytest.raises(ValueError, match=r"Proxy-Anchor needs class indices"):
        MF.sharded_proxy_anchor_loss(x, w, torch.full((3, 4), 0.25), class_start=0, num_classes=4)
    with pytest.raises(ValueError, match=r"must tile \[0, 6\)"):  # one process holding 4 of 6 classes
        MF.sharded_proxy_anchor_loss(x, w, y, class_start=0, num_classes=6)


def test_sharded_proxy_anchor_in_one_process_is_the_chunked_loss() -> None:
    x, w, y = _data(13)
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    ws = [w.clone().requires_grad_(True) for _ in range(2)]
    got = MF.sharded_proxy_anchor_loss(xs[0], ws[0], y, class_start=0, num_classes=C, num_sub_centers=1, chunk_size=2)
    want = MF.chunked_proxy_anchor_loss(xs[1], ws[1], y)
    torch.testing.assert_close(got, want, **TOL)
    for a, b in zip(torch.autograd.grad(got, [xs[0], ws[0]]), torch.autograd.grad(want, [xs[1], ws[1]])):
        torch.testing.assert_close(a, b, **TOL)


def test_proxy_anchor_chunks_hold_a_share_of_the_budget(monkeypatch) -> None:
    """Proxy-Anchor's chunks: four shares of the memory budget (three N×chunk·K buffers and the step's other
    tensors), 2^18 to 2^22 logits, a multiple of 512 classes, at most C; the user's budget where set; the chunk the
    loss runs with when no ``chunk_size`` is given."""
    from mll.functional._engine.plan import chunk_classes, class_sums_chunk

    f32 = torch.float32
    assert class_sums_chunk(1024, 100_000, 1, f32) == 4096  # 2^22 logits (the budget's share: 6.4 M)
    assert class_sums_chunk(256, 100_000, 1, f32) == 6144  # 25.6 MB / 16 B: 1.6 M logits, 6250 classes, rounded
    assert class_sums_chunk(4096, 1_000_000, 1, f32) == 1024
    assert class_sums_chunk(1024, 10_000, 1, f32) == 512  # at C = 10^4 the budget leaves 2^18 logits: 256 classes
    assert class_sums_chunk(256, 10_000, 1, f32) == 1024
    assert class_sums_chunk(256, 100_000, 3, f32) == 5120  # K = 3: 2^22 logits are 5461 classes, rounded
    assert class_sums_chunk(8, 700, 1, f32) == 700  # at most C
    assert class_sums_chunk(256, 100_000, 1, torch.float64) == 6144  # 8 bytes a logit, a budget of twice the bytes
    assert class_sums_chunk(1024, 100_000, 1, f32, device="meta") == chunk_classes(1024, 100_000, 1, "meta") == 4096
    with MF.set_memory_budget(0):
        assert class_sums_chunk(1024, 100_000, 1, f32) == 512  # 2^18 logits at least
    with MF.set_memory_budget(1 << 40):
        assert class_sums_chunk(256, 100_000, 1, f32) == 16384  # 2^22 logits at most
    seen = []
    spec = mll.functional.proxy.ClassSumsSpec
    monkeypatch.setattr(mll.functional.proxy, "ClassSumsSpec", lambda *a: seen.append(a[4]) or spec(*a))
    head = mll.ProxyAnchor(4, 20_000)
    head.loss(torch.randn(300, 4), torch.randint(0, 20_000, (300,))).backward()
    assert seen == [class_sums_chunk(300, 20_000, 1, f32)] == [1024], seen  # 6 MB / 16 B: 1250 classes, rounded
