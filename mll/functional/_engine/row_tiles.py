"""The loss and its gradient in one pass, row tile by row tile: three GEMMs, for a loss that ends the graph.

The chunk kernel (``kernel.py``) walks the classes twice — forward for each row's log-sum-exp, backward again to form
``softmax − target`` — so its logits are computed twice: four GEMMs where the floor does three. At large batches the
GEMMs are the whole cost. When the loss is reduced to one number (``"mean"`` or ``"sum"``) and nothing but a scalar
upstream gradient g can reach it, the gradient is ``g`` times what it is for ``g = 1``: it can be formed during the
forward, and backward only scales it. Each tile of rows computes its logits over the whole block of classes (one GEMM,
``rows × B·K`` numbers), its exact log-sum-exp (with the other blocks' under class sharding: one MAX and one SUM
all-reduce per tile), its per-row losses and ``softmax − target``, and then its share of the feature gradient and of
the weight gradient (the other two GEMMs). The weight gradient is accumulated unfolded over the tiles and the rows'
normalisation folded into it once (``normalization.fold_normalization_``). Memory: one tile's logits and the
gradients themselves (the weight gradient is the tensor that becomes ``.grad``).

The margin, the targets and the pooling are the chunk kernel's (``chunks.Chunk``, ``kernel.chunk_dcos``): the same
numbers to rounding.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from mll.functional._engine.chunks import Chunk, ChunkRows, Spec, add_grads, chunk_bounds, gemm, in_chunk, row_slice
from mll.functional._engine.kernel import chunk_dcos, tile_softmax_grad
from mll.functional._engine.normalization import fold_normalization_
from mll.functional._engine.numerics import acc_dtype, double_backward, weight_eps

#: the column pass's chunk: about this many logits (4 MB of float32: a chunk and its temporaries stay in the cache)
COLUMN_ELEMENTS = 1 << 20


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
    # a non-target part (K = 1, class targets): the family's elementwise work a few columns at a time (column_pass)
    columns = k == 1 and spec.targets.dense is None and spec.family.negatives is not None and width > 0
    block = ChunkRows(weight, k, 0, width, acc, spec.normalize_weight, norms) if columns else None
    for first, (r0, r1) in enumerate(chunk_bounds(n, rows)):
        tile = spec.rows(r0, r1)
        pt = tuple(row_slice(p.detach(), r0, r1) for p in params)
        vt = None if value_d is None else value_d[r0:r1]
        if row_weights is None:
            gt, xg = torch.ones(r1 - r0, dtype=acc, device=x.device), x_acc[r0:r1]
        else:
            gt = row_weights[r0:r1].to(acc)
            xg = x_acc[r0:r1] * gt[:, None]
        gv = None if grad_value is None else grad_value[r0:r1]
        gp = [None if g is None else row_slice(g, r0, r1) for g in grad_params]
        gx = None if grad_x is None else grad_x[r0:r1].zero_()
        if block is not None:
            raw = gemm(x.detach()[r0:r1], block.rows, acc, buf[: (r1 - r0) * width].view(r1 - r0, width))
            losses[r0:r1] = column_pass(tile, x.detach()[r0:r1], weight, vt, pt, s, norms, raw, gt, gv, gp, grad_s)
            add_grads(raw, xg, block, k, spec.tau, gx, grad_w, fresh=first == 0, fold=False)
            del raw
        else:
            chunk = Chunk(tile, x.detach()[r0:r1], weight, vt, pt, s, 0, width, buf=buf, norms=norms)
            losses[r0:r1], dz = tile_softmax_grad(tile, chunk, vt, s, acc, keep_logits=grad_s is not None)
            if width == 0:  # an empty block (a rank without classes): its rows' statistics only, no gradient
                continue
            if grad_s is not None:
                grad_s += ((dz * chunk.z).sum(1) * gt).sum() / s
            dcos = chunk_dcos(tile, chunk, dz, s, gt, gv, list(pt), gp)
            add_grads(dcos, xg, chunk, k, spec.tau, gx, grad_w, fresh=first == 0, fold=False)
            del chunk, dz, dcos  # the tile's other logits-sized tensors (values, slopes) go before the next's
        if gx is not None and row_weights is not None:
            gx.mul_(gt[:, None])
    if grad_w is not None and norms is not None and n > 0 and width > 0:  # the rows' normalisation, once
        eps = weight_eps(weight.dtype)
        rows_acc = weight.detach() if weight.dtype == acc else weight.detach().to(acc)
        fold_normalization_(grad_w, rows_acc, norms.clamp(min=eps).reciprocal(), norms > eps)
    if grad_s is not None and spec.reduce is not None:
        spec.reduce(grad_s, "sum")
    return losses, [grad_x, grad_w, grad_s, grad_value, *grad_params]


def column_pass(
    spec: Spec, x: Tensor, weight: Tensor, value: Optional[Tensor], params: tuple[Tensor, ...], s: Any,
    norms: Optional[Tensor], raw: Tensor, g: Tensor, grad_value: Optional[Tensor], grad_params: list[Optional[Tensor]],
    grad_s: Optional[Tensor],
) -> Tensor:  # fmt: skip
    """A row tile's losses for a family with a non-target part (K = 1, class targets); ``raw``, its GEMM output over
    the whole block (T × W), becomes ∂loss/∂cos divided by the weight rows' norms, in place.

    Such a family's values and slopes are two more tensors the size of the logits (and a mask): shaped over the
    whole tile they would hold three to four tiles' worth, so that a budget holds a tile a third as tall. Here they
    are formed :data:`COLUMN_ELEMENTS` logits at a time, twice, from the cosines that stay in ``raw``: first each
    chunk of columns folds into an online max and sum (the softmax statistics), then each forms its gradient and
    writes it back into ``raw``. One tile-sized buffer, at the price of the family's elementwise work done twice
    (CurricularFace, N = 1024, C = 10^5, tiles of 256 rows: 1.13× the floor's time, as the whole-tile epilogue with
    three times the memory; plain logits keep that epilogue, where a second pass only costs)."""
    n, width = raw.shape
    acc, targets = raw.dtype, spec.targets
    assert targets.classes is not None and value is not None
    bounds = chunk_bounds(width, max(1, COLUMN_ELEMENTS // max(n, 1)))

    def chunk(c0: int, c1: int, again: bool) -> Chunk:
        rows_norms = None if norms is None else norms[c0:c1]
        return Chunk(spec, x, weight, value, params, s, c0, c1, norms=rows_norms, raw=raw[:, c0:c1], cosines=again)

    top = torch.full((n,), -math.inf, dtype=acc, device=raw.device)
    total = torch.zeros(n, dtype=acc, device=raw.device)
    for c0, c1 in bounds:
        z = chunk(c0, c1, False).z
        new = torch.maximum(top, z.amax(1))
        total = total * torch.exp(top - new) + z.sub_(new[:, None]).exp_().sum(1)
        top = new
    del z
    inside = (targets.classes >= 0) & (targets.classes < width)
    w = 1.0 if targets.weights is None else targets.weights.to(acc)
    term = torch.where(inside, value * s * w, 0.0).sum(1)
    if spec.reduce is not None:  # the other blocks' statistics (class sharding): the global max, then the sums
        every = spec.reduce(top.clone(), "max")
        total, term = spec.reduce(torch.stack([total * torch.exp(top - every), term]), "sum")
        top = every
    lse = top + torch.log(total)
    losses = (lse if targets.row_sum is None else lse * targets.row_sum) - term
    for c0, c1 in bounds:
        part = chunk(c0, c1, True)
        z = part.z
        dz = z.sub_(lse[:, None]).exp_() if grad_s is None else torch.exp(z - lse[:, None])
        if targets.row_sum is not None:
            dz.mul_(targets.row_sum[:, None])
        for p in range(targets.classes.shape[1]):
            hit, col = in_chunk(targets.classes[:, p : p + 1], c0, c1)
            wp = 1.0 if targets.weights is None else targets.weights[:, p : p + 1].to(acc)
            dz.scatter_add_(1, col, torch.where(hit, -wp, 0.0).to(acc))
        if grad_s is not None:
            grad_s += ((dz * z).sum(1) * g).sum() / s
        raw[:, c0:c1].copy_(chunk_dcos(spec, part, dz, s, g, grad_value, list(params), grad_params))
    return losses
