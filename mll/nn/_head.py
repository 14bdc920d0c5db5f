"""The shared body of the cosine heads: one shallow base, one level below ``nn.Module``.

As torch.nn's ``_NormBase`` does for the norm layers, :class:`Head` owns what every cosine head repeats — the
argument checks, the class weights and the scale, ``reset_parameters``, the eval-mode bypass, the label checks and
the body of ``loss()`` — so that a head is its constructor and one hook, :meth:`Head.step_margin`: the margin of
this training step (a :class:`mll.functional.Margin`), after updating any running statistic. The maths lives in
:mod:`mll.functional`; ``forward`` and ``loss`` feed the same margin object to its dense and chunked paths, so a
head written once runs at every scale.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, TypeVar

import torch
from torch import Tensor, nn

from mll import functional as MF
from mll.functional._engine.agreement import agree_on_call
from mll.functional._engine.checks import (
    check_chunk_size,
    check_features,
    check_in_features,
    check_num_classes,
    check_num_sub_centers,
    check_pooling,
    check_reduction,
    check_scale,
    check_target,
    is_soft,
)
from mll.functional.chunked import chunked_loss, read_only
from mll.functional.margin import apply_margin
from mll.nn._regularized import plus_regularizer
from mll.nn._state import InitialValue, float_repr, register_scale, restore_initial_values

__all__ = ["Head", "agreed"]

T = TypeVar("T")


class Head(nn.Module):
    """Class weights, a scale, and a margin per training step (see the module notes).

    Subclasses call ``super().__init__`` with the shared arguments and a ``default_margin`` (the margin the default
    scale is solved for, see :func:`mll.functional.heuristic_scale`), set their own hyper-parameters before it
    (the default scale may read them), register their tensors with their initial values (``mll/nn/_state.py``) and
    override :meth:`step_margin` (and name their ``running_stats``).

    **Re-initialisation**, one rule for every head: :meth:`reset_parameters` draws the class weights anew and sets
    every other parameter and buffer — the scale (trained or adapted), per-class margins (AdaM-Softmax's learned
    ones too), running statistics, annealed weights — back to the value it had when the head was built (kept in
    ``initial_values``, outside the ``state_dict``). So it also fills a head built on the meta device after
    ``to_empty()``: with the same seed, the state of a head built directly. :meth:`reset_running_stats` restores
    only the running statistics (as ``nn.BatchNorm``'s does).
    """

    in_features: int
    out_features: int
    num_sub_centers: int
    pooling: str
    pooling_temperature: float
    weight: nn.Parameter
    scale: Tensor
    #: training mode needs labels (a margin or a running statistic that needs the targets)
    needs_labels = True
    #: the head accepts soft targets ``(*, C)`` in training mode
    soft_targets = True
    #: ``extra_repr`` says whether the scale is trained
    show_trainable = True
    #: a training step shares statistics across ranks (a collective): the ranks agree on their checks first
    shares_statistics = False
    #: the process group whose ranks share the running statistics (None: the default group); the sharded forms set
    #: their own
    group: Any = None
    #: the head's objective adds :meth:`regularizer` to every sample's cross-entropy in :meth:`loss` (AdaM-Softmax,
    #: SoftTriple)
    regularized = False
    #: ``loss()`` in eval mode is the plain cross-entropy, which takes any target; False: the head's loss is the same
    #: in both modes, its targets checked as in training (Proxy-Anchor)
    plain_eval_loss = True
    #: the head has a scale ``s`` (a buffer, or a parameter with ``trainable_scale``); without one, its logits are the
    #: cosines times its own fixed factor, :meth:`logit_scale`
    has_scale = True
    #: the buffers that are running statistics (what :meth:`reset_running_stats` restores)
    running_stats: tuple[str, ...] = ()
    #: each parameter and buffer's value at construction, by name (not the weights: they are drawn)
    initial_values: dict[str, InitialValue]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_sub_centers: int = 1,
        *,
        scale: Optional[float] = None,
        trainable_scale: bool = False,
        default_margin: Optional[MF.Margin] = None,
        pooling: str = "max",
        pooling_temperature: float = 0.1,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        self.initial_values = {}
        check_in_features(in_features)
        check_num_classes(out_features)
        check_num_sub_centers(num_sub_centers)
        check_pooling(pooling, pooling_temperature)
        if not isinstance(trainable_scale, bool):
            raise TypeError(f"trainable_scale must be a bool, but got {type(trainable_scale).__name__}")
        if scale is not None:
            check_scale(scale)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.num_sub_centers = int(num_sub_centers)
        self.pooling, self.pooling_temperature = pooling, float(pooling_temperature)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((self.weight_rows(), self.in_features), **factory))
        #: the scale was left to its default (solved for the head's margin)
        self.scale_is_default = scale is None
        if self.has_scale:
            if scale is None:
                scale = MF.heuristic_scale(self.out_features, default_margin or MF.NO_MARGIN())
            register_scale(self, scale, trainable_scale, device, dtype)

    def weight_rows(self) -> int:
        """How many rows of class weights this module holds: ``C·K`` (a sharded form: its block's)."""
        return self.out_features * self.num_sub_centers

    def options(self) -> dict[str, Any]:
        """The constructor's arguments after ``in_features`` and ``out_features`` that rebuild this head: its
        hyper-parameters, with the initial value of every tensor it keeps (the scale, per-class margins). The current
        state — weights, a trained scale or margins, running statistics — is in the ``state_dict``."""
        options: dict[str, Any] = {
            "num_sub_centers": self.num_sub_centers,
            "pooling": self.pooling,
            "pooling_temperature": self.pooling_temperature,
        }
        scale = getattr(self, "scale", None)
        if isinstance(scale, Tensor):
            options["scale"] = self.initial_values["scale"]
            if self.show_trainable:
                options["trainable_scale"] = scale.requires_grad
        return {**options, **self.head_options()}

    def initial(self, name: str) -> Any:
        """A hyper-parameter as the constructor took it: the initial value of a tensor the head keeps (a per-class
        margin, a learned one too), or the attribute itself (a float)."""
        return self.initial_values.get(name, getattr(self, name))

    def head_options(self) -> dict[str, Any]:
        """The head's own constructor arguments (its margin's), for :meth:`options`."""
        return {}

    def reset_parameters(self) -> None:
        """Draw the class weights anew and set every other parameter and buffer back to its initial value (see the
        class notes)."""
        # Gaussian rows point in uniformly random directions on the sphere (a uniform box, as in nn.Linear's
        # init, favours its diagonals); the norm is irrelevant after normalisation.
        nn.init.normal_(self.weight)
        restore_initial_values(self)

    def reset_running_stats(self) -> None:
        """Set the running statistics (``running_stats``) back to their initial values."""
        restore_initial_values(self, self.running_stats)

    def logit_scale(self) -> Tensor | float:
        """The factor between cosines and logits."""
        return self.scale

    def cosine(self, input: Tensor) -> Tensor:
        """The pooled cosines ``(*, C)``: :func:`mll.functional.cosine_logits` with the head's weights."""
        return MF.cosine_logits(
            input, self.weight, self.num_sub_centers, pooling=self.pooling,  # type: ignore[arg-type]
            pooling_temperature=self.pooling_temperature,
        )  # fmt: skip

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        """This training step's margin, after updating any running statistic from the batch. ``labels`` are checked
        (int64 class indices or soft targets); ``cosine`` is the dense path's ``(*, C)`` cosines, or None in
        :meth:`loss`, which never builds them."""
        return MF.NO_MARGIN()

    def check_labels(self, labels: Optional[Tensor], logits_shape: torch.Size | tuple[int, ...]) -> Optional[Tensor]:
        """Training-mode labels, checked (before anything changes state)."""
        if labels is None:
            if not self.needs_labels:
                return None
            raise ValueError(
                f"{type(self).__name__} needs labels in training mode to apply its margin: call head(input, labels) "
                "with class indices of shape (*) or soft targets of shape (*, C), or call head.eval() for inference"
            )
        labels = check_target(labels, torch.Size(logits_shape), name="labels")
        if not self.soft_targets and is_soft(labels):
            raise ValueError(
                f"{type(self).__name__} needs class indices (an integer tensor of shape (*)), not soft targets"
            )
        return labels

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        return self.logits(input, labels)

    def logits(self, input: Tensor, labels: Optional[Tensor], margin: Optional[MF.Margin] = None) -> Tensor:
        """The body of ``forward``: scaled cosines, with this step's margin in training mode (``margin``, when given,
        instead of :meth:`step_margin`'s)."""
        if not self.training:
            return self.cosine(input) * self.logit_scale()
        cosine, labels = self.agreed(lambda: self._cosine_and_labels(input, labels))
        if margin is None:
            margin = self.step_margin(input, labels, cosine)  # type: ignore[arg-type]
        if labels is None or margin.family is MF.NO_MARGIN:
            return cosine * self.logit_scale()
        return apply_margin(cosine, labels, margin, self.logit_scale())

    def _cosine_and_labels(self, input: Tensor, labels: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
        cosine = self.cosine(input)
        return cosine, self.check_labels(labels, cosine.shape)

    def agreed(self, check: Callable[[], T]) -> T:
        """``check()``, and — when a step shares statistics across ranks — the ranks' agreement on its outcome and on
        the head's sizes, so that a bad input on one rank raises the same error on every rank instead of leaving
        the others waiting in the statistics' collective."""
        if not self.shares_statistics:
            return check()
        sizes = {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "num_sub_centers": self.num_sub_centers,
        }
        return agreed(check, sizes, self.weight.device, self.group)

    def loss(
        self, input: Tensor, labels: Tensor, *, reduction: str = "mean", chunk_size: Optional[int] = None
    ) -> Tensor:
        """``F.cross_entropy(self(input, labels), labels, reduction=reduction)`` over class chunks, without the N×C
        logits (see :func:`mll.functional.margin_cross_entropy`); running statistics update as in a forward. Soft
        targets that require a gradient are refused (detach them, or differentiate the dense form above).

        A head with a regulariser (``regularized``: AdaM-Softmax, SoftTriple) adds ``regularizer()`` to every
        sample's loss, in training and eval mode: ``"none"`` gives ``ce_i + reg``, ``"mean"`` ``mean(ce) + reg``,
        ``"sum"`` ``sum(ce) + N·reg`` — the paper's objective."""
        return self.chunked_loss(input, labels, reduction, chunk_size)

    def chunked_loss(
        self, input: Tensor, labels: Tensor, reduction: str, chunk_size: Optional[int],
        margin: Optional[MF.Margin] = None,
    ) -> Tensor:  # fmt: skip
        """The body of ``loss``: every check first, then this step's margin (which may change state; ``margin``,
        when given, instead), then the chunked cross-entropy."""
        if not self.training:  # (read, most often: see read_only)
            target = self._loss_checks(input, labels, reduction, chunk_size)
            return read_only(lambda: self.loss_terms(input, target, MF.NO_MARGIN(), reduction, chunk_size))
        target = self.agreed(lambda: self._loss_checks(input, labels, reduction, chunk_size))
        # every check above ran before the first change of state here
        if margin is None:
            margin = self.step_margin(input, target, None)
        return self.loss_terms(input, target, margin, reduction, chunk_size)

    def _loss_checks(self, input: Tensor, labels: Tensor, reduction: str, chunk_size: Optional[int]) -> Tensor:
        check_features(input, self.weight, self.num_sub_centers)
        self.check_loss_reduction(reduction)
        check_chunk_size(chunk_size)
        shape = torch.Size((*input.shape[:-1], self.out_features))
        if labels is None:
            kinds = "class indices (*) or soft targets (*, C)" if self.plain_eval_loss else "class indices of shape (*)"
            raise ValueError(f"{type(self).__name__}.loss needs labels: {kinds}")
        if not self.training and self.plain_eval_loss:
            return check_target(labels, shape, name="labels")
        checked = self.check_labels(labels, shape)
        assert checked is not None
        return checked

    def check_loss_reduction(self, reduction: str) -> None:
        """``loss()``'s ``reduction``: ``"mean"``, ``"sum"`` or ``"none"``."""
        check_reduction(reduction)

    def loss_terms(
        self, input: Tensor, labels: Tensor, margin: MF.Margin, reduction: str, chunk_size: Optional[int]
    ) -> Tensor:
        """The chunked cross-entropy with ``margin``, plus the regulariser of a ``regularized`` head (heads with
        another objective replace this)."""
        ce = chunked_loss(
            input, self.weight, labels, self.logit_scale(), margin, self.num_sub_centers, self.pooling,
            self.pooling_temperature, chunk_size, reduction,
        )  # fmt: skip
        return plus_regularizer(ce, self, input, reduction) if self.regularized else ce

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"num_sub_centers={self.num_sub_centers}",
        ]
        scale = getattr(self, "scale", None)
        if isinstance(scale, Tensor):
            parts.append(f"scale={float_repr(scale, '.4g')}")
            if self.show_trainable:
                parts.append(f"trainable_scale={scale.requires_grad}")
        if self.pooling != "max":
            parts.append(f"pooling={self.pooling!r}, pooling_temperature={self.pooling_temperature}")
        return ", ".join([*parts, *self.extra_options()])

    def extra_options(self) -> list[str]:
        """The head's own hyper-parameters for ``extra_repr``."""
        return []


def agreed(check: Callable[[], T], sizes: dict[str, int], device: torch.device, group: Any = None) -> T:
    """Run ``check``; under ``torch.distributed`` every rank then learns whether any rank's check failed and whether
    ``sizes`` match, and all raise the same error or all go on
    (:func:`mll.functional._engine.agreement.agree_on_call`)."""
    problem: Optional[Exception] = None
    result: Any = None
    try:
        result = check()
    except (TypeError, ValueError) as error:
        problem = error
    agree_on_call(problem, sizes, device, group)
    return result
