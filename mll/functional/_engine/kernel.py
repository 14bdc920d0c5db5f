"""The one chunk kernel: margin cross-entropy over a block of classes, chunk by chunk, without the N×C logits.

Forward walks the block's classes in chunks: normalise the chunk's weight rows, one GEMM, pool sub-centers, shape
the logits with the margin (its non-target part, then the target entries), and keep an online log-sum-exp per row
(running max and rescaled sum). It saves O(N) statistics. Backward walks the chunks again, recomputes each chunk's
logits, forms ``softmax − target`` and writes the chunk's slice of the weight gradient and its share of the feature
gradient.

The block is all C classes in a single process (:func:`mll.functional.margin_cross_entropy`) or one rank's shard
(:func:`mll.functional.sharded_margin_cross_entropy`): the only difference is ``Spec.reduce``, which combines the
per-row statistics of the blocks (an all-reduce MAX, then SUM). The margin is a
:class:`mll.functional.MarginFamily`; at the target entries its value and slope are computed once, before the loop,
from the target cosines (O(N·P·K·d)), so a margin whose parameters need a gradient (MagFace) gets it through autograd
outside this kernel, and a family's non-target part can depend on the row's target cosine (CurricularFace).
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from mll.functional._engine import compiled
from mll.functional._engine.accumulate import accumulate_node, grad_to_accumulate_into
from mll.functional._engine.chunks import (
    Chunk,
    Spec,
    add_grads,
    chunk_bounds,
    chunk_buffer,
    flat_params,
    in_chunk,
    into_buffer,
    record_norms,
    saved_norms,
    sub_center_grads,
)
from mll.functional._engine.numerics import DirectApply, acc_dtype, double_backward, exp, exp_, refuse_batched_backward
from mll.functional._engine.targets import Targets


def chunked_ce(
    x: Tensor, weight: Tensor, scale: Any, value: Optional[Tensor], spec: Spec, *params: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """``ChunkedCE.apply``. When no gradient will be asked for, no chunk keeps its logits for a backward; and under
    ``torch.compile`` the forward is then called alone: dynamo mis-traces ``apply`` of a Function with
    ``setup_context`` when no input needs a gradient (a compiled ``loss()`` under ``torch.no_grad()``, or DeepNCM's,
    whose means need none)."""
    inputs = (x, weight, scale, value, *params)
    if not (torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in inputs)):
        spec.keep = False
        if torch.compiler.is_compiling():
            return ChunkedCE.forward(x, weight, scale, value, spec, *params)
    return ChunkedCE.apply(x, weight, scale, value, spec, *params)


class ChunkedCE(DirectApply, torch.autograd.Function):
    """Per-row margin cross-entropy of a block of classes: ``forward(x̂, weight, scale, value, spec, *params)``.

    ``x̂`` are normalised features ``(N, d)``, ``weight`` the block's raw rows ``(B·K, d)``, ``value`` the margin's
    target logits at ``spec.targets.classes`` ``(N, P)`` (before the scale; may carry autograd to the margin's
    parameters), ``params`` the family's parameters as tensors (flattened: 0-dim, ``(B,)``, ``(N, 1)``, ``(N, B)``),
    used by dense soft targets and non-target parts. Returns the N per-row losses (identical on every block).
    """

    @staticmethod
    def vmap(info: Any, in_dims: Any, *args: Any) -> Any:
        raise RuntimeError(
            "the chunked margin cross-entropy does not run under torch.func.vmap (a Python loop over class chunks "
            "with a data-dependent softmax); vmap the dense path F.cross_entropy(head(input, target), target) instead"
        )

    @staticmethod
    def forward(
        x: Tensor, weight: Tensor, scale: Any, value: Optional[Tensor], spec: Spec, *params: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        n, k = x.shape[0], spec.num_sub_centers
        acc = acc_dtype(x.dtype)
        s = scale.detach().to(acc) if isinstance(scale, Tensor) else scale
        targets = spec.targets
        value_d = None if value is None else value.detach().to(acc)
        run_max = torch.full((n,), -math.inf, dtype=acc, device=x.device)
        run_sum = torch.zeros(n, dtype=acc, device=x.device)
        target_term = torch.zeros(n, dtype=acc, device=x.device)  # Σ_j t_ij z_ij over this block
        width = weight.shape[0] // k
        buf = chunk_buffer(n, spec, width, acc, x.device)
        kept: Optional[list[Chunk]] = [] if spec.keep else None
        # each row's norm, saved for a recomputing backward (C·K numbers; none without the normalisation)
        norms = torch.empty(weight.shape[0] if spec.normalize_weight else 0, dtype=acc, device=x.device)
        for start, stop in chunk_bounds(width, spec.chunk):
            if spec.compiled:
                chunk = Chunk(spec, x, weight, None, params, s, start, stop, None if spec.keep else buf, False)
                record_norms(norms, chunk, k)
                run_max, run_sum, term = _compiled_forward(spec, chunk, value_d, params, s, run_max, run_sum, acc)
                if term is not None:
                    target_term += term
                if kept is not None:
                    kept.append(chunk)
                continue
            # kept logits live in their own chunk's tensors; recomputed ones in the shared buffer
            chunk = Chunk(spec, x, weight, value_d, params, s, start, stop, None if spec.keep else buf)
            record_norms(norms, chunk, k)
            z = chunk.z
            if targets.dense is not None:
                target_term += (chunk.t * z).sum(1)
            new_max = torch.maximum(run_max, z.amax(1))
            shifted = z.sub_(new_max[:, None]) if kept is None else into_buffer(buf, torch.sub, z, new_max[:, None])
            run_sum = run_sum * torch.exp(run_max - new_max) + exp_(shifted).sum(1)
            run_max = new_max
            if kept is not None:
                kept.append(chunk)
        if kept is not None:  # (only then: a traced forward must not change the spec)
            spec.kept = kept
        if targets.classes is not None and width > 0:
            assert value_d is not None
            target_term = target_logit_sum(targets, value_d, s, width, acc)
        if spec.reduce is not None:
            # the softmax over every block: the global row max first, so that no block's exp overflows, then one
            # sum of the rescaled sums and the target terms (an empty block adds exp(−inf)·0 = 0)
            global_max = spec.reduce(run_max.clone(), "max")
            stats = spec.reduce(torch.stack([run_sum * torch.exp(run_max - global_max), target_term]), "sum")
            lse = global_max + torch.log(stats[0])
            target_term = stats[1]
        else:
            lse = run_max + torch.log(run_sum)
        losses = (lse if targets.row_sum is None else lse * targets.row_sum) - target_term
        return losses, lse, norms

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, weight, scale, value, spec, *params = inputs
        _, lse, norms = output
        ctx.spec, ctx.scale_is_tensor = spec, isinstance(scale, Tensor)
        ctx.scale = None if ctx.scale_is_tensor else scale
        ctx.value_dtype = None if value is None else value.dtype
        ctx.save_for_backward(
            x, weight, lse, norms, scale if ctx.scale_is_tensor else None, None if value is None else value.detach(),
            *params,
        )  # fmt: skip
        ctx.mark_non_differentiable(lse, norms)
        ctx.accumulate = accumulate_node(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_lse: Any, _grad_norms: Any) -> tuple[Any, ...]:
        if double_backward():
            raise RuntimeError(
                "the chunked margin cross-entropy gives first derivatives only: backward with create_graph=True "
                "(double backward, gradient penalties) is not supported; use the dense path "
                "F.cross_entropy(head(input, target), target)"
            )
        refuse_batched_backward("chunked margin cross-entropy", "F.cross_entropy(head(input, target), target)")
        x, weight, lse, norms, scale_t, value, *params = ctx.saved_tensors
        # the arithmetic runs on the values: under torch.func.grad the saved tensors still track the transform's
        # gradient here, and the GEMMs write into preallocated outputs (``out=``), which autograd refuses
        x, rows_w = x.detach(), weight.detach()
        spec: Spec = ctx.spec
        targets, k = spec.targets, spec.num_sub_centers
        acc = acc_dtype(x.dtype)
        s = scale_t.detach().to(acc) if ctx.scale_is_tensor else ctx.scale
        width = weight.shape[0] // k
        g = grad.to(acc)
        needs = ctx.needs_input_grad
        n = x.shape[0]
        # every term is linear in the rows' upstream gradient g: it is folded into the features of the weight
        # gradient's GEMM (x·g) and into the feature gradient at the end, not into an N×C pass per chunk
        grad_x = torch.zeros(x.shape, dtype=acc, device=x.device) if needs[0] else None
        xg = x.to(acc) * g[:, None] if needs[1] else None
        # with an existing .grad, each chunk's weight gradient is added into it: no C×d buffer of our own; else
        # each chunk writes its own rows of a fresh gradient once
        into = grad_to_accumulate_into(ctx.accumulate, weight) if needs[1] else None
        grad_w = into
        if needs[1] and into is None:
            tiled = width * k == weight.shape[0]  # every row is written by one chunk
            grad_w = (torch.empty if tiled else torch.zeros)(weight.shape, dtype=acc, device=x.device)
        grad_s = torch.zeros((), dtype=acc, device=x.device) if ctx.scale_is_tensor and needs[2] else None
        grad_value = torch.zeros(value.shape, dtype=acc, device=x.device) if value is not None and needs[3] else None
        grad_params = [torch.zeros_like(p) if needs[5 + i] else None for i, p in enumerate(params)]
        value_d = None if value is None else value.to(acc)
        buf = chunk_buffer(n, spec, width, acc, x.device)
        kept = spec.kept
        # the compiled body serves every spec but dense soft targets whose margin parameters need a gradient
        compiled = spec.compiled and (targets.dense is None or all(gp is None for gp in grad_params))
        for i, (start, stop) in enumerate(chunk_bounds(width, spec.chunk)):
            if compiled:
                if kept is not None:
                    chunk = kept[i]
                else:
                    chunk = Chunk(spec, x, rows_w, None, tuple(params), s, start, stop, buf, False,
                                   saved_norms(norms, start, stop, k))  # fmt: skip
                dcos, part_s, part_value = _compiled_backward(spec, chunk, value_d, params, s, lse, g, acc,
                                                             grad_s is not None, grad_value is not None)  # fmt: skip
                if grad_s is not None and part_s is not None:
                    grad_s += part_s
                if grad_value is not None and part_value is not None:
                    grad_value += part_value
                add_grads(dcos, xg, chunk, k, spec.tau, grad_x, grad_w, fresh=into is None)
                continue
            if kept is not None:  # the forward's logits, left as they are (a second backward reads them again)
                chunk = kept[i]
                dz = exp_(into_buffer(buf, torch.sub, chunk.z, lse[:, None]))
            else:
                chunk = Chunk(spec, x, rows_w, value_d, tuple(params), s, start, stop, buf,
                               norms=saved_norms(norms, start, stop, k))  # fmt: skip
                # p = softmax; in place over the logits unless the scale's gradient still needs them
                dz = exp(chunk.z - lse[:, None]) if grad_s is not None else exp_(chunk.z.sub_(lse[:, None]))
            if targets.row_sum is not None:
                dz.mul_(targets.row_sum[:, None])
            if targets.dense is not None:
                dz.sub_(chunk.t)
            else:
                assert targets.classes is not None
                subtract_targets_(dz, targets, start, stop)
            if grad_s is not None:
                grad_s += ((dz * chunk.z).sum(1) * g).sum() / s
            dcos = chunk_dcos(spec, chunk, dz, s, g, grad_value, params, grad_params)
            add_grads(dcos, xg, chunk, k, spec.tau, grad_x, grad_w, fresh=into is None)
        if grad_s is not None and spec.reduce is not None:  # the scale is shared by the blocks
            spec.reduce(grad_s, "sum")
        if grad_x is not None:
            grad_x.mul_(g[:, None])
        return (
            None if grad_x is None else grad_x.to(x.dtype),
            None if grad_w is None or into is not None else grad_w.to(weight.dtype),
            None if grad_s is None else grad_s.to(scale_t.dtype),
            None if grad_value is None else grad_value.to(ctx.value_dtype),
            None,
            *grad_params,
        )


def _chunk_targets(spec: Spec, chunk: Chunk, acc: torch.dtype) -> tuple[Any, Any, Any]:
    """The chunk's target entries for the compiled body: ``(cols, inside)`` ``(N, P)`` for class targets, or the
    chunk's dense soft targets ``t``."""
    targets = spec.targets
    if targets.dense is not None:
        return None, None, targets.dense[:, chunk.start : chunk.stop].to(acc)
    assert targets.classes is not None
    inside, cols = in_chunk(targets.classes, chunk.start, chunk.stop)
    return cols, inside, None


def _compiled_forward(
    spec: Spec, chunk: Chunk, value: Optional[Tensor], params: tuple[Tensor, ...], s: Any, run_max: Tensor,
    run_sum: Tensor, acc: torch.dtype,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:  # fmt: skip
    """One chunk of the forward through the compiled body; with ``spec.keep`` the chunk keeps what backward needs."""
    cols, inside, t = _chunk_targets(spec, chunk, acc)
    out = compiled.run(
        "forward", compiled.forward_body, chunk.raw, chunk.inv, s, run_max, run_sum, value, cols, inside, t,
        spec.target_cos, spec.row_params, flat_params(params, chunk.start, chunk.stop), spec.family,
        spec.num_sub_centers, spec.tau, spec.plain, spec.keep,
    )  # fmt: skip
    chunk.raw = None
    if spec.keep:
        chunk.z, chunk.cos_k, chunk.pooled, chunk.slope, chunk.neg_slope = out[3:]
        chunk.t = t
    return out[0], out[1], out[2]


def _compiled_backward(
    spec: Spec, chunk: Chunk, value: Optional[Tensor], params: list[Tensor], s: Any, lse: Tensor, g: Tensor,
    acc: torch.dtype, need_scale: bool, need_value: bool,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:  # fmt: skip
    """One chunk of the backward through the compiled body: ``(dcos, grad_scale part, grad_value part)``."""
    targets = spec.targets
    cols, inside, t = _chunk_targets(spec, chunk, acc)
    kept = None if chunk.raw is not None else (chunk.z, chunk.cos_k, chunk.pooled, chunk.slope, chunk.neg_slope)
    weights = None if targets.weights is None else targets.weights.to(acc)
    row_sum = None if targets.row_sum is None else targets.row_sum.to(acc)
    return compiled.run(
        "backward", compiled.backward_body, chunk.raw, kept, chunk.inv, s, lse, g, value, cols, inside, weights,
        row_sum, t, spec.target_cos, spec.row_params, flat_params(tuple(params), chunk.start, chunk.stop),
        spec.slope, spec.family, spec.num_sub_centers, spec.tau, spec.plain, need_scale, need_value,
    )  # fmt: skip


def chunk_dcos(
    spec: Spec, chunk: Chunk, dz: Tensor, s: Any, g: Tensor, grad_value: Optional[Tensor], params: list[Tensor],
    grad_params: list[Optional[Tensor]], out: Optional[Tensor] = None,
) -> Tensor:  # fmt: skip
    """∂loss/∂(cosine) of the chunk from ∂loss/∂logit ``dz`` (without the rows' upstream gradient ``g``), through the
    margin, divided by each weight row's norm (the normalisation's forward factor, folded in here); for K > 1 the
    sub-center cosines' gradient. Also the margin's own gradients (with ``g``). May overwrite ``dz``. ``out``: where
    a family's non-target slopes (one sub-center, class targets) write it, if given — a row tile's cosines, which
    nothing reads after the slopes are formed: the gradient lands in the tile without a copy."""
    targets, k = spec.targets, spec.num_sub_centers
    # the per-column factor: the scale and, for K = 1, the rows' 1 / ‖w‖ (K > 1: after the pooling's backward)
    factor = chunk.scaled_inv(s) if k == 1 else s
    if targets.dense is not None:
        assert chunk.slope is not None and chunk.pooled is not None
        if any(gp is not None for gp in grad_params):  # margins that need a gradient, at every soft entry
            leaves = [
                p.detach().requires_grad_(gp is not None)
                for p, gp in zip(flat_params(tuple(params), chunk.start, chunk.stop), grad_params)
            ]
            with torch.enable_grad():
                value, _ = spec.family.value_and_slope(chunk.pooled.detach(), chunk.t, *leaves)
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            grads = iter(torch.autograd.grad(value, wanted, dz * (g[:, None] * s), allow_unused=True))
            for i, gp in enumerate(grad_params):
                if gp is None:
                    continue
                got = next(grads)
                if got is None:
                    continue
                if gp.dim() == 0 or gp.shape[-1] == 1:
                    gp += got.sum_to_size(gp.shape)
                else:
                    gp[..., chunk.start : chunk.stop] += got.sum_to_size(leaves[i].shape)
        return sub_center_grads(dz.mul_(chunk.slope).mul_(factor), chunk, k, spec.tau)
    assert targets.classes is not None and spec.slope is not None
    slope = spec.slope
    entries = [
        in_chunk(targets.classes[:, p : p + 1], chunk.start, chunk.stop) for p in range(targets.classes.shape[1])
    ]
    at = [dz.gather(1, col) * s for _, col in entries]  # ∂loss/∂ψ at the margin's entries, before dz is overwritten
    if grad_value is not None:
        for p, (inside, _) in enumerate(entries):
            grad_value[:, p : p + 1] += torch.where(inside, at[p] * g[:, None], 0.0)
    into = dz if out is None or k != 1 else out
    dcos = dz if chunk.neg_slope is None else torch.mul(dz, chunk.neg_slope, out=into)
    dcos.mul_(factor)
    for p, (inside, col) in enumerate(entries):
        target = at[p] * slope[:, p : p + 1]
        if k == 1:
            target = target * chunk.inv[col]
        dcos.scatter_(1, col, torch.where(inside, target, dcos.gather(1, col)))
    return sub_center_grads(dcos, chunk, k, spec.tau)


def tile_softmax_grad(
    spec: Spec, chunk: Chunk, value: Optional[Tensor], s: Any, acc: torch.dtype, keep_logits: bool
) -> tuple[Tensor, Tensor]:
    """A chunk that holds a row tile's logits over the whole block: its rows' losses and ∂loss/∂logit for an upstream
    gradient of 1 (``softmax·Σt − t``), with the other blocks' softmax statistics under ``spec.reduce``. The
    gradient overwrites the logits unless ``keep_logits`` (the scale's gradient still reads them)."""
    z, targets = chunk.z, spec.targets
    width = z.shape[1]
    if targets.dense is not None:
        term = (chunk.t * z).sum(1)
    elif width > 0:
        assert targets.classes is not None and value is not None
        term = target_logit_sum(targets, value, s, width, acc)
    else:
        term = z.new_zeros(z.shape[0])
    top = z.amax(1) if width > 0 else z.new_full((z.shape[0],), -torch.inf)
    if spec.reduce is not None:  # the row max over every block first, so that no block's exp overflows
        top = spec.reduce(top, "max")
    e = exp(z - top[:, None]) if keep_logits else exp_(z.sub_(top[:, None]))
    total = e.sum(1)
    if spec.reduce is not None:
        total, term = spec.reduce(torch.stack([total, term]), "sum")
    lse = top + torch.log(total)
    losses = (lse if targets.row_sum is None else lse * targets.row_sum) - term
    dz = e.mul_((total.reciprocal() if targets.row_sum is None else targets.row_sum / total)[:, None])
    if targets.dense is not None:
        dz.sub_(chunk.t)
    else:
        assert targets.classes is not None
        if width > 0:
            subtract_targets_(dz, targets, 0, width)
    return losses, dz


def target_logit_sum(targets: Targets, value: Tensor, s: Any, width: int, acc: torch.dtype) -> Tensor:
    """Each row's Σ_p w_p·s·ψ_p over its target entries inside a block of ``width`` classes (``value`` = ψ at the
    targets, ``(N, P)``): the target part of the cross-entropy, ``lse·Σt − term``."""
    assert targets.classes is not None
    inside = (targets.classes >= 0) & (targets.classes < width)
    w = 1.0 if targets.weights is None else targets.weights.to(acc)
    return torch.where(inside, value * s * w, 0.0).sum(1)


def subtract_targets_(dz: Tensor, targets: Targets, start: int, stop: int) -> Tensor:
    """``dz −= t`` in place on the chunk of classes ``[start, stop)``: each target entry's weight (1 for a class
    index) subtracted where it falls in the chunk."""
    assert targets.classes is not None
    for p in range(targets.classes.shape[1]):
        inside, col = in_chunk(targets.classes[:, p : p + 1], start, stop)
        w = 1.0 if targets.weights is None else targets.weights[:, p : p + 1].to(dz.dtype)
        dz.scatter_add_(1, col, torch.where(inside, -w, 0.0).to(dz.dtype))
    return dz
