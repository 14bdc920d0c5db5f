"""Modules: own the parameters and buffers, validate their arguments, call :mod:`mll.functional`."""

from mll.nn.adacos import AdaCos, FixedAdaCos
from mll.nn.adaptive_margin import AdaMSoftmax
from mll.nn.arcneg import ArcNegFace
from mll.nn.circle import CircleLoss
from mll.nn.curricular import CurricularFace
from mll.nn.feature_norm import AdaFace, MagFace
from mll.nn.large_margin import LargeMarginSoftmax
from mll.nn.linear import NormalizedLinear, ScaledNormalizedLinear, ScaledNormalizedLinearSqrt
from mll.nn.margin import ArcFace, CombinedMargin, CosFace, ElasticArcFace, ElasticCosFace, SphereFace
from mll.nn.mv_softmax import MVSoftmax
from mll.nn.ncm import DeepNCM
from mll.nn.npcface import NPCFace
from mll.nn.proxy import ProxyAnchor, ProxyNCAPlusPlus
from mll.nn.resharding import load_resharded
from mll.nn.sharded import (
    ShardedAdaCos,
    ShardedAdaFace,
    ShardedAdaMSoftmax,
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
    ShardedLargeMarginSoftmax,
    ShardedMagFace,
    ShardedMVSoftmax,
    ShardedNormalizedLinear,
    ShardedNPCFace,
    ShardedProxyAnchor,
    ShardedProxyNCAPlusPlus,
    ShardedScaledNormalizedLinear,
    ShardedScaledNormalizedLinearSqrt,
    ShardedSoftTriple,
    ShardedSphereFace,
    dense_state_dict,
)
from mll.nn.soft_triple import SoftTriple
from mll.nn.sub_centers import SubCenterCleanup, clean_sub_centers, keep_dominant_sub_centers

__all__ = [
    "AdaCos",
    "AdaFace",
    "AdaMSoftmax",
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
    "LargeMarginSoftmax",
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
    "ShardedAdaMSoftmax",
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
    "ShardedLargeMarginSoftmax",
    "ShardedMVSoftmax",
    "ShardedMagFace",
    "ShardedNPCFace",
    "ShardedNormalizedLinear",
    "ShardedProxyAnchor",
    "ShardedProxyNCAPlusPlus",
    "ShardedScaledNormalizedLinear",
    "ShardedScaledNormalizedLinearSqrt",
    "ShardedSoftTriple",
    "ShardedSphereFace",
    "SoftTriple",
    "SphereFace",
    "SubCenterCleanup",
    "clean_sub_centers",
    "dense_state_dict",
    "keep_dominant_sub_centers",
    "load_resharded",
]
