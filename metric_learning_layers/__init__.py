"""Compatibility package: the names of metric-learning-layers 0.1.6, as the very same objects as in :mod:`mll`.

``import metric_learning_layers as mll`` keeps 0.1.6 code running; new code imports :mod:`mll`.
See the README's migration notes for what changed.
"""

from mll import (
    AdaCos,
    ArcFace,
    CosFace,
    DeepNCM,
    FixedAdaCos,
    NormalizedLinear,
    ScaledNormalizedLinear,
    ScaledNormalizedLinearSqrt,
    __version__,
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
    "__version__",
]
