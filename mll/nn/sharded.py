r"""Class-sharded heads: each rank holds one block of the class weights, the loss covers all classes exactly.

Model parallelism for the classifier, as in "Partial FC: Training 10 Million Identities on a Single Machine" (An et
al., ICCVW 2021, https://arxiv.org/abs/2010.05222), for every head of :mod:`mll.nn`: ``ShardedH`` takes ``H``'s
arguments, plus

- ``class_range`` (tuple of int, optional): ``(start, stop)``, this rank's block of classes; by default
  ``shard_bounds(out_features, world_size)[rank]`` (blocks may be uneven or empty; together they tile ``[0, C)``);
- ``group`` (ProcessGroup, optional): the ranks sharing the classes (the default group when None);
- ``sample_rate`` (float): Partial FC's fraction of each block kept per training step, in ``(0, 1]``;
- ``feature_grad_scale`` (float, optional): multiplier of the features' gradient; None: the world size;
- ``generator`` (torch.Generator, optional): for the class sampling (and ElasticFace's margin draws);
- ``sampling`` (str): ``"block"`` (Partial FC's share of each block) or ``"class"`` (the same sample on any number
  of ranks: a resume on another world size continues exactly), see ``mll/nn/_sampling.py``.

Every rank of ``group`` builds the head with the same arguments and keeps the weights of its block (per-class
margins and running statistics are small and kept whole on every rank). ``head.loss(features, labels)`` is the
dense head's ``loss()`` on the global batch — all ranks' samples in rank order — over all classes, in value and
gradients: every rank calls it, and backward, in every step; running statistics update as the dense head's would on
the global batch, identically on every rank. ``head(features)`` gives this rank's block of logits, ``(*, stop −
start)``: scaled cosines, no margin, no change of state. The maths, the traffic, the gradient contract and the
checks are those of :func:`mll.functional.sharded_margin_cross_entropy`.

With a data-parallel backbone, wrap the backbone, not the head, in ``DistributedDataParallel`` (DDP would average
different blocks); by default the features get ``world_size`` times their gradient, which DDP's average turns into
the exact gradient of the global-batch loss. ``from_dense(head)`` cuts this rank's block out of a single-process
head; each rank's ``state_dict`` records its block in ``class_range`` (and its random state), and
:func:`mll.nn.load_resharded` reads the ranks' files for any other number of ranks, or for the dense head.

Targets: class indices ``(*)``, soft targets ``(*, C)`` (their non-zero entries travel), or few-hot pairs
``(classes, weights)`` of shape ``(*, P)`` each, for heads whose statistics do not read the labels.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from mll import functional as MF
from mll.functional._engine.block import (
    all_reduce_log_sum_exp,
    block_soft_targets,
    gather_block_batch,
    own_share_sum,
    pair_class_sums,
)
from mll.functional._engine.chunks import target_cosines
from mll.functional._engine.distributed import all_gather_ints, all_reduce_sum, rank_and_world
from mll.functional.curricular import curricular_update_from_statistics, finite_sum_and_count
from mll.functional.margin import at_target
from mll.functional.npcface import npcface_sharded_statistics
from mll.functional.scale import adacos_statistics_chunked
from mll.nn._regularized import reduce_rows, shared_class_term, sum_grad_over_ranks
from mll.nn._sampling import sampling_kwargs
from mll.nn._sharded import Sharded, dense_state_dict, soft_target
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
from mll.nn.soft_triple import SoftTriple

__all__ = [
    "ShardedAdaCos", "ShardedAdaFace", "ShardedArcFace", "ShardedArcNegFace", "ShardedCircleLoss",
    "ShardedCombinedMargin", "ShardedCosFace",
    "ShardedCurricularFace", "ShardedDeepNCM", "ShardedElasticArcFace", "ShardedElasticCosFace", "ShardedFixedAdaCos",
    "ShardedMVSoftmax", "ShardedMagFace", "ShardedNPCFace", "ShardedNormalizedLinear", "ShardedProxyAnchor",
    "ShardedProxyNCAPlusPlus", "ShardedScaledNormalizedLinear", "ShardedScaledNormalizedLinearSqrt",
    "ShardedSphereFace", "dense_state_dict",
]  # fmt: skip


class ShardedNormalizedLinear(Sharded, NormalizedLinear):
    """Class-sharded :class:`mll.nn.NormalizedLinear` (see the module notes)."""


class ShardedScaledNormalizedLinear(Sharded, ScaledNormalizedLinear):
    """Class-sharded :class:`mll.nn.ScaledNormalizedLinear` (see the module notes)."""


class ShardedScaledNormalizedLinearSqrt(Sharded, ScaledNormalizedLinearSqrt):
    """Class-sharded :class:`mll.nn.ScaledNormalizedLinearSqrt` (see the module notes)."""


class ShardedFixedAdaCos(Sharded, FixedAdaCos):
    """Class-sharded :class:`mll.nn.FixedAdaCos` (see the module notes)."""


class ShardedCosFace(Sharded, CosFace):
    """Class-sharded :class:`mll.nn.CosFace` (see the module notes); per-class margins are kept whole on every
    rank and cut to the block at each step."""


class ShardedArcFace(Sharded, ArcFace):
    """Class-sharded :class:`mll.nn.ArcFace`, InsightFace's Partial FC (see the module notes)."""


class ShardedCombinedMargin(Sharded, CombinedMargin):
    """Class-sharded :class:`mll.nn.CombinedMargin` (see the module notes)."""


class ShardedSphereFace(Sharded, SphereFace):
    """Class-sharded :class:`mll.nn.SphereFace` (see the module notes); anneal ``lambda_`` on every rank alike."""


def _elastic_step_margin(head: Any, input: Tensor, labels: Any, cosine: Optional[Tensor]) -> MF.Margin:
    """ElasticFace's step, refusing the one cell the sharded loss lacks."""
    if isinstance(head.margin, Tensor) and soft_target(labels):
        raise ValueError(
            f"{type(head).__name__} with per-class margins takes class indices: with soft targets each sample "
            "would draw one margin per class, which the sharded loss does not take (use one mean margin)"
        )
    return head.family(head.sample_margins(input, labels))


def _global_sample_margins(head: Any, input: Tensor, labels: Any) -> Tensor:
    """This rank's rows of one draw over the global batch (all ranks' rows in rank order): every rank draws as
    many margins as the dense head would on the global batch, from its generator in the same state, and keeps its
    own rows, so the margins are the dense head's on any number of ranks and the generators stay in step."""
    rank, world = rank_and_world(head.group)
    lead = tuple(input.shape[:-1])
    n = math.prod(lead)
    sizes = [row[0] for row in all_gather_ints([n], input.device, head.group, world)]
    start, total = sum(sizes[:rank]), sum(sizes)
    spec = head.family.parameters[0]
    mean: Any = head.margin
    if isinstance(mean, Tensor):  # each sample's class mean on this rank's rows; any valid mean elsewhere
        mine = at_target(mean, torch.Size((*lead, head.out_features)), labels).reshape(n, 1)
        mean = torch.full((total, 1), spec.low, dtype=mine.dtype, device=mine.device)
        mean[start : start + n] = mine
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    draws = MF.elastic_margins(
        mean, head.std, (total, 1), bounds=(spec.low, spec.high), generator=head.generator, dtype=dtype,
        device=input.device,
    )  # fmt: skip
    return draws[start : start + n].reshape(*lead, 1)


class ShardedElasticArcFace(Sharded, ElasticArcFace):  # type: ignore[misc]  # forward: no margins= (block logits)
    """Class-sharded :class:`mll.nn.ElasticArcFace` (see the module notes). The margins are drawn over the global
    batch — every rank draws the dense head's number of margins from ``generator`` and keeps its own samples' — so
    with a generator in the same state on every rank (seed it alike; ``from_dense`` keeps the dense head's) the loss
    equals the dense head's for that generator state, on any number of ranks. Class sampling (``sample_rate < 1``)
    draws from a generator of each rank's own, seeded from ``generator`` at construction, so that the margins'
    generators stay in step. Per-class means take class indices (a per-sample, per-class draw is not sharded)."""

    step_margin = _elastic_step_margin
    sample_margins = _global_sample_margins


class ShardedElasticCosFace(Sharded, ElasticCosFace):  # type: ignore[misc]
    """Class-sharded :class:`mll.nn.ElasticCosFace` (see :class:`ShardedElasticArcFace`)."""

    step_margin = _elastic_step_margin
    sample_margins = _global_sample_margins


class ShardedAdaFace(Sharded, AdaFace):
    """Class-sharded :class:`mll.nn.AdaFace` (see the module notes): the norm statistics are gathered over the
    group, so every rank holds the single-process values of the global batch."""


class ShardedMagFace(Sharded, MagFace):
    """Class-sharded :class:`mll.nn.MagFace` (see the module notes): ``loss()`` adds ``lambda_g`` times the mean of
    the magnitude regulariser over the global batch (each rank's samples get their own share of its gradient)."""

    def loss_terms(
        self, input: Tensor, labels: Any, margin: MF.Margin, reduction: str, chunk_size: Optional[int]
    ) -> Tensor:
        ce = Sharded.loss_terms(self, input, labels, margin, reduction, chunk_size)
        a = input.norm(dim=-1)
        world = rank_and_world(self.group)[1]
        grad_scale = float(world) if self.feature_grad_scale is None else self.feature_grad_scale
        if a.requires_grad and grad_scale != 1.0:  # the features' gradient contract, as the cross-entropy's
            a.register_hook(lambda grad: grad * grad_scale)
        g = MF.magface_regularizer(a, lower=self.lower, upper=self.upper).to(ce.dtype)
        if reduction == "none":
            return ce + self.lambda_g * g
        total, count = own_share_sum(g, self.group)
        return ce + self.lambda_g * (total if reduction == "sum" else total / count.to(total.dtype))


__all__ += ["ShardedAdaMSoftmax", "ShardedLargeMarginSoftmax", "ShardedSoftTriple"]  # the zoo's heads (issue #14)


class ShardedAdaMSoftmax(Sharded, AdaMSoftmax):
    """Class-sharded :class:`mll.nn.AdaMSoftmax` (see the module notes): every rank keeps all C margins; each rank's
    loss differentiates its block's margins in the cross-entropy and its own samples' share of the regulariser, and
    backward sums the margins' gradient over the ranks, so that every rank holds the full, exact gradient (and,
    after the same optimizer step, the same margins)."""

    def step_margin(self, input: Tensor, labels: Any, cosine: Optional[Tensor]) -> MF.Margin:
        self.project_margins()
        return MF.ADAPTIVE(sum_grad_over_ranks(self.margin, self.group))

    def loss_terms(
        self, input: Tensor, labels: Any, margin: MF.Margin, reduction: str, chunk_size: Optional[int]
    ) -> Tensor:
        ce = Sharded.loss_terms(self, input, labels, margin, "none", chunk_size)
        # the margins of this step (their gradient summed over the ranks); in eval mode, wrapped here
        m = margin.params[0] if margin.family is MF.ADAPTIVE else sum_grad_over_ranks(self.margin, self.group)
        reg = MF.adaptive_margin_regularizer(m, lambda_=self.lambda_)  # type: ignore[arg-type]
        return reduce_rows(ce + reg.to(ce.dtype), reduction, self.group)


class ShardedSoftTriple(Sharded, SoftTriple):
    """Class-sharded :class:`mll.nn.SoftTriple` (see the module notes): the centre regulariser is a sum over classes,
    so each rank computes its block's part from its own rows and the ranks add the parts (one all-reduce); backward
    gives each block's rows the gradient of the global objective (every rank's rows carry the term)."""

    def loss_terms(
        self, input: Tensor, labels: Any, margin: MF.Margin, reduction: str, chunk_size: Optional[int]
    ) -> Tensor:
        ce = Sharded.loss_terms(self, input, labels, margin, "none", chunk_size)
        part = self.center_term(self.weight, self.out_features).to(ce.dtype)
        term = shared_class_term(part, ce.numel(), self.group).reshape(ce.shape)
        return reduce_rows(ce + term, reduction, self.group)


class ShardedLargeMarginSoftmax(Sharded, LargeMarginSoftmax):
    """Class-sharded :class:`mll.nn.LargeMarginSoftmax` (see the module notes): the sharded loss on the features and
    the block's weights as they are (``normalized=False``); the feature norms travel with the features (their
    gradient comes home), the block's weight norms stay on the rank. ``head(x)`` gives the block's ``scale·x·Wᵀ``."""

    def loss_terms(
        self, input: Tensor, labels: Any, margin: MF.Margin, reduction: str, chunk_size: Optional[int]
    ) -> Tensor:
        return MF.sharded_margin_cross_entropy(
            input, self.weight, labels, class_start=self.class_start, num_classes=self.out_features,
            scale=self.logit_scale(), margin=self.block_margin(margin), num_sub_centers=1, **sampling_kwargs(self),
            chunk_size=chunk_size, feature_grad_scale=self.feature_grad_scale, group=self.group,
            reduction=reduction, normalized=False,  # type: ignore[arg-type]
        )  # fmt: skip


class ShardedCurricularFace(Sharded, CurricularFace):
    """Class-sharded :class:`mll.nn.CurricularFace` (see the module notes): each rank sums the target cosines of
    the global batch's samples whose class is in its block, the ranks add them, and ``t`` is updated from the
    global mean on every rank alike."""

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        with torch.no_grad():
            x, classes, _ = gather_block_batch(input, labels, self.out_features, self.class_start, _width(self),
                                                 self.group)  # fmt: skip
            local = classes[:, :1]
            cos = target_cosines(MF.normalize(x), self.weight, local.clamp(min=0), self.num_sub_centers, _tau(self))
            total, count = finite_sum_and_count(torch.where(local >= 0, cos, torch.nan))
            stats = all_reduce_sum(torch.stack([total, count.to(total.dtype)]), self.group)
            self.t.copy_(curricular_update_from_statistics(self.t, stats[0], stats[1], self.decay))
        return MF.CURRICULAR(self.margin, self.t.clone())  # this step's t: the next call updates the buffer


class ShardedMVSoftmax(Sharded, MVSoftmax):
    """Class-sharded :class:`mll.nn.MVSoftmax` (see the module notes): each row's target cosine comes from the rank
    that owns its class, so every rank raises the same mis-classified logits."""


class ShardedNPCFace(Sharded, NPCFace):
    """Class-sharded :class:`mll.nn.NPCFace` (see the module notes): each rank adds its block's hard negatives of
    the global batch's rows, the ranks sum them, and every row's positive margin is the single-process one."""

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        mean = npcface_sharded_statistics(
            input, labels, self.weight, self.margin, num_classes=self.out_features, class_start=self.class_start,
            num_sub_centers=self.num_sub_centers, tau=_tau(self), group=self.group,
        )  # fmt: skip
        return MF.NPC(self.margin, self.m0 + self.m1 * mean, self.t, self.a)


class ShardedArcNegFace(Sharded, ArcNegFace):
    """Class-sharded :class:`mll.nn.ArcNegFace` (see the module notes): each row's target cosine comes from the rank
    that owns its class, so every rank re-weights its block's negatives as the dense head does."""


class ShardedCircleLoss(Sharded, CircleLoss):
    """Class-sharded :class:`mll.nn.CircleLoss` (see the module notes): its logits are elementwise, so each block
    shapes its own; the softmax over the blocks is the sharded loss's."""


class ShardedAdaCos(Sharded, AdaCos):
    """Class-sharded :class:`mll.nn.AdaCos` (see the module notes): each rank computes its block's part of every
    sample's non-target log-sum-exp and target angle on the global batch, the ranks combine them, and the scale is
    updated from the global statistics on every rank alike (labels are required: the label-free form needs the
    predicted class over all blocks)."""

    def step_margin(self, input: Tensor, labels: Any, cosine: Optional[Tensor]) -> MF.Margin:
        with torch.no_grad():
            width = _width(self)
            x, classes, weights = gather_block_batch(input, labels, self.out_features, self.class_start, width,
                                                       self.group)  # fmt: skip
            dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            target = block_soft_targets(classes, weights, width, dtype) if soft_target(labels) else classes[:, 0]
            log_b, theta = adacos_statistics_chunked(
                x, self.weight, target, self.scale, num_sub_centers=self.num_sub_centers, tau=_tau(self)
            )
            log_b = all_reduce_log_sum_exp(log_b, self.group)
            theta = all_reduce_sum(theta, self.group)
            if log_b.numel() > 0:  # an empty global batch keeps the scale
                new = MF.adacos_reduce(log_b, theta, min_scale=self.min_scale)
                self.scale.copy_(torch.where(torch.isnan(new), self.scale, new.to(self.scale.dtype)))
        return MF.NO_MARGIN()


def _width(head: Any) -> int:
    return int(head.class_stop - head.class_start)


def _tau(head: Any) -> Optional[float]:
    return float(head.pooling_temperature) if head.pooling == "soft" and head.num_sub_centers > 1 else None


class ShardedDeepNCM(Sharded, DeepNCM):
    """Class-sharded :class:`mll.nn.DeepNCM` (see the module notes): each rank holds the means of its block, and
    updates them from the global batch's samples of its classes after the loss, as the dense head does. No
    sub-centers, margin or trainable scale (as :class:`mll.nn.DeepNCM`)."""

    soft_targets = True

    def rows(self) -> Tensor:
        return self.means

    def logit_scale(self) -> Tensor:
        return self.scale

    def forward(self, input: Tensor, labels: Any = None) -> Tensor:
        if labels is not None:
            return Sharded.forward(self, input, labels)
        return MF.ncm_logits(input, self.means, self.scale)

    def loss(self, input: Tensor, labels: Any, *, reduction: str = "mean", chunk_size: Optional[int] = None) -> Tensor:
        """The cross-entropy over all classes of the means before this step, then (training) the means' update."""
        return self.chunked_loss(input, labels, reduction, chunk_size)

    def step_margin(self, input: Tensor, labels: Any, cosine: Optional[Tensor]) -> MF.Margin:
        return MF.NO_MARGIN()

    def loss_terms(
        self, input: Tensor, labels: Any, margin: MF.Margin, reduction: str, chunk_size: Optional[int]
    ) -> Tensor:
        means = self.means.clone() if self.training else self.means  # backward needs the means of the forward
        loss = MF.sharded_margin_cross_entropy(
            input, means.to(input.dtype), labels, class_start=self.class_start, num_classes=self.out_features,
            scale=self.scale, **sampling_kwargs(self), chunk_size=chunk_size,
            feature_grad_scale=self.feature_grad_scale, group=self.group, reduction=reduction,  # type: ignore[arg-type]
        )  # fmt: skip
        if self.training:
            with torch.no_grad():
                width = _width(self)
                x, classes, weights = gather_block_batch(input, labels, self.out_features, self.class_start, width,
                                                           self.group)  # fmt: skip
                sums, counts = pair_class_sums(x, classes, weights, width)
                self.means.copy_(MF.ncm_update_from_statistics(self.means, sums, counts, self.alpha))
        return loss


class ShardedProxyNCAPlusPlus(Sharded, ProxyNCAPlusPlus):
    """Class-sharded :class:`mll.nn.ProxyNCAPlusPlus` (see the module notes): its loss is a softmax cross-entropy
    over the proxies, which the sharded cross-entropy computes exactly."""


class ShardedProxyAnchor(Sharded, ProxyAnchor):
    """Class-sharded :class:`mll.nn.ProxyAnchor` (see the module notes): each rank gathers the global batch,
    computes its block's positive and negative log-sums and its count of classes with a positive, and the ranks add
    the three numbers (:func:`mll.functional.sharded_proxy_anchor_loss`). No class sampling: ``sample_rate`` must
    be 1 (the negative term averages over every proxy)."""

    def __init__(self, *args: Any, sample_rate: float = 1.0, **kwargs: Any) -> None:
        if sample_rate != 1.0:
            raise ValueError(
                "ShardedProxyAnchor samples no classes: sample_rate must be 1.0 (its negative term averages over "
                f"every proxy), but got {sample_rate!r}"
            )
        super().__init__(*args, sample_rate=sample_rate, **kwargs)

    def loss_terms(
        self, input: Tensor, labels: Any, margin: MF.Margin, reduction: str, chunk_size: Optional[int]
    ) -> Tensor:
        return MF.sharded_proxy_anchor_loss(
            input, self.weight, labels, class_start=self.class_start, num_classes=self.out_features,
            alpha=self.alpha, delta=self.delta, num_sub_centers=self.num_sub_centers, pooling=self.pooling,
            pooling_temperature=self.pooling_temperature, chunk_size=chunk_size,
            feature_grad_scale=self.feature_grad_scale, group=self.group,
        )  # fmt: skip
