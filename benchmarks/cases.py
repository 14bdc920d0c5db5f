"""What is timed: one training step of a head plus its cross-entropy, forward and backward.

Every implementation is a factory ``make(cfg) -> step`` that owns its own class weights; ``step()`` runs the loss
and its backward on shared features ``x`` (a leaf that requires grad, as a backbone's output would) and labels.
Gradients accumulate into buffers allocated once, so steady-state steps allocate only what the head needs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import mll
from benchmarks.peers import load_legacy, load_pml

SCALE, ARC_MARGIN, COS_MARGIN = 30.0, 0.5, 0.35


@dataclass(frozen=True)
class Config:
    batch: int = 256
    features: int = 512
    classes: int = 1000
    sub_centers: int = 1
    soft: bool = False
    seed: int = 0


@dataclass
class Data:
    x: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor  # y, or soft targets (a mixup of two labels) when cfg.soft


def make_data(cfg: Config) -> Data:
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch, cfg.features, generator=g).requires_grad_(True)
    y = torch.randint(0, cfg.classes, (cfg.batch,), generator=g)
    target: torch.Tensor = y
    if cfg.soft:
        other = torch.randint(0, cfg.classes, (cfg.batch,), generator=g)
        lam = torch.rand(cfg.batch, 1, generator=g)
        classes = torch.arange(cfg.classes)
        target = lam * (classes == y[:, None]) + (1 - lam) * (classes == other[:, None])
    return Data(x, y, target)


Step = Callable[[], None]
Factory = Callable[[Config, Data], Step]


def _weight(cfg: Config, rows: int) -> torch.Tensor:
    return torch.randn(rows, cfg.features, generator=torch.Generator().manual_seed(cfg.seed + 1)).requires_grad_(True)


def floor(cfg: Config, data: Data) -> Step:
    """F.cross_entropy(s * F.linear(F.normalize(x), F.normalize(W)), y), pooled over sub-centers when K > 1."""
    w = _weight(cfg, cfg.classes * cfg.sub_centers)

    def step() -> None:
        cos = F.linear(F.normalize(data.x), F.normalize(w))
        if cfg.sub_centers > 1:
            cos = cos.view(cfg.batch, cfg.classes, cfg.sub_centers).amax(-1)
        F.cross_entropy(SCALE * cos, data.target).backward()

    return step


def _module_step(head: torch.nn.Module, data: Data, with_labels: bool = True) -> Step:
    head.train()

    def step() -> None:
        logits = head(data.x, data.target) if with_labels else head(data.x)
        F.cross_entropy(logits, data.target).backward()

    return step


def ours(name: str, **kwargs: object) -> Factory:
    def make(cfg: Config, data: Data) -> Step:
        cls = getattr(mll, name)
        args = (cfg.features, cfg.classes) if name == "DeepNCM" else (cfg.features, cfg.classes, cfg.sub_centers)
        head = cls(*args, **kwargs)
        if name == "DeepNCM":
            head.means.normal_()  # a trained state: every class seen
        return _module_step(head, data)

    return make


def legacy(name: str, **kwargs: object) -> Factory:
    def make(cfg: Config, data: Data) -> Step:
        module = load_legacy()
        assert module is not None
        cls = getattr(module, name)
        if name == "DeepNCM":
            head = cls(cfg.features, cfg.classes)
            head.means.data.normal_()
        else:
            head = cls(cfg.features, cfg.classes, cfg.sub_centers, **kwargs)
        return _module_step(head, data, with_labels=name != "AdaCos")

    return make


def pml(name: str, **kwargs: object) -> Factory:
    def make(cfg: Config, data: Data) -> Step:
        losses = load_pml()
        assert losses is not None
        cls = getattr(losses, name)
        if name == "NormalizedSoftmaxLoss":
            loss_fn = cls(num_classes=cfg.classes, embedding_size=cfg.features, temperature=1 / SCALE)
        elif name == "SubCenterArcFaceLoss":
            loss_fn = cls(
                num_classes=cfg.classes, embedding_size=cfg.features, scale=SCALE, sub_centers=cfg.sub_centers, **kwargs
            )
        else:
            loss_fn = cls(num_classes=cfg.classes, embedding_size=cfg.features, scale=SCALE, **kwargs)

        def step() -> None:
            loss_fn(data.x, data.y).backward()

        return step

    return make


def per_class_arcface(cfg: Config, data: Data) -> Step:
    """ArcFace with dynamic per-class margins (0.05-0.5 from random class counts): a (C,) buffer gathered at the
    targets."""
    counts = torch.randint(1, 1000, (cfg.classes,), generator=torch.Generator().manual_seed(cfg.seed + 2))
    head = mll.ArcFace(
        cfg.features, cfg.classes, cfg.sub_centers, scale=SCALE, margin=mll.functional.dynamic_margins(counts)
    )
    return _module_step(head, data)


@dataclass(frozen=True)
class Case:
    head: str
    impl: str  # "floor", "mll", "0.1.6", "pml 2.9"
    factory: Factory
    available: Callable[[], bool] = lambda: True


def _has_legacy() -> bool:
    return load_legacy() is not None


def _has_pml() -> bool:
    return load_pml() is not None


ARC_DEG = math.degrees(ARC_MARGIN)

#: the suites: (title, configs' overrides, cases); the floor is always the first case
SUITES: dict[str, list[Case]] = {
    "int labels": [
        Case("floor", "floor", floor),
        Case("ScaledNormalizedLinear", "mll", ours("ScaledNormalizedLinear", scale=SCALE)),
        Case("CosFace", "mll", ours("CosFace", scale=SCALE, margin=COS_MARGIN)),
        Case("ArcFace", "mll", ours("ArcFace", scale=SCALE, margin=ARC_MARGIN)),
        Case("AdaCos", "mll", ours("AdaCos")),
        Case("ScaledNormalizedLinear", "0.1.6", legacy("ScaledNormalizedLinear", scale=SCALE), _has_legacy),
        Case("CosFace", "0.1.6", legacy("CosFace", scale=SCALE, margin=COS_MARGIN), _has_legacy),
        Case("ArcFace", "0.1.6", legacy("ArcFace", scale=SCALE, margin=ARC_MARGIN), _has_legacy),
        Case("AdaCos", "0.1.6", legacy("AdaCos"), _has_legacy),
        Case("ScaledNormalizedLinear", "pml 2.9", pml("NormalizedSoftmaxLoss"), _has_pml),
        Case("CosFace", "pml 2.9", pml("CosFaceLoss", margin=COS_MARGIN), _has_pml),
        Case("ArcFace", "pml 2.9", pml("ArcFaceLoss", margin=ARC_DEG), _has_pml),
    ],
    "sub-centers": [
        Case("floor (C·K rows + max-pool)", "floor", floor),
        Case("ArcFace", "mll", ours("ArcFace", scale=SCALE, margin=ARC_MARGIN)),
        Case("CosFace", "mll", ours("CosFace", scale=SCALE, margin=COS_MARGIN)),
        Case("ArcFace", "0.1.6", legacy("ArcFace", scale=SCALE, margin=ARC_MARGIN), _has_legacy),
        Case("ArcFace", "pml 2.9", pml("SubCenterArcFaceLoss", margin=ARC_DEG), _has_pml),
    ],
    "soft targets": [
        Case("floor (soft cross-entropy)", "floor", floor),
        Case("CosFace", "mll", ours("CosFace", scale=SCALE, margin=COS_MARGIN)),
        Case("ArcFace", "mll", ours("ArcFace", scale=SCALE, margin=ARC_MARGIN)),
        Case("ArcFace", "0.1.6", legacy("ArcFace", scale=SCALE, margin=ARC_MARGIN), _has_legacy),
    ],
    "margin families": [
        Case("floor", "floor", floor),
        Case("ArcFace (reference)", "mll", ours("ArcFace", scale=SCALE, margin=ARC_MARGIN)),
        Case("CombinedMargin (1, 0.3, 0.2)", "mll", ours("CombinedMargin", scale=SCALE)),
        Case("SphereFace (m=4)", "mll", ours("SphereFace", scale=SCALE)),
        Case("AdaFace", "mll", ours("AdaFace", scale=SCALE)),
        Case("MagFace", "mll", ours("MagFace", scale=SCALE)),
        Case("ElasticArcFace", "mll", ours("ElasticArcFace", scale=SCALE)),
        Case("ElasticCosFace", "mll", ours("ElasticCosFace", scale=SCALE)),
        Case("ArcFace, per-class margins", "mll", per_class_arcface),
        Case("CurricularFace (dense step)", "mll", ours("CurricularFace", scale=SCALE)),
        Case("SphereFace (m=4)", "pml 2.9", pml("SphereFaceLoss", margin=4), _has_pml),
    ],
    "DeepNCM": [
        Case("ScaledNormalizedLinear (reference)", "mll", ours("ScaledNormalizedLinear", scale=SCALE)),
        Case("DeepNCM (logits + update)", "mll", ours("DeepNCM", scale=SCALE)),
        Case("DeepNCM (logits + update)", "0.1.6", legacy("DeepNCM"), _has_legacy),
    ],
}
