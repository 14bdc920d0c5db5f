"""The shared body of :mod:`mll.compat.pml`'s losses: pml's call, its options and its reductions.

pytorch-metric-learning (pml) runs every loss through one call: check the shapes, refuse ``ref_emb``, weight each
sample by how often a miner's ``indices_tuple`` names it, compute a *loss dictionary* of named sub-losses (each with
its per-element ``losses``, their ``indices`` and a ``reduction_type``), add the regularisers as already-reduced
sub-losses, and hand the dictionary to a reducer. :class:`PMLLoss` does the same around each loss's own
``_losses`` (computed by :mod:`mll.functional`), so that pml's reducer and regulariser objects, when a user passes
them, see what pml would show them. Nothing here imports pml: its objects are recognised by their class name and
their protocol.
"""

from __future__ import annotations

import copy
import numbers
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from mll.compat._pml_inputs import (
    check_labels,
    class_names,
    describe,
    describe_distance,
    is_pml_reducer,
    miner_weights,
)

__all__ = ["LossDict", "PMLLoss", "reduced"]

#: pml's loss dictionary: sub-loss name -> {"losses", "indices", "reduction_type"[, "divisor"]}
LossDict = dict[str, dict[str, Any]]
#: a miner's output: (anchors, positives, negatives) or (anchors1, positives, anchors2, negatives)
IndicesTuple = Union[tuple[Tensor, ...], list[Tensor]]
#: pml's reducers that take the whole loss dictionary; every other reducer gets one sub-loss at a time
_WHOLE_DICT_REDUCERS = ("MultipleReducers", "DoNothingReducer")


class PMLLoss(nn.Module):
    """pml's ``BaseMetricLossFunction`` call and options, over a loss of :mod:`mll.functional`.

    Subclasses set the class attributes, validate their own arguments, call ``super().__init__(**kwargs)``, create
    their parameter with :meth:`_parameter`, and implement :meth:`_losses`, :meth:`_regularized_weight` and
    :meth:`get_logits`.
    """

    #: the pml distances this loss computes (class name, power, normalize_embeddings); the first is pml's default
    distances: tuple[tuple[str, int, bool], ...] = (("CosineSimilarity", 1, True),)
    #: the name of the loss's parameter (pml's: ``W``, ``proxies``, ``fc``)
    parameter_name = "W"
    #: pml's names of the loss's own sub-losses (before the regularisers')
    sub_losses: tuple[str, ...] = ("loss",)
    #: a miner's tuple weighs only its anchors (pml's ``using_ref``: ProxyNCA compares the batch with the proxies)
    anchors_only = False
    #: the reducers this loss accepts besides ``None`` and plain callables (None: every pml reducer)
    only_reducers: Optional[tuple[str, ...]] = None

    num_classes: int
    embedding_size: int

    def __init__(
        self,
        *,
        weight_regularizer: Optional[Callable[[Tensor], Any]] = None,
        weight_reg_weight: float = 1,
        embedding_regularizer: Optional[Callable[[Tensor], Any]] = None,
        embedding_reg_weight: float = 1,
        reducer: Optional[Callable[..., Any]] = None,
        distance: Any = None,
        weight_init_func: Optional[Callable[[Tensor], Any]] = None,
        collect_stats: Optional[bool] = None,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        for name, value in (
            ("weight_regularizer", weight_regularizer),
            ("embedding_regularizer", embedding_regularizer),
            ("weight_init_func", weight_init_func),
        ):
            if value is not None and (isinstance(value, type) or not callable(value)):
                raise TypeError(
                    f"{owner} {name} must be None or a callable instance (e.g. pml's LpRegularizer(), or a function "
                    f"of the weights), but got {describe(value)}"
                )
        for name, factor in (("weight_reg_weight", weight_reg_weight), ("embedding_reg_weight", embedding_reg_weight)):
            if not (isinstance(factor, numbers.Real) and not isinstance(factor, bool)) and not (
                isinstance(factor, Tensor) and factor.numel() == 1
            ):
                raise TypeError(f"{owner} {name} must be a real number, but got {describe(factor)}")
        if collect_stats:
            raise ValueError(
                f"{owner} collect_stats must be None or False: mll.compat.pml keeps none of pml's recorded statistics "
                f"(avg_angle, …), but got {collect_stats!r}"
            )
        self.weight_regularizer = weight_regularizer
        self.weight_reg_weight = weight_reg_weight
        self.embedding_regularizer = embedding_regularizer
        self.embedding_reg_weight = embedding_reg_weight
        self.weight_init_func = weight_init_func
        self.normalize_embeddings = self._check_distance(distance)
        self.distance = distance
        self.reducer = reducer
        self._reducers = self._check_reducer(reducer)
        self._factory = {"device": device, "dtype": dtype}

    # ---------------------------------------------------------------------------------------------- construction

    def _check_distance(self, distance: Any) -> bool:
        """Whether the embeddings are normalised: pml's default distance, or one of :attr:`distances`."""
        if distance is None:
            return self.distances[0][2]
        owner = type(self).__name__
        accepted = " or ".join(f"{n}(normalize_embeddings={e}, p=2, power={w})" for n, w, e in self.distances)
        if not isinstance(distance, type):
            for name, power, normalize in self.distances:
                if (
                    type(distance).__name__,
                    getattr(distance, "p", None),
                    getattr(distance, "power", None),
                    getattr(distance, "normalize_embeddings", None),
                ) == (name, 2, power, normalize):
                    return normalize
        got = describe_distance(distance) if not isinstance(distance, type) else describe(distance)
        raise ValueError(
            f"{owner} computes with pml's default distance only: distance must be None or pml's {accepted}, "
            f"but got {got}"
        )

    def _check_reducer(self, reducer: Any) -> dict[Optional[str], Any]:
        """How to reduce: {} for pml's default (computed here), {name: reducer} for a pml reducer (a copy per
        sub-loss, as pml makes them), {None: reducer} for a whole-dictionary reducer or a plain callable."""
        owner = type(self).__name__
        if reducer is None:
            return {}
        if isinstance(reducer, type) or not callable(reducer):
            raise TypeError(
                f"{owner} reducer must be None, an instance of one of pml's reducers (e.g. MeanReducer()) or a "
                f"callable that reduces a tensor of losses to a scalar, but got {describe(reducer)}"
            )
        if self.only_reducers is not None:
            if is_pml_reducer(reducer) and class_names(reducer) & set(self.only_reducers):
                return {}  # pml's default for this loss, which mll computes
            raise ValueError(
                f"{owner} reducer must be None or pml's {' or '.join(self.only_reducers)}() (its default): mll's "
                f"kernel for this loss returns the reduced loss, not per-element terms, but got {describe(reducer)}"
            )
        if not is_pml_reducer(reducer) or class_names(reducer) & set(_WHOLE_DICT_REDUCERS):
            return {None: reducer}
        return {name: copy.deepcopy(reducer) for name in self._sub_loss_names()}

    def _sub_loss_names(self) -> list[str]:
        names = list(self.sub_losses)
        if self.weight_regularizer is not None:
            names.append("weight_reg_loss")
        if self.embedding_regularizer is not None:
            names.append("embedding_reg_loss")
        return names

    def _parameter(self, shape: tuple[int, ...], default_init: Callable[[Tensor], Any]) -> nn.Parameter:
        """The loss's parameter in pml's layout, initialised by ``weight_init_func`` or pml's default for it."""
        parameter = nn.Parameter(torch.empty(shape, **self._factory))
        with torch.no_grad():
            (self.weight_init_func or default_init)(parameter)
        return parameter

    # ---------------------------------------------------------------------------------------------- the call

    def forward(
        self,
        embeddings: Tensor,
        labels: Optional[Tensor] = None,
        indices_tuple: Optional[IndicesTuple] = None,
        ref_emb: Optional[Tensor] = None,
        ref_labels: Optional[Tensor] = None,
    ) -> Any:
        """The loss of a batch, as pml's ``loss_fn(embeddings, labels, indices_tuple, ref_emb, ref_labels)``.

        Args:
            embeddings (Tensor[N, D]): the batch's embeddings.
            labels (Tensor[N] of int): class indices in ``[0, num_classes)`` (required; any integer dtype).
            indices_tuple (tuple of Tensor, optional): a miner's output, ``(anchors, positives, negatives)`` or
                ``(anchors1, positives, anchors2, negatives)``: each sample's loss is weighted by how often the tuple
                names it, relative to the most named (pml's ``convert_to_weights``); None or all empty: weight 1.
            ref_emb (Tensor, optional): refused, as by pml (these losses compare the batch with their own
                parameters), unless it is ``embeddings`` itself with ``ref_labels`` being ``labels``.
            ref_labels (Tensor, optional): see ``ref_emb``.

        Returns:
            Tensor: the loss in ``embeddings``' dtype, or what a pml reducer that does not reduce returns.
        """
        owner = type(self).__name__
        if not isinstance(embeddings, Tensor) or not embeddings.is_floating_point():
            raise TypeError(
                f"{owner} embeddings must be a floating-point tensor of shape (batch_size, "
                f"{self.embedding_size}), but got {describe(embeddings)}"
            )
        if labels is not None:
            labels = self._check_labels(embeddings, labels)
        if ref_emb is not None and (ref_emb is not embeddings or ref_labels is not labels):
            raise ValueError(
                f"{owner} does not take ref_emb or ref_labels (nor does pml's): it compares the batch "
                "with its own parameters; pass ref_emb=None"
            )
        if labels is None:
            raise ValueError(f"{owner} needs labels: class indices of shape (batch_size,)")
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            raise ValueError(
                f"{owner} embeddings must have shape (batch_size, {self.embedding_size}), but got "
                f"{tuple(embeddings.shape)}"
            )
        weights = self._miner_weights(indices_tuple, embeddings)
        self._cast(embeddings)  # every check above ran before this first change of state
        loss_dict = self._losses(embeddings, labels, weights)
        if self.weight_regularizer is not None:
            reg = self._regularizer_value("weight_regularizer", self.weight_regularizer, self._regularized_weight())
            loss_dict["weight_reg_loss"] = reduced(reg * self.weight_reg_weight)
        if self.embedding_regularizer is not None:
            reg = self._regularizer_value("embedding_regularizer", self.embedding_regularizer, embeddings)
            loss_dict["embedding_reg_loss"] = reduced(reg * self.embedding_reg_weight)
        return self._reduce(loss_dict, embeddings, labels)

    def _check_labels(self, embeddings: Tensor, labels: Any) -> Tensor:
        return check_labels(type(self).__name__, embeddings, labels, self.num_classes)

    def _miner_weights(self, indices_tuple: Any, embeddings: Tensor) -> Optional[Tensor]:
        return miner_weights(type(self).__name__, indices_tuple, embeddings, self.anchors_only)

    def _cast(self, embeddings: Tensor) -> None:
        """pml's ``cast_types``: the parameter follows the embeddings' dtype and device (its ``.data`` is replaced,
        so an optimizer holding it keeps working on the same Parameter)."""
        parameter = getattr(self, self.parameter_name)
        if parameter.dtype != embeddings.dtype or parameter.device != embeddings.device:
            parameter.data = parameter.data.to(device=embeddings.device, dtype=embeddings.dtype)

    def _regularizer_value(self, name: str, regularizer: Callable[[Tensor], Any], tensor: Tensor) -> Any:
        value = regularizer(tensor)
        if isinstance(value, Tensor) and value.numel() == 1:
            return value.reshape(())
        if isinstance(value, numbers.Real) and not isinstance(value, bool):
            return value
        raise ValueError(
            f"{type(self).__name__} {name} must return a scalar (a one-element tensor or a number), but "
            f"returned {describe(value)}"
        )

    def _reduce(self, loss_dict: LossDict, embeddings: Tensor, labels: Tensor) -> Any:
        """pml's reduction of the loss dictionary: each sub-loss reduced, the sub-losses summed in the embeddings'
        dtype. pml's default (``None``) reduces an element sub-loss to its mean; a plain callable reducer gets
        the element losses; a pml reducer gets pml's dictionaries."""
        dtype = embeddings.dtype
        reducer = self._reducers.get(None)
        if reducer is not None and is_pml_reducer(reducer):  # a whole-dictionary pml reducer
            return reducer(_in_dtype(loss_dict, dtype), embeddings, labels)
        parts = []
        for name, term in loss_dict.items():
            if name in self._reducers:
                parts.append(self._reducers[name]({name: _in_dtype({name: term}, dtype)[name]}, embeddings, labels))
            elif term["reduction_type"] == "already_reduced":
                parts.append(term["losses"])
            elif reducer is not None:
                parts.append(self._plain_reduced(reducer, term["losses"].to(dtype)))
            else:
                parts.append(term["losses"].mean())
        if len(parts) == 1:
            return torch.as_tensor(parts[0], device=embeddings.device).to(dtype)
        return torch.stack([torch.as_tensor(p, device=embeddings.device).to(dtype).reshape(()) for p in parts]).sum()

    def _plain_reduced(self, reducer: Callable[[Tensor], Any], losses: Tensor) -> Any:
        value = reducer(losses)
        if isinstance(value, Tensor) and value.numel() == 1:
            return value.reshape(())
        raise ValueError(
            f"{type(self).__name__} reducer must reduce the losses to a scalar, but returned {describe(value)}"
        )

    # ---------------------------------------------------------------------------------------------- per loss

    def _losses(self, embeddings: Tensor, labels: Tensor, weights: Optional[Tensor]) -> LossDict:
        """The loss's own sub-losses, in pml's form (``weights``: the miner's per-sample weights, None for 1)."""
        raise NotImplementedError

    def _regularized_weight(self) -> Tensor:
        """What pml hands ``weight_regularizer``: one row per class (or centre), ``(rows, embedding_size)``."""
        raise NotImplementedError

    def get_logits(self, embeddings: Tensor) -> Tensor:
        """pml's ``get_logits``: the loss's logits or similarities without a margin."""
        raise NotImplementedError

    def _weighted(self, losses: Tensor, weights: Optional[Tensor]) -> dict[str, Any]:
        """Per-sample losses, times the miner's weights, as pml's element sub-loss over the batch."""
        if weights is not None:
            losses = losses * weights.to(losses.dtype)
        return {
            "losses": losses,
            "indices": torch.arange(losses.shape[0], device=losses.device),
            "reduction_type": "element",
        }


def reduced(value: Any) -> dict[str, Any]:
    return {"losses": value, "indices": None, "reduction_type": "already_reduced"}


def _in_dtype(loss_dict: LossDict, dtype: torch.dtype) -> LossDict:
    """The dictionary pml would build: element losses in the embeddings' dtype (mll computes half precision in
    float32)."""
    out = {}
    for name, term in loss_dict.items():
        losses = term["losses"]
        if term["reduction_type"] != "already_reduced" and isinstance(losses, Tensor):
            term = {**term, "losses": losses.to(dtype)}
        out[name] = term
    return out
