"""The one internal module :mod:`mll.nn` uses besides the public :mod:`mll.functional`.

The modules validate their inputs once (naming ``labels`` rather than ``target``) and then call the unchecked
forms of the public functions, so a training step does not check (and read back from the device) the same
labels twice. Everything here is either such an unchecked twin or a shared argument check.
"""

from mll.functional._agreement import agree_on_call, call_report, dtype_code
from mll.functional._block import (
    all_reduce_log_sum_exp,
    block_soft_targets,
    gather_block_batch,
    own_share_sum,
    pair_class_sums,
)
from mll.functional._checks import (
    _INDEX_DTYPES,
    UNSET,
    _is_int,
    check_decay,
    check_feature_grad_scale,
    check_features,
    check_generator,
    check_in_features,
    check_lambda,
    check_margin_param,
    check_nonnegative,
    check_num_classes,
    check_num_sub_centers,
    check_positive,
    check_sample_rate,
    check_scale,
    check_target,
    is_soft,
    renamed,
    shape_str,
    values_checkable,
)
from mll.functional._distributed import all_gather_rows, all_reduce_sum, rank_and_world
from mll.functional._kernel import target_cosines
from mll.functional.arcneg import check_arcneg_sigma
from mll.functional.chunked import check_chunk_size, check_pair, check_reduction, chunked_loss
from mll.functional.circle import circle_family
from mll.functional.cosine import check_pooling
from mll.functional.curricular import curricular_update_from_statistics, finite_sum_and_count
from mll.functional.feature_norm import MAGFACE_MAGNITUDES, MAGFACE_MARGINS, ada, check_magface_args, mag
from mll.functional.margin import apply_margin, at_target
from mll.functional.npcface import check_npcface_options, npcface_sharded_statistics
from mll.functional.npcface import hard_mean as npcface_hard_mean
from mll.functional.npcface import hard_mean_chunked as npcface_hard_mean_chunked
from mll.functional.scale import adacos_statistics_chunked
from mll.functional.sub_centers import _check_dominant, _check_max_angle

__all__ = [
    "MAGFACE_MAGNITUDES",
    "MAGFACE_MARGINS",
    "UNSET",
    "_INDEX_DTYPES",
    "_check_dominant",
    "_check_max_angle",
    "_is_int",
    "ada",
    "adacos_statistics_chunked",
    "agree_on_call",
    "all_gather_rows",
    "all_reduce_log_sum_exp",
    "all_reduce_sum",
    "apply_margin",
    "at_target",
    "block_soft_targets",
    "call_report",
    "check_arcneg_sigma",
    "check_chunk_size",
    "check_decay",
    "check_feature_grad_scale",
    "check_features",
    "check_generator",
    "check_in_features",
    "check_lambda",
    "check_magface_args",
    "check_margin_param",
    "check_nonnegative",
    "check_npcface_options",
    "check_num_classes",
    "check_num_sub_centers",
    "check_pair",
    "check_pooling",
    "check_positive",
    "check_reduction",
    "check_sample_rate",
    "check_scale",
    "check_target",
    "chunked_loss",
    "circle_family",
    "curricular_update_from_statistics",
    "dtype_code",
    "finite_sum_and_count",
    "gather_block_batch",
    "is_soft",
    "mag",
    "npcface_hard_mean",
    "npcface_hard_mean_chunked",
    "npcface_sharded_statistics",
    "own_share_sum",
    "pair_class_sums",
    "rank_and_world",
    "renamed",
    "shape_str",
    "target_cosines",
    "values_checkable",
]
