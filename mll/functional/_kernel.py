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
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mll.functional._accumulate import accumulate_node, grad_to_accumulate_into
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
    #: False: the weight rows are used as they are, so that a chunk's "cosines" are the dot products x·w (L-Softmax)
    normalize_weight: bool = True
    #: at the ``classes`` entries: the margin's slope ``(N, P)``; for a family's non-target part, each row's target
    #: cosine ``(N, 1)`` and its parameters at the target class (set by :func:`prepare`)
    slope: Optional[Tensor] = None
    target_cos: Optional[Tensor] = None
    row_params: tuple[Tensor, ...] = ()


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


def pool(cos_k: Tensor, k: int, tau: Optional[float]) -> Tensor:
    """Pool ``(N, W·K)`` sub-center cosines to ``(N, W)``: max, or a softmax of temperature τ."""
    if k == 1:
        return cos_k
    view = cos_k.view(*cos_k.shape[:-1], -1, k)
    if tau is None:
        return view.amax(-1)
    return (torch.softmax(view / tau, dim=-1) * view).sum(-1)


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


class _Chunk:
    """One chunk's logits (accumulation dtype) and what its backward needs."""

    def __init__(
        self, spec: Spec, x: Tensor, weight: Tensor, value: Optional[Tensor], params: tuple[Tensor, ...],
        s: Any, start: int, stop: int,
    ) -> None:  # fmt: skip
        k, acc = spec.num_sub_centers, acc_dtype(x.dtype)
        rows = weight[start * k : stop * k].detach()
        self.norms = rows.to(acc).norm(dim=1, keepdim=True)
        self.w_hat = normalize(rows) if spec.normalize_weight else rows
        self.cos_k = F.linear(x, self.w_hat).to(acc)
        self.pooled = pool(self.cos_k, k, spec.tau)
        self.start, self.stop = start, stop
        self.slope: Optional[Tensor] = None  # dense soft targets: ∂ψ/∂cos per entry
        self.neg_slope: Optional[Tensor] = None
        family, targets = spec.family, spec.targets
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
    ) -> tuple[Tensor, Tensor]:
        n, k = x.shape[0], spec.num_sub_centers
        acc = acc_dtype(x.dtype)
        s = scale.detach().to(acc) if isinstance(scale, Tensor) else scale
        targets = spec.targets
        value_d = None if value is None else value.detach().to(acc)
        run_max = torch.full((n,), -math.inf, dtype=acc, device=x.device)
        run_sum = torch.zeros(n, dtype=acc, device=x.device)
        target_term = torch.zeros(n, dtype=acc, device=x.device)  # Σ_j t_ij z_ij over this block
        width = weight.shape[0] // k
        for start, stop in chunk_bounds(width, spec.chunk):
            chunk = _Chunk(spec, x, weight, value_d, params, s, start, stop)
            if targets.dense is not None:
                target_term += (chunk.t * chunk.z).sum(1)
            new_max = torch.maximum(run_max, chunk.z.amax(1))
            run_sum = run_sum * torch.exp(run_max - new_max) + torch.exp(chunk.z - new_max[:, None]).sum(1)
            run_max = new_max
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
        return losses, lse

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        x, weight, scale, value, spec, *params = inputs
        _, lse = output
        ctx.spec, ctx.scale_is_tensor = spec, isinstance(scale, Tensor)
        ctx.scale = None if ctx.scale_is_tensor else scale
        ctx.value_dtype = None if value is None else value.dtype
        ctx.save_for_backward(
            x, weight, lse, scale if ctx.scale_is_tensor else None, None if value is None else value.detach(), *params
        )
        ctx.mark_non_differentiable(lse)
        ctx.accumulate = accumulate_node(weight)

    @staticmethod
    def backward(ctx: Any, grad: Tensor, _grad_lse: Any) -> tuple[Any, ...]:
        if _double_backward():
            raise RuntimeError(
                "the chunked margin cross-entropy gives first derivatives only: backward with create_graph=True "
                "(double backward, gradient penalties) is not supported; use the dense path "
                "F.cross_entropy(head(input, target), target)"
            )
        x, weight, lse, scale_t, value, *params = ctx.saved_tensors
        spec: Spec = ctx.spec
        targets, k = spec.targets, spec.num_sub_centers
        acc = acc_dtype(x.dtype)
        s = scale_t.detach().to(acc) if ctx.scale_is_tensor else ctx.scale
        width = weight.shape[0] // k
        g = grad.to(acc)
        needs = ctx.needs_input_grad
        grad_x = torch.zeros(x.shape, dtype=acc, device=x.device) if needs[0] else None
        # with an existing .grad, each chunk's weight gradient is added into it: no C×d buffer of our own
        into = grad_to_accumulate_into(ctx.accumulate, weight) if needs[1] else None
        grad_w = into
        if needs[1] and into is None:
            grad_w = torch.zeros(weight.shape, dtype=acc, device=x.device)
        grad_s = torch.zeros((), dtype=acc, device=x.device) if ctx.scale_is_tensor and needs[2] else None
        grad_value = torch.zeros(value.shape, dtype=acc, device=x.device) if value is not None and needs[3] else None
        grad_params = [torch.zeros_like(p) if needs[5 + i] else None for i, p in enumerate(params)]
        value_d = None if value is None else value.to(acc)
        for start, stop in chunk_bounds(width, spec.chunk):
            chunk = _Chunk(spec, x, weight, value_d, tuple(params), s, start, stop)
            dz = torch.exp_(chunk.z - lse[:, None])  # p
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
            dz.mul_(g[:, None])
            if grad_s is not None:
                grad_s += (dz * chunk.z).sum() / s
            dcos = _dcos(spec, chunk, dz, s, grad_value, params, grad_params)
            _add_grads(dcos, x, weight, chunk, k, spec.tau, grad_x, grad_w, spec.normalize_weight)
        if grad_s is not None and spec.reduce is not None:  # the scale is shared by the blocks
            spec.reduce(grad_s, "sum")
        return (
            None if grad_x is None else grad_x.to(x.dtype),
            None if grad_w is None or into is not None else grad_w.to(weight.dtype),
            None if grad_s is None else grad_s.to(scale_t.dtype),
            None if grad_value is None else grad_value.to(ctx.value_dtype),
            None,
            *grad_params,
        )


def _double_backward() -> bool:
    """Whether this backward is being differentiated: ``create_graph=True``, or nested ``torch.func`` transforms.
    (A single ``torch.func.grad``/``vjp`` runs backward with grad mode on, at transform level 1: that is fine.)"""
    if torch._C._are_functorch_transforms_active():
        level = torch._C._functorch.maybe_current_level()
        return level is not None and level > 1
    return torch.is_grad_enabled()


def _dcos(
    spec: Spec, chunk: _Chunk, dz: Tensor, s: Any, grad_value: Optional[Tensor], params: list[Tensor],
    grad_params: list[Optional[Tensor]],
) -> Tensor:  # fmt: skip
    """∂loss/∂(pooled cosine) of the chunk from ∂loss/∂logit, through the margin; also the margin's own gradients."""
    targets = spec.targets
    if targets.dense is not None:
        assert chunk.slope is not None
        if any(gp is not None for gp in grad_params):  # margins that need a gradient, at every soft entry
            leaves = [
                p.detach().requires_grad_(gp is not None)
                for p, gp in zip(flat_params(tuple(params), chunk.start, chunk.stop), grad_params)
            ]
            with torch.enable_grad():
                value, _ = spec.family.value_and_slope(chunk.pooled.detach(), chunk.t, *leaves)
            wanted = [leaf for leaf in leaves if leaf.requires_grad]
            grads = iter(torch.autograd.grad(value, wanted, dz * s, allow_unused=True))
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
        return dz.mul_(chunk.slope).mul_(s)
    assert targets.classes is not None and spec.slope is not None
    slope = spec.slope
    dcos = dz * s if chunk.neg_slope is None else dz * s * chunk.neg_slope
    for p in range(targets.classes.shape[1]):
        inside, col = _inside(targets.classes[:, p : p + 1], chunk.start, chunk.stop)
        at = dz.gather(1, col) * s
        if grad_value is not None:
            grad_value[:, p : p + 1] += torch.where(inside, at, 0.0)
        dcos.scatter_(1, col, torch.where(inside, at * slope[:, p : p + 1], dcos.gather(1, col)))
    return dcos


def _add_grads(
    dcos: Tensor, x: Tensor, weight: Tensor, chunk: _Chunk, k: int, tau: Optional[float],
    grad_x: Optional[Tensor], grad_w: Optional[Tensor], normalize_weight: bool = True,
) -> None:  # fmt: skip
    """Chain ∂loss/∂cos of one chunk through the sub-center pooling, the GEMM and the weights' normalisation."""
    n, acc = x.shape[0], dcos.dtype
    width = chunk.stop - chunk.start
    if k > 1:
        view = chunk.cos_k.view(n, width, k)
        if tau is None:  # max-pool: split among ties as amax does
            winners = (view == chunk.pooled.unsqueeze(-1)).to(acc)
            dcos = (winners * (dcos / winners.sum(-1)).unsqueeze(-1)).view(n, -1)
        else:  # soft pooling S = Σ p_k c_k: ∂S/∂c_k = p_k·(1 + (c_k − S)/τ)
            p_k = torch.softmax(view / tau, dim=-1)
            dcos = (dcos.unsqueeze(-1) * p_k * (1 + (view - chunk.pooled.unsqueeze(-1)) / tau)).view(n, -1)
    w_acc = chunk.w_hat.to(acc)
    if grad_x is not None:
        grad_x += dcos @ w_acc
    if grad_w is not None:
        d_hat = dcos.T @ x.to(acc)
        if not normalize_weight:  # the rows as they are: no normalisation to chain through
            grad_w[chunk.start * k : chunk.stop * k] += d_hat.to(grad_w.dtype)
            return
        # backward of w / max(‖w‖, ε): project out the radial part where the norm is above ε
        eps = weight_eps(weight.dtype)
        radial = (w_acc * d_hat).sum(1, keepdim=True)
        rows = torch.where(chunk.norms > eps, d_hat - w_acc * radial, d_hat) / chunk.norms.clamp(min=eps)
        grad_w[chunk.start * k : chunk.stop * k] += rows.to(grad_w.dtype)


def chunk_cosines(x: Tensor, weight: Tensor, k: int, tau: Optional[float], chunk: int) -> Any:
    """``(start, stop, pooled cosines (N, stop − start))`` of each chunk, in the accumulation dtype, without
    autograd: for statistics that need every class (AdaCos's scale) but not the N×C cosines at once."""
    acc = acc_dtype(x.dtype)
    with torch.no_grad():
        for start, stop in chunk_bounds(weight.shape[0] // k, chunk):
            cos_k = F.linear(x.detach(), normalize(weight[start * k : stop * k].detach())).to(acc)
            yield start, stop, pool(cos_k, k, tau)
