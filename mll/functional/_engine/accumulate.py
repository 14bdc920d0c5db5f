"""Adding a chunked backward's weight gradient into an existing ``.grad``, chunk by chunk.

Under gradient accumulation (or ``zero_grad(set_to_none=False)``) autograd adds a backward's result into ``.grad``:
for the chunked loss that result is a whole C×d weight gradient, one more C×d buffer than the chunk loop needs.
When the engine is about to accumulate into a leaf weight anyway, the backward can add each chunk's rows into
``.grad`` itself and hand autograd nothing for the weight: the same numbers, no C×d buffer of its own.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor


def accumulate_node(weight: Tensor) -> Any:
    """The autograd node that accumulates a leaf weight's gradient into ``.grad`` (None where that cannot be used:
    a non-leaf, or while compiling)."""
    if (
        not (weight.is_leaf and weight.requires_grad)
        or torch.compiler.is_compiling()
        or torch.is_inference_mode_enabled()  # no autograd graph at all (a validation loop)
    ):
        return None
    with torch.enable_grad():  # setup_context runs without grad mode
        grad_fn = weight.view_as(weight).grad_fn
    return None if grad_fn is None else grad_fn.next_functions[0][0]


def grad_to_accumulate_into(node: Any, weight: Tensor) -> Optional[Tensor]:
    """The weight's existing ``.grad``, when this backward may add the block's gradient into it chunk by chunk —
    instead of building a whole C×d gradient that autograd then adds to it (gradient accumulation,
    ``zero_grad(set_to_none=False)``): a ``loss.backward()`` that will accumulate into this leaf (not
    ``torch.autograd.grad``), no hook on the weight's gradient, and a dense ``.grad`` of the weight's shape."""
    if node is None:
        return None
    grad = weight.grad
    if (
        grad is None
        or grad.shape != weight.shape
        or grad.layout != torch.strided
        or grad.requires_grad
        or weight._backward_hooks
        or getattr(weight, "_post_accumulate_grad_hooks", None)
        or not _will_accumulate(node)
    ):
        return None
    return grad


def _will_accumulate(node: Any) -> bool:
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except RuntimeError:  # torch.autograd.grad: the gradient is returned, never accumulated
        return False
