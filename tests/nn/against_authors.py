"""Comparing a head with its authors' forward pass on the same weights: a batch whose targets are easy or hard by
choice, and logits, loss and gradients compared."""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: features, classes and samples of the comparisons
D, C, N = 8, 6, 12


def aligned(weight: torch.Tensor, labels: torch.Tensor, noise: float, seed: int = 100) -> torch.Tensor:
    """Features near their class weights (noise relative to the weight's norm): targets with a large cosine."""
    g = torch.Generator().manual_seed(seed)  # not the stream of the weights (the tests seed the global one with 0)
    w = F.normalize(weight.detach(), dim=-1)[labels]
    return (w + noise * torch.randn(w.shape, generator=g, dtype=w.dtype)).requires_grad_(True)


def compare(ours: torch.Tensor, theirs: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> None:
    """Logits, the cross-entropy and its gradients in the features and the weights agree in float64."""
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    a, b = F.cross_entropy(ours, y), F.cross_entropy(theirs, y)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for g_ours, g_theirs in zip(torch.autograd.grad(a, (x, weight)), torch.autograd.grad(b, (x, weight))):
        torch.testing.assert_close(g_ours, g_theirs, rtol=1e-10, atol=1e-12)
