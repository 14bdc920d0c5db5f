r"""Proxy-based losses: one learnable vector (a proxy) per class, compared with the features by cosine.

**ProxyNCA++** ("ProxyNCA++: Revisiting and Revitalizing Proxy Neighborhood Component Analysis", Teh, DeVries &
Taylor, ECCV 2020, https://arxiv.org/abs/2004.01113) is a softmax over the proxies of −d²(x̂, p̂)/T with the
squared Euclidean distance of unit vectors, d² = 2 − 2 cos θ, and a low temperature T (1/9 in the paper). Since
−d²/T = (2/T)·cos θ − 2/T and the softmax ignores the per-row constant, its loss is the cross-entropy of scaled
cosines with s = 2/T: :func:`proxy_nca_logits` gives them, and the chunked and sharded cross-entropies of the
engine (:func:`margin_cross_entropy`, :func:`sharded_margin_cross_entropy` with ``scale=2/T``) are its loss at
every scale.

**Proxy-Anchor** ("Proxy Anchor Loss for Deep Metric Learning", Kim, Kim, Cho & Kwak, CVPR 2020,
https://arxiv.org/abs/2003.13911) is not a softmax over the classes: each proxy p is an anchor, and its two terms sum
over the *batch* — the positives X_p⁺ (samples of its class) and the negatives X_p⁻ (all others):

.. math:: \ell = \frac{1}{|P^+|} \sum_{p \in P^+} \log\Big(1 + \sum_{x \in X_p^+} e^{-\alpha(s(x, p) - \delta)}\Big)
          + \frac{1}{|P|} \sum_{p \in P} \log\Big(1 + \sum_{x \in X_p^-} e^{\alpha(s(x, p) + \delta)}\Big)

with s the cosine, P the C proxies and P⁺ those with a positive in the batch. Three forms, one formula:

* :func:`proxy_anchor_loss` — dense, from the N×C cosines;
* :func:`chunked_proxy_anchor_loss` — from features and proxies, walking the classes in chunks. Each class's two
  terms are sums over the batch for that class alone, so a chunk's terms are exact by themselves; the only global
  numbers are the sums of the terms and |P⁺|, the count of classes with a positive, which add over chunks. Forward
  keeps each class's two log-sums (2·C numbers); backward recomputes each chunk's cosines and forms
  ∂ℓ/∂s(x, p) = −α/|P⁺|·σ⁺ on positives and α/C·σ⁻ on negatives, σ the entry's share of its log-sum: peak memory
  O(N·chunk), never N×C;
* :func:`sharded_proxy_anchor_loss` — each rank owns a block of classes, gathers the global batch (features and
  labels), computes its block's two sums and its count of positive classes with the chunked kernel, and the ranks
  add the three numbers (one all-reduce): the same loss on every rank, and each block's gradient is exact.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mll.functional._engine.agreement import Report, agree, check_block
from mll.functional._engine.checks import (
    check_chunk_size,
    check_cosine,
    check_features,
    check_nonnegative,
    check_pooling,
    check_positive,
    check_target,
    is_int,
    is_soft,
    shape_str,
)
from mll.functional._engine.class_sums import ClassLogSums, ClassSumsSpec, ProxyAnchorOnePass, class_log_sums
from mll.functional._engine.compiled import outside_graph
from mll.functional._engine.distributed import GatherRows, all_gather_rows, all_reduce, rank_and_world
from mll.functional._engine.normalization import normalize
from mll.functional._engine.numerics import acc_dtype, has_values
from mll.functional._engine.plan import class_sums_chunk, dense_first
from mll.functional.chunked import accumulating_bytes, scalar_loss
from mll.functional.cosine import pooled_cosines

__all__ = [
    "PROXY_ANCHOR_ALPHA",
    "PROXY_ANCHOR_DELTA",
    "PROXY_NCA_TEMPERATURE",
    "chunked_proxy_anchor_loss",
    "proxy_anchor_loss",
    "proxy_nca_logits",
    "proxy_nca_scale",
    "sharded_proxy_anchor_loss",
]

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


# ---------------------------------------------------------------------------------------------- Proxy-Anchor

#: Proxy-Anchor's scale α and margin δ: the paper's defaults (and the authors' ``alpha = 32``, ``mrg = 0.1``)
PROXY_ANCHOR_ALPHA = 32.0
PROXY_ANCHOR_DELTA = 0.1


def check_proxy_anchor_args(alpha: object, delta: object) -> tuple[float, float]:
    """``alpha > 0`` and ``delta >= 0``, finite, as floats."""
    return check_positive(alpha, "Proxy-Anchor alpha"), check_nonnegative(delta, "Proxy-Anchor delta")


def _class_indices(target: Any, shape: torch.Size, name: str = "target") -> Tensor:
    checked = check_target(target, shape, name=name)
    if is_soft(checked):
        raise ValueError(
            f"Proxy-Anchor needs class indices (an integer tensor of shape {shape_str(tuple(shape[:-1]))}), not soft "
            f"{name}: its positives and negatives are the samples of a proxy's class and all others"
        )
    return checked


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def proxy_anchor_loss(
    cosine: Tensor, target: Tensor, *, alpha: float = PROXY_ANCHOR_ALPHA, delta: float = PROXY_ANCHOR_DELTA
) -> Tensor:
    r"""Proxy-Anchor loss from the cosines of every sample to every proxy.

    "Proxy Anchor Loss for Deep Metric Learning" (Kim et al., CVPR 2020, https://arxiv.org/abs/2003.13911):

    .. math:: \ell = \frac{1}{|P^+|} \sum_{p \in P^+} \log\Big(1 + \sum_{x \in X_p^+} e^{-\alpha(s(x, p) - \delta)}\Big)
              + \frac{1}{|P|} \sum_{p \in P} \log\Big(1 + \sum_{x \in X_p^-} e^{\alpha(s(x, p) + \delta)}\Big)

    The sums run over the batch for each proxy (column), not over the classes of a sample: it is not a softmax
    cross-entropy. Each log-sum is computed with a shift (``log(1 + Σ eᶻ)`` without overflow for any α), in float32
    for half-precision cosines; finite with finite gradients at cos = ±1. A batch without samples gives 0 (no
    positive proxy, and every negative sum is empty). Works under ``torch.func.vmap``/``grad`` and
    ``torch.compile(fullgraph=True)``.

    Args:
        cosine (Tensor[*, C]): cosines of the samples to the C proxies (leading dimensions are samples).
        target (Tensor[*] of int): class indices (soft targets are refused: a proxy's positives are a set).
        alpha (float): ``α > 0``, the scale (default 32).
        delta (float): ``δ >= 0``, the margin (default 0.1).

    Returns:
        Tensor: the loss, 0-dim, in ``cosine``'s dtype (float32 for half precision).
    """
    check_cosine(cosine)
    alpha, delta = check_proxy_anchor_args(alpha, delta)
    labels = _class_indices(target, cosine.shape)
    return proxy_anchor_from_cosines(cosine, labels, alpha, delta)


def proxy_anchor_from_cosines(cosine: Tensor, labels: Tensor, alpha: float, delta: float) -> Tensor:
    """:func:`proxy_anchor_loss` after its checks (``labels`` int64, shape ``cosine.shape[:-1]``)."""
    c = cosine.shape[-1]
    cos = cosine.reshape(-1, c).to(acc_dtype(cosine.dtype))
    labels = labels.reshape(-1)
    if cos.shape[0] == 0:  # an empty batch: 0 (no positive proxy, every negative sum empty), with a gradient
        return (cos.sum() * 0).to(_out_dtype(cosine.dtype))
    pos, neg, present = class_log_sums(cos, labels, alpha, delta, every_label_inside=True)
    count = present.sum().clamp(min=1)
    return (pos.sum() / count + neg.sum() / c).to(_out_dtype(cosine.dtype))


def chunked_proxy_anchor_loss(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    alpha: float = PROXY_ANCHOR_ALPHA,
    delta: float = PROXY_ANCHOR_DELTA,
    num_sub_centers: int = 1,
    pooling: str = "max",
    pooling_temperature: float = 0.1,
    chunk_size: Optional[int] = None,
) -> Tensor:
    r"""Proxy-Anchor loss over class chunks: :func:`proxy_anchor_loss` of :func:`cosine_logits` without the N×C
    cosines.

    Equal in value and in the gradients of ``input`` and ``weight`` to
    ``proxy_anchor_loss(cosine_logits(input, weight, K, pooling=…), target, alpha=α, delta=δ)``. How it chunks:
    a class's two log-sums run over the batch for that class only, so the classes are walked in chunks and each
    chunk's log-sums are exact; the loss needs only their totals and |P⁺| (the chunks' counts of classes with a
    positive, added), while |P| is C. Forward keeps the 2·C log-sums; backward recomputes each chunk's cosines, forms
    the gradient of the cosines (see the module notes) and chains it through sub-center pooling, the GEMM and the
    proxies' normalisation. Peak extra memory O(N·chunk·K + chunk·K·d); statistics in float32 for half-precision
    input. Works under ``torch.func.grad`` and ``torch.compile``; a clear error under ``torch.func.vmap`` or a
    double backward.

    Args:
        input (Tensor[*, d]): features.
        weight (Tensor[C*K, d]): proxies (row ``c*K + k`` is proxy k of class c).
        target (Tensor[*] of int): class indices.
        alpha (float): ``α > 0`` (default 32).
        delta (float): ``δ >= 0`` (default 0.1).
        num_sub_centers (int): ``K`` proxies per class; a class's similarity is their pooled cosine.
        pooling (str): ``"max"`` or ``"soft"`` sub-center pooling (see :func:`cosine_logits`).
        pooling_temperature (float): γ of soft pooling.
        chunk_size (int, optional): classes per chunk; default: three N×chunk·K buffers (and a share for the
            step's other tensors) within the memory budget, 2^18 to 2^22 logits, at least 512 classes (see
            ``docs/chunked.md``).

    Returns:
        Tensor: the loss, 0-dim (float32 for half-precision input).
    """
    alpha, delta = check_proxy_anchor_args(alpha, delta)
    check_features(input, weight, num_sub_centers)
    check_pooling(pooling, pooling_temperature)
    check_chunk_size(chunk_size)
    labels = _class_indices(target, torch.Size((*input.shape[:-1], weight.shape[0] // num_sub_centers)))
    return proxy_anchor_chunked(
        input, weight, labels, alpha, delta, num_sub_centers, pooling, pooling_temperature, chunk_size
    )


def _tau(pooling: str, pooling_temperature: float, k: int) -> Optional[float]:
    return float(pooling_temperature) if pooling == "soft" and k > 1 else None


def proxy_anchor_chunked(
    input: Tensor, weight: Tensor, labels: Tensor, alpha: float, delta: float, num_sub_centers: int, pooling: str,
    pooling_temperature: float, chunk_size: Optional[int],
) -> Tensor:  # fmt: skip
    """:func:`chunked_proxy_anchor_loss` after its checks (``labels`` int64 of shape ``input.shape[:-1]``)."""
    k = int(num_sub_centers)
    num_classes = weight.shape[0] // k
    rows = input.numel() // max(1, input.shape[-1])
    if rows > 0 and dense_first(rows, num_classes, k, chunk_size):  # a small step: the dense cosines
        cosine = pooled_cosines(input.reshape(rows, input.shape[-1]), weight, k, pooling, pooling_temperature)
        return proxy_anchor_from_cosines(cosine, labels.reshape(-1), alpha, delta)
    x = normalize(input).reshape(-1, input.shape[-1])
    chunk = chunk_size if chunk_size is not None else class_sums_chunk(x.shape[0], num_classes, k, x.dtype, x.device)
    spec = ClassSumsSpec(alpha, delta, k, _tau(pooling, pooling_temperature, k), int(chunk))
    labels = labels.reshape(-1)
    if scalar_loss("mean", x, weight) and not accumulating_bytes(weight):  # the gradient formed in the forward
        count = present_classes(labels, num_classes)
        loss, _ = ProxyAnchorOnePass.apply(x, weight, labels, spec, 1.0 / count, 1.0 / num_classes)
        return loss.to(_out_dtype(input.dtype))
    stats, _, _ = ClassLogSums.apply(x, weight, labels, spec)
    loss = stats[0] / stats[2].detach().clamp(min=1) + stats[1] / num_classes
    return loss.to(_out_dtype(input.dtype))


def sharded_proxy_anchor_loss(
    input: Tensor,
    weight: Tensor,
    target: Tensor,
    *,
    class_start: int,
    num_classes: int,
    alpha: float = PROXY_ANCHOR_ALPHA,
    delta: float = PROXY_ANCHOR_DELTA,
    num_sub_centers: int = 1,
    pooling: str = "max",
    pooling_temperature: float = 0.1,
    chunk_size: Optional[int] = None,
    feature_grad_scale: Optional[float] = None,
    group: Any = None,
) -> Tensor:
    r"""Proxy-Anchor loss over C classes whose proxies are split by class across the ranks of ``group``.

    Every rank calls it in the same step with its own features and class indices and its block of proxies (rows
    ``(c − class_start)·K + k``, the blocks tiling ``[0, C)``, empty ones allowed). How it shards: each rank
    gathers the global batch — every rank's normalised features (with their gradient path home) and labels — and
    runs the chunk kernel of :func:`chunked_proxy_anchor_loss` on its block: its classes' positive and negative
    log-sums over the global batch are exact there, since a class's terms involve that class alone. The ranks then
    add three numbers — the block's sums of the two terms and its count of classes with a positive (|P⁺| is their
    total; |P| is C) — in one all-reduce. The loss is the same number on every rank and equals
    :func:`proxy_anchor_loss` on the global batch (all ranks' samples in rank order) with all the proxies.

    **Gradient**, as :func:`sharded_margin_cross_entropy`'s contract: every rank calls backward; each rank's
    ``weight`` gets ∂ℓ/∂W_r; its ``input`` gets ``feature_grad_scale · ∂ℓ/∂x_r`` (default: the world size, which a
    ``DistributedDataParallel`` backbone's average turns into ∂ℓ/∂θ). The ranks agree on their checks first, so a bad
    input on one rank raises the same error on every rank. No class sampling (the negative term averages over every
    class). Eager only (a graph break under ``torch.compile``); without a process group it is the single-process
    chunked loss.

    Args:
        input (Tensor[*, d]): this rank's features.
        weight (Tensor[B*K, d]): this rank's block of proxies.
        target (Tensor[*] of int): this rank's class indices, in ``[0, C)``.
        class_start (int): the block's first class.
        num_classes (int): ``C``, over all ranks.
        alpha (float): ``α``, as :func:`chunked_proxy_anchor_loss` (the same on every rank).
        delta (float): ``δ``, likewise.
        num_sub_centers (int): ``K``, likewise.
        pooling (str): sub-center pooling, likewise.
        pooling_temperature (float): soft pooling's γ, likewise.
        chunk_size (int, optional): classes per chunk of the block, likewise.
        feature_grad_scale (float, optional): multiplier of the features' gradient; None means the world size.
        group (ProcessGroup, optional): the ranks sharing the classes; the default group when None.

    Returns:
        Tensor: the loss, 0-dim, identical on every rank (float32 for half-precision input).
    """
    return outside_graph(_sharded, _EAGER)(
        input, weight, target, class_start, num_classes, alpha, delta, num_sub_centers, pooling, pooling_temperature,
        chunk_size, feature_grad_scale, group,
    )  # fmt: skip


_EAGER: list[Any] = []  # _sharded outside the graph (outside_graph)


def _check_locally(
    input: Any, weight: Any, target: Any, class_start: Any, num_classes: Any, alpha: Any, delta: Any,
    num_sub_centers: Any, pooling: Any, pooling_temperature: Any, chunk_size: Any, feature_grad_scale: Any,
    report: Report,
) -> tuple[Tensor, float, float, int]:  # fmt: skip
    """Every check of one rank's call, filling ``report`` with what must agree between the ranks."""
    alpha, delta = check_proxy_anchor_args(alpha, delta)
    # the report's margin slots carry the loss's name and (α, δ), compared across ranks like a margin's
    report.set_margin("proxy_anchor", (alpha, delta))
    report.set_reduction("mean")
    k, _ = check_block(
        report, input, weight, class_start, num_classes, num_sub_centers, pooling, pooling_temperature, chunk_size,
        feature_grad_scale,
    )  # fmt: skip
    labels = _class_indices(target, torch.Size((*input.shape[:-1], int(num_classes))))
    report.entries = 1
    report.set_requires_grad(input, weight, 1.0)
    return labels.reshape(-1), alpha, delta, k


def _sharded(
    input: Tensor, weight: Tensor, target: Tensor, class_start: int, num_classes: int, alpha: float, delta: float,
    num_sub_centers: int, pooling: str, pooling_temperature: float, chunk_size: Optional[int],
    feature_grad_scale: Optional[float], group: Any,
) -> Tensor:  # fmt: skip
    rank, world = rank_and_world(group)
    device = input.device if isinstance(input, Tensor) else torch.device("cpu")
    report, problem, local = Report(), None, None
    try:
        local = _check_locally(
            input, weight, target, class_start, num_classes, alpha, delta, num_sub_centers, pooling,
            pooling_temperature, chunk_size, feature_grad_scale, report,
        )  # fmt: skip
    except (TypeError, ValueError) as error:
        problem = error
    reports = agree(report, problem, device, group, world, num_classes if is_int(num_classes) else 0)
    assert local is not None
    labels, alpha, delta, k = local
    sizes = [r.rows for r in reports]
    width = weight.shape[0] // k
    grad_scale = float(world) if feature_grad_scale is None else float(feature_grad_scale)
    x = normalize(input).reshape(sizes[rank], input.shape[-1])
    if world > 1 or grad_scale != 1.0:
        x = GatherRows.apply(x, sizes, rank, group, grad_scale)
    y = all_gather_rows(labels.reshape(-1, 1), sizes, group).reshape(-1)
    local_y = torch.where((y >= class_start) & (y < class_start + width), y - int(class_start), -1)
    chunk = chunk_size if chunk_size is not None else class_sums_chunk(sum(sizes), max(width, 1), k, x.dtype, x.device)
    spec = ClassSumsSpec(alpha, delta, k, _tau(pooling, pooling_temperature, k), int(chunk), group, world)
    if scalar_loss("mean", x, weight) and not accumulating_bytes(weight):  # the gradient formed in the forward
        count = present_classes(y, int(num_classes))  # |P⁺| of the global batch, the same on every rank
        part, stats = ProxyAnchorOnePass.apply(x, weight, local_y, spec, 1.0 / count, 1.0 / int(num_classes))
        total = all_reduce(stats.clone(), "sum", group, world)
        loss = total[0] / count + total[1] / int(num_classes) + (part - part.detach())
        return loss.to(_out_dtype(input.dtype))
    stats, _, _ = ClassLogSums.apply(x, weight, local_y, spec)
    # the global sums' values, to the bit on every rank, with the gradient of this block's own sums
    total = all_reduce(stats.detach().clone(), "sum", group, world)
    own = total + (stats - stats.detach())
    loss = own[0] / total[2].clamp(min=1) + own[1] / int(num_classes)
    return loss.to(_out_dtype(input.dtype))


def present_classes(labels: Tensor, num_classes: int) -> int:
    """|P⁺|: how many classes of ``[0, C)`` have a sample among ``labels`` (at least 1; a host read — none for labels
    without values, on the meta device or fake, where the step runs on shapes alone: 1)."""
    if not has_values(labels):
        return 1
    inside = labels[(labels >= 0) & (labels < num_classes)]
    return max(1, int(torch.unique(inside).numel()))
