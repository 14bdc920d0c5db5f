"""Train a small network on scikit-learn's bundled handwritten digits with each head, and compare.

    python examples/quickstart.py

Needs scikit-learn (bundled data set, no download). Runs in seconds on a laptop CPU.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import mll


def main(epochs: int = 30, seed: int = 0) -> None:
    torch.manual_seed(seed)
    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0
    y = torch.tensor(labels)
    perm = torch.randperm(len(y))
    train, test = perm[:1400], perm[1400:]

    heads = {
        "nn.Linear (softmax)": lambda: nn.Linear(32, 10),
        "ScaledNormalizedLinear": lambda: mll.ScaledNormalizedLinear(32, 10),
        "CosFace": lambda: mll.CosFace(32, 10, margin=0.35),
        "ArcFace": lambda: mll.ArcFace(32, 10, margin=0.5),
        "ArcFace, 3 sub-centers": lambda: mll.ArcFace(32, 10, num_sub_centers=3),
        "AdaCos": lambda: mll.AdaCos(32, 10),
        "DeepNCM": lambda: mll.DeepNCM(32, 10),
    }
    print(f"{'head':<24} {'test accuracy':>13} {'seconds':>8}")
    for name, make in heads.items():
        torch.manual_seed(seed)
        backbone = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 32))
        head = make()
        params = list(backbone.parameters()) + list(head.parameters())
        optimizer = torch.optim.Adam(params, lr=3e-3)
        start = time.perf_counter()
        for _ in range(epochs):
            backbone.train(), head.train()
            for batch in train[torch.randperm(len(train))].split(64):
                features = backbone(x[batch])
                # margin heads take the labels in training; nn.Linear ignores them here
                logits = head(features) if isinstance(head, nn.Linear) else head(features, y[batch])
                loss = F.cross_entropy(logits, y[batch])
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        backbone.eval(), head.eval()
        with torch.no_grad():
            accuracy = (head(backbone(x[test])).argmax(-1) == y[test]).float().mean().item()
        print(f"{name:<24} {accuracy:>13.3f} {time.perf_counter() - start:>8.1f}")


if __name__ == "__main__":
    main()
