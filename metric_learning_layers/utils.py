"""0.1.6 module path ``metric_learning_layers.utils``."""

from mll.functional import heuristic_scale

__all__ = ["heuristic_scale"]
