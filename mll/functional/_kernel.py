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
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mll.functional import _compiled
from mll.functional._accumulate import accumulate_node, grad_to_accumulate_into
from mll.functional._compiled import pool, pool_backward
from mll.functional._fold import fold_normalization_
from mll.functional.cosine import normalize
from mll.functional.margin import MarginFamily

#: ``reduce(tensor, op)`` with op "max" or "sum": combines per-row statistics over the blocks (in place)
Reduce = Callable[[Tensor, str], Tensor]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax statistics in float64 for float64 input, float32 otherwise (half precision included)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def weight_eps(dtype: torch.dtype) -> float:
    """The ε of :func:`mll.functional.normalize` for weights of ``dtype``."""
    return 2.0**-10 if dtype == torch.float16 else 1e-12


@dataclass
class Targets:
    """The rows' targets as the kernel sees them in its block of B classes.

    Either ``classes`` — ``(N, P)`` block-local class indices, one or more per row (class indices: P = 1; few-hot
    soft targets: P entries with ``weights``); an index outside ``[0, B)`` is a class of another block, or a
    duplicate merged into an earlier entry — or ``dense``, ``(N, B)`` soft targets sliced per chunk. ``row_sum`` is
    each row's Σ_j t_ij over *all* classes (None: 1, class indices).
    """

    classes: Optional[Tensor] = None
    weights: Optional[Tensor] = None
    dense: Optional[Tensor] = None
    row_sum: Optional[Tensor] = None


@dataclass
class Spec:
    """Everything but the differentiable tensors: the margin, the pooling, the chunking and the block reduction."""

    family: MarginFamily
    targets: Targets
    num_sub_centers: int
    chunk: int
    tau: Optional[float] = None  # soft sub-center pooling temperature; None: max pooling
    reduce: Optional[Reduce] = None  # None: a single block
    #: keep each chunk's logits from forward to backward instead of recomputing them (no fourth GEMM): for blocks
    #: whose logits are small (see :func:`mll.functional.chunked.keeps_logits`); the forward fills ``kept``
    keep: bool = False
    kept: Optional[list[Any]] = None
    #: run the chunk's elementwise work compiled (``_compiled.py``); default: :func:`mll.functional.set_chunk_kernel`
    compiled: bool = field(default_factory=lambda: _compiled.chunk_kernel() == "compiled")
    #: False: the weight rows are used as they are, so that a chunk's "cosines" are the dot products x·w (L-Softmax)
    normalize_weight: bool = True
    #: at the ``classes`` entries: the margin's slope ``(N, P)``; for a family's non-target part, each row's target
    #: cosine ``(N, 1)`` and its parameters at the target class (set by :func:`prepare`)
    slope: Optional[Tensor] = None
    target_cos: Optional[Tensor] = None
    row_params: tuple[Tensor, ...] = ()

    @property
    def plain(self) -> bool:
        """The plain scaled cosine logits with target values written in: one sub-center, class indices (or few-hot
        pairs), no non-target part — the chunk needs its logits only, not its cosines."""
        return self.num_sub_centers == 1 and self.targets.dense is None and self.family.negatives is None


def chunk_bounds(width: int, chunk: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk, width)) for start in range(0, width, chunk)]


def flat_params(params: tuple[Tensor, ...], start: int, stop: int) -> list[Tensor]:
    """Each parameter's columns for the chunk's classes (per-sample and scalar parameters as they are)."""
    return [p if p.dim() == 0 or p.shape[-1] == 1 else p[..., start:stop] for p in params]


def at_classes(param: Tensor, classes: Tensor, width: int) -> Tensor:
    """A parameter (0-dim, ``(B,)`` per class, ``(N, 1)`` per sample, ``(N, B)`` per entry) at ``classes (N, P)``."""
    if param.dim() == 0:
        return param
    if param.shape[-1] == 1:
        return param.expand(classes.shape)
    index = classes.clamp(0, max(width - 1, 0))
    if param.dim() == 1:
        return param[index]
    return param.gather(1, index)


def target_cosines(
    x: Tensor, weight: Tensor, classes: Tensor, k: int, tau: Optional[float], normalize_weight: bool = True
) -> Tensor:
    """Pooled cosines of each row with its ``classes (N, P)`` (clamped into the block), in the accumulation dtype.

    O(N·P·K·d): the entries the margin shapes, computed once before the chunk loop. An empty block gives zeros.
    """
    acc = acc_dtype(x.dtype)
    width = weight.shape[0] // k
    if width == 0:
        return torch.zeros(classes.shape, dtype=acc, device=x.device)
    rows = weight.detach().view(width, k, -1)[classes.clamp(0, width - 1)]  # (N, P, K, d)
    rows = normalize(rows) if normalize_weight else rows
    cos_k = torch.einsum("nd,npkd->npk", x.detach().to(acc), rows.to(acc))
    return pool(cos_k.reshape(classes.shape[0], -1), k, tau) if k > 1 else cos_k.squeeze(-1)


def _inside(classes: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """Per entry: whether it falls in the chunk, and its chunk column (clamped into the chunk when it does not)."""
    local = classes - start
    return (local >= 0) & (local < stop - start), local.clamp(0, stop - start - 1)


def _gemm(x: Tensor, rows: Tensor, acc: torch.dtype, out: Optional[Tensor]) -> Tensor:
    """``x @ rowsᵀ`` in the accumulation dtype, into ``out`` (a reused chunk buffer) where the dtypes allow it."""
    if out is not None and x.dtype == rows.dtype == acc and not torch.is_autocast_enabled(x.device.type):
        return torch.mm(x, rows.t(), out=out)
    return F.linear(x, rows).to(acc)


def chunk_buffer(n: int, spec: Spec, width: int, acc: torch.dtype, device: Any) -> Tensor:
    """One flat buffer for a chunk's N×chunk·K GEMM output, reused by every chunk (no allocation per chunk)."""
    return torch.empty(n * min(spec.chunk, width) * spec.num_sub_centers, dtype=acc, device=device)


def _into(buf: Tensor, op: Callable[..., Tensor], a: Tensor, b: Tensor) -> Tensor:
    """``op(a, b)`` written into the front of the flat buffer ``buf``, shaped as ``a``."""
    return op(a, b, out=buf[: a.numel()].view(a.shape))


class _Chunk:
    """One chunk's logits (accumulation dtype) and what its backward needs.

    The weight rows are never normalised into a copy: the GEMM runs on the raw rows and each output column is scaled
    by ``inv = 1 / max(‖w‖, ε)`` — an N×chunk pass, folded into the scale for the plain cosine logits, instead of a
    chunk·K×d normalised copy and its backward (see :func:`_add_grads`). The logits ``z`` may live in ``buf``.
    """

    def __init__(
        self, spec: Spec, x: Tensor, weight: Tensor, value: Optional[Tensor], params: tuple[Tensor, ...],
        s: Any, start: int, stop: int, buf: Optional[Tensor] = None, epilogue: bool = True,
        norms: Optional[Tensor] = None,
    ) -> None:  # fmt: skip
        k, acc = spec.num_sub_centers, acc_dtype(x.dtype)
        n, cols = x.shape[0], (stop - start) * k
        self.rows = weight[start * k : stop * k].detach()
        if spec.normalize_weight:
            if norms is None:  # (backward passes the forward's, one C·K×d read fewer)
                norms = torch.linalg.vector_norm(self.rows, dim=1, dtype=acc)
            self.norms = norms
            eps = weight_eps(weight.dtype)
            self.inv = norms.clamp(min=eps).reciprocal_()
            self.radial = norms > eps  # rows whose normalisation's backward projects out the radial part
        else:  # the rows as they are: no factor, no normalisation to chain through in backward
            self.norms = None
            self.inv = torch.ones(self.rows.shape[0], dtype=acc, device=x.device)
            self.radial = torch.zeros(self.rows.shape[0], dtype=torch.bool, device=x.device)
        raw = _gemm(x, self.rows, acc, None if buf is None else buf[: n * cols].view(n, cols))
        self.start, self.stop = start, stop
        self.slope: Optional[Tensor] = None  # dense soft targets: ∂ψ/∂cos per entry
        self.neg_slope: Optional[Tensor] = None
        self.cos_k: Optional[Tensor] = None  # sub-center cosines (K > 1, for the pooling's backward)
        self.pooled: Optional[Tensor] = None  # pooled cosines (where the margin needs them)
        family, targets = spec.family, spec.targets
        self.raw: Optional[Tensor] = None
        if not epilogue:  # the compiled body shapes the logits (``_compiled.py``)
            self.raw = raw
            return
        if spec.plain:
            self.z = raw.mul_(self.inv * s)  # the plain scaled cosines: one pass, in place
        else:
            self.cos_k = raw.mul_(self.inv)
            self.pooled = pool(self.cos_k, k, spec.tau)
            if targets.dense is not None:
                self.t = targets.dense[:, start:stop].to(acc)
                with torch.no_grad():
                    z, self.slope = family.value_and_slope(self.pooled, self.t, *flat_params(params, start, stop))
                self.z = z * s
                return
            if family.negatives is not None:
                assert spec.target_cos is not None
                z, self.neg_slope = family.negatives(self.pooled, spec.target_cos, *spec.row_params)
                self.z = z * s
            else:
                self.z = self.pooled * s
        assert targets.classes is not None and value is not None
        for p in range(targets.classes.shape[1]):  # one entry per row at a time: no two writes collide
            inside, col = _inside(targets.classes[:, p : p + 1], start, stop)
            self.z.scatter_(1, col, torch.where(inside, value[:, p : p + 1] * s, self.z.gather(1, col)))


def prepare(spec: Spec, x: Tensor, weight: Tensor, params: tuple[Tensor, ...]) -> Optional[Tensor]:
    """The margin at the target entries, before the chunk loop: returns ``value (N, P)`` (with autograd to the
    parameters that need it) and sets ``spec.slope`` (and, for a non-target part, ``target_cos``/``row_params``).
    Dense soft targets: nothing to prepare (None)."""
    targets, family = spec.targets, spec.family
    if targets.classes is None:
        return None
    width = weight.shape[0] // spec.num_sub_centers
    cos = target_cosines(x, weight, targets.classes, spec.num_sub_centers, spec.tau, spec.normalize_weight)
    graph = torch.is_grad_enabled() and any(p.requires_grad for p in params)
    with torch.set_grad_enabled(graph):
        at = [at_classes(p, targets.classes, width) for p in params]
        w = 1.0 if targets.weights is None else targets.weights.to(cos.dtype)
        value, slope = family.value_and_slope(cos, w, *at)
    spec.slope = slope.detach()
    if family.negatives is not None:
        spec.target_cos = cos[:, :1]
        spec.row_params = tuple(a if a.dim() == 0 else a.detach()[:, :1] for a in at)
    return value


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


class ChunkedCE(torch.autograd.Function):
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
        kept: Optional[list[_Chunk]] = [] if spec.keep else None
        # each row's norm, saved for a recomputing backward (C·K numbers; none without the normalisation)
        norms = torch.empty(weight.shape[0] if spec.normalize_weight else 0, dtype=acc, device=x.device)
        for start, stop in chunk_bounds(width, spec.chunk):
            if spec.compiled:
                chunk = _Chunk(spec, x, weight, None, params, s, start, stop, None if spec.keep else buf, False)
                _record_norms(norms, chunk, k)
                run_max, run_sum, term = _compiled_forward(spec, chunk, value_d, params, s, run_max, run_sum, acc)
                if term is not None:
                    target_term += term
                if kept is not None:
                    kept.append(chunk)
                continue
            # kept logits live in their own chunk's tensors; recomputed ones in the shared buffer
            chunk = _Chunk(spec, x, weight, value_d, params, s, start, stop, None if spec.keep else buf)
            _record_norms(norms, chunk, k)
            z = chunk.z
            if targets.dense is not None:
                target_term += (chunk.t * z).sum(1)
            new_max = torch.maximum(run_max, z.amax(1))
            shifted = z.sub_(new_max[:, None]) if kept is None else _into(buf, torch.sub, z, new_max[:, None])
            run_sum = run_sum * torch.exp(run_max - new_max) + shifted.exp_().sum(1)
            run_max = new_max
            if kept is not None:
                kept.append(chunk)
        if kept is not None:  # (only then: a traced forward must not change the spec)
            spec.kept = kept
        if targets.classes is not None and width > 0:
            assert value_d is not None
            inside = (targets.classes >= 0) & (targets.classes < width)
            w = 1.0 if targets.weights is None else targets.weights.to(acc)
            target_term = torch.where(inside, value_d * s * w, 0.0).sum(1)
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
        if _double_backward():
            raise RuntimeError(
                "the chunked margin cross-entropy gives first derivatives only: backward with create_graph=True "
                "(double backward, gradient penalties) is not supported; use the dense path "
                "F.cross_entropy(head(input, target), target)"
            )
        x, weight, lse, norms, scale_t, value, *params = ctx.saved_tensors
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
                    chunk = _Chunk(spec, x, weight, None, tuple(params), s, start, stop, buf, False,
                                   _saved_norms(norms, start, stop, k))  # fmt: skip
                dcos, part_s, part_value = _compiled_backward(spec, chunk, value_d, params, s, lse, g, acc,
                                                             grad_s is not None, grad_value is not None)  # fmt: skip
                if grad_s is not None and part_s is not None:
                    grad_s += part_s
                if grad_value is not None and part_value is not None:
                    grad_value += part_value
                _add_grads(dcos, xg, chunk, k, spec.tau, grad_x, grad_w, fresh=into is None)
                continue
            if kept is not None:  # the forward's logits, left as they are (a second backward reads them again)
                chunk = kept[i]
                dz = _into(buf, torch.sub, chunk.z, lse[:, None]).exp_()
            else:
                chunk = _Chunk(spec, x, weight, value_d, tuple(params), s, start, stop, buf,
                               norms=_saved_norms(norms, start, stop, k))  # fmt: skip
                # p = softmax; in place over the logits unless the scale's gradient still needs them
                dz = torch.exp(chunk.z - lse[:, None]) if grad_s is not None else chunk.z.sub_(lse[:, None]).exp_()
            if targets.row_sum is not None:
                dz.mul_(targets.row_sum[:, None])
            if targets.dense is not None:
                dz.sub_(chunk.t)
            else:
                assert targets.classes is not None
                for p in range(targets.classes.shape[1]):
                    inside, col = _inside(targets.classes[:, p : p + 1], start, stop)
                    w = 1.0 if targets.weights is None else targets.weights[:, p : p + 1].to(acc)
                    dz.scatter_add_(1, col, torch.where(inside, -w, 0.0).to(acc))
            if grad_s is not None:
                grad_s += ((dz * chunk.z).sum(1) * g).sum() / s
            dcos = _dcos(spec, chunk, dz, s, g, grad_value, params, grad_params)
            _add_grads(dcos, xg, chunk, k, spec.tau, grad_x, grad_w, fresh=into is None)
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


def _record_norms(norms: Tensor, chunk: _Chunk, k: int) -> None:
    if chunk.norms is not None:
        norms[chunk.start * k : chunk.stop * k] = chunk.norms


def _saved_norms(norms: Tensor, start: int, stop: int, k: int) -> Optional[Tensor]:
    return norms[start * k : stop * k] if norms.numel() else None


def _chunk_targets(spec: Spec, chunk: _Chunk, acc: torch.dtype) -> tuple[Any, Any, Any]:
    """The chunk's target entries for the compiled body: ``(cols, inside)`` ``(N, P)`` for class targets, or the
    chunk's dense soft targets ``t``."""
    targets = spec.targets
    if targets.dense is not None:
        return None, None, targets.dense[:, chunk.start : chunk.stop].to(acc)
    assert targets.classes is not None
    inside, cols = _inside(targets.classes, chunk.start, chunk.stop)
    return cols, inside, None


def _compiled_forward(
    spec: Spec, chunk: _Chunk, value: Optional[Tensor], params: tuple[Tensor, ...], s: Any, run_max: Tensor,
    run_sum: Tensor, acc: torch.dtype,
) -> tuple[Tensor, Tensor, Optional[Tensor]]:  # fmt: skip
    """One chunk of the forward through the compiled body; with ``spec.keep`` the chunk keeps what backward needs."""
    cols, inside, t = _chunk_targets(spec, chunk, acc)
    out = _compiled.run(
        "forward", _compiled.forward_body, chunk.raw, chunk.inv, s, run_max, run_sum, value, cols, inside, t,
        spec.target_cos, spec.row_params, flat_params(params, chunk.start, chunk.stop), spec.family,
        spec.num_sub_centers, spec.tau, spec.plain, spec.keep,
    )  # fmt: skip
    chunk.raw = None
    if spec.keep:
        chunk.z, chunk.cos_k, chunk.pooled, chunk.slope, chunk.neg_slope = out[3:]
        chunk.t = t
    return out[0], out[1], out[2]


def _compiled_backward(
    spec: Spec, chunk: _Chunk, value: Optional[Tensor], params: list[Tensor], s: Any, lse: Tensor, g: Tensor,
    acc: torch.dtype, need_scale: bool, need_value: bool,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:  # fmt: skip
    """One chunk of the backward through the compiled body: ``(dcos, grad_scale part, grad_value part)``."""
    targets = spec.targets
    cols, inside, t = _chunk_targets(spec, chunk, acc)
    kept = None if chunk.raw is not None else (chunk.z, chunk.cos_k, chunk.pooled, chunk.slope, chunk.neg_slope)
    weights = None if targets.weights is None else targets.weights.to(acc)
    row_sum = None if targets.row_sum is None else targets.row_sum.to(acc)
    return _compiled.run(
        "backward", _compiled.backward_body, chunk.raw, kept, chunk.inv, s, lse, g, value, cols, inside, weights,
        row_sum, t, spec.target_cos, spec.row_params, flat_params(tuple(params), chunk.start, chunk.stop),
        spec.slope, spec.family, spec.num_sub_centers, spec.tau, spec.plain, need_scale, need_value,
    )  # fmt: skip


def _double_backward() -> bool:
    """Whether this backward is being differentiated: ``create_graph=True``, or nested ``torch.func`` transforms.
    (A single ``torch.func.grad``/``vjp`` runs backward with grad mode on, at transform level 1: that is fine.)"""
    if torch._C._are_functorch_transforms_active():
        level = torch._C._functorch.maybe_current_level()
        return level is not None and level > 1
    return torch.is_grad_enabled()


def _dcos(
    spec: Spec, chunk: _Chunk, dz: Tensor, s: Any, g: Tensor, grad_value: Optional[Tensor], params: list[Tensor],
    grad_params: list[Optional[Tensor]],
) -> Tensor:  # fmt: skip
    """∂loss/∂(cosine) of the chunk from ∂loss/∂logit ``dz`` (without the rows' upstream gradient ``g``), through the
    margin, divided by each weight row's norm (the normalisation's forward factor, folded in here); for K > 1 the
    sub-center cosines' gradient. Also the margin's own gradients (with ``g``). May overwrite ``dz``."""
    targets, k = spec.targets, spec.num_sub_centers
    # the per-column factor: the scale and, for K = 1, the rows' 1 / ‖w‖ (K > 1: after the pooling's backward)
    factor = chunk.inv * s if k == 1 else s
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
        return _sub_centers(dz.mul_(chunk.slope).mul_(factor), chunk, k, spec.tau)
    assert targets.classes is not None and spec.slope is not None
    slope = spec.slope
    entries = [_inside(targets.classes[:, p : p + 1], chunk.start, chunk.stop) for p in range(targets.classes.shape[1])]
    at = [dz.gather(1, col) * s for _, col in entries]  # ∂loss/∂ψ at the margin's entries, before dz is overwritten
    if grad_value is not None:
        for p, (inside, _) in enumerate(entries):
            grad_value[:, p : p + 1] += torch.where(inside, at[p] * g[:, None], 0.0)
    dcos = dz if chunk.neg_slope is None else dz.mul_(chunk.neg_slope)
    dcos.mul_(factor)
    for p, (inside, col) in enumerate(entries):
        target = at[p] * slope[:, p : p + 1]
        if k == 1:
            target = target * chunk.inv[col]
        dcos.scatter_(1, col, torch.where(inside, target, dcos.gather(1, col)))
    return _sub_centers(dcos, chunk, k, spec.tau)


def _sub_centers(dcos: Tensor, chunk: _Chunk, k: int, tau: Optional[float]) -> Tensor:
    """K > 1: the pooled cosines' gradient ``(N, W)`` to the sub-center cosines ``(N, W·K)``, divided by each row's
    norm. K = 1: ``dcos`` as it is (the norms are already in)."""
    if k == 1:
        return dcos
    assert chunk.cos_k is not None and chunk.pooled is not None
    return pool_backward(dcos, chunk.cos_k, chunk.pooled, k, tau).mul_(chunk.inv)


def _add_grads(
    dcos: Tensor, xg: Optional[Tensor], chunk: _Chunk, k: int, tau: Optional[float], grad_x: Optional[Tensor],
    grad_w: Optional[Tensor], fresh: bool,
) -> None:  # fmt: skip
    """The chunk's share of the feature gradient and its rows of the weight gradient, from ``dcos`` = ∂loss/∂cos
    divided by the rows' norms (``xg``: the features times the rows' upstream gradient).

    With ŵ = w·inv, inv = 1 / max(‖w‖, ε): the feature gradient is Σ_j ∂cos_j·ŵ_j = (dcos·inv) @ W — the raw rows,
    no normalised copy — and the row gradient is inv·(dŵ − ŵ (ŵ·dŵ)) = D − w·inv²·(w·D) with D = (dcos·inv)ᵀ @ xg
    (where ‖w‖ ≤ ε the normalisation is w/ε and D alone is the gradient)."""
    acc = dcos.dtype
    rows = chunk.rows if chunk.rows.dtype == acc else chunk.rows.to(acc)
    if grad_x is not None:
        grad_x.addmm_(dcos, rows)
    if grad_w is None:
        return
    assert xg is not None
    dest = grad_w[chunk.start * k : chunk.stop * k]
    direct = fresh and dest.dtype == acc
    d = torch.mm(dcos.t(), xg, out=dest) if direct else dcos.t() @ xg
    fold_normalization_(d, rows, chunk.inv, chunk.radial)
    if not direct:
        dest += d.to(dest.dtype)


def chunk_cosines(x: Tensor, weight: Tensor, k: int, tau: Optional[float], chunk: int) -> Any:
    """``(start, stop, pooled cosines (N, stop − start))`` of each chunk, in the accumulation dtype, without
    autograd: for statistics that need every class (AdaCos's scale) but not the N×C cosines at once."""
    acc = acc_dtype(x.dtype)
    with torch.no_grad():
        for start, stop in chunk_bounds(weight.shape[0] // k, chunk):
            rows = weight[start * k : stop * k].detach()
            inv = torch.linalg.vector_norm(rows, dim=1, dtype=acc).clamp(min=weight_eps(weight.dtype)).reciprocal_()
            yield start, stop, pool(_gemm(x.detach(), rows, acc, None).mul_(inv), k, tau)
