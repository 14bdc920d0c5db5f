"""0.1.6 module path ``metric_learning_layers.mml``: the layers, re-exported from :mod:`mll`."""

from mll import (
    AdaCos,
    ArcFace,
    CosFace,
    DeepNCM,
    FixedAdaCos,
    NormalizedLinear,
    ScaledNormalizedLinear,
    ScaledNormalizedLinearSqrt,
)

__all__ = [
    "AdaCos",
    "ArcFace",
    "CosFace",
    "DeepNCM",
    "FixedAdaCos",
    "NormalizedLinear",
    "ScaledNormalizedLinear",
    "ScaledNormalizedLinearSqrt",
]
