"""A chunk of classes: its logits from the raw weight rows, its targets, and its gradient to features and weights.

What every chunked path does per chunk, whatever it computes from the logits: normalise nothing into a copy — one
GEMM on the chunk's raw weight rows, each output column scaled by ``1 / max(‖w‖, ε)`` — pool sub-centers, shape the
logits with the margin (its non-target part, then the target entries: :class:`Chunk`); and on the way back, chain
a gradient of the cosines through the pooling, the GEMM and the rows' normalisation into the features' gradient and
the chunk's rows of the weight gradient (:func:`sub_center_grads`, :func:`add_grads`). The row softmax of the
margin cross-entropy (``kernel.py``) and the per-class batch sums of Proxy-Anchor (``class_sums.py``) are two loops
over these chunks. The margin at the target entries is computed once, before the loop (:func:`prepare`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Optional, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from mll.functional._engine import compiled
from mll.functional._engine.compiled import pool, pool_backward
from mll.functional._engine.normalization import fold_normalization_, normalize
from mll.functional._engine.numerics import acc_dtype, autocast_enabled, in_place_ok, weight_eps
from mll.functional._engine.targets import Targets

#: ``reduce(tensor, op)`` with op "max" or "sum": combines per-row statistics over the blocks (in place)
Reduce = Callable[[Tensor, str], Tensor]


class Family(Protocol):
    """What the engine reads of a margin family (:class:`mll.functional.MarginFamily` is one): its value and slope at
    the target entries, and its optional change to the non-target entries."""

    @property
    def value_and_slope(self) -> Callable[..., tuple[Tensor, Tensor]]: ...

    @property
    def negatives(self) -> Optional[Callable[..., tuple[Tensor, Tensor]]]: ...


@dataclass
class Spec:
    """Everything but the differentiable tensors: the margin, the pooling, the chunking and the block reduction."""

    family: Family
    targets: Targets
    num_sub_centers: int
    chunk: int
    tau: Optional[float] = None  # soft sub-center pooling temperature; None: max pooling
    reduce: Optional[Reduce] = None  # None: a single block
    #: keep each chunk's logits from forward to backward instead of recomputing them (no fourth GEMM): for blocks
    #: whose logits are small (see :func:`mll.functional.chunked.keeps_logits`); the forward fills ``kept``
    keep: bool = False
    kept: Optional[list[Any]] = None
    #: run the chunk's elementwise work compiled (``compiled.py``); default: :func:`mll.functional.set_chunk_kernel`
    compiled: bool = field(default_factory=lambda: compiled.chunk_kernel() == "compiled")
    #: False: the weight rows are used as they are, so that a chunk's "cosines" are the dot products x·w (L-Softmax)
    normalize_weight: bool = True
    #: at the ``classes`` entries: the margin's slope ``(N, P)``; for a family's non-target part, each row's target
    #: cosine ``(N, 1)`` and its parameters at the target class (set by :func:`prepare`)
    slope: Optional[Tensor] = None
    target_cos: Optional[Tensor] = None
    row_params: tuple[Tensor, ...] = ()
    #: the ranks of a class-sharded loss (``block.Ranks``), for the row tiles' backward
    ranks: Any = None

    def rows(self, start: int, stop: int) -> Spec:
        """The spec of rows ``[start, stop)``: their targets, slopes and row parameters (a row tile's)."""
        return replace(
            self, targets=self.targets.rows(start, stop), keep=False, kept=None, compiled=False,
            slope=row_slice(self.slope, start, stop), target_cos=row_slice(self.target_cos, start, stop),
            row_params=tuple(row_slice(p, start, stop) for p in self.row_params),
        )  # fmt: skip

    @property
    def plain(self) -> bool:
        """The plain scaled cosine logits with target values written in: one sub-center, class indices (or few-hot
        pairs), no non-target part — the chunk needs its logits only, not its cosines."""
        return self.num_sub_centers == 1 and self.targets.dense is None and self.family.negatives is None


def row_slice(tensor: Any, start: int, stop: int) -> Any:
    """Rows ``[start, stop)`` of a per-row tensor ``(N, …)``; a 0-dim or per-class ``(B,)`` tensor (or None) as it
    is."""
    return tensor if tensor is None or tensor.dim() < 2 else tensor[start:stop]


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
    return pool(cos_k.flatten(1), k, tau) if k > 1 else cos_k.squeeze(-1)


def in_chunk(classes: Tensor, start: int, stop: int) -> tuple[Tensor, Tensor]:
    """Per entry: whether it falls in the chunk, and its chunk column (clamped into the chunk when it does not)."""
    local = classes - start
    return (local >= 0) & (local < stop - start), local.clamp(0, stop - start - 1)


def gemm(x: Tensor, rows: Tensor, acc: torch.dtype, out: Optional[Tensor]) -> Tensor:
    """``x @ rowsᵀ`` in the accumulation dtype, into ``out`` (a reused chunk buffer) where the dtypes allow it."""
    if out is not None and x.dtype == rows.dtype == acc and not autocast_enabled(x.device):
        return torch.mm(x, rows.t(), out=out)
    return F.linear(x, rows).to(acc)


def chunk_buffer(n: int, spec: Spec, width: int, acc: torch.dtype, device: Any) -> Tensor:
    """One flat buffer for a chunk's N×chunk·K GEMM output, reused by every chunk (no allocation per chunk)."""
    return torch.empty(n * min(spec.chunk, width) * spec.num_sub_centers, dtype=acc, device=device)


def into_buffer(buf: Tensor, op: Callable[..., Tensor], a: Tensor, b: Tensor) -> Tensor:
    """``op(a, b)`` written into the front of the flat buffer ``buf``, shaped as ``a``."""
    return op(a, b, out=buf[: a.numel()].view(a.shape))


class ChunkRows:
    """A chunk's raw weight rows ``[start·K, stop·K)`` (detached) and their normalisation, without a normalised copy:
    ``inv = 1 / max(‖w‖, ε)`` per row, by which a GEMM on the raw rows is scaled column by column, and ``radial``, the
    rows whose normalisation's backward projects out the radial part (‖w‖ > ε). With ``normalize_weight=False`` the
    rows are used as they are (``inv`` = 1, nothing to chain through in backward). ``cos_k`` and ``pooled`` are the
    chunk's sub-center and pooled cosines where a path keeps them (for :func:`sub_center_grads`). ``shared``: rows of
    a range that holds ``[start, stop)``, whose normalisation is computed once and sliced here (a row tile's groups of
    rows and blocks of classes share the tile's)."""

    def __init__(
        self, weight: Tensor, k: int, start: int, stop: int, acc: torch.dtype, normalize_weight: bool = True,
        norms: Optional[Tensor] = None, shared: Optional[ChunkRows] = None,
    ) -> None:  # fmt: skip
        self.start, self.stop = start, stop
        self.cos_k: Optional[Tensor] = None  # sub-center cosines (K > 1, for the pooling's backward)
        self.pooled: Optional[Tensor] = None  # pooled cosines (where a path needs them)
        self.norms: Optional[Tensor] = None
        self.inv: Tensor
        self.radial: Tensor
        self._scaled: Optional[tuple[Any, Tensor]] = None  # (s, inv·s): see scaled_inv
        self._within: Optional[tuple[ChunkRows, slice]] = None
        if shared is not None:
            assert shared.start <= start <= stop <= shared.stop
            part = slice((start - shared.start) * k, (stop - shared.start) * k)
            self._within = (shared, part)
            self.rows: Tensor = shared.rows[part]
            self.norms = None if shared.norms is None else shared.norms[part]
            self.inv, self.radial = shared.inv[part], shared.radial[part]
            return
        self.rows = weight[start * k : stop * k].detach()
        if normalize_weight:
            if norms is None:  # (a recomputing backward passes the forward's: one C·K×d read fewer)
                norms = torch.linalg.vector_norm(self.rows, dim=1, dtype=acc)
            self.norms = norms
            eps = weight_eps(weight.dtype)
            self.inv = norms.clamp(min=eps).reciprocal_()
            self.radial = norms > eps
        else:
            self.inv = torch.ones(self.rows.shape[0], dtype=acc, device=weight.device)
            self.radial = torch.zeros(self.rows.shape[0], dtype=torch.bool, device=weight.device)

    def scaled_inv(self, s: Any) -> Tensor:
        """``inv · s``, the per-column factor of the scaled cosines: formed once per scale for the range that holds
        these rows (a row tile's groups of rows each take their slice of the tile's, instead of a C-sized product
        each — one per row at C = 10^6)."""
        if self._within is not None:
            shared, part = self._within
            return shared.scaled_inv(s)[part]
        if self._scaled is None or self._scaled[0] is not s:
            self._scaled = (s, self.inv * s)
        return self._scaled[1]


def cosines(x: Tensor, weight: Tensor, k: int, tau: Optional[float], start: int, stop: int) -> ChunkRows:
    """A chunk's rows with its sub-center and pooled cosines to ``x``, in the accumulation dtype (no autograd)."""
    acc = acc_dtype(x.dtype)
    chunk = ChunkRows(weight, k, start, stop, acc)
    chunk.cos_k = gemm(x.detach(), chunk.rows, acc, None).mul_(chunk.inv)
    chunk.pooled = pool(chunk.cos_k, k, tau)
    return chunk


class Chunk(ChunkRows):
    """One chunk's logits (accumulation dtype) and what its backward needs.

    The weight rows are never normalised into a copy: the GEMM runs on the raw rows and each output column is scaled
    by ``inv`` — an N×chunk pass, folded into the scale for the plain cosine logits, instead of a chunk·K×d
    normalised copy and its backward (see :func:`add_grads`). The logits ``z`` may live in ``buf``.
    """

    def __init__(
        self, spec: Spec, x: Tensor, weight: Tensor, value: Optional[Tensor], params: tuple[Tensor, ...],
        s: Any, start: int, stop: int, buf: Optional[Tensor] = None, epilogue: bool = True,
        norms: Optional[Tensor] = None, raw: Optional[Tensor] = None, shared: Optional[ChunkRows] = None,
    ) -> None:  # fmt: skip
        k, acc = spec.num_sub_centers, acc_dtype(x.dtype)
        n, cols = x.shape[0], (stop - start) * k
        super().__init__(weight, k, start, stop, acc, spec.normalize_weight, norms, shared)
        # ``raw``: the chunk's GEMM output, computed by the caller (a row tile's group of rows, written in place)
        if raw is None:
            raw = gemm(x, self.rows, acc, None if buf is None else buf[: n * cols].view(n, cols))
        self.slope: Optional[Tensor] = None  # dense soft targets: ∂ψ/∂cos per entry
        self.neg_slope: Optional[Tensor] = None
        family, targets = spec.family, spec.targets
        self.raw: Optional[Tensor] = None
        if not epilogue:  # the compiled body shapes the logits (``compiled.py``)
            self.raw = raw
            return
        if spec.plain:
            self.z = raw.mul_(self.scaled_inv(s))  # the plain scaled cosines: one pass, in place
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
                self.shape_negatives(spec, s)
            else:
                self.z = self.pooled * s
        self.write_targets(targets, value, s)

    def shape_negatives(self, spec: Spec, s: Any) -> None:
        """The family's non-target part on the pooled cosines, scaled: ``z`` and ``neg_slope`` (formed again from the
        cosines where a pass dropped them: ``row_tiles.class_blocks``)."""
        assert spec.target_cos is not None and spec.family.negatives is not None and self.pooled is not None
        z, self.neg_slope = spec.family.negatives(self.pooled, spec.target_cos, *spec.row_params)
        # the values are the family's own buffer (unless it hands back the cosines): scaled where they lie
        dense = z.is_contiguous() or z.t().is_contiguous()
        self.z = z.mul_(s) if z is not self.pooled and in_place_ok() and dense else z * s

    def write_targets(self, targets: Targets, value: Optional[Tensor], s: Any) -> None:
        """The margin's values at the target entries ``ψ·s`` written over ``z``, where they fall in the chunk."""
        assert targets.classes is not None and value is not None
        for p in range(targets.classes.shape[1] if self.stop > self.start else 0):  # one entry per row at a time
            inside, col = in_chunk(targets.classes[:, p : p + 1], self.start, self.stop)
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


def record_norms(norms: Tensor, chunk: Chunk, k: int) -> None:
    if chunk.norms is not None:
        norms[chunk.start * k : chunk.stop * k] = chunk.norms


def saved_norms(norms: Tensor, start: int, stop: int, k: int) -> Optional[Tensor]:
    return norms[start * k : stop * k] if norms.numel() else None


def sub_center_grads(dcos: Tensor, chunk: ChunkRows, k: int, tau: Optional[float]) -> Tensor:
    """K > 1: the pooled cosines' gradient ``(N, W)`` to the sub-center cosines ``(N, W·K)``, divided by each row's
    norm. K = 1: ``dcos`` as it is (the norms are already in)."""
    if k == 1:
        return dcos
    assert chunk.cos_k is not None and chunk.pooled is not None
    return pool_backward(dcos, chunk.cos_k, chunk.pooled, k, tau).mul_(chunk.inv)


def add_grads(
    dcos: Tensor, xg: Optional[Tensor], chunk: ChunkRows, k: int, tau: Optional[float], grad_x: Optional[Tensor],
    grad_w: Optional[Tensor], fresh: bool, fold: bool = True,
) -> None:  # fmt: skip
    """The chunk's share of the feature gradient and its rows of the weight gradient, from ``dcos`` = ∂loss/∂cos
    divided by the rows' norms (``xg``: the features times the rows' upstream gradient).

    With ŵ = w·inv, inv = 1 / max(‖w‖, ε): the feature gradient is Σ_j ∂cos_j·ŵ_j = (dcos·inv) @ W — the raw rows,
    no normalised copy — and the row gradient is inv·(dŵ − ŵ (ŵ·dŵ)) = D − w·inv²·(w·D) with D = (dcos·inv)ᵀ @ xg
    (where ‖w‖ ≤ ε the normalisation is w/ε and D alone is the gradient). ``fold=False``: D itself is written
    (``fresh``) or added, in place; the caller folds the sum of several calls once (the fold is linear in D)."""
    acc = dcos.dtype
    rows = chunk.rows if chunk.rows.dtype == acc else chunk.rows.to(acc)
    if grad_x is not None:
        grad_x.addmm_(dcos, rows)
    if grad_w is None:
        return
    assert xg is not None
    dest = grad_w[chunk.start * k : chunk.stop * k]
    if not fold:
        assert dest.dtype == acc
        torch.mm(dcos.t(), xg, out=dest) if fresh else dest.addmm_(dcos.t(), xg)
        return
    direct = fresh and dest.dtype == acc
    d = torch.mm(dcos.t(), xg, out=dest) if direct else dcos.t() @ xg
    fold_normalization_(d, rows, chunk.inv, chunk.radial)
    if not direct:
        dest += d.to(dest.dtype)


def chunk_cosines(x: Tensor, weight: Tensor, k: int, tau: Optional[float], chunk: int) -> Any:
    """``(start, stop, pooled cosines (N, stop − start))`` of each chunk, in the accumulation dtype, without
    autograd: for statistics that need every class (AdaCos's scale) but not the N×C cosines at once."""
    with torch.no_grad():
        for start, stop in chunk_bounds(weight.shape[0] // k, chunk):
            yield start, stop, cosines(x, weight, k, tau, start, stop).pooled
