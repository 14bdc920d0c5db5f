"""From :mod:`mll.compat.pml`'s losses to :mod:`mll.nn`'s heads and back: the weights (transposed where pml keeps
them as columns) and the hyper-parameters (degrees to radians, temperatures to scales)."""

from __future__ import annotations

import math
from typing import Any, cast

import torch
from torch import Tensor, nn

from mll import nn as heads
from mll.compat._pml_base import PMLLoss
from mll.compat._pml_large_margin import LargeMarginSoftmaxLoss, SphereFaceLoss
from mll.compat._pml_margin import (
    ArcFaceLoss,
    CosFaceLoss,
    NormalizedSoftmaxLoss,
    SubCenterArcFaceLoss,
)
from mll.compat._pml_proxy import ProxyAnchorLoss, ProxyNCALoss, SoftTripleLoss

__all__ = ["from_head", "to_head"]

#: the native head of each loss (``to_head``), and the loss of each head (``from_head``)
_PAIRS = (
    "ArcFaceLoss / SubCenterArcFaceLoss ↔ ArcFace, CosFaceLoss ↔ CosFace, SphereFaceLoss ↔ SphereFace, "
    "LargeMarginSoftmaxLoss ↔ LargeMarginSoftmax, NormalizedSoftmaxLoss ↔ ScaledNormalizedLinear, "
    "ProxyAnchorLoss ↔ ProxyAnchor, ProxyNCALoss ↔ ProxyNCAPlusPlus, SoftTripleLoss ↔ SoftTriple"
)
#: mll.SphereFace and mll.LargeMarginSoftmax take margins in [1, 10)
_NATIVE_MULTIPLE_ANGLE = 10


def to_head(loss: PMLLoss) -> nn.Module:
    """The :mod:`mll.nn` head that trains the same model as a :mod:`mll.compat.pml` loss: its weights (a copy, as
    rows: ``W.t()``, ``fc.t()``, ``proxies``) and hyper-parameters, on the loss's device and dtype.

    Every pair keeps the numbers (``head.loss(x, y)`` equals ``loss(x, y)`` to rounding, in value and gradients)
    except SphereFace: pml's ``SphereFaceLoss`` scales the logits by ``‖x‖``, :class:`mll.SphereFace` normalises the
    features and scales by ``scale`` (same weights, same cosines, a different loss). ``weight_regularizer``,
    ``embedding_regularizer``, ``reducer`` and a miner's ``indices_tuple`` belong to the training loop and are not
    carried. Pairs: ArcFaceLoss and SubCenterArcFaceLoss → :class:`mll.ArcFace` (``margin`` in radians,
    ``num_sub_centers``), CosFaceLoss → :class:`mll.CosFace`, SphereFaceLoss → :class:`mll.SphereFace`,
    LargeMarginSoftmaxLoss → :class:`mll.LargeMarginSoftmax`, NormalizedSoftmaxLoss →
    :class:`mll.ScaledNormalizedLinear` (``scale = 1/temperature``), ProxyAnchorLoss → :class:`mll.ProxyAnchor`
    (``alpha``, ``delta = margin``), ProxyNCALoss → :class:`mll.ProxyNCAPlusPlus` (``softmax_temperature =
    1/softmax_scale``), SoftTripleLoss → :class:`mll.SoftTriple` (``scale = la``, ``pooling_temperature = gamma``,
    ``tau = 0``: pml's loss has no centre regulariser).

    Args:
        loss (PMLLoss): one of the nine losses of :mod:`mll.compat.pml`.

    Returns:
        nn.Module: the head, in training mode.
    """
    if not isinstance(loss, PMLLoss):
        raise TypeError(f"to_head takes a loss of mll.compat.pml ({_PAIRS}), but got {type(loss).__name__}")
    owner = type(loss).__name__
    d, c = loss.embedding_size, loss.num_classes
    parameter = getattr(loss, loss.parameter_name)
    factory: dict[str, Any] = {"device": parameter.device, "dtype": parameter.dtype}
    rows = parameter.t() if loss.parameter_name in ("W", "fc") else parameter
    head: nn.Module
    if isinstance(loss, ArcFaceLoss):
        head = heads.ArcFace(d, c, loss.sub_centers, scale=loss.scale, margin=loss.margin, **factory)
    elif isinstance(loss, CosFaceLoss):
        head = heads.CosFace(d, c, scale=loss.scale, margin=loss.margin, **factory)
    elif isinstance(loss, LargeMarginSoftmaxLoss):
        if loss.margin >= _NATIVE_MULTIPLE_ANGLE:
            native = "SphereFace" if isinstance(loss, SphereFaceLoss) else "LargeMarginSoftmax"
            raise ValueError(
                f"{owner} margin={loss.margin} has no native head: mll.{native} takes margins in "
                f"[1, {_NATIVE_MULTIPLE_ANGLE}); keep mll.compat.pml.{owner} for it"
            )
        cls = heads.SphereFace if isinstance(loss, SphereFaceLoss) else heads.LargeMarginSoftmax
        head = cls(d, c, scale=loss.scale, margin=float(loss.margin), **factory)
    elif isinstance(loss, NormalizedSoftmaxLoss):
        if not loss.normalize_embeddings:
            raise ValueError(
                f"{owner} with DotProductSimilarity(normalize_embeddings=False) has no native head: "
                "mll.ScaledNormalizedLinear normalises the features"
            )
        head = heads.ScaledNormalizedLinear(d, c, scale=1 / loss.temperature, **factory)
    elif isinstance(loss, ProxyAnchorLoss):
        head = heads.ProxyAnchor(d, c, alpha=loss.alpha, delta=loss.margin, **factory)
    elif isinstance(loss, ProxyNCALoss):
        head = heads.ProxyNCAPlusPlus(d, c, softmax_temperature=1 / loss.softmax_scale, **factory)
    else:
        assert isinstance(loss, SoftTripleLoss)
        head = heads.SoftTriple(
            d,
            c,
            loss.centers_per_class,
            scale=loss.la,
            margin=loss.margin,
            tau=0.0,
            pooling="soft",
            pooling_temperature=loss.pooling_temperature,
            **factory,
        )
    with torch.no_grad():
        head.weight.copy_(rows)
    return head


def from_head(head: nn.Module) -> PMLLoss:
    """The :mod:`mll.compat.pml` loss of an :mod:`mll.nn` head: the inverse of :func:`to_head`, so that a trained
    head can be saved as a pml checkpoint (``from_head(head).state_dict()`` loads into pml's loss).

    The head's hyper-parameters must be ones pml can express, else a ``ValueError`` names the option: one margin for
    all classes (not a per-class tensor), no ``easy_margin``, max pooling over sub-centers (SoftTriple: soft), one
    weight row per class except ArcFace and SoftTriple, SphereFace's and L-Softmax's λ = 0 and an integer margin,
    SoftTriple's ``tau = 0`` (pml's loss has no centre regulariser: set ``head.tau = 0.0`` first, or pass pml's
    ``SparseCentersRegularizer`` as ``weight_regularizer``). A trainable scale becomes pml's fixed one, at its
    current value. Sharded heads: gather the blocks with :func:`mll.nn.dense_state_dict` into a dense head first.

    Args:
        head (nn.Module): one of :class:`mll.ArcFace`, :class:`mll.CosFace`, :class:`mll.SphereFace`,
            :class:`mll.LargeMarginSoftmax`, :class:`mll.ScaledNormalizedLinear`, :class:`mll.ProxyAnchor`,
            :class:`mll.ProxyNCAPlusPlus`, :class:`mll.SoftTriple`.

    Returns:
        PMLLoss: the loss, its parameter a copy of the head's weights in pml's layout, on the head's device and dtype.
    """
    kind, h = type(head), cast(Any, head)
    name = kind.__name__
    if kind not in _FROM_HEAD:
        raise TypeError(f"from_head takes one of the heads pml has a loss for ({_PAIRS}), but got {name}")
    weight: Tensor = h.weight
    factory: dict[str, Any] = {"device": weight.device, "dtype": weight.dtype}
    d, c, k = int(h.in_features), int(h.out_features), int(h.num_sub_centers)
    for option in ("margin", "m1", "m2", "m3"):
        if isinstance(getattr(h, option, None), Tensor):
            raise ValueError(f"{name} {option} must be one float for pml, not a per-class tensor")
    if k > 1 and kind not in (heads.ArcFace, heads.SoftTriple):
        raise ValueError(f"{name} num_sub_centers must be 1 for pml (only its ArcFace has sub-centers), but got {k}")
    expected_pooling = "soft" if kind is heads.SoftTriple else "max"
    if k > 1 and h.pooling != expected_pooling:
        raise ValueError(f"{name} pooling must be {expected_pooling!r} for pml, but got {h.pooling!r}")
    loss = _FROM_HEAD[kind](h, d, c, k, factory)
    parameter = getattr(loss, loss.parameter_name)
    with torch.no_grad():
        parameter.copy_(weight.detach().t() if loss.parameter_name in ("W", "fc") else weight.detach())
    return loss


def _scale(head: Any) -> float:
    return float(head.scale.detach())


def _arc(head: Any, d: int, c: int, k: int, factory: dict[str, Any]) -> PMLLoss:
    if head.easy_margin:
        raise ValueError("ArcFace easy_margin must be False for pml (its ArcFaceLoss has no easy margin)")
    degrees = math.degrees(head.margin)
    loss: ArcFaceLoss
    if k == 1:
        loss = ArcFaceLoss(c, d, degrees, _scale(head), **factory)
    else:
        loss = SubCenterArcFaceLoss(c, d, margin=degrees, scale=_scale(head), sub_centers=k, **factory)
    loss.margin = float(head.margin)  # the radians themselves, not radians(degrees(m))
    return loss


def _integer_margin(name: str, margin: float, lambda_: float) -> int:
    if lambda_ != 0:
        raise ValueError(f"{name} lambda_ must be 0 for pml (it has no annealing), but got {lambda_:g}")
    if margin != int(margin):
        raise ValueError(f"{name} margin must be an integer for pml (it uses int(margin)), but got {margin:g}")
    return int(margin)


def _sphere(head: Any, d: int, c: int, k: int, factory: dict[str, Any]) -> PMLLoss:
    margin = _integer_margin("SphereFace", head.margin, float(head.annealing_lambda))
    return SphereFaceLoss(c, d, margin, _scale(head), **factory)


def _large_margin(head: Any, d: int, c: int, k: int, factory: dict[str, Any]) -> PMLLoss:
    margin = _integer_margin("LargeMarginSoftmax", head.margin, float(head.lambda_))
    return LargeMarginSoftmaxLoss(c, d, margin, _scale(head), **factory)


def _soft_triple(head: Any, d: int, c: int, k: int, factory: dict[str, Any]) -> PMLLoss:
    if head.tau != 0:
        raise ValueError(
            f"SoftTriple tau must be 0 for pml, whose SoftTripleLoss has no centre regulariser, but got {head.tau:g}: "
            "set head.tau = 0.0 first, or give the pml loss weight_regularizer=SparseCentersRegularizer(C, K) and "
            "weight_reg_weight=tau"
        )
    return SoftTripleLoss(c, d, k, _scale(head), head.pooling_temperature, head.margin, **factory)


_FROM_HEAD = {
    heads.ArcFace: _arc,
    heads.CosFace: lambda h, d, c, k, f: CosFaceLoss(c, d, margin=h.margin, scale=_scale(h), **f),
    heads.SphereFace: _sphere,
    heads.LargeMarginSoftmax: _large_margin,
    heads.ScaledNormalizedLinear: lambda h, d, c, k, f: NormalizedSoftmaxLoss(c, d, 1 / _scale(h), **f),
    heads.ProxyAnchor: lambda h, d, c, k, f: ProxyAnchorLoss(c, d, h.delta, h.alpha, **f),
    heads.ProxyNCAPlusPlus: lambda h, d, c, k, f: ProxyNCALoss(c, d, softmax_scale=1 / h.softmax_temperature, **f),
    heads.SoftTriple: _soft_triple,
}
