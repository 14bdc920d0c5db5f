"""The shared body of the class-sharded heads: a head's maths on one rank's block of classes.

``ShardedH`` is ``H`` with two changes, made once here for every head: its ``weight`` holds only the rows of the
block ``[class_start, class_stop)``, and its loss is :func:`mll.functional.sharded_margin_cross_entropy` — the chunk
kernel with two all-reduces — with the margin that ``H.step_margin`` gives. So a sharded head is its dense head's
constructor, hyper-parameters, margin and checks, inherited (one mixin before the dense class in the bases); only a
head whose running statistic needs every class (AdaCos, CurricularFace) says how its block's share is computed.
Hyper-parameters — per-class margins included — and running statistics are small and replicated on every rank;
the weights are the only per-class state that is split.

Why a mixin, where the style guide prefers flat modules: the alternative is fifteen hand-written sharded classes,
each repeating its dense head's constructor, checks and margin — the "dozen copies of the same constructor" a shallow
shared piece is allowed to remove (as ``_NormBase`` does for the norm layers). It stays shallow: ``Sharded`` is not
a base of any dense head and has no base of its own besides the head it is mixed into, so a sharded head is one
level above its dense head, never a chain; and ``isinstance(ShardedArcFace(...), ArcFace)`` holds because a sharded
ArcFace *is* an ArcFace — the same maths on a block — not an unrelated head reusing code (0.1.6's AdaCos ⊂ CosFace).
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from mll import functional as MF
from mll.functional._engine.agreement import agree_on_call, call_report, dtype_code
from mll.functional._engine.checks import (
    check_chunk_size,
    check_feature_grad_scale,
    check_features,
    check_generator,
    check_pair,
    check_reduction,
    check_sample_rate,
    is_int,
)
from mll.functional._engine.distributed import rank_and_world
from mll.functional.chunked import read_only
from mll.nn._sampling import (
    RANDOM_STATE_KEYS,
    advance_sampling,
    agreed_sampling,
    check_sampling,
    follow_device,
    init_sampling,
    load_random_state,
    sampling_kwargs,
    save_random_state,
)
from mll.nn._state import keep_initial

if TYPE_CHECKING:  # the mixin always comes before a head: type-check it as one
    from mll.nn._head import Head as _Base
else:
    _Base = object

__all__ = ["Sharded", "dense_state_dict"]

#: state_dict entries split by class (rows of the block, K per class); every other entry is replicated
PER_CLASS = ("weight", "means")


class Sharded(_Base):
    """Mixin before a dense head class: ``class ShardedArcFace(Sharded, ArcFace)``. See :mod:`mll.nn.sharded`."""

    class_start: int
    class_stop: int
    #: the single-process head this one shards: the class after ``Sharded`` in the bases
    dense: type[Any]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if Sharded in cls.__bases__ and "dense" not in vars(cls):
            cls.dense = cls.__bases__[cls.__bases__.index(Sharded) + 1]

    def __init__(
        self, *args: Any, class_range: Optional[tuple[int, int]] = None, group: Any = None,
        sample_rate: float = 1.0, feature_grad_scale: Optional[float] = None,
        generator: Optional[torch.Generator] = None, sampling: str = "block", **kwargs: Any,
    ) -> None:  # fmt: skip
        check_sample_rate(sample_rate)
        check_feature_grad_scale(feature_grad_scale)
        check_generator(generator)
        check_sampling(sampling)
        rank_and_world(group)  # a group without torch.distributed is an error here, not at the first step
        self.requested_range, self.group = class_range, group  # read by weight_rows, during the dense __init__
        draws = "generator" in inspect.signature(self.dense).parameters
        if draws:
            kwargs["generator"] = generator  # ElasticFace's margins, drawn alike on every rank
        super().__init__(*args, **kwargs)
        self.sample_rate = float(sample_rate)
        self.feature_grad_scale = None if feature_grad_scale is None else float(feature_grad_scale)
        init_sampling(self, sampling, generator, draws, self.rows().device, rank_and_world(group)[0])
        # saved with the weights: a checkpoint says which classes it holds
        block = torch.tensor([self.class_start, self.class_stop], dtype=torch.int64, device="cpu")
        self.register_buffer("class_range", block.to(self.rows().device))
        keep_initial(self, "class_range", block)
        self._register_load_state_dict_pre_hook(_check_class_range, with_module=True)
        self.register_load_state_dict_pre_hook(load_random_state)
        self.register_state_dict_post_hook(save_random_state)

    def rows(self) -> Tensor:
        """The block's per-class rows (the weights; DeepNCM's class means)."""
        return self.weight

    def _apply(self, fn: Any, recurse: bool = True) -> Any:  # .to(), .cuda(), …: the sampling stream follows
        out = super()._apply(fn, recurse)
        follow_device(self)
        return out

    def weight_rows(self) -> int:
        """The block's rows: ``(class_stop − class_start)·K``; the block is resolved here, as the weight is made."""
        out_features, class_range = self.out_features, self.requested_range
        if class_range is None:
            rank, world = rank_and_world(self.group)
            class_range = MF.shard_bounds(out_features, world)[rank]
        elif not (
            isinstance(class_range, (tuple, list))
            and len(class_range) == 2
            and all(is_int(v) for v in class_range)
            and 0 <= class_range[0] <= class_range[1] <= out_features
        ):
            raise ValueError(
                f"class_range must be a pair (start, stop) of integers with 0 <= start <= stop <= out_features="
                f"{out_features}, but got {class_range!r}"
            )
        self.class_start, self.class_stop = (int(v) for v in class_range)
        return (self.class_stop - self.class_start) * self.num_sub_centers

    def forward(self, input: Tensor, labels: Any = None) -> Tensor:
        """This rank's block of logits ``(*, class_stop − class_start)``: scaled cosines, no margin, no change of
        state (the logits of the other classes live on the other ranks). Called with labels it returns
        :meth:`loss`, as before 0.2 (deprecated)."""
        if labels is not None:
            warnings.warn(
                f"{type(self).__name__}(input, labels) returning the loss is deprecated and will be removed in 0.3: "
                "call head.loss(input, labels); head(input) gives this rank's block of logits",
                DeprecationWarning,
                stacklevel=2,
            )
            return self.loss(input, labels)
        return self.cosine(input) * self.logit_scale()

    def chunked_loss(
        self, input: Tensor, labels: Any, reduction: str, chunk_size: Optional[int],
        margin: Optional[MF.Margin] = None,
    ) -> Tensor:  # fmt: skip
        """Every rank checks its call and the ranks agree (so that no rank is left waiting in a collective), then
        this step's margin and statistics, then the sharded loss."""
        problem: Optional[Exception] = None
        target: Any = None
        try:
            target = self._loss_checks(input, labels, reduction, chunk_size)
        except (TypeError, ValueError) as error:
            problem = error
        # everything the sharded loss's own agreement compares, before any statistic changes: a call that raises
        # changes no state, and no rank is left in a collective the others skip (train on one rank, eval on another)
        shared: dict[str, int | float] = {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "num_sub_centers": self.num_sub_centers,
            **self._agreed_options(),
            "training": int(self.training),
            "dtype": dtype_code(getattr(input, "dtype", None)),
            "soft": int(target is not None and soft_target(target)),
            **call_report(input, self.rows(), self.logit_scale(), reduction),
        }
        shared.update(agreed_sampling(self))
        agree_on_call(problem, shared, self.rows().device, self.group, (self.class_start, self.class_stop),
                        self.out_features)  # fmt: skip
        if not self.training:
            margin = MF.NO_MARGIN()
        elif margin is None:
            margin = self.step_margin(input, target, None)
        if self.training:
            out = self.loss_terms(input, target, margin, reduction, chunk_size)
        else:  # (every rank alike: the ranks agreed on the mode above; compiled, outside the graph, as the loss is)
            out = read_only(lambda: self.loss_terms(input, target, margin, reduction, chunk_size), eager=True)
        advance_sampling(self)
        return out

    def _agreed_options(self) -> dict[str, float]:
        """The constructor's numeric arguments, keyed as an error names them (a tensor or another object: nan): every
        rank must build its head alike. A margin argument is compared before the default scale that follows it."""
        head, options = type(self).__name__, self.options()
        follows = getattr(self, "scale_is_default", False)
        out: dict[str, float] = {}
        for key in sorted(options, key=lambda k: k == "scale"):  # the scale last
            value = options[key]
            title = f"{head} {key}"
            if follows and key == "scale":
                title = f"{head}'s default scale (it follows the margin arguments)"
            elif follows and ("margin" in key or key in ("m0", "m1", "m2", "m3")):
                title += " (the default scale follows it)"
            out[title] = float(value) if isinstance(value, (int, float)) else math.nan
        return out

    def _loss_checks(self, input: Tensor, labels: Any, reduction: str, chunk_size: Optional[int]) -> Any:
        if not isinstance(labels, (tuple, list)):
            return super()._loss_checks(input, labels, reduction, chunk_size)
        name = type(self).__name__
        if self.training and not self.soft_targets:
            raise ValueError(
                f"{name}.loss needs class indices (*) in training mode, not few-hot pairs (classes, weights)"
            )
        check_features(input, self.rows(), self.num_sub_centers)
        check_reduction(reduction)
        check_chunk_size(chunk_size)
        classes, weights = check_pair(labels, tuple(input.shape[:-1]), self.out_features)
        return classes, weights

    def loss_terms(
        self, input: Tensor, labels: Any, margin: MF.Margin, reduction: str, chunk_size: Optional[int]
    ) -> Tensor:
        """The sharded cross-entropy with this step's margin, its per-class parameters cut to the block."""
        return MF.sharded_margin_cross_entropy(
            input, self.weight, labels, class_start=self.class_start, num_classes=self.out_features,
            scale=self.logit_scale(), margin=self.block_margin(margin),
            num_sub_centers=self.num_sub_centers, pooling=self.pooling,
            pooling_temperature=self.pooling_temperature, **sampling_kwargs(self), chunk_size=chunk_size,
            feature_grad_scale=self.feature_grad_scale, group=self.group, reduction=reduction,  # type: ignore[arg-type]
        )  # fmt: skip

    def block_margin(self, margin: MF.Margin) -> MF.Margin:
        """``margin`` with its per-class parameters ``(C,)`` cut to this block's ``(B,)``."""
        c, start, stop = self.out_features, self.class_start, self.class_stop
        params = tuple(
            p[start:stop] if isinstance(p, Tensor) and p.dim() == 1 and p.shape[0] == c else p for p in margin.params
        )
        return MF.Margin(margin.family, params)

    def extra_repr(self) -> str:
        parts = [
            super().extra_repr(),
            f"class_range=[{self.class_start}, {self.class_stop})",
            f"sample_rate={self.sample_rate}",
        ]
        if self.sampling != "block":
            parts.append(f"sampling={self.sampling!r}")
        if self.feature_grad_scale is not None:
            parts.append(f"feature_grad_scale={self.feature_grad_scale}")
        return ", ".join(parts)

    @classmethod
    def from_dense(cls, head: Any, *, class_range: Optional[tuple[int, int]] = None, **kwargs: Any) -> Any:
        """This rank's block of a single-process head: its hyper-parameters, running statistics and the block's
        weights, copied. Keyword arguments as the constructor's (``group``, ``sample_rate``, ``feature_grad_scale``,
        ``generator``)."""
        dense = cls.dense
        if not isinstance(head, dense) or isinstance(head, Sharded):
            raise TypeError(
                f"{cls.__name__}.from_dense needs a single-process {dense.__name__}, but got {type(head).__name__} "
                "(a sharded head's blocks reassemble with mll.nn.dense_state_dict first)"
            )
        weight = head.weight if hasattr(head, "weight") else head.means
        options = {**head.options(), **kwargs}
        shard = cls(
            head.in_features, head.out_features, class_range=class_range, device=weight.device, dtype=weight.dtype,
            **options,
        )  # fmt: skip
        k = head.num_sub_centers
        block = block_state(head.state_dict(), shard.class_start, shard.class_stop, k, shard.get_buffer("class_range"))
        shard.load_state_dict(block)
        return shard


def soft_target(target: Any) -> bool:
    """Whether a checked target is soft: dense ``(*, C)`` or a few-hot pair, rather than class indices."""
    return isinstance(target, (tuple, list)) or target.is_floating_point()


def block_state(state: Mapping[str, Tensor], start: int, stop: int, k: int, class_range: Tensor) -> dict[str, Tensor]:
    """A dense head's ``state_dict`` cut to the block ``[start, stop)`` (K rows per class) of a sharded one."""
    out = dict(state)
    for key in PER_CLASS:
        if key in out:
            out[key] = out[key][start * k : stop * k]
    out["class_range"] = class_range
    return out


def _check_class_range(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    saved = state_dict.get(prefix + "class_range")
    if not isinstance(saved, Tensor):
        return
    if saved.shape != (2,):
        raise ValueError(
            f"the state_dict's class_range must be a pair (start, stop), but got shape {tuple(saved.shape)}"
        )
    if tuple(saved.tolist()) != (module.class_start, module.class_stop):
        start, stop = saved.tolist()
        raise ValueError(
            f"this shard holds classes [{module.class_start}, {module.class_stop}), but the state_dict holds classes "
            f"[{start}, {stop}): load each rank's own checkpoint, or re-shard with mll.nn.load_resharded"
        )


def dense_state_dict(shards: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The ``state_dict`` of the single-process head, assembled from every rank's sharded head ``state_dict``.

    Checks that the shards' class ranges tile ``[0, C)`` (in any order; empty blocks allowed) and agree on
    ``in_features`` and sub-centers; the per-class rows (``weight``, DeepNCM's ``means``) are concatenated in class
    order, and every other entry (the scale, per-class margins, running statistics) must be the same on every shard
    and is taken once; the random state (the class sample's, ElasticFace's generator) is left out, as a dense head
    keeps none. Load the result into the dense head with the same hyper-parameters (``ShardedArcFace`` →
    ``ArcFace`` …)::

        shards = [torch.load(f"head-{r}.pt") for r in range(world)]
        head = mll.ArcFace(in_features, num_classes, margin=0.5)
        head.load_state_dict(mll.nn.dense_state_dict(shards))

    It holds every shard and the whole C·K×d matrix in this process: for one process that wants the dense head.
    :func:`load_resharded` reads the same files into a dense head block by block (memory-mapped, no second copy of
    the matrix), and into the heads of any other number of ranks, each reading only its own rows.

    Args:
        shards (sequence of state_dict): one per rank, as saved from ``head.state_dict()``.

    Returns:
        dict: the dense head's ``state_dict`` (``weight`` of shape ``[C*K, d]``, ``scale``, …).
    """
    if len(shards) == 0:
        raise ValueError("dense_state_dict needs at least one shard state_dict, but got none")
    rows_key = next((key for key in PER_CLASS if key in shards[0]), "weight")
    for index, shard in enumerate(shards):
        missing = [key for key in (rows_key, "class_range") if key not in shard]
        if missing or set(shard) != set(shards[0]):
            raise ValueError(
                f"shard {index} lacks {missing or sorted(set(shards[0]) ^ set(shard))}: pass the state_dicts of "
                "one Sharded* head, one per rank"
            )
    order = sorted(range(len(shards)), key=lambda i: tuple(shards[i]["class_range"].tolist()))
    ranges = [tuple(int(v) for v in shards[i]["class_range"].tolist()) for i in order]
    filled = [r for r in ranges if r[1] > r[0]]
    if not filled or filled[0][0] != 0 or any(a[1] != b[0] for a, b in zip(filled, filled[1:])):
        raise ValueError(f"the shards' class ranges must tile [0, C) without gaps or overlaps, but got {ranges}")
    num_classes = filled[-1][1]
    widths = {shards[i][rows_key].shape[1] for i in order}
    if len(widths) != 1:
        raise ValueError(f"the shards must have the same in_features, but got {sorted(widths)}")
    per_class = {shards[i][rows_key].shape[0] // (r[1] - r[0]) for i, r in zip(order, ranges) if r[1] > r[0]}
    k = min(per_class)
    if len(per_class) != 1 or not all(shards[i][rows_key].shape[0] == (r[1] - r[0]) * k for i, r in zip(order, ranges)):
        raise ValueError("the shards must have the same number of sub-centers (weight rows per class)")
    out: dict[str, Tensor] = {}
    for key, first in shards[order[0]].items():
        if key == "class_range" or key in RANDOM_STATE_KEYS:
            continue
        if key == rows_key:
            out[key] = torch.cat([shards[i][key] for i in order])
            continue
        if not all(torch.equal(shards[i][key], first) for i in order):
            values = [shards[i][key].tolist() if shards[i][key].numel() <= 4 else "…" for i in order]
            raise ValueError(f"the shards must hold the same {key}, but got {values} (by class range)")
        out[key] = first.clone()
    assert out[rows_key].shape[0] == num_classes * k
    return out
