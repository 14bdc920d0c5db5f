"""Class-sharded heads: each rank holds one block of the class weights, the loss covers all classes exactly.

Model parallelism for the classifier (InsightFace's Partial FC) on ``torch.distributed``. The maths, the traffic
and the gradient contract are those of :func:`mll.functional.sharded_margin_cross_entropy`; the modules own the
block of weights and the scale, and carry their block's class range in their ``state_dict`` so that the
per-rank checkpoints reassemble into a single-process head (:func:`dense_state_dict`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from mll import functional as MF
from mll.functional import _internal as I
from mll.nn._head import _upgrade_legacy_scale
from mll.nn.linear import ScaledNormalizedLinear
from mll.nn.margin import ArcFace, CosFace

__all__ = ["ShardedArcFace", "ShardedCosFace", "ShardedScaledNormalizedLinear", "dense_state_dict"]


def _init_shard(
    module: Any,
    in_features: int,
    out_features: int,
    num_sub_centers: int,
    *,
    class_range: Optional[tuple[int, int]],
    group: Any,
    sample_rate: float,
    feature_grad_scale: Optional[float],
    generator: Optional[torch.Generator],
    scale: Optional[float],
    default_scale: Callable[[], float],
    trainable_scale: bool,
    device: Any,
    dtype: Any,
) -> None:
    """Validate and store the hyper-parameters, pick the block, create its ``weight``, ``class_range`` and ``scale``."""
    I.check_in_features(in_features)
    I.check_num_classes(out_features)
    I.check_num_sub_centers(num_sub_centers)
    I.check_sample_rate(sample_rate)
    I.check_feature_grad_scale(feature_grad_scale)
    I.check_generator(generator)
    if not isinstance(trainable_scale, bool):
        raise TypeError(f"trainable_scale must be a bool, but got {type(trainable_scale).__name__}")
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
    module.in_features, module.out_features, module.num_sub_centers = (
        int(in_features),
        int(out_features),
        int(num_sub_centers),
    )
    module.class_start, module.class_stop = start, stop
    module.sample_rate = float(sample_rate)
    module.feature_grad_scale = None if feature_grad_scale is None else float(feature_grad_scale)
    module.group, module.generator = group, generator
    factory = {"device": device, "dtype": dtype}
    module.weight = nn.Parameter(torch.empty(((stop - start) * int(num_sub_centers), int(in_features)), **factory))
    # saved with the weights: a checkpoint says which classes it holds
    module.register_buffer("class_range", torch.tensor([start, stop], dtype=torch.int64, device=device))
    scale = default_scale() if scale is None else scale
    I.check_scale(scale)
    value = torch.tensor(float(scale), dtype=dtype or torch.get_default_dtype(), device=device)
    if trainable_scale:
        module.scale = nn.Parameter(value)
    else:
        module.register_buffer("scale", value)
    module._register_load_state_dict_pre_hook(_upgrade_legacy_scale, with_module=True)
    module._register_load_state_dict_pre_hook(_check_class_range, with_module=True)


def _check_class_range(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    saved = state_dict.get(prefix + "class_range")
    if isinstance(saved, Tensor) and tuple(saved.tolist()) != (module.class_start, module.class_stop):
        start, stop = saved.tolist()
        raise ValueError(
            f"this shard holds classes [{module.class_start}, {module.class_stop}), but the state_dict holds classes "
            f"[{start}, {stop}): load each rank's own checkpoint, or re-shard with dense_state_dict and from_dense"
        )


def _sharded_loss(
    module: Any,
    input: Tensor,
    labels: Any,
    reduction: str,
    chunk_size: Optional[int],
    margin_type: str,
    margin: float = 0.0,
    easy_margin: bool = False,
) -> Tensor:
    """A sharded head's loss: its margin and sampling in training mode; in eval mode neither, like the dense heads."""
    training = module.training
    return MF.sharded_margin_cross_entropy(
        input, module.weight, labels, class_start=module.class_start, num_classes=module.out_features,
        scale=module.scale, margin=margin, margin_type=margin_type if training else "none",
        easy_margin=easy_margin, num_sub_centers=module.num_sub_centers,
        sample_rate=module.sample_rate if training else 1.0, generator=module.generator, chunk_size=chunk_size,
        feature_grad_scale=module.feature_grad_scale, group=module.group, reduction=reduction,  # type: ignore[arg-type]
    )  # fmt: skip


def _shard_repr(module: Any, *extra: str) -> str:
    parts = [
        f"in_features={module.in_features}", f"out_features={module.out_features}",
        f"num_sub_centers={module.num_sub_centers}", f"scale={float(module.scale.detach()):.4g}",
        f"trainable_scale={module.scale.requires_grad}", *extra,
        f"class_range=[{module.class_start}, {module.class_stop})", f"sample_rate={module.sample_rate}",
    ]  # fmt: skip
    if module.feature_grad_scale is not None:
        parts.append(f"feature_grad_scale={module.feature_grad_scale}")
    return ", ".join(parts)


def _shard_kwargs(head: Any, expected: type, name: str) -> dict[str, Any]:
    """The shared constructor arguments of a sharded head built from a dense one."""
    if not isinstance(head, expected):
        raise TypeError(f"{name}.from_dense needs a {expected.__name__}, but got {type(head).__name__}")
    dense: Any = head  # isinstance against a type variable narrows to object
    scale = dense.scale
    return {
        "in_features": dense.in_features,
        "out_features": dense.out_features,
        "num_sub_centers": dense.num_sub_centers,
        "scale": float(scale.detach()),
        "trainable_scale": scale.requires_grad,
        "device": dense.weight.device,
        "dtype": dense.weight.dtype,
    }


def _copy_block(shard: Any, head: Any) -> nn.Module:
    k = shard.num_sub_centers
    with torch.no_grad():
        shard.weight.copy_(head.weight[shard.class_start * k : shard.class_stop * k])
    return shard


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


class ShardedScaledNormalizedLinear(nn.Module):
    r"""Class-sharded :class:`mll.nn.ScaledNormalizedLinear`: the softmax of :math:`s\cos\theta` over all classes.

    As :class:`ShardedArcFace` (construction, loss, checkpoints, DDP), without a margin: see
    :func:`mll.functional.sharded_margin_cross_entropy` with ``margin_type="none"``. The default scale is
    :func:`mll.functional.heuristic_scale` of ``out_features`` (√2·ln(C − 1)).
    """

    in_features: int
    out_features: int
    num_sub_centers: int
    class_start: int
    class_stop: int
    weight: nn.Parameter
    scale: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_sub_centers: int = 1,
        scale: Optional[float] = None,
        trainable_scale: bool = False,
        *,
        sample_rate: float = 1.0,
        class_range: Optional[tuple[int, int]] = None,
        group: Any = None,
        feature_grad_scale: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _init_shard(
            self, in_features, out_features, num_sub_centers, class_range=class_range, group=group,
            sample_rate=sample_rate, feature_grad_scale=feature_grad_scale, generator=generator, scale=scale,
            default_scale=lambda: MF.heuristic_scale(out_features), trainable_scale=trainable_scale,
            device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)

    def forward(self, input: Tensor, labels: Any) -> Tensor:
        return self.loss(input, labels)

    def loss(self, input: Tensor, labels: Any, *, reduction: str = "mean", chunk_size: Optional[int] = None) -> Tensor:
        """The loss over all classes; see :func:`mll.functional.sharded_margin_cross_entropy`."""
        return _sharded_loss(self, input, labels, reduction, chunk_size, "none")

    def extra_repr(self) -> str:
        return _shard_repr(self)

    @classmethod
    def from_dense(
        cls, head: ScaledNormalizedLinear, *, class_range: Optional[tuple[int, int]] = None, **kwargs: Any
    ) -> ShardedScaledNormalizedLinear:
        """This rank's block of a single-process ``ScaledNormalizedLinear`` (weights copied; keyword arguments as
        the constructor's: ``group``, ``sample_rate``, ``feature_grad_scale``, ``generator``)."""
        shard = cls(**_shard_kwargs(head, ScaledNormalizedLinear, cls.__name__), class_range=class_range, **kwargs)
        return _copy_block(shard, head)  # type: ignore[return-value]


class ShardedCosFace(nn.Module):
    r"""Class-sharded :class:`mll.nn.CosFace`: :math:`s(\cos\theta_y - m)` on the target, over all ranks' classes.

    As :class:`ShardedArcFace` (construction, loss, checkpoints, DDP), with CosFace's margin ``m`` in ``[0, 1)``
    (default 0.5, as :class:`mll.nn.CosFace`): see :func:`mll.functional.sharded_margin_cross_entropy` with
    ``margin_type="cos"``.
    """

    in_features: int
    out_features: int
    num_sub_centers: int
    class_start: int
    class_stop: int
    weight: nn.Parameter
    scale: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_sub_centers: int = 1,
        scale: Optional[float] = None,
        trainable_scale: bool = False,
        margin: float = 0.5,
        *,
        sample_rate: float = 1.0,
        class_range: Optional[tuple[int, int]] = None,
        group: Any = None,
        feature_grad_scale: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        MF.COS.parameters[0].check(margin, "CosFace")
        self.margin = float(margin)
        _init_shard(
            self, in_features, out_features, num_sub_centers, class_range=class_range, group=group,
            sample_rate=sample_rate, feature_grad_scale=feature_grad_scale, generator=generator, scale=scale,
            default_scale=lambda: MF.heuristic_scale(out_features, self.margin, margin_type="cos"),
            trainable_scale=trainable_scale, device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)

    def forward(self, input: Tensor, labels: Any) -> Tensor:
        return self.loss(input, labels)

    def loss(self, input: Tensor, labels: Any, *, reduction: str = "mean", chunk_size: Optional[int] = None) -> Tensor:
        """The loss over all classes; see :func:`mll.functional.sharded_margin_cross_entropy`."""
        return _sharded_loss(self, input, labels, reduction, chunk_size, "cos", self.margin)

    def extra_repr(self) -> str:
        return _shard_repr(self, f"margin={self.margin}")

    @classmethod
    def from_dense(
        cls, head: CosFace, *, class_range: Optional[tuple[int, int]] = None, **kwargs: Any
    ) -> ShardedCosFace:
        """This rank's block of a single-process ``CosFace`` (weights copied; keyword arguments as the
        constructor's: ``group``, ``sample_rate``, ``feature_grad_scale``, ``generator``)."""
        args = _shard_kwargs(head, CosFace, cls.__name__)
        if isinstance(head.margin, Tensor):
            raise ValueError(f"{cls.__name__} takes one margin for all classes; per-class margins are not sharded yet")
        shard = cls(**args, margin=head.margin, class_range=class_range, **kwargs)
        return _copy_block(shard, head)  # type: ignore[return-value]


class ShardedArcFace(nn.Module):
    r"""Class-sharded :class:`mll.nn.ArcFace`: :math:`s\cos(\theta_y + m)` on the target, over all ranks' classes.

    Model parallelism for the classifier, as in "Partial FC: Training 10 Million Identities on a Single Machine"
    (An et al., ICCVW 2021, https://arxiv.org/abs/2010.05222). Every rank of ``group`` (the default group when
    None) builds the head with the same arguments and keeps only the weights of its block of classes,
    ``shard_bounds(out_features, world_size)[rank]`` unless ``class_range`` says otherwise (blocks may be uneven or
    empty; together they must tile ``[0, out_features)``). Calling the head returns the **loss** over all classes,
    not logits (those are spread over the ranks): ``loss = head(features, labels)``, the same as
    ``head.loss(features, labels)``. Every rank calls it, and backward, in every step. The maths, the traffic and
    the gradients are those of :func:`mll.functional.sharded_margin_cross_entropy` (``margin_type="arc"``);
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
        - output: ``()``; ``loss(..., reduction="none")``: ``(*)``, this rank's samples
    """

    in_features: int
    out_features: int
    num_sub_centers: int
    class_start: int
    class_stop: int
    weight: nn.Parameter
    scale: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_sub_centers: int = 1,
        scale: Optional[float] = None,
        trainable_scale: bool = False,
        margin: float = 0.5,
        easy_margin: bool = False,
        *,
        sample_rate: float = 1.0,
        class_range: Optional[tuple[int, int]] = None,
        group: Any = None,
        feature_grad_scale: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        MF.ARC.parameters[0].check(margin, "ArcFace")
        self.margin, self.easy_margin = float(margin), bool(easy_margin)
        _init_shard(
            self, in_features, out_features, num_sub_centers, class_range=class_range, group=group,
            sample_rate=sample_rate, feature_grad_scale=feature_grad_scale, generator=generator, scale=scale,
            default_scale=lambda: MF.heuristic_scale(out_features, self.margin, margin_type="arc"),
            trainable_scale=trainable_scale, device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)

    def forward(self, input: Tensor, labels: Any) -> Tensor:
        return self.loss(input, labels)

    def loss(self, input: Tensor, labels: Any, *, reduction: str = "mean", chunk_size: Optional[int] = None) -> Tensor:
        """The loss over all classes; see :func:`mll.functional.sharded_margin_cross_entropy`."""
        return _sharded_loss(self, input, labels, reduction, chunk_size, "arc", self.margin, self.easy_margin)

    def extra_repr(self) -> str:
        return _shard_repr(self, f"margin={self.margin}", f"easy_margin={self.easy_margin}")

    @classmethod
    def from_dense(
        cls, head: ArcFace, *, class_range: Optional[tuple[int, int]] = None, **kwargs: Any
    ) -> ShardedArcFace:
        """This rank's block of a single-process ``ArcFace`` (weights copied; keyword arguments as the
        constructor's: ``group``, ``sample_rate``, ``feature_grad_scale``, ``generator``)."""
        args = _shard_kwargs(head, ArcFace, cls.__name__)
        if isinstance(head.margin, Tensor):
            raise ValueError(f"{cls.__name__} takes one margin for all classes; per-class margins are not sharded yet")
        shard = cls(**args, margin=head.margin, easy_margin=head.easy_margin, class_range=class_range, **kwargs)
        return _copy_block(shard, head)  # type: ignore[return-value]
