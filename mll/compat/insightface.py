r"""InsightFace's margin and Partial FC on mll's sharded kernel: ``CombinedMarginLoss`` and ``PartialFC_V2``.

InsightFace's ``recognition/arcface_torch`` trains with ``PartialFC_V2(CombinedMarginLoss(64, m1, m2, m3), …)``
under ``torchrun``: rank r keeps the weights of its block of classes, ``loss = module(local_embeddings,
local_labels)`` is the cross-entropy over all classes. This module gives the same two classes — their constructor
arguments, units (radians), call, attributes, class blocks per rank and ``state_dict`` keys, so that their per-rank
checkpoints load unchanged — computed by :func:`mll.functional.sharded_margin_cross_entropy`.

**Their numbers by default.** InsightFace's loss differs from the exact margin cross-entropy in three ways, and
this module reproduces each (``docs/from-insightface.md`` measures them):

* its ArcFace passes the gradient straight through the margin (∂ logit / ∂ cos = s for the target too) and keeps
  cos(θ + m) past θ > π − m (:data:`mll.functional.insightface.INSIGHTFACE_ARC`);
* its cross-entropy clamps each sample's target probability at 1e-30 before the log, so a sample's loss is at most
  −ln(1e-30) = 69.08, while its gradient ignores the clamp (softmax − one-hot, for every sample);
* its Partial FC keeps ``int(sample_rate · block)`` classes of each block (all positives, if there are more).

``CombinedMarginLoss(..., exact=True)`` is the switch to mll's numbers: :data:`mll.functional.ARC`'s exact
gradient and monotone fix, no clamp — the loss and gradients of :class:`mll.ShardedArcFace` (or
:class:`mll.ShardedCosFace`) with the same scale and margin.
"""

from __future__ import annotations

import math
import numbers
import warnings
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mll import functional as MF
from mll.functional.insightface import ARC_FILTERED, COS_FILTERED, INSIGHTFACE_ARC, INSIGHTFACE_ARC_FILTERED
from mll.nn._head import agreed

__all__ = ["CombinedMarginLoss", "PartialFC_V2"]

#: InsightFace's floor on the target probability: a sample's loss is at most −ln(1e-30) ≈ 69.08
TARGET_PROBABILITY_FLOOR = 1e-30


class CombinedMarginLoss(nn.Module):
    r"""InsightFace's ``CombinedMarginLoss``: cosines in, scaled logits with the margin out.

    Two of its forms exist (as in InsightFace): **ArcFace** (``m1 = 1, m3 = 0``), target logit
    :math:`s\cos(\theta + m_2)`, and **CosFace** (``m3 > 0``), :math:`s(\cos\theta - m_3)`; every other logit is
    :math:`s\cos\theta`. With ``interclass_filtering_threshold > 0`` the non-target cosines above it become 0 first.
    Like InsightFace, ``m1`` and ``m2`` are ignored when ``m3 > 0`` (a warning says so); ``m1 != 1`` with ``m3 = 0``
    is refused (InsightFace raises a bare ``RuntimeError``; the general combined margin is :class:`mll.CombinedMargin`).

    By default its ArcFace's gradient passes straight through the margin and the target logit keeps
    cos(θ + m₂) past θ > π − m₂, as InsightFace's; ``exact=True`` gives mll's :data:`mll.functional.ARC` (exact
    derivative, monotone past π − m₂), and makes :class:`PartialFC_V2` drop InsightFace's clamp of the target
    probability. CosFace's gradient is exact either way. Unlike InsightFace's, the input is not changed in place.

    Args:
        s (float): the scale (InsightFace's configs: 64).
        m1 (float): must be 1 unless ``m3 > 0`` (InsightFace's multiplicative angular margin, not implemented there).
        m2 (float): ArcFace's additive angular margin, radians in ``[0, π/2)`` (InsightFace's configs: 0.5).
        m3 (float): CosFace's additive cosine margin in ``[0, 1)`` (InsightFace's configs: 0.4 for CosFace).
        interclass_filtering_threshold (float): ``>= 0``; above 0, non-target cosines above it are set to 0.
        exact (bool): mll's exact margin and loss instead of InsightFace's numbers (keyword only).

    Shape:
        - logits: ``(N, B)`` cosines of N samples against a block of B classes (InsightFace: clamped to [−1, 1]).
        - labels: ``(N,)`` or ``(N, 1)`` block-local class indices, −1 where a sample's class is in another block.
        - output: ``(N, B)`` scaled logits.
    """

    def __init__(
        self, s: float, m1: float, m2: float, m3: float, interclass_filtering_threshold: float = 0,
        *, exact: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()
        threshold = interclass_filtering_threshold
        for name, value in (
            ("s", s),
            ("m1", m1),
            ("m2", m2),
            ("m3", m3),
            ("interclass_filtering_threshold", threshold),
        ):
            if not _is_real(value) or not math.isfinite(float(value)):
                raise TypeError(f"CombinedMarginLoss {name} must be a finite float, but got {value!r}")
        if s <= 0:
            raise ValueError(f"CombinedMarginLoss s must be a float > 0 (InsightFace's configs: 64), but got {s!r}")
        if not isinstance(exact, bool):
            raise TypeError(f"CombinedMarginLoss exact must be a bool, but got {type(exact).__name__}")
        self.s, self.m1, self.m2, self.m3 = float(s), float(m1), float(m2), float(m3)
        self.interclass_filtering_threshold = float(interclass_filtering_threshold)
        self.exact = exact
        if self.interclass_filtering_threshold < 0:
            raise ValueError(
                "CombinedMarginLoss interclass_filtering_threshold must be >= 0 (0: no filtering), but got "
                f"{interclass_filtering_threshold!r}"
            )
        if self.m3 > 0 and (self.m1 != 1.0 or self.m2 != 0.0):
            warnings.warn(
                f"CombinedMarginLoss(m1={m1}, m2={m2}, m3={m3}) is CosFace with margin m3: like InsightFace's, it "
                "ignores m1 and m2 when m3 > 0 (for the combined margin cos(m1·θ + m2) − m3 use mll.CombinedMargin)",
                UserWarning,
                stacklevel=2,
            )
        elif self.m3 <= 0 and (self.m1 != 1.0 or self.m3 < 0):
            raise ValueError(
                f"CombinedMarginLoss takes InsightFace's two forms, ArcFace (m1=1, m3=0) and CosFace (m3 > 0), but "
                f"got m1={m1}, m3={m3} (for the combined margin cos(m1·θ + m2) − m3 use mll.CombinedMargin)"
            )
        self.margin()  # the margin's range, checked here: ArcFace's m2 in radians, CosFace's m3 below 1
        # InsightFace's attributes, for code that reads them
        self.cos_m, self.sin_m = math.cos(self.m2), math.sin(self.m2)
        self.theta, self.sinmm = math.cos(math.pi - self.m2), math.sin(math.pi - self.m2) * self.m2
        self.easy_margin = False

    @property
    def arcface(self) -> bool:
        """Whether this is the ArcFace form (``m3 = 0``), else CosFace."""
        return self.m3 <= 0

    def margin(self) -> MF.Margin:
        """The margin as an mll :class:`mll.functional.Margin` (before the scale), for every path of the engine."""
        threshold = self.interclass_filtering_threshold
        try:
            if self.arcface:
                if threshold > 0:
                    return (ARC_FILTERED if self.exact else INSIGHTFACE_ARC_FILTERED)(self.m2, threshold)
                return (MF.ARC if self.exact else INSIGHTFACE_ARC)(self.m2)
            return COS_FILTERED(self.m3, threshold) if threshold > 0 else MF.COS(self.m3)
        except ValueError as error:
            name, unit = ("m2", " radians (0.5 rad = 28.6°)") if self.arcface else ("m3", "")
            raise ValueError(f"CombinedMarginLoss {name}{unit}: {error}") from None

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Scaled logits with the margin on the targets found in this block (see the class notes)."""
        if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point():
            raise ValueError(f"logits must be a floating-point tensor (N, B) of cosines, but got {_describe(logits)}")
        if not isinstance(labels, Tensor) or labels.is_floating_point() or labels.numel() != logits.shape[0]:
            raise ValueError(
                f"labels must be an integer tensor (N,) or (N, 1) with N = {logits.shape[0]} (−1: a class of another "
                f"block), but got {_describe(labels)}"
            )
        labels = labels.reshape(-1).long()
        width = logits.shape[1]
        if bool(((labels < -1) | (labels >= width)).any()):
            raise ValueError(f"labels must be in [0, {width}) or −1 (a class of another block)")
        margin = self.margin()
        here = labels >= 0
        if margin.family.negatives is not None:  # rows without a target here: every cosine is a non-target
            filtered = torch.where(logits > self.interclass_filtering_threshold, 0.0, logits)
            out = (filtered * self.s).to(logits.dtype)
        else:
            out = logits * self.s
        rows = here.nonzero().squeeze(1)
        if rows.numel() == 0:
            return out
        mine = MF.margin_logits(logits[rows], labels[rows], margin, scale=self.s)
        return out.index_put((rows,), mine)

    def extra_repr(self) -> str:
        threshold = self.interclass_filtering_threshold
        return (
            f"s={self.s:g}, m1={self.m1:g}, m2={self.m2:g}, m3={self.m3:g}"
            + (f", interclass_filtering_threshold={threshold:g}" if threshold > 0 else "")
            + (", exact=True" if self.exact else "")
        )


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _rank_and_world(group: Any) -> tuple[int, int]:
    """This process's rank in ``group`` and its size; ``(0, 1)`` without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("PartialFC_V2 group was given, but torch.distributed is not initialised")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"dtype {value.dtype}, shape {tuple(value.shape)}"
    return type(value).__name__


def as_combined_margin(margin_loss: object) -> CombinedMarginLoss:
    """Ours, or a peer's object with InsightFace's attributes (``s, m1, m2, m3`` — InsightFace's own
    ``CombinedMarginLoss``), read as ours (InsightFace's numbers)."""
    if isinstance(margin_loss, CombinedMarginLoss):
        return margin_loss
    if all(hasattr(margin_loss, name) for name in ("s", "m1", "m2", "m3")):
        get = margin_loss.__getattribute__
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # their object, their arguments: warned where they were given
            return CombinedMarginLoss(get("s"), get("m1"), get("m2"), get("m3"),
                                      getattr(margin_loss, "interclass_filtering_threshold", 0))  # fmt: skip
    raise TypeError(
        "margin_loss must be a CombinedMarginLoss (mll.compat.insightface's, or InsightFace's: an object with s, m1, "
        f"m2, m3), but got {type(margin_loss).__name__}: other margins are mll's heads (mll.ShardedArcFace, …)"
    )


class PartialFC_V2(nn.Module):
    """InsightFace's ``PartialFC_V2``: this rank's block of class weights, and ``loss = module(x, y)`` over all classes.

    Rank r of ``world`` holds the classes ``[class_start, class_start + num_local)`` of InsightFace's split (the
    first ``C mod world`` ranks one class more: :func:`mll.functional.shard_bounds`), in ``weight`` of shape
    ``(num_local, embedding_size)``, initialised as InsightFace's (normal, std 0.01). Its ``state_dict`` is
    ``{"weight"}`` (and, with ``sample_rate < 1``, ``sampling_generator``, the state of the rank's sampling stream,
    which InsightFace does not save), so InsightFace's per-rank checkpoints (``state_dict_softmax_fc``) load as they
    are; :func:`mll.compat.checkpoints.load_insightface_checkpoints` reads them for another number of ranks.

    ``module(local_embeddings, local_labels)`` — every rank, every step — returns the mean loss over the global
    batch, the same number on every rank; backward gives this rank's weights their gradient and its features
    ``world · ∂L/∂x`` (InsightFace's convention: DDP's average on the backbone makes it the gradient of L).
    The numbers are InsightFace's (see the module notes) unless the margin is ``CombinedMarginLoss(...,
    exact=True)``. As InsightFace's module it samples and applies the margin in eval mode too. Ranks may hold
    different numbers of samples, none included (InsightFace's asserts equal batches).

    Args:
        margin_loss (CombinedMarginLoss): the margin (ours, or InsightFace's own object).
        embedding_size (int): ``d``.
        num_classes (int): ``C``, over all ranks.
        sample_rate (float): Partial FC's share of each block kept per step, in ``(0, 1]``: every positive class of
            the global batch plus random others, ``int(sample_rate · num_local)`` in all.
        fp16 (bool): the cosines' GEMM under float16 autocast (on the embeddings' device), as InsightFace's.
        group (ProcessGroup, optional): the ranks sharing the classes (keyword only; the default group when None).
        generator (torch.Generator, optional): seeds this rank's sampling stream (keyword only; InsightFace draws
            from the global generator, which a checkpoint does not hold).
        device (torch.device, optional): of ``weight`` (keyword only).
        dtype (torch.dtype, optional): of ``weight`` (keyword only).
    """

    _version = 2

    def __init__(
        self, margin_loss: Any, embedding_size: int, num_classes: int, sample_rate: float = 1.0, fp16: bool = False,
        *, group: Any = None, generator: Optional[torch.Generator] = None, device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        super().__init__()
        self.margin_softmax = as_combined_margin(margin_loss)
        for name, value in (("embedding_size", embedding_size), ("num_classes", num_classes)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"PartialFC_V2 {name} must be an integer >= 1, but got {value!r}")
        if not _is_real(sample_rate) or not 0 < sample_rate <= 1:
            raise ValueError(f"PartialFC_V2 sample_rate must be a float in (0, 1], but got {sample_rate!r}")
        if not isinstance(fp16, bool):
            raise TypeError(f"PartialFC_V2 fp16 must be a bool, but got {fp16!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"PartialFC_V2 generator must be a torch.Generator, but got {type(generator).__name__}")
        self.rank, self.world_size = _rank_and_world(group)
        self.group = group
        self.embedding_size, self.num_classes = int(embedding_size), int(num_classes)
        self.sample_rate, self.fp16 = float(sample_rate), fp16
        if self.num_classes < self.world_size:
            raise ValueError(
                f"PartialFC_V2 num_classes={num_classes} must be at least the world size {self.world_size} "
                "(InsightFace's split gives every rank a class)"
            )
        self.class_start, stop = MF.shard_bounds(self.num_classes, self.world_size)[self.rank]
        self.num_local = stop - self.class_start
        self.num_sample = int(self.sample_rate * self.num_local)
        self.weight = nn.Parameter(torch.empty(self.num_local, self.embedding_size, device=device, dtype=dtype))
        self.reset_parameters()
        self.sampling_generator: Optional[torch.Generator] = None
        if self.sample_rate < 1:  # on the CPU, as InsightFace's draws (then moved to the weights' device)
            seed = int(torch.randint(0, 2**62, (), generator=generator, device="cpu" if generator is None else
                                     generator.device))  # fmt: skip
            self.sampling_generator = torch.Generator().manual_seed(seed + self.rank)
        self.register_state_dict_post_hook(_save_sampling)
        self.register_load_state_dict_pre_hook(_load_sampling)

    def reset_parameters(self) -> None:
        """Draw the weights anew, as InsightFace's: normal, mean 0, std 0.01."""
        with torch.no_grad():
            self.weight.normal_(0.0, 0.01)

    def sample(self, positive: Tensor) -> Tensor:
        """This step's kept classes of the block, InsightFace's rule: the positives, plus random others up to
        ``num_sample`` (uniform scores, positives first, the highest kept), sorted block-local indices."""
        kept = positive.nonzero().squeeze(1)
        if self.num_sample < kept.numel():
            return kept
        generator = self.sampling_generator
        device = generator.device if generator is not None else positive.device
        score = torch.rand(positive.numel(), generator=generator, device=device).to(positive.device)
        score[positive] = 2.0
        return score.topk(self.num_sample).indices.sort().values

    def forward(self, local_embeddings: Tensor, local_labels: Tensor) -> Tensor:
        """The mean loss over the global batch (see the class notes)."""
        device = local_embeddings.device if isinstance(local_embeddings, Tensor) else self.weight.device
        labels = local_labels.reshape(-1) if isinstance(local_labels, Tensor) else local_labels
        # the one setting the sharded loss's own agreement cannot see (every rank raises, or none)
        agreed(lambda: None, {"PartialFC_V2 fp16": int(self.fp16)}, device, self.group)
        margin = self.margin_softmax.margin()
        exact = self.margin_softmax.exact
        with torch.autocast(device.type, dtype=torch.float16, enabled=self.fp16):
            losses = MF.sharded_margin_cross_entropy(
                local_embeddings, self.weight, labels, class_start=self.class_start, num_classes=self.num_classes,
                scale=self.margin_softmax.s, margin=margin, sample_rate=self.sample_rate, sampler=self.sample,
                group=self.group, reduction="mean" if exact else "none",
            )  # fmt: skip
        if exact:
            return losses
        return floored_mean(losses, self.group)

    def extra_repr(self) -> str:
        return (
            f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, "
            f"class_range=[{self.class_start}, {self.class_start + self.num_local}), sample_rate={self.sample_rate}, "
            f"fp16={self.fp16}"
        )


def floored_mean(losses: Tensor, group: Any = None) -> Tensor:
    """InsightFace's loss from this rank's samples' exact losses: each capped at −ln(1e-30) (its clamp of the target
    probability) in value only — the gradient is that of the exact losses, as InsightFace's backward ignores the
    clamp — averaged over the global batch; the same number on every rank, and each rank backpropagates its own
    samples' share."""
    cap = -torch.log(torch.tensor(TARGET_PROBABILITY_FLOOR, dtype=losses.dtype, device=losses.device))
    capped = losses.detach().clamp(max=cap)
    totals = torch.stack([capped.sum(), torch.tensor(float(losses.numel()), dtype=losses.dtype, device=losses.device)])
    if _rank_and_world(group)[1] > 1:
        dist.all_reduce(totals, group=group)
    count = totals[1]
    share = losses.sum() / count  # this rank's samples' part of the mean: its gradient
    return share + (totals[0] / count - share).detach()


def _save_sampling(module: Any, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    if module.sampling_generator is not None:
        state_dict[prefix + "sampling_generator"] = module.sampling_generator.get_state()


def _load_sampling(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    state = state_dict.pop(prefix + "sampling_generator", None)  # InsightFace's checkpoints have none
    if state is not None and module.sampling_generator is not None:
        module.sampling_generator.set_state(state.detach().to("cpu", torch.uint8))
