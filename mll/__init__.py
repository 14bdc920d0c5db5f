"""mll: metric-learning classification heads for PyTorch.

Drop-in replacements for the last ``nn.Linear`` of a classifier: normalised features and class weights,
scaled cosine logits, margins (CosFace, ArcFace, SphereFace, combined, CurricularFace, AdaFace, MagFace,
ElasticFace), adaptive scales (AdaCos), sub-centers, soft targets, class means (DeepNCM), and class-sharded heads
for classifiers spread over several ranks. The maths lives in :mod:`mll.functional`; the modules in :mod:`mll.nn`
own the state; :mod:`mll.metrics` evaluates embeddings and heads (retrieval, verification, accuracy).
"""

from mll import functional, metrics
from mll import nn as _nn
from mll.nn import *  # noqa: F403  (every head, its sharded form, clean_sub_centers)

__version__ = "0.2.0"

#: mll.nn's tools for checkpoints and sub-center clean-up stay in mll.nn
_NN_ONLY = ("SubCenterCleanup", "dense_state_dict", "keep_dominant_sub_centers")
__all__ = [name for name in _nn.__all__ if name not in _NN_ONLY] + ["__version__", "functional", "metrics"]
