"""Compatibility package: the names of metric-learning-layers 0.1.6, as the very same objects as in :mod:`mll`.

``import metric_learning_layers as mll`` keeps 0.1.6 code running; new code imports :mod:`mll`.
See the README's migration notes for what changed.
"""

from mll import __version__
from mll.nn import *  # noqa: F403  (every head of mll.nn: the 0.1.6 names and the newer ones)
from mll.nn import __all__ as _layers

__all__ = [*_layers, "__version__"]
