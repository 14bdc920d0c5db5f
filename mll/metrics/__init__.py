"""Evaluation of embeddings and heads: retrieval, verification and classification metrics at any gallery size.

Pure functions on tensors (any leading batch shape, float16/bfloat16/float32/float64, any device) whose
definitions follow pytorch-metric-learning's ``AccuracyCalculator`` (retrieval) and InsightFace's evaluation
protocols (verification), so numbers compare. Neighbour search walks the gallery in blocks with a running top-k,
so no ``N×M`` similarity matrix is formed; a gallery spread over the ranks of a ``torch.distributed`` group gives
the numbers of one process. Definitions, correspondences and a worked example: ``docs/metrics.md``.
"""

from mll.metrics.classification import classification_accuracy, head_accuracy
from mll.metrics.retrieval import nearest_neighbors, retrieval_metrics
from mll.metrics.sharded import sharded_retrieval_metrics
from mll.metrics.verification import (
    FAR_TARGETS,
    pair_cosines,
    pair_verification_metrics,
    plot_roc,
    roc_curve,
    verification_metrics,
)

__all__ = [
    "FAR_TARGETS",
    "classification_accuracy",
    "head_accuracy",
    "nearest_neighbors",
    "pair_cosines",
    "pair_verification_metrics",
    "plot_roc",
    "retrieval_metrics",
    "roc_curve",
    "sharded_retrieval_metrics",
    "verification_metrics",
]
