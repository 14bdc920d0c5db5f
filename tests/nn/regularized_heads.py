"""The heads whose objective is not the plain cross-entropy of their own cosine logits — AdaM-Softmax and
SoftTriple add a regulariser, L-Softmax's logits are not cosines — built for their tests, with a batch and their
dense objective."""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

import mll
from mll import functional as MF

D, C = 6, 5


def adam(**kw: Any) -> mll.AdaMSoftmax:
    kw.setdefault("scale", 8.0)
    return mll.AdaMSoftmax(D, C, margin=torch.linspace(0.1, 0.5, C), lambda_=3.0, **kw)


def soft_triple(**kw: Any) -> mll.SoftTriple:
    return mll.SoftTriple(D, C, 3, margin=0.05, tau=0.5, pooling_temperature=0.2, **kw)


def large_margin(**kw: Any) -> mll.LargeMarginSoftmax:
    return mll.LargeMarginSoftmax(D, C, margin=3.0, lambda_=0.5, scale=1.5, **kw)


#: name -> constructor (dense head)
ZOO: dict[str, Callable[..., torch.nn.Module]] = {
    "AdaMSoftmax": adam,
    "SoftTriple": soft_triple,
    "LargeMarginSoftmax": large_margin,
}


def regularizer(head: torch.nn.Module) -> Any:
    """What the head's loss() adds to the cross-entropy (0 when nothing)."""
    return head.regularizer() if hasattr(head, "regularizer") else 0.0


def batch(n: int = 4, dtype: torch.dtype = torch.float64, soft: bool = False, seed: int = 0) -> tuple[Any, Any]:
    g = torch.Generator().manual_seed(seed)
    x = 2 * torch.randn(n, D, generator=g, dtype=dtype)
    if soft:
        return x, torch.softmax(torch.randn(n, C, generator=g, dtype=dtype), -1)
    return x, torch.randint(0, C, (n,), generator=g)


def full_loss(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The dense path's objective: cross-entropy of the logits plus the head's regulariser."""
    return F.cross_entropy(head(x, y), y) + regularizer(head)


def eval_logits(head: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    if isinstance(head, mll.LargeMarginSoftmax):  # the margin-free logits it trains (documented)
        return x @ head.weight.T * head.scale
    return MF.cosine_logits(x, head.weight, head.num_sub_centers, pooling=head.pooling,
                            pooling_temperature=head.pooling_temperature) * head.scale  # fmt: skip
