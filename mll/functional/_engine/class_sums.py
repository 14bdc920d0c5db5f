r"""Losses whose terms sum over the batch per class, walked in chunks of classes: Proxy-Anchor's kernel.

The chunk kernel (``kernel.py``) computes a softmax along each *row* (a sample over the classes). Proxy-Anchor's two
terms run down each *column* instead — a proxy over the batch's samples of its class (positives) and all others
(negatives):

.. math:: \ell = \frac{1}{|P^+|} \sum_{p \in P^+} \log\Big(1 + \sum_{x \in X_p^+} e^{-\alpha(s(x, p) - \delta)}\Big)
          + \frac{1}{|P|} \sum_{p \in P} \log\Big(1 + \sum_{x \in X_p^-} e^{\alpha(s(x, p) + \delta)}\Big)

so a chunk's column terms are exact by themselves and the only global numbers are their totals and |P⁺|, which add
over chunks (and over ranks). :func:`class_log_sums` computes a block of columns' log-sums from its cosines (the dense
loss uses it on all C columns); :class:`ClassLogSums` walks the chunks of :mod:`chunks` with it, keeping the 2·C
log-sums, and its backward recomputes each chunk's cosines, forms ∂ℓ/∂s = −α/|P⁺|·σ⁺ on positives and α/|P|·σ⁻ on
negatives (σ an entry's share of its log-sum) and chains it through the pooling, the GEMM and the proxies'
normalisation exactly as the row kernel does. Peak memory O(N·chunk), never N×C.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from mll.functional._engine.accumulate import accumulate_node, grad_to_accumulate_into
from mll.functional._engine.agreement import check_backward_agreement
from mll.functional._engine.chunks import ChunkRows, add_grads, chunk_bounds, cosines, in_chunk, sub_center_grads
from mll.functional._engine.numerics import DirectApply, acc_dtype, double_backward, exp, exp_, refuse_batched_backward


def class_log_sums(
    cos: Tensor, labels: Tensor, alpha: float, delta: float, every_label_inside: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Each class's positive and negative log-sums and whether it has a positive (see :func:`class_log_terms`)."""
    pos, neg, present, _, _ = class_log_terms(cos, labels, alpha, delta, every_label_inside)
    return pos, neg, present


def class_log_terms(
    cos: Tensor, labels: Tensor, alpha: float, delta: float, every_label_inside: bool = False
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Each class's positive and negative log-sums and whether it has a positive, ``(W,)`` each, from cosines
    ``(N, W)`` and labels ``(N,)`` (a label outside ``[0, W)`` is a class elsewhere: a negative for every class here).

    The positives are the N target entries only: their log-sums by scatter over the classes, O(N) — not a masked pass
    over the N×W cosines. The negatives: every entry with the positives set to −inf and a row of zeros for the 1 in
    log(1 + Σ eᶻ), one fused log-sum-exp down each column, forward and backward. Also the negatives' terms
    ``e^{b − shift}`` ``(N, W)`` (0 at the positives) and each column's ``shift``, from which a one-pass kernel forms
    the negatives' gradient ``e^{b − neg}`` by one column scaling."""
    w = cos.shape[1]
    inside = (labels >= 0) & (labels < w)
    col = labels.clamp(0, max(w - 1, 0))
    at = col.unsqueeze(1)
    z = torch.where(inside, -alpha * (cos.gather(1, at).squeeze(1) - delta), -math.inf)
    top = _per_class(z.detach(), col, w, "amax")  # max(0, max z) per class
    pos = top + torch.log(torch.exp(-top) + _per_class(torch.exp(z - top[col]), col, w, "sum"))
    # one N×W buffer of this function's own, written in place (autograd records in-place ops on it; torch.func's
    # transforms get the out-of-place forms): the dense loss holds one N×W tensor, as a cross-entropy does
    own = not torch._C._are_functorch_transforms_active()
    negatives = cos + delta
    negatives = negatives.mul_(alpha) if own else negatives * alpha
    if every_label_inside:  # the dense loss: a constant written at the positives, differentiable elsewhere
        fill: Tensor | float = -math.inf
    else:  # a chunk (no autograd in the kernel's forward): a row of another chunk's class keeps its entry
        fill = torch.where(inside.unsqueeze(1), -math.inf, negatives.gather(1, at))
    negatives = negatives.scatter_(1, at, fill) if own else negatives.scatter(1, at, fill)
    # log(1 + Σ_rows e^z) down each column, shifted by max(0, max z): the 1 is a row of zeros, never concatenated
    shift = negatives.detach().amax(0).clamp(min=0) if negatives.shape[0] else negatives.new_zeros(w)
    terms = exp_(negatives.sub_(shift)) if own else exp(negatives - shift)
    neg = shift + torch.log(torch.exp(-shift) + terms.sum(0))
    present = _per_class(inside.to(cos.dtype), col, w, "sum").clamp(max=1)
    return pos, neg, present, terms, shift


def _per_class(values: Tensor, col: Tensor, w: int, reduce: str) -> Tensor:
    """``values`` (N,) reduced into W classes by ``col``, starting from zeros (``"sum"`` or ``"amax"``). A single
    class is a plain reduction: Inductor (torch 2.13) fails to generate code for a scatter into one element
    (``new_zeros(1).index_add(0, i, z)``), which is every chunk of one class — C = 1025 with 1024-class chunks."""
    if w == 1:
        if reduce == "sum":
            return values.sum().reshape(1)
        return torch.cat([values.new_zeros(1), values]).amax(0, keepdim=True)
    if reduce == "sum":
        return values.new_zeros(w).index_add(0, col, values)
    return values.new_zeros(w).scatter_reduce(0, col, values, "amax", include_self=True)


@dataclass
class ClassSumsSpec:
    alpha: float
    delta: float
    num_sub_centers: int
    tau: Optional[float]  # soft sub-center pooling temperature; None: max pooling
    chunk: int
    group: Any = None
    world: int = 1


class ClassLogSums(DirectApply, torch.autograd.Function):
    """A block of classes' ``(Σ positive log-sums, Σ negative log-sums, #classes with a positive)``:
    ``forward(x̂ (N, d), weight (B·K, d), labels (N,) block-local, spec)``. Labels outside ``[0, B)`` are samples of
    other blocks' classes: negatives for every class here."""

    @staticmethod
    def vmap(info: Any, in_dims: Any, *args: Any) -> Any:
        raise RuntimeError(
            "the chunked Proxy-Anchor loss does not run under torch.func.vmap (a Python loop over class chunks); "
            "vmap the dense proxy_anchor_loss(cosine_logits(input, weight), target) instead"
        )

    @staticmethod
    def forward(x: Tensor, weight: Tensor, labels: Tensor, spec: ClassSumsSpec) -> tuple[Tensor, Tensor, Tensor]:
        acc, k = acc_dtype(x.dtype), spec.num_sub_centers
        width = weight.shape[0] // k
        pos = torch.zeros(width, dtype=acc, device=x.device)
        neg = torch.zeros(width, dtype=acc, device=x.device)
        present = torch.zeros(width, dtype=acc, device=x.device)
        for start, stop in chunk_bounds(width, spec.chunk):
            chunk = cosines(x, weight, k, spec.tau, start, stop)
            assert chunk.pooled is not None
            pos[start:stop], neg[start:stop], present[start:stop] = class_log_sums(
                chunk.pooled, labels - start, spec.alpha, spec.delta
            )
        return torch.stack([pos.sum(), neg.sum(), present.sum()]), pos, neg

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, weight, labels, spec = inputs
        _, pos, neg = output
        ctx.spec = spec
        ctx.save_for_backward(x, weight, labels, pos, neg)
        ctx.mark_non_differentiable(pos, neg)
        ctx.accumulate = accumulate_node(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _pos: Any, _neg: Any) -> tuple[Any, ...]:
        if double_backward():
            raise RuntimeError(
                "the chunked Proxy-Anchor loss gives first derivatives only: backward with create_graph=True "
                "(double backward, gradient penalties) is not supported; use the dense proxy_anchor_loss"
            )
        refuse_batched_backward("chunked Proxy-Anchor loss", "proxy_anchor_loss(cosine_logits(input, weight), target)")
        spec: ClassSumsSpec = ctx.spec
        if spec.world > 1:  # before the features' reduce-scatter: no rank left waiting on a double backward
            check_backward_agreement(grad.device, spec.group, spec.world)
        x, weight, labels, pos, neg = ctx.saved_tensors
        x, rows_w = x.detach(), weight.detach()  # values only: see ChunkedCE.backward (torch.func.grad)
        acc, k = acc_dtype(x.dtype), spec.num_sub_centers
        alpha = spec.alpha
        g = grad.to(acc)
        # ∂ℓ/∂s on positives: −α·g⁺·e^{a − pos}, a = −α(s − δ); on negatives: α·g⁻·e^{b − neg}, b = α(s + δ)
        factor_pos, factor_neg = -alpha * g[0], alpha * g[1]
        needs = ctx.needs_input_grad
        grad_x = torch.zeros(x.shape, dtype=acc, device=x.device) if needs[0] else None
        xg = x.to(acc)  # (the features of the weight gradient's GEMM; g is already in the factors)
        into = grad_to_accumulate_into(ctx.accumulate, weight) if needs[1] else None
        grad_w = into
        if needs[1] and into is None:
            grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device)
        for start, stop in chunk_bounds(weight.shape[0] // k, spec.chunk):
            chunk = cosines(x, rows_w, k, spec.tau, start, stop)
            dcos = column_dcos(chunk, labels, spec, pos[start:stop], neg[start:stop], factor_pos, factor_neg)
            add_grads(dcos, xg, chunk, k, spec.tau, grad_x, grad_w, fresh=into is None)
        return (
            None if grad_x is None else grad_x.to(x.dtype),
            None if grad_w is None or into is not None else grad_w.to(weight.dtype),
            None,
            None,
        )


def column_dcos(
    chunk: ChunkRows, labels: Tensor, spec: ClassSumsSpec, pos: Tensor, neg: Tensor, factor_pos: Any, factor_neg: Any
) -> Tensor:
    """A chunk's ∂ℓ/∂(sub-center cosines), divided by the rows' norms as :func:`chunks.add_grads` takes it, from its
    columns' log-sums: ``factor_pos·e^{a − pos}`` on positives (a = −α(s − δ)) and ``factor_neg·e^{b − neg}`` on
    negatives (b = α(s + δ)); each exponent is at most its column's log-sum, so each exponential is in [0, 1]."""
    s = chunk.pooled
    assert s is not None
    alpha, delta = spec.alpha, spec.delta
    positive = labels.unsqueeze(1) == torch.arange(chunk.start, chunk.stop, device=labels.device)
    exponent = torch.where(positive, -alpha * (s - delta) - pos, alpha * (s + delta) - neg)
    # (torch.where of two Python floats would be float32)
    on_pos, on_neg = (
        torch.as_tensor(f, dtype=exponent.dtype, device=exponent.device) for f in (factor_pos, factor_neg)
    )
    return _through_rows(exp(exponent).mul_(torch.where(positive, on_pos, on_neg)), chunk, spec)


def terms_dcos(
    chunk: ChunkRows, labels: Tensor, spec: ClassSumsSpec, pos: Tensor, neg: Tensor, terms: Tensor, shift: Tensor,
    factor_pos: Any, factor_neg: Any,
) -> Tensor:  # fmt: skip
    """:func:`column_dcos` from the negatives' terms ``e^{b − shift}`` of :func:`class_log_terms` (overwritten):
    ``factor_neg·e^{b − neg}`` is one column scaling of them, and the N positive entries (0 there) are written
    after, ``factor_pos·e^{a − pos}``."""
    s = chunk.pooled
    assert s is not None
    dcos = terms.mul_((torch.exp(shift - neg) * factor_neg).unsqueeze(0))
    inside, col = in_chunk(labels.unsqueeze(1), chunk.start, chunk.stop)
    a = -spec.alpha * (s.gather(1, col) - spec.delta) - pos[col]
    dcos.scatter_(1, col, torch.where(inside, torch.exp(a) * factor_pos, dcos.gather(1, col)))
    return _through_rows(dcos, chunk, spec)


def _through_rows(dcos: Tensor, chunk: ChunkRows, spec: ClassSumsSpec) -> Tensor:
    """∂ℓ/∂(pooled cosines) on to what :func:`chunks.add_grads` takes: divided by the rows' norms (K = 1), or through
    the pooling to the sub-center cosines."""
    k = spec.num_sub_centers
    return dcos.mul_(chunk.inv) if k == 1 else sub_center_grads(dcos, chunk, k, spec.tau)


class ProxyAnchorOnePass(torch.autograd.Function):
    """``forward(x̂, weight, labels, spec, w_pos, w_neg) -> (w_pos·Σ pos + w_neg·Σ neg, stats)``: a block's part of
    the Proxy-Anchor loss with its gradient formed during the forward, chunk by chunk — a chunk's column log-sums are
    exact within it, so ``∂ℓ/∂s`` needs nothing from later chunks once the weights (1/|P⁺| and 1/|P|) are known:
    three GEMMs. ``stats`` as :class:`ClassLogSums`'s (no gradient). Backward scales the formed gradients. (Beside an
    existing ``.grad`` the callers take :class:`ClassLogSums`, which adds its chunks into it: no C×d buffer.)"""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, labels: Tensor, spec: ClassSumsSpec, w_pos: float, w_neg: float
    ) -> tuple[Tensor, Tensor]:
        ctx.spec, ctx.weights, ctx.needs = spec, (w_pos, w_neg), ctx.needs_input_grad[:2]
        part, stats, ctx.grads = one_pass(x, weight, labels, spec, w_pos, w_neg, ctx.needs)
        ctx.save_for_backward(x, weight, labels)
        ctx.mark_non_differentiable(stats)
        return part, stats

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _stats: Any) -> tuple[Any, ...]:
        if double_backward():
            raise RuntimeError(
                "the chunked Proxy-Anchor loss gives first derivatives only: backward with create_graph=True "
                "(double backward, gradient penalties) is not supported; use the dense proxy_anchor_loss"
            )
        spec: ClassSumsSpec = ctx.spec
        if spec.world > 1:  # before the features' reduce-scatter: no rank left waiting on a double backward
            check_backward_agreement(grad.device, spec.group, spec.world)
        x, weight, labels = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None
        if grads is None:  # a second backward of a retained graph: the first took the forward's gradients
            w_pos, w_neg = ctx.weights
            _, _, grads = one_pass(x.detach(), weight.detach(), labels, spec, w_pos, w_neg, ctx.needs)
        out: list[Optional[Tensor]] = []
        for tensor, like in zip(grads, (x, weight)):
            out.append(None if tensor is None else tensor.mul_(grad.to(tensor.dtype)).to(like.dtype))
        del grads
        return out[0], out[1], None, None, None, None


def one_pass(
    x: Tensor, weight: Tensor, labels: Tensor, spec: ClassSumsSpec, w_pos: float, w_neg: float,
    needs: tuple[bool, ...],
) -> tuple[Tensor, Tensor, list[Optional[Tensor]]]:  # fmt: skip
    """The block's ``w_pos·Σ pos + w_neg·Σ neg``, its ``(Σ pos, Σ neg, #present)`` and the gradients of ``x`` and
    ``weight`` for an upstream gradient of 1 (None where ``needs`` says none), chunk by chunk."""
    acc, k = acc_dtype(x.dtype), spec.num_sub_centers
    width = weight.shape[0] // k
    stats = torch.zeros(3, dtype=acc, device=x.device)
    grad_x = torch.zeros(x.shape, dtype=acc, device=x.device) if needs[0] else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device) if needs[1] else None
    xg = x.detach().to(acc)
    factor_pos, factor_neg = -spec.alpha * w_pos, spec.alpha * w_neg
    for start, stop in chunk_bounds(width, spec.chunk):
        chunk = cosines(x, weight, k, spec.tau, start, stop)
        assert chunk.pooled is not None
        pos, neg, present, terms, shift = class_log_terms(chunk.pooled, labels - start, spec.alpha, spec.delta)
        stats += torch.stack([pos.sum(), neg.sum(), present.sum()])
        if grad_x is not None or grad_w is not None:
            dcos = terms_dcos(chunk, labels, spec, pos, neg, terms, shift, factor_pos, factor_neg)
            add_grads(dcos, xg, chunk, k, spec.tau, grad_x, grad_w, fresh=True)
    return stats[0] * w_pos + stats[1] * w_neg, stats, [grad_x, grad_w]
