"""Peers' APIs as thin shells over mll's engine.

* :mod:`mll.compat.pml` — pytorch-metric-learning's classification losses (``ArcFaceLoss``, ``ProxyAnchorLoss``, …):
  its constructor arguments, units, call, parameter names and checkpoints, computed by :mod:`mll.functional`.
* :mod:`mll.compat.insightface` — InsightFace's ``CombinedMarginLoss`` and ``PartialFC_V2`` on the sharded kernel,
  their numbers by default.
* :mod:`mll.compat.checkpoints` — InsightFace's per-rank and pml's checkpoints into mll heads on any number of ranks.

Nothing here imports the peers: their objects that users pass in (reducers, regularizers, distances) are recognised
by what they are and do, and called as the peer would call them.
"""
