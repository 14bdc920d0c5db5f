"""0.1.6 module path ``metric_learning_layers.mml``: the layers, re-exported from :mod:`mll`."""

from mll.nn import *  # noqa: F403
from mll.nn import __all__ as __all__
