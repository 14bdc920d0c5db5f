"""Run a loss of ``mll.compat.pml`` and pytorch-metric-learning's of the same name on the same weights and inputs.

pml is imported here only (``pytest.importorskip``: the ``dev`` extra installs it, so CI runs these comparisons).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import pytest
import torch
from torch import Tensor

import mll.compat.pml as M

pml_losses = pytest.importorskip("pytorch_metric_learning.losses")
warnings.filterwarnings("ignore", message=".*__array_wrap__.*", category=DeprecationWarning)

#: the parameter each loss keeps, by pml's name
PARAMETER = {
    "ArcFaceLoss": "W",
    "CosFaceLoss": "W",
    "SubCenterArcFaceLoss": "W",
    "SphereFaceLoss": "W",
    "LargeMarginSoftmaxLoss": "W",
    "NormalizedSoftmaxLoss": "W",
    "ProxyAnchorLoss": "proxies",
    "ProxyNCALoss": "proxies",
    "SoftTripleLoss": "fc",
}
NAMES = sorted(PARAMETER)


@dataclass
class Run:
    """One call's loss, and the gradients of the embeddings and of the loss's parameter."""

    loss: Any
    grad_x: Optional[Tensor]
    grad_w: Optional[Tensor]
    module: torch.nn.Module


def pair(name: str, seed: int = 0, **kwargs: Any) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, pml's) with pml's weights loaded into ours (its ``state_dict``, unchanged)."""
    torch.manual_seed(seed)
    theirs = getattr(pml_losses, name)(**kwargs)
    ours = getattr(M, name)(**kwargs)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def run(module: torch.nn.Module, x: Tensor, y: Tensor, *args: Any, backward: bool = True, **kwargs: Any) -> Run:
    x = x.detach().clone().requires_grad_(backward)
    loss = module(x, y, *args, **kwargs)
    w = getattr(module, PARAMETER[type(module).__name__])
    w.grad = None
    if backward:
        loss.backward()
    return Run(loss, x.grad, w.grad, module)


def side_by_side(name: str, x: Tensor, y: Tensor, *args: Any, seed: int = 0, kwargs: Optional[dict] = None,
                 **call: Any) -> tuple[Run, Run]:  # fmt: skip
    """Both losses on the same weights (cast to ``x``'s dtype) and inputs: (ours, pml's)."""
    ours, theirs = pair(name, seed, **(kwargs or {}))
    ours, theirs = ours.to(x.dtype), theirs.to(x.dtype)
    return run(ours, x, y, *args, **call), run(theirs, x, y, *args, **call)


def relative(a: Tensor, b: Tensor, floor: float = 0.0) -> float:
    """max |a − b| / max(max |b|, floor) (0 when both are 0)."""
    a, b = a.detach().double(), b.detach().double()
    scale = max(b.abs().max().item() if b.numel() else 0.0, floor)
    diff = (a - b).abs().max().item() if b.numel() else 0.0
    return diff / scale if scale > 0 else diff


#: what a difference is measured against, at least: a cross-entropy near 0 has a relative condition number of
#: about 1/loss (its rounding is absolute, ~eps times the logits), so a loss below 1 and gradients below 0.01 are
#: compared absolutely
LOSS_FLOOR, GRAD_FLOOR = 1.0, 1e-2


def assert_same(ours: Run, theirs: Run, rtol: float) -> dict[str, float]:
    """Loss, embedding and parameter gradients within ``rtol`` of pml's (relative to its largest entry, floored at
    :data:`LOSS_FLOOR` / :data:`GRAD_FLOOR`); returns the differences."""
    out = {"loss": relative(ours.loss, theirs.loss, LOSS_FLOOR)}
    if theirs.grad_x is not None:
        assert ours.grad_x is not None and ours.grad_w is not None and theirs.grad_w is not None
        out["grad_x"] = relative(ours.grad_x, theirs.grad_x, GRAD_FLOOR)
        out["grad_w"] = relative(ours.grad_w, theirs.grad_w, GRAD_FLOOR)
    assert ours.loss.dtype == theirs.loss.dtype
    assert max(out.values()) <= rtol, out
    return out


def data(n: int, d: int, c: int, dtype: torch.dtype, seed: int = 0, spread: float = 3.0) -> tuple[Tensor, Tensor]:
    """Features in random directions with norms in ``[spread/6, spread]`` (varied, so that L-Softmax's and
    SphereFace's norms matter) and labels in [0, c)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    norms = spread * (1 + 5 * torch.rand(n, 1, generator=g, dtype=torch.float64)) / 6
    return (x / x.norm(dim=1, keepdim=True) * norms).to(dtype), torch.randint(0, c, (n,), generator=g)


def tolerance(dtype: torch.dtype) -> float:
    """float64: pml's numbers to 1e-12. float32: to its rounding, which for a well-classified sample is absolute —
    float32's ε times the logits (the engine forms a sample's loss as log-sum-exp minus the target logit, pml's
    ``F.cross_entropy`` as a log-softmax), times the scale over the features' norm in the gradients."""
    return 1e-12 if dtype == torch.float64 else 1e-3
