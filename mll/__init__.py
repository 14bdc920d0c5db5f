"""mll: metric-learning classification heads for PyTorch.

Drop-in replacements for the last ``nn.Linear`` of a classifier: normalised features and class weights,
scaled cosine logits, margins (CosFace, ArcFace, SphereFace, combined, CurricularFace, AdaFace, MagFace,
ElasticFace), adaptive scales (AdaCos), sub-centers, soft targets, class means (DeepNCM), and class-sharded heads
for classifiers spread over several ranks. The maths lives in :mod:`mll.functional`; the modules in :mod:`mll.nn`
own the state.
"""

from mll import functional
from mll.nn import (
    AdaCos,
    AdaFace,
    ArcFace,
    CombinedMargin,
    CosFace,
    CurricularFace,
    DeepNCM,
    ElasticArcFace,
    ElasticCosFace,
    FixedAdaCos,
    MagFace,
    NormalizedLinear,
    ScaledNormalizedLinear,
    ScaledNormalizedLinearSqrt,
    ShardedArcFace,
    ShardedCosFace,
    ShardedScaledNormalizedLinear,
    SphereFace,
    clean_sub_centers,
)

__version__ = "0.2.0"

__all__ = [
    "AdaCos",
    "AdaFace",
    "ArcFace",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "DeepNCM",
    "ElasticArcFace",
    "ElasticCosFace",
    "FixedAdaCos",
    "MagFace",
    "NormalizedLinear",
    "ScaledNormalizedLinear",
    "ScaledNormalizedLinearSqrt",
    "ShardedArcFace",
    "ShardedCosFace",
    "ShardedScaledNormalizedLinear",
    "SphereFace",
    "__version__",
    "clean_sub_centers",
    "functional",
]
