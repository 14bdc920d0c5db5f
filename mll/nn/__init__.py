"""Modules: own the parameters and buffers, validate their arguments, call :mod:`mll.functional`."""

from mll.nn.adacos import AdaCos, FixedAdaCos
from mll.nn.linear import NormalizedLinear, ScaledNormalizedLinear, ScaledNormalizedLinearSqrt
from mll.nn.margin import ArcFace, CosFace
from mll.nn.ncm import DeepNCM
from mll.nn.sharded import ShardedArcFace, ShardedCosFace, ShardedScaledNormalizedLinear, dense_state_dict

__all__ = [
    "AdaCos",
    "ArcFace",
    "CosFace",
    "DeepNCM",
    "FixedAdaCos",
    "NormalizedLinear",
    "ScaledNormalizedLinear",
    "ScaledNormalizedLinearSqrt",
    "ShardedArcFace",
    "ShardedCosFace",
    "ShardedScaledNormalizedLinear",
    "dense_state_dict",
]
