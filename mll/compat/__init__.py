"""Peers' APIs as thin shells over mll's engine.

* :mod:`mll.compat.pml` — pytorch-metric-learning's classification losses (``ArcFaceLoss``, ``ProxyAnchorLoss``, …):
  its constructor arguments, units, call, parameter names and checkpoints, computed by :mod:`mll.functional`.

Nothing here imports the peers: their objects that users pass in (reducers, regularizers, distances) are recognised
by what they are and do, and called as the peer would call them.
"""
