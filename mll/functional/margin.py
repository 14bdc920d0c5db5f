r"""The margin protocol: what a margin *is*, shared by every head and every path.

A margin family says how a target cosine becomes a target logit. It is plain data — a :class:`MarginFamily` — and
every path consumes the same object: the dense logits (:func:`margin_logits`, behind :func:`cos_margin`,
:func:`arc_margin`, …), the chunked loss (:func:`margin_cross_entropy`), the class-sharded loss
(:func:`sharded_margin_cross_entropy`) and the default scale (:func:`heuristic_scale`). The paths differ only in
*where the classes live* (all in memory, in chunks, on ranks), never in what a margin is.

A family holds:

* ``value_and_slope(cos, w, *params) -> (ψ, ∂ψ/∂cos)``: the target logit ψ (before the scale) and its derivative
  in the target cosine, elementwise, written in torch ops. ``w`` is the entry's target weight — 1 for class
  indices, ``t`` for soft targets — and every family is the identity at ``w = 0`` (ψ = cos, slope 1). Autograd is
  attached to ``params`` (and ``w``) but never to ``cos``: the engine routes the cosine's gradient through the
  returned slope, computed once without autograd's bookkeeping.
* ``parameters``: one :class:`MarginParameter` per entry of ``params``: its name and valid range.
* ``target_logit(θ, *params) -> float``: ψ at angle θ for Python floats, which :func:`heuristic_scale` solves for a
  default scale (None: the family has no closed form and heads pass ``scale=``).
* optionally ``negatives(cos, target_cos, *params) -> (value, slope)``: a change to the *non-target* logits as a
  function of each row's target cosine ``(*, 1)`` and the row's parameters read at its target class (CurricularFace's
  hard negatives). The row's target cosine is a statistic there (no gradient flows through it), as in the papers.

Calling a family checks and binds its parameters: ``ARC(0.5)`` is a :class:`Margin`. A parameter is a float or a
tensor that broadcasts to the logits' shape ``(*, C)``: ``(C,)`` per class, ``(*, 1)`` per sample, ``(*, C)`` per
entry. Adding a family is one ``value_and_slope`` function and one :class:`MarginFamily` (see the docs' "Adding a
head" page)::

    def value_and_slope(cos, w, m):            # ψ = cos − m·w (CosFace)
        value = cos - m * w
        return value, torch.ones_like(value)

    MINE = MF.MarginFamily("mine", value_and_slope, (MF.MarginParameter("m", 0.0, 1.0),),
                           target_logit=lambda theta, m: math.cos(theta) - m)
    logits = MF.margin_logits(cosine, labels, MINE(0.3), scale=30.0)
    loss = MF.margin_cross_entropy(x, W, labels, scale=30.0, margin=MINE(0.3))
"""

from __future__ import annotations

import importlib
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor

from mll.functional._engine.agreement import name_code
from mll.functional._engine.checks import (
    check_cosine,
    check_margin_param,
    check_scale,
    check_target,
    is_soft,
    values_checkable,
)
from mll.functional._engine.dense import (
    ScaledTargetReplace,
    gather_target,
    scaled_dense_replace,
    scaled_negatives_replace,
    scaled_target_replace,
)
from mll.functional._engine.numerics import Scale, work_dtype

__all__ = ["Margin", "MarginFamily", "MarginParameter", "margin_logits"]

MarginParam = Union[float, Tensor]
#: ``fn(cos, w, *params) -> (ψ, ∂ψ/∂cos)``
ValueAndSlope = Callable[..., tuple[Tensor, Tensor]]
#: ``fn(cos, target_cos, *params) -> (value, ∂value/∂cos)`` on the non-target entries
Negatives = Callable[..., tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class MarginParameter:
    """One hyper-parameter of a margin family: its name and valid range ``[low, high)`` (``]`` if inclusive)."""

    name: str
    low: float = -math.inf
    high: float = math.inf
    high_inclusive: bool = False
    #: a statistic the head computes per step (AdaFace's quality, MagFace's magnitude): no range check on tensors
    statistic: bool = False

    def check(self, value: object, family: str, logits_shape: Optional[Sequence[int]] = None) -> None:
        """Type and range of a float; dtype of a tensor, and with ``logits_shape`` its shape and (in eager mode) its
        values. Binding a family checks without a shape, so that no tensor value is read (no host sync) until use."""
        if not isinstance(value, Tensor) and torch.compiler.is_compiling():
            return  # a float was checked where the head stored it; a compiled step does not re-check it
        if isinstance(value, Tensor):
            if not value.is_floating_point():
                raise TypeError(
                    f"{family} {self.name} must be a float or a floating-point tensor, but got dtype {value.dtype}"
                )
            if logits_shape is None:
                return
        # a statistic of the features (AdaFace's quality, MagFace's magnitude) is checked for its shape only: a
        # non-finite feature gives a non-finite statistic and a NaN loss for its row, as on the dense path
        data = self.statistic and isinstance(value, Tensor)
        check_margin_param(
            value, self.low, self.high, family, _shape(logits_shape), name=self.name,
            high_inclusive=self.high_inclusive, check_values=not data,
        )  # fmt: skip


def _global_name(family: MarginFamily, module: Optional[str]) -> Optional[str]:
    namespace = vars(sys.modules[module]) if module in sys.modules else {}
    return next((name for name, value in namespace.items() if value is family), None)


def family_global(module: str, name: str) -> MarginFamily:
    """The margin family ``name`` of ``module`` (how a pickled family is found again)."""
    family = getattr(importlib.import_module(module), name)
    if not isinstance(family, MarginFamily):
        raise TypeError(f"{module}.{name} is not a MarginFamily, but a {type(family).__name__}")
    return family


def _shape(shape: Optional[Sequence[int]]) -> Optional[torch.Size]:
    return None if shape is None else torch.Size(shape)


@dataclass(frozen=True)
class MarginFamily:
    """A margin family: the target logit as a function of the target cosine (see the module notes).

    Attributes:
        name (str): the family's name, also accepted as ``margin_type`` by the older string-based arguments.
        value_and_slope (callable): ``fn(cos, w, *params) -> (ψ, ∂ψ/∂cos)``.
        parameters (tuple of MarginParameter): names and ranges of ``params``.
        target_logit (callable, optional): ``ψ(θ, *params)`` on Python floats, for :func:`heuristic_scale`.
        negatives (callable, optional): ``fn(cos, target_cos, *params) -> (value, slope)`` on non-target entries
            (``value`` a new tensor, or ``cos`` itself: never a view of it — the dense path writes into it).
        class_indices_only (bool): the family is not defined for soft targets.
        title (str): how error messages name the family (its paper's name), default ``name``.
        identity (bool): ψ = cos for every target (no margin): the dense logits are the scaled cosines.
        shift (bool): ψ = cos − p·t with ``p`` the first parameter (CosFace): the target logit moves by a constant,
            its slope is 1, and a few class-index logits take one scatter-add (:func:`_few_shifted`).
    """

    name: str
    value_and_slope: ValueAndSlope
    parameters: tuple[MarginParameter, ...] = ()
    target_logit: Optional[Callable[..., float]] = None
    negatives: Optional[Negatives] = None
    class_indices_only: bool = False
    title: str = ""
    identity: bool = False
    shift: bool = False

    def __post_init__(self) -> None:
        name_code(self.name)  # so that the ranks' agreement names a family another rank used

    def __call__(self, *params: MarginParam) -> Margin:
        """Bind (and check) the parameters: ``ARC(0.5)``."""
        return Margin(self, tuple(params))

    def check(self, params: Sequence[MarginParam], logits_shape: Optional[Sequence[int]] = None) -> None:
        """Check ``params`` (see :meth:`MarginParameter.check`)."""
        if len(params) != len(self.parameters):
            names = ", ".join(p.name for p in self.parameters) or "none"
            raise TypeError(
                f"the {self.label} margin takes {len(self.parameters)} parameter(s) ({names}), but got {len(params)}"
            )
        for spec, value in zip(self.parameters, params):
            spec.check(value, self.label, logits_shape)

    @property
    def label(self) -> str:
        return self.title or self.name

    def __repr__(self) -> str:
        return f"MarginFamily({self.name!r})"

    def __reduce__(self) -> Any:
        # a family is a module-level constant that heads compare by identity (``margin.family is NO_MARGIN``): it
        # pickles (and deep-copies) as a reference to its name in the module of its ``value_and_slope``, as pickle
        # does for functions; one that is no such global travels by value (its functions must then be module-level)
        module = getattr(self.value_and_slope, "__module__", None)
        name = _global_name(self, module)
        if module is None or name is None:
            return (MarginFamily, tuple(getattr(self, f.name) for f in fields(self)))
        return (family_global, (module, name))


@dataclass(frozen=True, repr=False)
class Margin:
    """A margin family with its parameters bound: what every path takes (``margin=ARC(0.5)``)."""

    family: MarginFamily
    params: tuple[MarginParam, ...] = ()

    def __post_init__(self) -> None:
        self.family.check(self.params)

    def __repr__(self) -> str:
        shown = ", ".join(f"{p.name}={_show(v)}" for p, v in zip(self.family.parameters, self.params))
        return f"{self.family.name}({shown})"

    def check(self, logits_shape: Sequence[int]) -> None:
        """Check the parameters against logits of shape ``(*, C)``."""
        self.family.check(self.params, logits_shape)

    def typical(self) -> tuple[float, ...]:
        """Each parameter as one float (the mean of a tensor): what :func:`heuristic_scale` solves with."""
        return tuple(float(p.detach().double().mean()) if isinstance(p, Tensor) else float(p) for p in self.params)


def _show(value: object) -> str:
    if isinstance(value, Tensor):
        return f"Tensor{tuple(value.shape)}"
    return f"{value:g}" if isinstance(value, float) else repr(value)


def param_tensor(value: MarginParam, dtype: torch.dtype, device: torch.device) -> Tensor:
    if isinstance(value, Tensor):
        return value.to(device=device, dtype=dtype)
    return torch.tensor(value, dtype=dtype, device=device)


def at_target(param: Tensor, shape: torch.Size, target: Tensor) -> Tensor:
    """A parameter that broadcasts to the logits' shape ``(*, C)``, read at each sample's target class: ``(*)``."""
    if param.dim() == 0:
        return param
    if param.shape[-1] == 1:  # one value per sample
        return param.expand(*shape[:-1], 1).squeeze(-1)
    return param.expand(shape).gather(-1, target.unsqueeze(-1)).squeeze(-1)


def _at_entries(param: Tensor, shape: torch.Size, index: Tensor) -> Tensor:
    """A parameter that broadcasts to ``shape``, read at flat indices (no copy of the broadcast tensor)."""
    if param.dim() == 0:
        return param
    return param.expand(shape)[torch.unravel_index(index, shape)]


def margin_logits(cosine: Tensor, target: Tensor, margin: Margin, *, scale: Scale = 1.0) -> Tensor:
    r"""Scaled logits with a margin on the target entries: the dense path of every margin family.

    .. math:: z_{ij} = s\,\psi(\cos\theta_{ij}; t_{ij}) \text{ at targets}, \qquad
              z_{ij} = s\cos\theta_{ij} \text{ elsewhere (or the family's negatives)}

    Class indices take the target-only path: the family's trigonometry runs on the N target cosines, which are
    written back in place, fused with the scale (O(N) extra work, no N×C one-hot). Soft targets interpolate the
    margin by each entry's weight ``t``; few-hot ones (at most one entry in eight non-zero) run the same fused
    scatter on their non-zero entries in eager mode, others the dense N×C path. All paths agree for one-hot targets.
    Works under ``torch.func.vmap``/``grad`` and ``torch.compile(fullgraph=True)`` (first derivatives; see
    ``mll/functional/_engine/dense.py``).

    Args:
        cosine (Tensor[*, C]): cosines, e.g. from :func:`cosine_logits`.
        target (Tensor[*] of int or Tensor[*, C] of float): class indices or soft targets.
        margin (Margin): a bound margin family, e.g. ``ARC(0.5)``.
        scale (float or Tensor): ``s``, multiplied in (fused).

    Returns:
        Tensor[*, C]: the scaled logits, in ``cosine``'s dtype.
    """
    if not isinstance(margin, Margin):
        raise TypeError(f"margin must be a mll.functional.Margin such as ARC(0.5), but got {type(margin).__name__}")
    check_cosine(cosine)
    margin.check(cosine.shape)
    check_scale(scale)
    target = check_target(target, cosine.shape)
    if margin.family.class_indices_only and is_soft(target):
        raise ValueError(
            f"{margin.family.label} needs class indices (an integer tensor of shape (*)), not soft targets"
        )
    return apply_margin(cosine, target, margin, scale)


def apply_margin(cosine: Tensor, target: Tensor, margin: Margin, scale: Scale) -> Tensor:
    """:func:`margin_logits` without argument checks (``target`` checked and int64 already)."""
    family = margin.family
    if family.identity:
        return cosine * scale
    dtype = work_dtype(cosine.dtype)
    soft = is_soft(target)
    few = cosine.numel() <= FEW_LOGITS and dtype == cosine.dtype and not torch.compiler.is_compiling()
    if few and family.shift and not soft:
        return _few_shifted(cosine, target, margin.params[0], scale)
    ps = [param_tensor(p, dtype, cosine.device) for p in margin.params]
    fn = family.value_and_slope
    # the value needs a graph only for margins (MagFace) or soft targets that require grad: skipping autograd's
    # bookkeeping elsewhere keeps the dozens of small O(N) ops of a margin cheap
    graph = torch.is_grad_enabled() and (any(p.requires_grad for p in ps) or (soft and target.requires_grad))
    if family.negatives is not None:
        return _with_negatives(cosine, target, family, ps, scale, graph)
    if soft:
        index = _soft_nonzero(target)
        if index is not None:
            flat = cosine.reshape(1, -1)
            with torch.set_grad_enabled(graph):
                at = [_at_entries(p, cosine.shape, index) for p in ps]
                value, slope = fn(flat.detach()[0, index].to(dtype), target.reshape(-1)[index].to(dtype), *at)
            out = ScaledTargetReplace.apply(
                flat, index.unsqueeze(0), value.unsqueeze(0), slope.detach().unsqueeze(0), scale
            )
            return out.reshape(cosine.shape)
        with torch.set_grad_enabled(graph):
            value, slope = fn(cosine.detach().to(dtype), target.to(dtype), *ps)
        return scaled_dense_replace(cosine, value, slope.detach(), scale)
    with torch.set_grad_enabled(graph):
        at = [at_target(p, cosine.shape, target) for p in ps]
        value, slope = fn(gather_target(cosine, target).to(dtype), 1.0, *at)
    if few:
        # (compiled, the Python cost this saves is gone; and Inductor in torch 2.13 got the gradient of two heads
        # sharing one cosine wrong with it, one through this replacement and one through the plain scale)
        return _few_replaced(cosine, target, value, slope.detach(), scale)
    return scaled_target_replace(cosine, target, value, slope.detach(), scale)


#: at most this many logits take :func:`_few_replaced` (2^14: a batch of 64 over 256 classes)
FEW_LOGITS = 1 << 14


def _few_replaced(cosine: Tensor, target: Tensor, value: Tensor, slope: Tensor, scale: Scale) -> Tensor:
    """:func:`scaled_target_replace` in autograd's own operations, for a few logits: the same values (the target
    entry is ``value + slope·0``) and first derivatives (``slope`` at the target, a constant as there). Autograd's
    nodes cost microseconds where one Python backward costs tens; the N×C passes they add cost nothing here."""
    index = target.unsqueeze(-1)
    at = cosine.gather(-1, index)
    shaped = value.unsqueeze(-1) + slope.unsqueeze(-1) * (at - at.detach())
    return cosine.scatter(-1, index, shaped) * scale


def _few_shifted(cosine: Tensor, target: Tensor, shift: MarginParam, scale: Scale) -> Tensor:
    """:func:`_few_replaced` for a family that moves the target cosine by ``−shift`` (slope 1): one scatter-add,
    whose gradient passes through to every cosine (and to ``shift`` where it requires one)."""
    index = target.unsqueeze(-1)
    if isinstance(shift, Tensor):
        by = -at_target(param_tensor(shift, cosine.dtype, cosine.device), cosine.shape, target)
        return cosine.scatter_add(-1, index, by.expand(target.shape).unsqueeze(-1)) * scale
    return cosine.scatter_add(-1, index, cosine.new_full(index.shape, -shift)) * scale


def _with_negatives(
    cosine: Tensor, target: Tensor, family: MarginFamily, ps: list[Tensor], scale: Scale, graph: bool
) -> Tensor:
    """Dense logits of a family that also shapes non-target entries: one elementwise pass, then the targets."""
    assert family.negatives is not None
    dtype = work_dtype(cosine.dtype)
    c = gather_target(cosine, target).to(dtype)
    with torch.set_grad_enabled(graph):
        at = [at_target(p, cosine.shape, target) for p in ps]
        value, slope = family.value_and_slope(c, 1.0, *at)
    with torch.no_grad():  # the row's parameters at its target class, (*, 1)
        rows = [p if p.dim() == 0 else a.detach().unsqueeze(-1) for p, a in zip(ps, at)]
        cos_in = cosine.detach().to(dtype)
        neg_value, neg_slope = family.negatives(cos_in, c.unsqueeze(-1), *rows)
        if neg_value is cos_in:  # the dense path writes the logits into the values: never into the cosines
            neg_value = neg_value.clone()
    return scaled_negatives_replace(cosine, target, neg_value, neg_slope, value, slope.detach(), scale)


#: soft targets with at most this fraction of non-zero entries take the sparse path in eager mode
SPARSE_FRACTION = 1 / 8


def _soft_nonzero(target: Tensor) -> Tensor | None:
    """Flat indices of the non-zero soft-target entries when few enough for the sparse path, else None.

    Few-hot soft targets (mixup, CutMix: two classes per row) leave most of the N×C entries at t = 0, where
    every margin is the identity with slope 1. In eager mode the margin then runs on those entries only,
    through the same fused scatter as class indices: O(nnz) trigonometry instead of O(N·C). The number of
    entries is data-dependent, so under ``torch.compile`` and ``torch.func`` (and for dense targets such as
    label smoothing, or targets that require grad) the dense path runs instead; both give identical logits.
    """
    if target.requires_grad or not values_checkable(target):
        return None
    index = target.reshape(-1).nonzero().squeeze(-1)
    return index if index.numel() <= SPARSE_FRACTION * target.numel() else None
