"""0.1.6 module path ``metric_learning_layers.utils``."""

from __future__ import annotations

import torch

from mll.functional import heuristic_scale

__all__ = ["heuristic_scale", "one_hot"]


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """0.1.6's helper: float one-hot rows for class indices; labels with a class dimension pass through.

    Built by comparison (``F.one_hot`` calls ``.item()`` and does not work under ``torch.func.vmap``).
    """
    if labels.dim() > 1:
        return labels
    return (torch.arange(num_classes, device=labels.device) == labels.unsqueeze(-1)).float()
