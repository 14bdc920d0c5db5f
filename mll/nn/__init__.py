"""Modules: own the parameters and buffers, validate their arguments, call :mod:`mll.functional`."""

from mll.nn.adacos import AdaCos, FixedAdaCos
from mll.nn.arcneg import ArcNegFace
from mll.nn.circle import CircleLoss
from mll.nn.curricular import CurricularFace
from mll.nn.feature_norm import AdaFace, MagFace
from mll.nn.linear import NormalizedLinear, ScaledNormalizedLinear, ScaledNormalizedLinearSqrt
from mll.nn.margin import ArcFace, CombinedMargin, CosFace, ElasticArcFace, ElasticCosFace, SphereFace
from mll.nn.mv_softmax import MVSoftmax
from mll.nn.ncm import DeepNCM
from mll.nn.npcface import NPCFace
from mll.nn.proxy import ProxyAnchor, ProxyNCAPlusPlus
from mll.nn.sharded import (
    ShardedAdaCos,
    ShardedAdaFace,
    ShardedArcFace,
    ShardedArcNegFace,
    ShardedCircleLoss,
    ShardedCombinedMargin,
    ShardedCosFace,
    ShardedCurricularFace,
    ShardedDeepNCM,
    ShardedElasticArcFace,
    ShardedElasticCosFace,
    ShardedFixedAdaCos,
    ShardedMagFace,
    ShardedMVSoftmax,
    ShardedNormalizedLinear,
    ShardedNPCFace,
    ShardedProxyAnchor,
    ShardedProxyNCAPlusPlus,
    ShardedScaledNormalizedLinear,
    ShardedScaledNormalizedLinearSqrt,
    ShardedSphereFace,
    dense_state_dict,
)
from mll.nn.sub_centers import SubCenterCleanup, clean_sub_centers, keep_dominant_sub_centers

__all__ = [
    "AdaCos",
    "AdaFace",
    "ArcFace",
    "ArcNegFace",
    "CircleLoss",
    "CombinedMargin",
    "CosFace",
    "CurricularFace",
    "DeepNCM",
    "ElasticArcFace",
    "ElasticCosFace",
    "FixedAdaCos",
    "MVSoftmax",
    "MagFace",
    "NPCFace",
    "NormalizedLinear",
    "ProxyAnchor",
    "ProxyNCAPlusPlus",
    "ScaledNormalizedLinear",
    "ScaledNormalizedLinearSqrt",
    "ShardedAdaCos",
    "ShardedAdaFace",
    "ShardedArcFace",
    "ShardedArcNegFace",
    "ShardedCircleLoss",
    "ShardedCombinedMargin",
    "ShardedCosFace",
    "ShardedCurricularFace",
    "ShardedDeepNCM",
    "ShardedElasticArcFace",
    "ShardedElasticCosFace",
    "ShardedFixedAdaCos",
    "ShardedMVSoftmax",
    "ShardedMagFace",
    "ShardedNPCFace",
    "ShardedNormalizedLinear",
    "ShardedProxyAnchor",
    "ShardedProxyNCAPlusPlus",
    "ShardedScaledNormalizedLinear",
    "ShardedScaledNormalizedLinearSqrt",
    "ShardedSphereFace",
    "SphereFace",
    "SubCenterCleanup",
    "clean_sub_centers",
    "dense_state_dict",
    "keep_dominant_sub_centers",
]
