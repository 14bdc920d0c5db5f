"""The maths of every head, as pure functions.

No module state, no in-place writes to inputs. The elementwise functions — cosines, margins (``margin_logits`` and
its named forms), scales, statistics and updates — have no ``.item()`` or Python branching on tensor values in the
computation and work under ``torch.func.vmap``/``grad`` and ``torch.compile(fullgraph=True)``; input checks that
read tensor values run in eager mode only (and when :class:`value_checks` is on). The chunked loss
``margin_cross_entropy`` compiles with ``fullgraph=True`` (its chunk loop unrolls), works under ``torch.func.grad``
and raises a clear error under ``torch.func.vmap``; the sharded loss runs eagerly (a graph break under
``torch.compile``: collectives and host reads). The sub-center clean-up helpers and ``sample_classes`` read the data
(eager only). A table of what runs under which transform, each row tested: ``docs/functional.md``.

Typical use::

    from mll import functional as MF
    cos = MF.cosine_logits(x, W)                        # (N, C) in [-1, 1]
    logits = MF.arc_margin(cos, y, 0.5, scale=s)        # s·cos(θ + m) on the targets, s·cos θ elsewhere
    logits = MF.margin_logits(cos, y, MF.ARC(0.5), scale=s)            # the same, through the margin object
    loss = MF.margin_cross_entropy(x, W, y, scale=s, margin=MF.ARC(0.5))  # its loss, without the N×C logits
"""

from mll.functional._engine.checks import value_checks
from mll.functional._engine.compiled import chunk_kernel, set_chunk_kernel
from mll.functional._engine.normalization import normalize
from mll.functional._engine.plan import Plan, set_loss_path, set_memory_budget
from mll.functional.adaptive_margin import ADAPTIVE, adaptive_margin, adaptive_margin_regularizer
from mll.functional.arcneg import ARC_NEG, arcneg_margin
from mll.functional.chunked import loss_plan, margin_cross_entropy
from mll.functional.circle import CIRCLE, CIRCLE_EXACT, circle_margin
from mll.functional.cosine import cosine_logits
from mll.functional.curricular import CURRICULAR, curricular_margin, curricular_statistics, curricular_update
from mll.functional.feature_norm import (
    ADA,
    MAG,
    MAG_EASY,
    ada_margin,
    adaface_statistics,
    adaface_update,
    mag_margin,
    magface_regularizer,
)
from mll.functional.large_margin import LARGE_MARGIN, large_margin_logits
from mll.functional.margin import Margin, MarginFamily, MarginParameter, margin_logits
from mll.functional.margin_values import dynamic_margins, elastic_margins
from mll.functional.margins import (
    ARC,
    ARC_EASY,
    COMBINED,
    COS,
    NO_MARGIN,
    SPHERE,
    arc_margin,
    combined_margin,
    cos_margin,
    sphere_margin,
)
from mll.functional.mv_softmax import MV_ARC, MV_ARC_FIXED, MV_COS, MV_COS_FIXED, mv_margin
from mll.functional.ncm import ncm_batch_statistics, ncm_logits, ncm_update, ncm_update_from_statistics
from mll.functional.npcface import NPC, npcface_margin, npcface_statistics, npcface_statistics_chunked
from mll.functional.proxy import (
    PROXY_ANCHOR_ALPHA,
    PROXY_ANCHOR_DELTA,
    PROXY_NCA_TEMPERATURE,
    chunked_proxy_anchor_loss,
    proxy_anchor_loss,
    proxy_nca_logits,
    proxy_nca_scale,
    sharded_proxy_anchor_loss,
)
from mll.functional.scale import adacos_reduce, adacos_scale, adacos_statistics, heuristic_scale
from mll.functional.sharded import sharded_margin_cross_entropy
from mll.functional.sharding import sample_classes, sample_classes_by_key, shard_bounds
from mll.functional.soft_triple import soft_triple_distinct_centers, soft_triple_regularizer
from mll.functional.sub_centers import dominant_sub_centers, sub_center_counts, sub_center_outliers

__all__ = [
    "ADA",
    "ADAPTIVE",
    "ARC",
    "ARC_EASY",
    "ARC_NEG",
    "CIRCLE",
    "CIRCLE_EXACT",
    "COMBINED",
    "COS",
    "CURRICULAR",
    "LARGE_MARGIN",
    "MAG",
    "MAG_EASY",
    "MV_ARC",
    "MV_ARC_FIXED",
    "MV_COS",
    "MV_COS_FIXED",
    "NO_MARGIN",
    "NPC",
    "PROXY_ANCHOR_ALPHA",
    "PROXY_ANCHOR_DELTA",
    "PROXY_NCA_TEMPERATURE",
    "SPHERE",
    "Margin",
    "MarginFamily",
    "MarginParameter",
    "Plan",
    "ada_margin",
    "adacos_reduce",
    "adacos_scale",
    "adacos_statistics",
    "adaface_statistics",
    "adaface_update",
    "adaptive_margin",
    "adaptive_margin_regularizer",
    "arc_margin",
    "arcneg_margin",
    "chunk_kernel",
    "chunked_proxy_anchor_loss",
    "circle_margin",
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
    "large_margin_logits",
    "loss_plan",
    "mag_margin",
    "magface_regularizer",
    "margin_cross_entropy",
    "margin_logits",
    "mv_margin",
    "ncm_batch_statistics",
    "ncm_logits",
    "ncm_update",
    "ncm_update_from_statistics",
    "normalize",
    "npcface_margin",
    "npcface_statistics",
    "npcface_statistics_chunked",
    "proxy_anchor_loss",
    "proxy_nca_logits",
    "proxy_nca_scale",
    "sample_classes",
    "sample_classes_by_key",
    "set_chunk_kernel",
    "set_loss_path",
    "set_memory_budget",
    "shard_bounds",
    "sharded_margin_cross_entropy",
    "sharded_proxy_anchor_loss",
    "soft_triple_distinct_centers",
    "soft_triple_regularizer",
    "sphere_margin",
    "sub_center_counts",
    "sub_center_outliers",
    "value_checks",
]
