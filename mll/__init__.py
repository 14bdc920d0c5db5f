"""mll: metric-learning classification heads for PyTorch.

Drop-in replacements for the last ``nn.Linear`` of a classifier: normalised features and class weights,
scaled cosine logits, margins (CosFace, ArcFace), adaptive scales (AdaCos), sub-centers, soft targets and
class means (DeepNCM), and class-sharded heads for classifiers spread over several ranks. The maths lives in
:mod:`mll.functional`; the modules in :mod:`mll.nn` own the state.
"""

from mll import functional
from mll.nn import (
    AdaCos,
    ArcFace,
    CosFace,
    DeepNCM,
    FixedAdaCos,
    NormalizedLinear,
    ScaledNormalizedLinear,
    ScaledNormalizedLinearSqrt,
    ShardedArcFace,
    ShardedCosFace,
    ShardedScaledNormalizedLinear,
)

__version__ = "0.2.0"

__all__ = [
    "AdaCos",
    "ArcFace",
    "CosFace",
    "DeepNCM",
    "FixedAdaCos",
    "NormalizedLinear",
    "ScaledNormalizedLinear",
    "ScaledNormalizedLinearSqrt",
    "ShardedArcFace",
    "ShardedCosFace",
    "ShardedScaledNormalizedLinear",
    "__version__",
    "functional",
]
