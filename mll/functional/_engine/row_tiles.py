"""The loss and its gradient in one pass, row tile by row tile: three GEMMs, for a loss that ends the graph.

The chunk kernel (``kernel.py``) walks the classes twice — forward for each row's log-sum-exp, backward again to form
``softmax − target`` — so its logits are computed twice: four GEMMs where the floor does three. At large batches the
GEMMs are the whole cost. When the loss is reduced to one number (``"mean"`` or ``"sum"``) and nothing but a scalar
upstream gradient g can reach it, the gradient is ``g`` times what it is for ``g = 1``: it can be formed during the
forward, and backward only scales it. Each tile of rows computes its logits over the whole block of classes (one GEMM,
``rows × B·K`` numbers), its exact log-sum-exp (with the other blocks' under class sharding: one MAX and one SUM
all-reduce per tile), its per-row losses and ``softmax − target``, and then its share of the feature gradient and of
the weight gradient (the other two GEMMs). The weight gradient is accumulated unfolded over the tiles and the rows'
normalisation folded into it once (``normalization.fold_normalization_``). A factor common to a row's entries (its
upstream gradient, and for class-major tiles its softmax's Σt/Σe) scales the GEMMs' small operands — the row's
features and its feature gradient — rather than the tile. Memory: one tile's logits and the gradients themselves
(the weight gradient is the tensor that becomes ``.grad``).

A tile's elementwise work runs where its logits stay in cache: for one sub-center and class targets in a single
process (ArcFace, CosFace, ScaledNormalizedLinear, …; CurricularFace and the other families with a non-target part in
small tiles) the tile is formed class-major, ``W x̂ᵀ`` (a faster GEMM here), and walked a block of classes at a time
in two passes (:func:`class_blocks`); for the others (sub-centers, soft targets, class sharding, a non-target part in
larger tiles) it is row-major and walked a group of rows at a time (:func:`row_groups`). The margin, the targets and
the pooling are the chunk kernel's (``chunks.Chunk``, ``kernel.chunk_dcos``): the same numbers to rounding.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mll.functional._engine.chunks import Chunk, ChunkRows, Spec, add_grads, chunk_bounds, gemm, in_chunk, row_slice
from mll.functional._engine.kernel import chunk_dcos, target_logit_sum, tile_softmax_grad
from mll.functional._engine.normalization import fold_normalization_
from mll.functional._engine.numerics import acc_dtype, double_backward, exp_, scratch_pool, weight_eps

#: a tile's elementwise work runs on groups of rows of about this many logits (4 MB of float32: a group and its
#: temporaries stay in the cache between the GEMMs, which stream the whole tile)
GROUP_ELEMENTS = 1 << 20
#: one sub-center's logits in a single process run class-major (:func:`class_blocks`, :func:`class_major`); False:
#: row-major, in groups of rows
CLASS_MAJOR = True
#: a family with a non-target part runs class-major only in tiles of fewer rows than this: its values and slopes
#: are formed twice there (once per pass), which the faster GEMM repays at 64 rows (CurricularFace, d = 512,
#: C = 10^5, 2 threads: 0.97–1.05× the floor against 1.05–1.18× row-major) but not at 128 or 256 (even: 1.000 against
#: 1.001 and 1.010 against 1.005 with its mask as arithmetic; 1.120/1.113 and 1.067/1.032 before). With the rows'
#: softmax factor on the GEMMs' operands (two passes fewer), measured again beside the floor: 128 rows 0.978 and
#: 1.024 against 1.008 and 1.006 row-major (even), 256 rows 1.063 and 1.106 against 0.911 and 1.069 (row-major ahead)
NEGATIVES_CLASS_MAJOR_ROWS = 128
#: … and at any tile size where a row-major group would hold fewer than 4 rows (more classes than this): groups of a
#: row or two pay their fixed costs per row, and the row-major GEMM falls further behind (CurricularFace, N = 1024,
#: tiles of 256 rows, 2 threads, × ArcFace, row-major against class-major: C = 10^5 1.039 against 1.074 with glibc's
#: default allocator, 1.050 both tuned; C = 3·10^5 1.101 against 1.075, 1.088 against 1.087; C = 10^6 1.187 against
#: 1.105)
NEGATIVES_ROW_MAJOR_WIDTH = GROUP_ELEMENTS // 4


def row_tiled_ce(
    x: Tensor, weight: Tensor, scale: Any, value: Optional[Tensor], spec: Spec, rows: int, reduction: str,
    total_rows: int, *params: Tensor,
) -> Tensor:  # fmt: skip
    """``RowTiledCE.apply``: the block's loss, ``"mean"`` (over ``total_rows``) or ``"sum"`` of its rows' losses."""
    return RowTiledCE.apply(x, weight, scale, value, spec, rows, reduction, total_rows, *params)


class RowTiledCE(torch.autograd.Function):
    """``forward(x̂, weight, scale, value, spec, rows, reduction, total_rows, *params)``: the margin cross-entropy of a
    block of classes reduced to one number, its gradients formed on the way (see the module notes). Arguments as
    :class:`kernel.ChunkedCE`'s; ``rows`` rows per tile. Backward hands the gradients over (the weight's becomes
    ``.grad`` without a copy); a second backward of the same graph (``retain_graph=True``) forms them again."""

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor, scale: Any, value: Optional[Tensor], spec: Spec, rows: int,
        reduction: str, total_rows: int, *params: Tensor,
    ) -> Tensor:  # fmt: skip
        needs = (*ctx.needs_input_grad[:4], *ctx.needs_input_grad[8:])
        losses, ctx.grads = tile_gradients(x, weight, scale, value, spec, rows, params, needs)
        ctx.spec, ctx.rows, ctx.needs = spec, rows, needs
        ctx.factor = 1.0 / total_rows if reduction == "mean" else 1.0
        ctx.scale = None if isinstance(scale, Tensor) else scale
        ctx.save_for_backward(x, weight, scale if isinstance(scale, Tensor) else None, value, *params)
        out = losses.sum()
        return out * ctx.factor if reduction == "mean" else out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Any, ...]:
        # sharded: the ranks' upstream gradients, after every rank refused a double backward if any asked for one
        upstream = None if ctx.spec.ranks is None else ctx.spec.ranks.row_upstream(grad)
        if double_backward():
            raise RuntimeError(
                "the chunked margin cross-entropy gives first derivatives only: backward with create_graph=True "
                "(double backward, gradient penalties) is not supported; use the dense path "
                "F.cross_entropy(head(input, target), target)"
            )
        x, weight, scale_t, value, *params = ctx.saved_tensors
        grads, ctx.grads = ctx.grads, None
        scale = scale_t if scale_t is not None else ctx.scale
        g = grad * ctx.factor
        if upstream is not None:  # the ranks' upstream gradients differ: each row weighted by its rank's
            del grads
            _, grads = tile_gradients(x, weight, scale, value, ctx.spec, ctx.rows, params, ctx.needs, upstream)
            g = g.new_tensor(ctx.factor)
        elif grads is None:  # a second backward of a retained graph: the first took the forward's gradients
            _, grads = tile_gradients(x, weight, scale, value, ctx.spec, ctx.rows, params, ctx.needs)
        out: list[Optional[Tensor]] = []
        for tensor, like in zip(grads, (x, weight, scale_t, value, *params)):
            if tensor is None:
                out.append(None)
                continue
            tensor.mul_(g.to(tensor.dtype))
            out.append(tensor if tensor.dtype == like.dtype else tensor.to(like.dtype))
        del grads
        gx, gw, gs, gv, *gps = out
        return (gx, gw, gs, gv, None, None, None, None, *gps)


def tile_gradients(
    x: Tensor, weight: Tensor, scale: Any, value: Optional[Tensor], spec: Spec, rows: int,
    params: tuple[Tensor, ...], needs: tuple[bool, ...], row_weights: Optional[Tensor] = None,
) -> tuple[Tensor, list[Optional[Tensor]]]:  # fmt: skip
    """The per-row losses and, for an upstream gradient of 1 on each row (``row_weights`` on row i, if given), the
    gradients of ``(x, weight, scale, value, *params)`` (None where ``needs`` says none), in the accumulation
    dtype."""
    n, k = x.shape[0], spec.num_sub_centers
    acc = acc_dtype(x.dtype)
    s = scale.detach().to(acc) if isinstance(scale, Tensor) else scale
    width = weight.shape[0] // k
    value_d = None if value is None else value.detach().to(acc)
    norms = torch.linalg.vector_norm(weight.detach(), dim=1, dtype=acc) if spec.normalize_weight else None
    grad_x = torch.empty(x.shape, dtype=acc, device=x.device) if needs[0] else None
    grad_w = torch.empty(weight.shape, dtype=acc, device=x.device) if needs[1] else None
    grad_s = torch.zeros((), dtype=acc, device=x.device) if isinstance(scale, Tensor) and needs[2] else None
    grad_value = torch.zeros(value.shape, dtype=acc, device=x.device) if value is not None and needs[3] else None
    grad_params = [torch.zeros_like(p) if needs[4 + i] else None for i, p in enumerate(params)]
    losses = torch.empty(n, dtype=acc, device=x.device)
    x_acc = x.detach() if x.dtype == acc else x.detach().to(acc)
    # one buffer for every tile's logits: a tile's GEMM writes where the last tile's gradient was (one tile resident,
    # and under glibc's default allocator one mapping of it per step, not one per tile)
    buf = torch.empty(min(n, rows) * width * k, dtype=acc, device=x.device)
    block = ChunkRows(weight, k, 0, width, acc, spec.normalize_weight, norms)
    # a tile's elementwise work: a group of rows at a time, in cache (row_groups), or for one sub-center's logits in a
    # single process on a class-major tile, a block of classes at a time (class_blocks)
    by_classes = class_major(spec, width, min(n, rows), grad_s is not None)
    shape = class_blocks if by_classes else row_groups
    with scratch_pool():  # a group's or block's temporaries: allocated once for all the tiles
        for first, (r0, r1) in enumerate(chunk_bounds(n, rows)):
            out, xt = buf[: (r1 - r0) * width * k], x.detach()[r0:r1]
            if by_classes:  # Wx̂ᵀ (classes × rows) rather than x̂Wᵀ: the same numbers, a faster GEMM (see class_blocks)
                raw = gemm(block.rows, xt, acc, out.view(width, r1 - r0)).t()
            else:
                raw = gemm(xt, block.rows, acc, out.view(r1 - r0, width * k))
            gt = torch.ones(r1 - r0, dtype=acc, device=x.device) if row_weights is None else row_weights[r0:r1].to(acc)
            losses[r0:r1], factor = shape(
                spec.rows(r0, r1), xt, weight, None if value_d is None else value_d[r0:r1],
                tuple(row_slice(p.detach(), r0, r1) for p in params), s, raw, block, gt,
                None if grad_value is None else grad_value[r0:r1],
                [None if g is None else row_slice(g, r0, r1) for g in grad_params], grad_s,
            )  # fmt: skip
            # each row's share of both gradients scaled by its upstream gradient and, class-major, its softmax factor:
            # on the GEMMs' small operands (the features, the feature gradient), not on the tile
            rows_factor = None if row_weights is None else gt
            if factor is not None:
                rows_factor = factor if rows_factor is None else rows_factor * factor
            xg = x_acc[r0:r1] if rows_factor is None else x_acc[r0:r1] * rows_factor[:, None]
            gx = None if grad_x is None else grad_x[r0:r1].zero_()
            if width > 0:
                add_grads(raw, xg, block, k, spec.tau, gx, grad_w, fresh=first == 0, fold=False)
            if gx is not None and rows_factor is not None:
                gx.mul_(rows_factor[:, None])
            del raw, out
    del buf  # the tiles' logits go before the fold's own blocks come
    if grad_w is not None and norms is not None and n > 0 and width > 0:  # the rows' normalisation, once
        eps = weight_eps(weight.dtype)
        rows_acc = weight.detach() if weight.dtype == acc else weight.detach().to(acc)
        fold_normalization_(grad_w, rows_acc, norms.clamp(min=eps).reciprocal(), norms > eps)
    if grad_s is not None and spec.reduce is not None:
        spec.reduce(grad_s, "sum")
    return losses, [grad_x, grad_w, grad_s, grad_value, *grad_params]


def class_major(spec: Spec, width: int, rows: int, keep_logits: bool) -> bool:
    """Whether a tile's logits are formed class-major and shaped :func:`class_blocks`' way: one sub-center and class
    targets in a single process, unless the scale's gradient needs the logits after the softmax — and for a family
    with a non-target part, tiles of fewer than :data:`NEGATIVES_CLASS_MAJOR_ROWS` rows or blocks of more than
    :data:`NEGATIVES_ROW_MAJOR_WIDTH` classes."""
    one = spec.num_sub_centers == 1 and spec.targets.dense is None
    small = spec.family.negatives is None or rows < NEGATIVES_CLASS_MAJOR_ROWS or width > NEGATIVES_ROW_MAJOR_WIDTH
    return CLASS_MAJOR and one and small and spec.reduce is None and width > 0 and not keep_logits


def row_groups(
    tile: Spec, x: Tensor, weight: Tensor, value: Optional[Tensor], params: tuple[Tensor, ...], s: Any, raw: Tensor,
    block: ChunkRows, g: Tensor, grad_value: Optional[Tensor], grad_params: list[Optional[Tensor]],
    grad_s: Optional[Tensor],
) -> tuple[Tensor, None]:  # fmt: skip
    """A row tile's losses, and ∂loss/∂cos (divided by the rows' norms) written over its logits ``raw`` (rows ×
    B·K) in place, for an upstream gradient ``g`` per row on the margin's parameters and the scale (``grad_s``,
    accumulated). The work runs on groups of rows of about :data:`GROUP_ELEMENTS` logits (see :func:`group_rows`).
    No factor for the rows (None: :func:`class_blocks`' second result)."""
    width = raw.shape[1] // tile.num_sub_centers
    losses = raw.new_empty(raw.shape[0])
    for a, b in chunk_bounds(raw.shape[0], group_rows(tile, raw.shape[1])):
        part, group = raw[a:b], tile.rows(a, b)
        pt = tuple(row_slice(p, a, b) for p in params)
        vt = None if value is None else value[a:b]
        chunk = Chunk(group, x[a:b], weight, vt, pt, s, 0, width, raw=part, shared=block)
        losses[a:b], dz = tile_softmax_grad(group, chunk, vt, s, raw.dtype, keep_logits=grad_s is not None)
        if width == 0:  # an empty block (a rank without classes): its rows' statistics only, no gradient
            continue
        if grad_s is not None:
            grad_s += ((dz * chunk.z).sum(1) * g[a:b]).sum() / s
        gv = None if grad_value is None else grad_value[a:b]
        gp = [None if gr is None else row_slice(gr, a, b) for gr in grad_params]
        dcos = chunk_dcos(group, chunk, dz, s, g[a:b], gv, list(pt), gp, out=part)
        if dcos.data_ptr() != part.data_ptr():  # a family's own tensor: the gradient goes where the logits were
            part.copy_(dcos)
        del chunk, dz, dcos
    return losses, None


def class_blocks(
    tile: Spec, x: Tensor, weight: Tensor, value: Optional[Tensor], params: tuple[Tensor, ...], s: Any, raw: Tensor,
    block: ChunkRows, g: Tensor, grad_value: Optional[Tensor], grad_params: list[Optional[Tensor]],
    grad_s: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """A tile of one sub-center's logits held class-major (``raw`` = the ``rows × B`` view of a ``B × rows`` GEMM
    output), class targets: its rows' losses and their softmax factor f = Σt/Σ_j e^{z_j − max}, with ∂loss/∂cos
    (divided by the rows' norms) *over f* written over ``raw`` in place — the caller scales each row's share of the
    two gradient GEMMs by f on their small operands, so that no pass over the tile does. ``g``: an upstream gradient
    per row, on the margin's parameters. ``grad_s`` is always None here (:func:`class_major` leaves a scale that needs
    a gradient to :func:`row_groups`, which keeps the logits for it); it keeps the two functions' signatures alike.

    Why class-major: on this CPU the GEMM Wx̂ᵀ runs 5–25% faster than x̂Wᵀ for tiles of 64–512 rows (ZT = W X^T
    against Z = X W^T, d = 512, C = 10^5: 536 against 660 µs per row at 128 rows, 501 against 584 at 256; at 256
    rows the forward GEMM 220 against 248 ms, the two gradient GEMMs alike). A block of classes is then contiguous,
    so the elementwise work walks blocks of about :data:`GROUP_ELEMENTS` logits in two passes that each read the
    tile once from memory: the first shapes a block's logits (in place) and takes each row's maximum; the second
    replaces them by e^{z − max}, sums them, and forms ``e^{z − max}·slope`` (the target entries last, once the sums
    are known). A family's non-target part leaves the cosines in the tile: its values (and slopes) are formed in
    each pass from them, block-sized temporaries."""
    rows, width = raw.shape
    targets = tile.targets
    assert targets.classes is not None and value is not None and tile.slope is not None
    # a non-target part (CurricularFace, …): its values and slopes are block-sized temporaries, dropped after the
    # first pass and formed again from the cosines (left in the tile) in the second
    again = tile.family.negatives is not None
    chunks: list[Chunk] = []
    top: Optional[Tensor] = None
    for c0, c1 in chunk_bounds(width, block_columns(rows, width)):
        chunk = Chunk(tile, x, weight, value, params, s, c0, c1, raw=raw[:, c0:c1], shared=block)
        block_top = chunk.z.amax(1)
        top = block_top if top is None else torch.maximum(top, block_top, out=top)
        if again:
            del chunk.z
            chunk.neg_slope = None
        chunks.append(chunk)
    assert top is not None
    entries = targets.classes.shape[1]
    total = raw.new_zeros(rows)
    at_targets = raw.new_zeros(rows, entries)  # e^{z − max} at each target entry
    for chunk in chunks:
        if again:
            chunk.shape_negatives(tile, s)
            chunk.write_targets(targets, value, s)
        e = exp_(chunk.z.sub_(top[:, None]))
        total += e.sum(1)
        for p in range(entries):
            inside, col = in_chunk(targets.classes[:, p : p + 1], chunk.start, chunk.stop)
            at_targets[:, p : p + 1] += torch.where(inside, e.gather(1, col), 0.0)
        part = raw[:, chunk.start : chunk.stop]
        # plain logits: e is the tile's block itself (shaped in place); a non-target part writes e·slope there
        dcos = e if chunk.neg_slope is None else torch.mul(e, chunk.neg_slope, out=part)
        assert dcos.data_ptr() == part.data_ptr()
        dcos.mul_(chunk.scaled_inv(s))  # the scale and the rows' 1/‖w‖, per class
        if again:  # (the block's values and slopes go now: one block's at a time)
            del chunk.z, e, dcos
            chunk.neg_slope = None
    term = target_logit_sum(targets, value, s, width, total.dtype)
    lse = top + torch.log(total)
    losses = (lse if targets.row_sum is None else lse * targets.row_sum) - term
    factor = total.reciprocal() if targets.row_sum is None else targets.row_sum / total
    # the target entries: ∂loss/∂z = e·f − w there, through the margin's slope to the cosine, over f (a row with no
    # target weight, f = 0, has no gradient at all)
    for p in range(entries):
        inside, col = in_chunk(targets.classes[:, p : p + 1], 0, width)
        w = 1.0 if targets.weights is None else targets.weights[:, p : p + 1].to(raw.dtype)
        at = (at_targets[:, p : p + 1] * factor[:, None] - w) * s  # ∂loss/∂ψ
        if grad_value is not None:
            grad_value[:, p : p + 1] += torch.where(inside, at * g[:, None], 0.0)
        entry = at * tile.slope[:, p : p + 1] * block.inv[col] / factor[:, None]
        keep = inside & (factor[:, None] != 0)
        raw.scatter_(1, col, torch.where(keep, entry, torch.where(inside, 0.0, raw.gather(1, col))))
    return losses, factor


def block_columns(rows: int, width: int) -> int:
    """Classes per block of :func:`class_blocks`: about :data:`GROUP_ELEMENTS` logits, and at least 16 (each block
    keeps two numbers per row until the second pass: at most an eighth of the tile)."""
    return max(16, GROUP_ELEMENTS // max(1, rows))


def group_rows(spec: Spec, columns: int) -> int:
    """Rows per group of a tile's elementwise work: about :data:`GROUP_ELEMENTS` logits, so that the dozen passes of
    the softmax, the margin and a family's non-target part (its values, slopes and mask: temporaries of the group's
    size) run in cache, and the tile holds one logits-sized buffer whatever the family. Under class sharding each
    group's softmax joins the other ranks' blocks (two all-reduces), so every rank must group alike while the ranks'
    blocks differ in width: there a tile is one group (and its tile is planned with a chunk's buffers)."""
    if spec.reduce is not None:
        return 1 << 62
    return max(1, GROUP_ELEMENTS // max(1, columns))
