"""pytorch-metric-learning's classification losses, on mll's engine.

``from mll.compat.pml import ArcFaceLoss`` in place of ``from pytorch_metric_learning.losses import ArcFaceLoss``:
the nine classification losses of pytorch-metric-learning 2.9 (pml) — :class:`ArcFaceLoss`, :class:`CosFaceLoss`,
:class:`SubCenterArcFaceLoss`, :class:`SphereFaceLoss`, :class:`LargeMarginSoftmaxLoss`,
:class:`NormalizedSoftmaxLoss`, :class:`ProxyAnchorLoss`, :class:`ProxyNCALoss`, :class:`SoftTripleLoss` — with
pml's constructor arguments, units (ArcFace's margin in degrees) and defaults, its call
``loss_fn(embeddings, labels, indices_tuple=None, ref_emb=None, ref_labels=None)``, ``get_logits``, and its
parameter names and layouts (``W`` of shape ``(embedding_size, num_classes)``, ``proxies``, ``fc``), so that a pml
``state_dict`` loads unchanged. The losses are computed by :mod:`mll.functional` (chunked over the classes where
they are many) and equal pml's on the same weights, in value and gradients, to rounding (float64: 1e-12 relative).
No dependency on pml: its objects that you pass in are recognised by name and protocol.

pml's common options (keyword arguments of every loss):

* ``weight_regularizer``, ``weight_reg_weight``: a callable of the loss's weights in pml's row layout (``W.t()``,
  ``proxies``, ``fc.t()``) returning a scalar, added times the weight. pml's regularizer objects
  (``LpRegularizer``, ``RegularFaceRegularizer``, ``CenterInvariantRegularizer``, ``SparseCentersRegularizer``,
  ``ZeroMeanRegularizer``) are such callables; so is any function.
* ``embedding_regularizer``, ``embedding_reg_weight``: the same, of the embeddings.
* ``reducer``: None (pml's default: the mean of the per-sample losses; ProxyAnchor its own); any pml reducer object
  (``MeanReducer``, ``SumReducer``, ``AvgNonZeroReducer``, ``ThresholdReducer``, ``ClassWeightedReducer``,
  ``PerAnchorReducer``, ``MultipleReducers``, ``DoNothingReducer``, …), called with the loss dictionaries pml would
  build, a copy per sub-loss as pml makes them; or a plain callable, which gets each per-element sub-loss (the
  per-sample losses, times the miner's weights) and returns a scalar. ProxyAnchorLoss takes None or pml's
  ``DivisorReducer`` only (mll's kernel returns its reduced loss).
* ``distance``: None, or pml's default distance object for the loss (``CosineSimilarity()``; ProxyNCA
  ``LpDistance(power=2)``; NormalizedSoftmax ``DotProductSimilarity`` with ``normalize_embeddings`` True or False).
  Any other distance raises a ``ValueError`` naming it.
* ``weight_init_func``: a callable that initialises the parameter in place (pml's ``TorchInitWrapper``); pml's
  default per loss otherwise.
* ``collect_stats``: None or False (pml's recorded statistics are not kept).
* ``device``, ``dtype``: of the parameter (not in pml).

As pml does, a call moves the parameter to the embeddings' device and dtype (its ``.data`` is replaced).
Differences from pml, each deliberate: labels of any integer dtype are accepted (pml: int64 only); labels outside
``[0, num_classes)`` and indices outside the batch raise a ``ValueError`` naming them (pml: an IndexError, or for
ProxyNCA silently left out); margins and scales outside the engine's ranges raise (ArcFace [0°, 90°), CosFace
[0, 1), positive scales); gradients are finite where pml's ``acos`` gives NaN (cos θ = ±1); half-precision inputs
are computed in float32 (pml: in their dtype), the loss returned in their dtype.

Native heads: :func:`to_head` and :func:`from_head` convert a loss (its weights and hyper-parameters) to the
:mod:`mll.nn` head that trains the same model and back; see the guide ``docs/from-pml.md``.
"""

from mll.compat._pml_base import PMLLoss
from mll.compat._pml_convert import from_head, to_head
from mll.compat._pml_large_margin import LargeMarginSoftmaxLoss, SphereFaceLoss, multiple_angle_margin
from mll.compat._pml_margin import (
    ArcFaceLoss,
    CosFaceLoss,
    NormalizedSoftmaxLoss,
    SubCenterArcFaceLoss,
)
from mll.compat._pml_proxy import ProxyAnchorLoss, ProxyNCALoss, SoftTripleLoss

__all__ = [
    "ArcFaceLoss",
    "CosFaceLoss",
    "LargeMarginSoftmaxLoss",
    "NormalizedSoftmaxLoss",
    "PMLLoss",
    "ProxyAnchorLoss",
    "ProxyNCALoss",
    "SoftTripleLoss",
    "SphereFaceLoss",
    "SubCenterArcFaceLoss",
    "from_head",
    "multiple_angle_margin",
    "to_head",
]
