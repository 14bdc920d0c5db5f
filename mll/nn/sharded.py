"""Class-sharded heads: each rank holds one block of the class weights, the loss covers all classes exactly.

Model parallelism for the classifier (InsightFace's Partial FC) on ``torch.distributed``. The maths, the traffic
and the gradient contract are those of :func:`mll.functional.sharded_margin_cross_entropy`; the modules own the
block of weights and the scale, and carry their block's class range in their ``state_dict`` so that the
per-rank checkpoints reassemble into a single-process head (:func:`dense_state_dict`). One shallow base,
:class:`_Sharded`, holds what the three share; each is its constructor and its margin.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import torch
from torch import Tensor, nn

from mll import functional as MF
from mll.functional import _internal as I
from mll.nn._head import Head, register_scale
from mll.nn.linear import ScaledNormalizedLinear
from mll.nn.margin import ArcFace, CosFace

__all__ = ["ShardedArcFace", "ShardedCosFace", "ShardedScaledNormalizedLinear", "dense_state_dict"]


class _Sharded(nn.Module):
    """What every class-sharded head shares: the block, its weights and scale, the loss, ``from_dense``."""

    in_features: int
    out_features: int
    num_sub_centers: int
    class_start: int
    class_stop: int
    weight: nn.Parameter
    scale: Tensor
    #: the single-process head this one shards
    dense: type[Head]

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int, scale: Optional[float],
        trainable_scale: bool, default_margin: MF.Margin, *, class_range: Optional[tuple[int, int]], group: Any,
        sample_rate: float, feature_grad_scale: Optional[float], generator: Optional[torch.Generator], device: Any,
        dtype: Any,
    ) -> None:  # fmt: skip
        super().__init__()
        I.check_in_features(in_features)
        I.check_num_classes(out_features)
        I.check_num_sub_centers(num_sub_centers)
        I.check_sample_rate(sample_rate)
        I.check_feature_grad_scale(feature_grad_scale)
        I.check_generator(generator)
        if class_range is None:
            rank, world = I.rank_and_world(group)
            class_range = MF.shard_bounds(out_features, world)[rank]
        elif not (
            isinstance(class_range, (tuple, list))
            and len(class_range) == 2
            and all(I._is_int(v) for v in class_range)
            and 0 <= class_range[0] <= class_range[1] <= out_features
        ):
            raise ValueError(
                f"class_range must be a pair (start, stop) of integers with 0 <= start <= stop <= out_features="
                f"{out_features}, but got {class_range!r}"
            )
        start, stop = (int(v) for v in class_range)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.num_sub_centers = int(num_sub_centers)
        self.class_start, self.class_stop = start, stop
        self.sample_rate = float(sample_rate)
        self.feature_grad_scale = None if feature_grad_scale is None else float(feature_grad_scale)
        self.group, self.generator = group, generator
        rows = (stop - start) * self.num_sub_centers
        self.weight = nn.Parameter(torch.empty((rows, self.in_features), device=device, dtype=dtype))
        # saved with the weights: a checkpoint says which classes it holds
        self.register_buffer("class_range", torch.tensor([start, stop], dtype=torch.int64, device=device))
        default = MF.heuristic_scale(self.out_features, default_margin) if scale is None else scale
        register_scale(self, default, trainable_scale, device, dtype)
        self._register_load_state_dict_pre_hook(_check_class_range, with_module=True)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)

    def bound_margin(self) -> MF.Margin:
        """The training-mode margin (the same on every rank)."""
        return MF.NO_MARGIN()

    def forward(self, input: Tensor, labels: Any = None) -> Tensor:
        """This rank's block of scaled cosines ``(*, stop − start)`` (no margin; the logits of the other classes live
        on the other ranks). Called with labels it returns :meth:`loss`, as before 0.2 (deprecated)."""
        if labels is not None:
            warnings.warn(
                f"{type(self).__name__}(input, labels) returning the loss is deprecated and will be removed in 0.3: "
                "call head.loss(input, labels); head(input) gives this rank's block of logits",
                DeprecationWarning,
                stacklevel=2,
            )
            return self.loss(input, labels)
        cosine = MF.cosine_logits(input, self.weight, self.num_sub_centers)
        return cosine * self.scale

    def loss(self, input: Tensor, labels: Any, *, reduction: str = "mean", chunk_size: Optional[int] = None) -> Tensor:
        """The loss over all classes: its margin and sampling in training mode, neither in eval mode, like the dense
        heads; see :func:`mll.functional.sharded_margin_cross_entropy`."""
        training = self.training
        return MF.sharded_margin_cross_entropy(
            input, self.weight, labels, class_start=self.class_start, num_classes=self.out_features,
            scale=self.scale, margin=self.bound_margin() if training else MF.NO_MARGIN(),
            num_sub_centers=self.num_sub_centers, sample_rate=self.sample_rate if training else 1.0,
            generator=self.generator, chunk_size=chunk_size, feature_grad_scale=self.feature_grad_scale,
            group=self.group, reduction=reduction,  # type: ignore[arg-type]
        )  # fmt: skip

    def extra_options(self) -> list[str]:
        return []

    def extra_repr(self) -> str:
        parts = [
            f"in_features={self.in_features}", f"out_features={self.out_features}",
            f"num_sub_centers={self.num_sub_centers}", f"scale={float(self.scale.detach()):.4g}",
            f"trainable_scale={self.scale.requires_grad}", *self.extra_options(),
            f"class_range=[{self.class_start}, {self.class_stop})", f"sample_rate={self.sample_rate}",
        ]  # fmt: skip
        if self.feature_grad_scale is not None:
            parts.append(f"feature_grad_scale={self.feature_grad_scale}")
        return ", ".join(parts)

    @classmethod
    def dense_options(cls, head: Any) -> dict[str, Any]:
        """The head's own constructor arguments (its margin), for :meth:`from_dense`."""
        return {}

    @classmethod
    def from_dense(cls, head: Head, *, class_range: Optional[tuple[int, int]] = None, **kwargs: Any) -> Any:
        """This rank's block of a single-process head (weights copied; keyword arguments as the constructor's:
        ``group``, ``sample_rate``, ``feature_grad_scale``, ``generator``)."""
        if not isinstance(head, cls.dense):
            raise TypeError(f"{cls.__name__}.from_dense needs a {cls.dense.__name__}, but got {type(head).__name__}")
        dense: Any = head
        shard = cls(
            dense.in_features, dense.out_features, dense.num_sub_centers, scale=float(dense.scale.detach()),
            trainable_scale=dense.scale.requires_grad, class_range=class_range, device=dense.weight.device,
            dtype=dense.weight.dtype, **cls.dense_options(dense), **kwargs,
        )  # fmt: skip
        k = shard.num_sub_centers
        with torch.no_grad():
            shard.weight.copy_(dense.weight[shard.class_start * k : shard.class_stop * k])
        return shard


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
            f"[{start}, {stop}): load each rank's own checkpoint, or re-shard with dense_state_dict and from_dense"
        )


def _no_per_class(cls: type, value: Any) -> Any:
    if isinstance(value, Tensor):
        raise ValueError(f"{cls.__name__} takes one margin for all classes; per-class margins are not sharded yet")
    return value


def dense_state_dict(shards: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    """The ``state_dict`` of the single-process head, assembled from every rank's sharded head ``state_dict``.

    Checks that the shards' class ranges tile ``[0, C)`` (in any order; empty blocks allowed), agree on
    ``in_features`` and sub-centers, and hold the same scale; the weights are concatenated in class order.
    Load the result into the dense head with the same hyper-parameters (``ShardedArcFace`` → ``ArcFace`` …)::

        shards = [torch.load(f"head-{r}.pt") for r in range(world)]
        head = mll.ArcFace(in_features, num_classes, margin=0.5)
        head.load_state_dict(mll.nn.dense_state_dict(shards))

    Args:
        shards (sequence of state_dict): one per rank, as saved from ``head.state_dict()``.

    Returns:
        dict: ``{"weight": Tensor[C*K, d], "scale": Tensor}``.
    """
    if len(shards) == 0:
        raise ValueError("dense_state_dict needs at least one shard state_dict, but got none")
    for index, shard in enumerate(shards):
        missing = [key for key in ("weight", "scale", "class_range") if key not in shard]
        if missing:
            raise ValueError(f"shard {index} lacks {missing}: pass the state_dicts of Sharded* heads")
    order = sorted(range(len(shards)), key=lambda i: tuple(shards[i]["class_range"].tolist()))
    ranges = [tuple(int(v) for v in shards[i]["class_range"].tolist()) for i in order]
    filled = [r for r in ranges if r[1] > r[0]]
    num_classes = filled[-1][1] if filled else 0
    if not filled or filled[0][0] != 0 or any(a[1] != b[0] for a, b in zip(filled, filled[1:])):
        raise ValueError(f"the shards' class ranges must tile [0, C) without gaps or overlaps, but got {ranges}")
    widths = {shards[i]["weight"].shape[1] for i in order}
    if len(widths) != 1:
        raise ValueError(f"the shards must have the same in_features, but got {sorted(widths)}")
    per_class = {shards[i]["weight"].shape[0] // (r[1] - r[0]) for i, r in zip(order, ranges) if r[1] > r[0]}
    rows_ok = all(shards[i]["weight"].shape[0] == (r[1] - r[0]) * min(per_class) for i, r in zip(order, ranges))
    if len(per_class) != 1 or not rows_ok:
        raise ValueError("the shards must have the same number of sub-centers (weight rows per class)")
    scale = shards[order[0]]["scale"]
    for i in order:
        if not torch.equal(shards[i]["scale"], scale):
            raise ValueError(
                f"the shards must hold the same scale, but got {[float(shards[j]['scale']) for j in order]}"
            )
    weight = torch.cat([shards[i]["weight"] for i in order])
    assert weight.shape[0] == num_classes * min(per_class)
    return {"weight": weight, "scale": scale.clone()}


class ShardedScaledNormalizedLinear(_Sharded):
    r"""Class-sharded :class:`mll.nn.ScaledNormalizedLinear`: the softmax of :math:`s\cos\theta` over all classes.

    As :class:`ShardedArcFace` (construction, loss, checkpoints, DDP), without a margin. The default scale is
    :func:`mll.functional.heuristic_scale` of ``out_features`` (√2·ln(C − 1)).
    """

    dense = ScaledNormalizedLinear

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None,
        trainable_scale: bool = False, *, sample_rate: float = 1.0, class_range: Optional[tuple[int, int]] = None,
        group: Any = None, feature_grad_scale: Optional[float] = None, generator: Optional[torch.Generator] = None,
        device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        super().__init__(
            in_features, out_features, num_sub_centers, scale, trainable_scale, MF.NO_MARGIN(),
            class_range=class_range, group=group, sample_rate=sample_rate, feature_grad_scale=feature_grad_scale,
            generator=generator, device=device, dtype=dtype,
        )  # fmt: skip


class ShardedCosFace(_Sharded):
    r"""Class-sharded :class:`mll.nn.CosFace`: :math:`s(\cos\theta_y - m)` on the target, over all ranks' classes.

    As :class:`ShardedArcFace` (construction, loss, checkpoints, DDP), with CosFace's margin ``m`` in ``[0, 1)``
    (default 0.5, as :class:`mll.nn.CosFace`).
    """

    dense = CosFace

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None,
        trainable_scale: bool = False, margin: float = 0.5, *, sample_rate: float = 1.0,
        class_range: Optional[tuple[int, int]] = None, group: Any = None, feature_grad_scale: Optional[float] = None,
        generator: Optional[torch.Generator] = None, device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        self_margin = MF.COS(_no_per_class(type(self), margin))
        super().__init__(
            in_features, out_features, num_sub_centers, scale, trainable_scale, self_margin,
            class_range=class_range, group=group, sample_rate=sample_rate, feature_grad_scale=feature_grad_scale,
            generator=generator, device=device, dtype=dtype,
        )  # fmt: skip
        self.margin = float(margin)

    def bound_margin(self) -> MF.Margin:
        return MF.COS(self.margin)

    def extra_options(self) -> list[str]:
        return [f"margin={self.margin}"]

    @classmethod
    def dense_options(cls, head: Any) -> dict[str, Any]:
        return {"margin": _no_per_class(cls, head.margin)}


class ShardedArcFace(_Sharded):
    r"""Class-sharded :class:`mll.nn.ArcFace`: :math:`s\cos(\theta_y + m)` on the target, over all ranks' classes.

    Model parallelism for the classifier, as in "Partial FC: Training 10 Million Identities on a Single Machine"
    (An et al., ICCVW 2021, https://arxiv.org/abs/2010.05222). Every rank of ``group`` (the default group when
    None) builds the head with the same arguments and keeps only the weights of its block of classes,
    ``shard_bounds(out_features, world_size)[rank]`` unless ``class_range`` says otherwise (blocks may be uneven or
    empty; together they must tile ``[0, out_features)``). ``head.loss(features, labels)`` is the
    loss over all classes; every rank calls it, and backward, in every step. ``head(features)`` gives this rank's
    block of scaled cosines ``(*, stop − start)``, no margin (the logits are spread over the ranks). The maths, the
    traffic and the gradients are those of :func:`mll.functional.sharded_margin_cross_entropy` (``margin_type="arc"``);
    :func:`mll.functional.arc_margin` has the numerics of the margin.

    In training mode the margin applies and, with ``sample_rate < 1``, Partial FC's class sampling; in eval mode
    neither (the exact softmax loss of scaled cosines). Without a process group (or in a group of one) the head
    holds every class and its loss equals the dense head's ``loss()``.

    With a data-parallel backbone, wrap the backbone, not the head, in ``DistributedDataParallel`` (DDP would
    average different blocks). By default the features get ``world_size`` times their gradient, which DDP's
    average turns into the exact gradient of the global-batch loss (see ``feature_grad_scale``). Optimise the
    head's parameters like any others; a trainable scale gets the same gradient on every rank.

    Checkpoints: each rank saves ``head.state_dict()`` (it records the block in ``class_range``);
    :func:`mll.nn.dense_state_dict` reassembles them for a single-process :class:`mll.nn.ArcFace`, and
    :meth:`from_dense` cuts a rank's block out of one (to resume on another number of ranks).

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``, over all ranks.
        num_sub_centers (int): sub-centers per class ``K``.
        scale (float, optional): ``s > 0``; ``None`` uses :func:`mll.functional.heuristic_scale` for ``C`` classes
            and this margin.
        trainable_scale (bool): learn ``s``.
        margin (float): ``m`` in radians, in ``[0, π/2)`` (default 0.5).
        easy_margin (bool): apply the margin only where ``cos θ > 0``.
        sample_rate (float): Partial FC's fraction of each block used per step, in ``(0, 1]`` (1: every class).
        class_range (tuple of int, optional): ``(start, stop)``, this rank's block; by default from the group.
        group (ProcessGroup, optional): the ranks sharing the classes.
        feature_grad_scale (float, optional): multiplier of the features' gradient; None: the world size.
        generator (torch.Generator, optional): for the class sampling, on the weights' device.

    Attributes:
        weight (Tensor[(stop − start)*K, d]): row ``(c − start)*K + k`` is sub-center k of class c.
        class_range (Tensor[2] of int64): ``(start, stop)``, a buffer, saved in the ``state_dict``; also
            ``class_start`` and ``class_stop`` as ints.
        scale (Tensor): ``s``, a buffer or (trainable) a Parameter.

    Shape:
        - input: ``(*, d)``; labels: ``(*)`` class indices, ``(*, C)`` soft targets, or a pair
          ``(classes, weights)`` of shape ``(*, P)`` each (few-hot soft targets)
        - ``head(input)``: ``(*, stop − start)``, this rank's block of logits
        - ``head.loss(input, labels)``: ``()``; with ``reduction="none"``: ``(*)``, this rank's samples
    """

    dense = ArcFace

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None,
        trainable_scale: bool = False, margin: float = 0.5, easy_margin: bool = False, *,
        sample_rate: float = 1.0, class_range: Optional[tuple[int, int]] = None, group: Any = None,
        feature_grad_scale: Optional[float] = None, generator: Optional[torch.Generator] = None, device: Any = None,
        dtype: Any = None,
    ) -> None:  # fmt: skip
        self_margin = MF.ARC(_no_per_class(type(self), margin))
        super().__init__(
            in_features, out_features, num_sub_centers, scale, trainable_scale, self_margin,
            class_range=class_range, group=group, sample_rate=sample_rate, feature_grad_scale=feature_grad_scale,
            generator=generator, device=device, dtype=dtype,
        )  # fmt: skip
        self.margin, self.easy_margin = float(margin), bool(easy_margin)

    def bound_margin(self) -> MF.Margin:
        return (MF.ARC_EASY if self.easy_margin else MF.ARC)(self.margin)

    def extra_options(self) -> list[str]:
        return [f"margin={self.margin}", f"easy_margin={self.easy_margin}"]

    @classmethod
    def dense_options(cls, head: Any) -> dict[str, Any]:
        return {"margin": _no_per_class(cls, head.margin), "easy_margin": head.easy_margin}
