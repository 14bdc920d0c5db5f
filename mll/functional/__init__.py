"""The maths of every head, as pure functions.

No module state, no in-place writes to inputs, no ``.item()`` or Python branching on tensor values in the
computation: every function here works under ``torch.func.vmap``/``grad`` and ``torch.compile(fullgraph=True)``.
Input checks that read tensor values run in eager mode only.

Typical use::

    from mll import functional as MF
    cos = MF.cosine_logits(x, W)                        # (N, C) in [-1, 1]
    logits = MF.arc_margin(cos, y, 0.5, scale=s)        # s·cos(θ + m) on the targets, s·cos θ elsewhere
"""

from mll.functional.chunked import margin_cross_entropy
from mll.functional.cosine import cosine_logits, normalize
from mll.functional.curricular import curricular_margin, curricular_statistics, curricular_update
from mll.functional.feature_norm import (
    ada_margin,
    adaface_statistics,
    adaface_update,
    mag_margin,
    magface_regularizer,
)
from mll.functional.margin_values import dynamic_margins, elastic_margins
from mll.functional.margins import arc_margin, combined_margin, cos_margin, sphere_margin
from mll.functional.ncm import ncm_batch_statistics, ncm_logits, ncm_update, ncm_update_from_statistics
from mll.functional.scale import adacos_reduce, adacos_scale, adacos_statistics, heuristic_scale
from mll.functional.sharded import sample_classes, shard_bounds, sharded_margin_cross_entropy
from mll.functional.sub_centers import dominant_sub_centers, sub_center_counts, sub_center_outliers

__all__ = [
    "ada_margin",
    "adacos_reduce",
    "adacos_scale",
    "adacos_statistics",
    "adaface_statistics",
    "adaface_update",
    "arc_margin",
    "combined_margin",
    "cos_margin",
    "cosine_logits",
    "curricular_margin",
    "curricular_statistics",
    "curricular_update",
    "dominant_sub_centers",
    "dynamic_margins",
    "elastic_margins",
    "heuristic_scale",
    "mag_margin",
    "magface_regularizer",
    "margin_cross_entropy",
    "ncm_batch_statistics",
    "ncm_logits",
    "ncm_update",
    "ncm_update_from_statistics",
    "normalize",
    "sample_classes",
    "shard_bounds",
    "sharded_margin_cross_entropy",
    "sphere_margin",
    "sub_center_counts",
    "sub_center_outliers",
]
