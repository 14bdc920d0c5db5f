"""The row normalisation's backward, folded into a weight gradient in place.

With ŵ = w·inv, inv = 1 / max(‖w‖, ε), a gradient ``D`` with respect to the raw rows of a GEMM whose output columns
were scaled by inv becomes the gradient with respect to w as ``D − w·inv²·(w·D)`` (where ‖w‖ ≤ ε the normalisation
is w/ε, linear, and D alone is the gradient). Written out of place that is four C×d passes and two fresh C×d
buffers — more memory traffic than a cosine head's N×C passes when d > N. Here it is done block by block of rows,
each block's dot products and update while the block is in cache, into ``D`` itself: one read of w and D, one
write of D. Used by the chunk kernel (each chunk's rows) and the dense cosines' backward (all C rows).
"""

from __future__ import annotations

import torch
from torch import Tensor

#: elements per block of rows (2 MB of float32): a block of w, of D and the products stay in cache
BLOCK_ELEMENTS = 1 << 19


def fold_normalization_(grad: Tensor, rows: Tensor, inv: Tensor, radial: Tensor) -> Tensor:
    """``grad ← grad − rows·inv²·(rows·grad)`` on the rows where ``radial``, in place; returns ``grad``.

    Args:
        grad (Tensor[R, d]): the gradient with respect to the raw rows (a tensor the caller owns).
        rows (Tensor[R, d]): the raw rows, ``grad``'s dtype.
        inv (Tensor[R]): ``1 / max(‖w‖, ε)``.
        radial (Tensor[R], bool): the rows with ‖w‖ > ε.
    """
    count, width = rows.shape
    if count == 0:
        return grad
    block = max(1, min(count, BLOCK_ELEMENTS // max(width, 1)))
    products = grad.new_empty(block, width)
    dots = grad.new_empty(block)
    for start in range(0, count, block):
        stop = min(start + block, count)
        size = stop - start
        w, d, p, r = rows[start:stop], grad[start:stop], products[:size], dots[:size]
        torch.sum(torch.mul(w, d, out=p), 1, out=r)
        i = inv[start:stop]
        coef = torch.where(radial[start:stop], r.mul_(i).mul_(i).neg_(), 0.0)
        d.addcmul_(w, coef.unsqueeze(1))
    return grad
