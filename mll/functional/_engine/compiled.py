"""The chunk kernel's body as functions of tensors, for ``torch.compile``: one fused loop per chunk.

The eager kernel (``kernel.py``, ``chunks.py``) shapes a chunk's logits and folds them into the online log-sum-exp
in a dozen elementwise ops, each a pass over the chunk and, on a GPU, a kernel launch. Here the same maths — the
margin's non-target part, the sub-center pooling, the target entries, the running max and sum; and in backward the
softmax, the targets, the margin's slopes and the pooling's backward — is written as two pure functions that Inductor
compiles into a few fused loops (C++ on the CPU, Triton on a GPU). The GEMMs, the weight rows' norms and the folded
normalisation's backward stay eager (``kernel.py``, ``chunks.py``), so that the GEMMs run where the eager kernel
runs them.

The eager kernel is the reference: the compiled one is tested against it (float64 to 1e-12, float32 and bfloat16
within stated tolerances) for every spec the engine serves. It is used when :func:`set_chunk_kernel` says
``"compiled"`` (or ``MLL_CHUNK_KERNEL=compiled`` in the environment); where compilation fails (no C++ compiler, an
unsupported backend) the kernel warns once and runs eagerly from then on.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, Optional

import torch
from torch import Tensor

from mll.functional._engine.numerics import exp

__all__ = ["chunk_kernel", "set_chunk_kernel"]


def outside_graph(fn: Callable[..., Any], made: list[Any]) -> Callable[..., Any]:
    """``fn`` behind ``torch.compiler.disable`` (a graph break under ``torch.compile``: the class-sharded losses'
    collectives, a flag a traced call would not carry), made at the first call and kept in the caller's ``made``
    (an empty list of its module's): decorating at import would import ``torch._dynamo`` (over a second) into every
    ``import mll``."""
    if not made:
        made.append(torch.compiler.disable(fn))
    return made[0]


_KERNELS = ("eager", "compiled")
_mode = os.environ.get("MLL_CHUNK_KERNEL", "eager")
if _mode not in _KERNELS:
    raise ValueError(f"MLL_CHUNK_KERNEL must be 'eager' or 'compiled', but got {_mode!r}")

#: compiled variants per body: one per margin family, pooling, target kind, dtype and chunk shape (the last chunk
#: of a block is narrower); more than dynamo's default of 8
RECOMPILE_LIMIT = 256


def set_chunk_kernel(kernel: str) -> None:
    """Choose how the chunk kernel of ``loss()`` and the sharded heads runs its elementwise work.

    Args:
        kernel (str): ``"eager"`` (the default: eager PyTorch ops, no compilation) or ``"compiled"``
            (``torch.compile`` of the chunk's body — fused loops; the first call of each variant compiles it, see
            ``docs/chunked.md`` for the cost).
    """
    global _mode
    if kernel not in _KERNELS:
        raise ValueError(f"kernel must be 'eager' or 'compiled', but got {kernel!r}")
    _mode = kernel


def chunk_kernel() -> str:
    """``"eager"`` or ``"compiled"``: what :func:`set_chunk_kernel` (or ``MLL_CHUNK_KERNEL``) chose."""
    return _mode


def pool(cos_k: Tensor, k: int, tau: Optional[float]) -> Tensor:
    """Pool ``(N, W·K)`` sub-center cosines to ``(N, W)``: max, or a softmax of temperature τ."""
    if k == 1:
        return cos_k
    view = cos_k.view(*cos_k.shape[:-1], cos_k.shape[-1] // k, k)  # (explicit: an empty batch has no -1)
    if tau is None:
        return view.amax(-1)
    return (torch.softmax(view / tau, dim=-1) * view).sum(-1)


def pool_backward(dpooled: Tensor, cos_k: Tensor, pooled: Tensor, k: int, tau: Optional[float]) -> Tensor:
    """The pooled cosines' gradient ``(N, W)`` to the sub-center cosines ``(N, W·K)``."""
    n, width = dpooled.shape
    view = cos_k.view(n, width, k)
    if tau is None:  # max-pool: split among ties as amax does
        winners = (view == pooled.unsqueeze(-1)).to(dpooled.dtype)
        return (winners * (dpooled / winners.sum(-1)).unsqueeze(-1)).view(n, width * k)
    p_k = torch.softmax(view / tau, dim=-1)  # soft pooling S = Σ p_k c_k: ∂S/∂c_k = p_k·(1 + (c_k − S)/τ)
    return (dpooled.unsqueeze(-1) * p_k * (1 + (view - pooled.unsqueeze(-1)) / tau)).view(n, width * k)


def logits(
    raw: Tensor, inv: Tensor, s: Any, value: Optional[Tensor], cols: Optional[Tensor], inside: Optional[Tensor],
    t: Optional[Tensor], target_cos: Optional[Tensor], row_params: tuple[Tensor, ...], params: list[Tensor],
    family: Any, k: int, tau: Optional[float], plain: bool,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:  # fmt: skip
    """A chunk's logits from its raw GEMM output: ``(z, cos_k, pooled, slope, neg_slope)`` as the eager
    ``_Chunk`` computes them (``value``: the margin's target values before the scale; ``cols``/``inside``: the
    target entries' chunk columns, ``(N, P)``; ``t``: the chunk's dense soft targets)."""
    cos_k = pooled = slope = neg = None
    if plain:
        z = raw * (inv * s)
    else:
        cos_k = raw * inv
        pooled = pool(cos_k, k, tau)
        if t is not None:
            z, slope = family.value_and_slope(pooled, t, *params)
            return z * s, cos_k, pooled, slope, None
        if family.negatives is not None:
            z, neg = family.negatives(pooled, target_cos, *row_params)
            z = z * s
        else:
            z = pooled * s
    assert cols is not None and inside is not None and value is not None
    for p in range(cols.shape[1]):
        col = cols[:, p : p + 1]
        z = z.scatter(1, col, torch.where(inside[:, p : p + 1], value[:, p : p + 1] * s, z.gather(1, col)))
    return z, cos_k, pooled, slope, neg


def forward_body(
    raw: Tensor, inv: Tensor, s: Any, run_max: Tensor, run_sum: Tensor, value: Optional[Tensor],
    cols: Optional[Tensor], inside: Optional[Tensor], t: Optional[Tensor], target_cos: Optional[Tensor],
    row_params: tuple[Tensor, ...], params: list[Tensor], family: Any, k: int, tau: Optional[float], plain: bool,
    keep: bool,
) -> tuple[Any, ...]:  # fmt: skip
    """One chunk of the forward: ``(new_max, new_sum, target_term or None)`` and, with ``keep``, the chunk's
    ``(z, cos_k, pooled, slope, neg_slope)`` for backward. Without ``keep`` the logits are never written out."""
    z, cos_k, pooled, slope, neg = logits(
        raw, inv, s, value, cols, inside, t, target_cos, row_params, params, family, k, tau, plain
    )
    new_max = torch.maximum(run_max, z.amax(1))
    new_sum = run_sum * torch.exp(run_max - new_max) + exp(z - new_max[:, None]).sum(1)
    term = None if t is None else (t * z).sum(1)
    if keep:
        return new_max, new_sum, term, z, cos_k, pooled, slope, neg
    return new_max, new_sum, term


def backward_body(
    raw: Optional[Tensor], kept: Optional[tuple[Any, ...]], inv: Tensor, s: Any, lse: Tensor, g: Tensor,
    value: Optional[Tensor], cols: Optional[Tensor], inside: Optional[Tensor], weights: Optional[Tensor],
    row_sum: Optional[Tensor], t: Optional[Tensor], target_cos: Optional[Tensor], row_params: tuple[Tensor, ...],
    params: list[Tensor], target_slope: Optional[Tensor], family: Any, k: int, tau: Optional[float], plain: bool,
    need_scale: bool, need_value: bool,
) -> tuple[Tensor, Optional[Tensor], Optional[Tensor]]:  # fmt: skip
    """One chunk of the backward, from its raw GEMM output (recomputed) or its ``kept`` forward results:
    ``(dcos, grad_scale part, grad_value part)`` — ``dcos`` is ∂loss/∂(raw GEMM output) without the rows'
    upstream gradient ``g`` (the eager ``_dcos``, pooling's backward included)."""
    if kept is None:
        assert raw is not None
        z, cos_k, pooled, slope, neg = logits(
            raw, inv, s, value, cols, inside, t, target_cos, row_params, params, family, k, tau, plain
        )
    else:
        z, cos_k, pooled, slope, neg = kept
    dz = exp(z - lse[:, None])
    if row_sum is not None:
        dz = dz * row_sum[:, None]
    if t is not None:
        dz = dz - t
    else:
        assert cols is not None and inside is not None
        for p in range(cols.shape[1]):
            w = 1.0 if weights is None else weights[:, p : p + 1]
            dz = dz.scatter_add(1, cols[:, p : p + 1], torch.where(inside[:, p : p + 1], -w, 0.0).to(dz.dtype))
    grad_s = ((dz * z).sum(1) * g).sum() / s if need_scale else None
    factor = inv * s if k == 1 else s
    grad_value = None
    if t is not None:
        assert slope is not None
        dcos = dz * slope * factor
    else:
        assert cols is not None and inside is not None and target_slope is not None
        at = [dz.gather(1, cols[:, p : p + 1]) * s for p in range(cols.shape[1])]
        if need_value:
            grad_value = torch.cat(
                [torch.where(inside[:, p : p + 1], at[p] * g[:, None], 0.0) for p in range(cols.shape[1])], 1
            )
        dcos = (dz if neg is None else dz * neg) * factor
        for p in range(cols.shape[1]):
            col = cols[:, p : p + 1]
            target = at[p] * target_slope[:, p : p + 1]
            if k == 1:
                target = target * inv[col]
            dcos = dcos.scatter(1, col, torch.where(inside[:, p : p + 1], target, dcos.gather(1, col)))
    if k > 1:
        assert cos_k is not None and pooled is not None
        dcos = pool_backward(dcos, cos_k, pooled, k, tau) * inv
    return dcos, grad_s, grad_value


_compiled: dict[str, Callable[..., Any]] = {}
_warned = False


def _compile(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if name not in _compiled:
        # dynamo keeps its compiled variants per code object, at most ``recompile_limit`` (8 by default) before it
        # falls back to eager for good: raised once, process-wide, to RECOMPILE_LIMIT (never lowered), rather than
        # patched around every chunk's call
        config = torch._dynamo.config
        config.recompile_limit = max(config.recompile_limit, RECOMPILE_LIMIT)
        _compiled[name] = torch.compile(fn, dynamic=False, fullgraph=True)
    return _compiled[name]


def run(name: str, eager: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``eager(*args, **kwargs)`` compiled (one compiled function per body, many variants); where compilation
    fails, a warning once and the eager body from then on (:func:`set_chunk_kernel` is set to ``"eager"``)."""
    global _warned
    if _mode == "compiled" and not torch.compiler.is_compiling():  # (traced by an outer compile: inlined there)
        try:
            return _compile(name, eager)(*args, **kwargs)
        except Exception as error:
            if not _is_compile_failure(error):
                raise
            if not _warned:
                warnings.warn(
                    f"mll: torch.compile of the chunk kernel failed ({type(error).__name__}: {error}); the eager "
                    "kernel runs instead",
                    RuntimeWarning,
                    stacklevel=3,
                )
                _warned = True
            set_chunk_kernel("eager")
    return eager(*args, **kwargs)


def _is_compile_failure(error: Exception) -> bool:
    """Errors of the compiler stack (dynamo, Inductor, the C++/Triton toolchain), not of the maths."""
    module = type(error).__module__
    return module.startswith(("torch._dynamo", "torch._inductor", "triton")) or isinstance(
        error, (torch._dynamo.exc.BackendCompilerFailed, torch._dynamo.exc.Unsupported, OSError)
    )
