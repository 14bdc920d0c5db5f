"""Peers' APIs as thin shells over mll's engine: their arguments, units, calls, parameter names and checkpoints.

* :mod:`mll.compat.insightface` — InsightFace's ``CombinedMarginLoss`` and ``PartialFC_V2`` (arcface_torch).
* :mod:`mll.compat.checkpoints` — InsightFace's per-rank and pytorch-metric-learning's checkpoints, read into mll's
  heads on any number of ranks.

Nothing here imports the peers; the layers below (:mod:`mll.nn`, :mod:`mll.functional`) never import this one.
"""
