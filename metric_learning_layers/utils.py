"""0.1.6 module path ``metric_learning_layers.utils``."""

from __future__ import annotations

import numbers

import torch

from mll.functional import heuristic_scale
from mll.functional._engine.checks import values_checkable

__all__ = ["heuristic_scale", "one_hot"]

# how many distinct offending labels an error message lists
_SHOWN = 8


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """0.1.6's helper: float one-hot rows for class indices; labels with a class dimension pass through.

    Built by comparison (``F.one_hot`` calls ``.item()`` and does not work under ``torch.func.vmap``). Class
    indices outside ``[0, num_classes)`` raise a ``ValueError`` in eager mode (0.1.6 raised too); under
    ``torch.compile`` or a ``torch.func`` transform they cannot be checked and give an all-zero row.
    """
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class indices, but got {type(labels).__name__}")
    if labels.dim() > 1:
        return labels
    if not isinstance(num_classes, numbers.Integral) or isinstance(num_classes, bool) or num_classes < 1:
        raise ValueError(f"num_classes must be an integer >= 1, but got {num_classes!r}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(
            f"labels must be class indices of an integer dtype (or soft labels of shape (N, C)), "
            f"but got dtype {labels.dtype} and shape {tuple(labels.shape)}"
        )
    if values_checkable() and labels.numel() > 0:
        outside = (labels < 0) | (labels >= num_classes)
        if bool(outside.any()):
            bad = labels[outside].unique().tolist()
            shown = ", ".join(str(v) for v in bad[:_SHOWN]) + (", ..." if len(bad) > _SHOWN else "")
            raise ValueError(
                f"labels must be class indices in [0, {int(num_classes)}), but got out-of-range values {shown} "
                f"({int(outside.sum())} of {labels.numel()} labels)"
            )
    return (torch.arange(int(num_classes), device=labels.device) == labels.unsqueeze(-1)).float()
