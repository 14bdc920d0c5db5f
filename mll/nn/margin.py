"""Heads with a margin on the target logit: CosFace, ArcFace, the combined margin, SphereFace, ElasticFace."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mll import functional as MF
from mll.functional._checks import check_margin_param, check_nonnegative, check_target, is_soft
from mll.functional.cosine import Pooling
from mll.functional.margins import (
    ARC_MARGIN_RANGE,
    COMBINED_M1_RANGE,
    COMBINED_M2_RANGE,
    COMBINED_M3_RANGE,
    COS_MARGIN_RANGE,
    SPHERE_MARGIN_RANGE,
    MarginParam,
    _arc_fn,
    _at_target,
    _combined_value_and_slope,
    _cos_fn,
    _sphere_value_and_slope,
    arc_margin_unchecked,
    check_lambda,
    combined_margin_unchecked,
    cos_margin_unchecked,
    sphere_margin_unchecked,
)
from mll.nn._common import (
    chunked_loss,
    chunked_loss_with,
    head_cosine,
    head_repr,
    init_head,
    margin_repr,
    register_margin,
    reset_class_weight,
    statistics_dtype,
    typical_margin,
)

__all__ = ["ArcFace", "CombinedMargin", "CosFace", "ElasticArcFace", "ElasticCosFace", "SphereFace"]


def _missing_labels(name: str) -> ValueError:
    return ValueError(
        f"{name} needs labels in training mode to apply its margin: call head(input, labels) with class "
        "indices of shape (*) or soft targets of shape (*, C), or call head.eval() for inference"
    )


def margin_inputs(module: nn.Module, input: Tensor, labels: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """A margin head's pooled cosines and its checked labels in training mode; ``(cosine, None)`` in eval mode,
    where labels are optional and ignored."""
    cosine = head_cosine(module, input)
    if not module.training:
        return cosine, None
    if labels is None:
        raise _missing_labels(type(module).__name__)
    return cosine, check_target(labels, cosine.shape, name="labels")


class CosFace(nn.Module):
    r"""Large margin cosine head: :math:`s(\cos\theta_y - m)` on the target, :math:`s\cos\theta_j` elsewhere.

    "CosFace: Large Margin Cosine Loss for Deep Face Recognition" (Wang et al., CVPR 2018,
    https://arxiv.org/abs/1801.09414). See :func:`mll.functional.cos_margin`. The margin applies in training
    mode; in eval mode the head returns plain scaled cosines and needs no labels.

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): sub-centers per class ``K``.
        pooling (str): how sub-centers pool: ``"max"`` (Sub-center ArcFace) or ``"soft"`` (SoftTriple).
        pooling_temperature (float): γ > 0 of soft pooling (see :func:`mll.functional.cosine_logits`).
        scale (float, optional): ``s > 0``; ``None`` uses :func:`mll.functional.heuristic_scale` for this margin.
        trainable_scale (bool): learn ``s``.
        margin (float or Tensor): ``m`` in ``[0, 1)`` (default 0.5, as in 0.1.6; the paper uses 0.35); a tensor of
            shape ``(C,)`` gives one margin per class (see :func:`mll.functional.dynamic_margins`), kept as a buffer.

    Shape:
        - input: ``(*, d)``; labels: ``(*)`` class indices or ``(*, C)`` soft targets
        - output: ``(*, C)``
    """

    in_features: int
    out_features: int
    num_sub_centers: int
    weight: nn.Parameter
    scale: Tensor
    margin: MarginParam

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_sub_centers: int = 1,
        scale: Optional[float] = None,
        trainable_scale: bool = False,
        margin: MarginParam = 0.5,
        *,
        pooling: Pooling = "max",
        pooling_temperature: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        register_margin(self, "margin", margin, *COS_MARGIN_RANGE, "CosFace", out_features, device, dtype)
        init_head(
            self, in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_scale=lambda: MF.heuristic_scale(out_features, typical_margin(margin), margin_type="cos"),

            pooling=pooling, pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_class_weight(self.weight)

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        cosine, labels = margin_inputs(self, input, labels)
        if labels is None:  # eval mode: no margin
            return cosine * self.scale
        return cos_margin_unchecked(cosine, labels, self.margin, self.scale)

    def loss(
        self, input: Tensor, labels: Tensor, *, reduction: str = "mean", chunk_size: Optional[int] = None
    ) -> Tensor:
        """``F.cross_entropy(self(input, labels), labels)`` over class chunks: see
        :func:`mll.functional.margin_cross_entropy`."""
        return chunked_loss(self, input, labels, reduction, chunk_size, "cos", self.margin)

    def extra_repr(self) -> str:
        return head_repr(self, f"margin={margin_repr(self.margin)}")


class ArcFace(nn.Module):
    r"""Additive angular margin head: :math:`s\cos(\theta_y + m)` on the target, :math:`s\cos\theta_j` elsewhere.

    "ArcFace: Additive Angular Margin Loss for Deep Face Recognition" (Deng et al., CVPR 2019,
    https://arxiv.org/abs/1801.07698). See :func:`mll.functional.arc_margin` for the numerics (finite at
    cos = ±1, monotone past π − m). The margin applies in training mode; eval mode needs no labels.

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): sub-centers per class ``K`` (Sub-center ArcFace for ``K > 1``).
        pooling (str): how sub-centers pool: ``"max"`` (Sub-center ArcFace) or ``"soft"`` (SoftTriple).
        pooling_temperature (float): γ > 0 of soft pooling (see :func:`mll.functional.cosine_logits`).
        scale (float, optional): ``s > 0``; ``None`` uses :func:`mll.functional.heuristic_scale` for this margin.
        trainable_scale (bool): learn ``s``.
        margin (float or Tensor): ``m`` in radians, in ``[0, π/2)`` (default 0.5); a tensor of shape ``(C,)`` gives
            one margin per class (see :func:`mll.functional.dynamic_margins`), kept as a buffer.
        easy_margin (bool): apply the margin only where ``cos θ > 0``.

    Shape:
        - input: ``(*, d)``; labels: ``(*)`` class indices or ``(*, C)`` soft targets
        - output: ``(*, C)``
    """

    in_features: int
    out_features: int
    num_sub_centers: int
    weight: nn.Parameter
    scale: Tensor
    margin: MarginParam

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_sub_centers: int = 1,
        scale: Optional[float] = None,
        trainable_scale: bool = False,
        margin: MarginParam = 0.5,
        easy_margin: bool = False,
        *,
        pooling: Pooling = "max",
        pooling_temperature: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        register_margin(self, "margin", margin, *ARC_MARGIN_RANGE, "ArcFace", out_features, device, dtype)
        self.easy_margin = bool(easy_margin)
        init_head(
            self, in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_scale=lambda: MF.heuristic_scale(out_features, typical_margin(margin), margin_type="arc"),

            pooling=pooling, pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_class_weight(self.weight)

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        cosine, labels = margin_inputs(self, input, labels)
        if labels is None:  # eval mode: no margin
            return cosine * self.scale
        return arc_margin_unchecked(cosine, labels, self.margin, self.easy_margin, self.scale)

    def loss(
        self, input: Tensor, labels: Tensor, *, reduction: str = "mean", chunk_size: Optional[int] = None
    ) -> Tensor:
        """``F.cross_entropy(self(input, labels), labels)`` over class chunks: see
        :func:`mll.functional.margin_cross_entropy`."""
        return chunked_loss(self, input, labels, reduction, chunk_size, "arc", self.margin, self.easy_margin)

    def extra_repr(self) -> str:
        return head_repr(self, f"margin={margin_repr(self.margin)}", f"easy_margin={self.easy_margin}")


def dense_loss(module: nn.Module, input: Tensor, labels: Tensor, reduction: str) -> Tensor:
    """``F.cross_entropy(module(input, labels), labels)``: the ``loss()`` of heads without a chunked path."""
    logits = module(input, labels)
    flat = logits.reshape(-1, logits.shape[-1])
    target = labels.reshape(-1, logits.shape[-1]) if labels.is_floating_point() else labels.reshape(-1)
    loss = F.cross_entropy(flat.float() if flat.dtype in (torch.float16, torch.bfloat16) else flat, target,
                           reduction=reduction)  # fmt: skip
    return loss.reshape(labels.shape[: logits.dim() - 1]) if reduction == "none" else loss


class CombinedMargin(nn.Module):
    r"""InsightFace's combined margin head: :math:`s(\cos(m_1\theta_y + m_2) - m_3)` on the target.

    "ArcFace: Additive Angular Margin Loss for Deep Face Recognition" (Deng et al., CVPR 2019,
    https://arxiv.org/abs/1801.07698), Eq. 4. See :func:`mll.functional.combined_margin` (continued past π as
    SphereFace does, so the target logit stays monotone). ``(1, m, 0)`` is ArcFace below π − m, ``(1, 0, m)`` CosFace,
    ``(m, 0, 0)`` SphereFace.

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): sub-centers per class ``K``.
        scale (float, optional): ``s > 0``; ``None`` uses :func:`mll.functional.heuristic_scale` for these margins.
        trainable_scale (bool): learn ``s``.
        m1 (float or Tensor): multiplicative angular margin in ``[1, 10)`` (default 1).
        m2 (float or Tensor): additive angular margin in ``[0, π/2)`` (default 0.3, InsightFace's combined setting).
        m3 (float or Tensor): additive cosine margin in ``[0, 1)`` (default 0.2). Tensors of shape ``(C,)``: per class.
        pooling (str): how sub-centers pool: ``"max"`` (Sub-center ArcFace) or ``"soft"`` (SoftTriple).
        pooling_temperature (float): γ > 0 of soft pooling (see :func:`mll.functional.cosine_logits`).

    Shape:
        - input: ``(*, d)``; labels: ``(*)`` class indices or ``(*, C)`` soft targets
        - output: ``(*, C)``
    """

    in_features: int
    out_features: int
    num_sub_centers: int
    weight: nn.Parameter
    scale: Tensor
    m1: MarginParam
    m2: MarginParam
    m3: MarginParam

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_sub_centers: int = 1,
        scale: Optional[float] = None,
        trainable_scale: bool = False,
        m1: MarginParam = 1.0,
        m2: MarginParam = 0.3,
        m3: MarginParam = 0.2,
        *,
        pooling: Pooling = "max",
        pooling_temperature: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        register_margin(self, "m1", m1, *COMBINED_M1_RANGE, "combined", out_features, device, dtype)
        register_margin(self, "m2", m2, *COMBINED_M2_RANGE, "combined", out_features, device, dtype)
        register_margin(self, "m3", m3, *COMBINED_M3_RANGE, "combined", out_features, device, dtype)
        margins = (typical_margin(m1), typical_margin(m2), typical_margin(m3))
        init_head(
            self, in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_scale=lambda: MF.heuristic_scale(out_features, margins, margin_type="combined"),
            pooling=pooling, pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_class_weight(self.weight)

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        cosine, labels = margin_inputs(self, input, labels)
        if labels is None:  # eval mode: no margin
            return cosine * self.scale
        return combined_margin_unchecked(cosine, labels, self.m1, self.m2, self.m3, self.scale)

    def loss(
        self, input: Tensor, labels: Tensor, *, reduction: str = "mean", chunk_size: Optional[int] = None
    ) -> Tensor:
        """``F.cross_entropy(self(input, labels), labels)`` over class chunks: see
        :func:`mll.functional.margin_cross_entropy`."""
        params = (self.m1, self.m2, self.m3)
        return chunked_loss_with(self, input, labels, reduction, chunk_size, _combined_value_and_slope, params)

    def extra_repr(self) -> str:
        return head_repr(self, *(f"{n}={margin_repr(getattr(self, n))}" for n in ("m1", "m2", "m3")))


class SphereFace(nn.Module):
    r"""SphereFace's A-Softmax head: :math:`s\,\frac{\lambda\cos\theta_y + \psi(\theta_y)}{1 + \lambda}` on the target,
    :math:`\psi(\theta) = (-1)^k\cos(m\theta) - 2k`.

    "SphereFace: Deep Hypersphere Embedding for Face Recognition" (Liu et al., CVPR 2017,
    https://arxiv.org/abs/1704.08063). See :func:`mll.functional.sphere_margin`. Anneal ``lambda_`` during training
    as the paper does, e.g. ``head.lambda_ = max(5.0, 1000.0 / (1 + 0.1 * step))``: it is a 0-dim buffer
    (``annealing_lambda``), so checkpoints keep it and ``torch.compile`` does not recompile when it changes. With
    normalised features and a fixed scale, as every head here (the paper scales by ‖x‖).

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): sub-centers per class ``K``.
        scale (float, optional): ``s > 0``; ``None`` uses :func:`mll.functional.heuristic_scale` for this margin.
        trainable_scale (bool): learn ``s``.
        margin (float or Tensor): ``m`` in ``[1, 10)`` (default 4, the paper's); per class as a ``(C,)`` tensor.
        lambda_ (float): annealing weight ``λ >= 0`` (default 0: pure A-Softmax).
        pooling (str): how sub-centers pool: ``"max"`` (Sub-center ArcFace) or ``"soft"`` (SoftTriple).
        pooling_temperature (float): γ > 0 of soft pooling (see :func:`mll.functional.cosine_logits`).

    Shape:
        - input: ``(*, d)``; labels: ``(*)`` class indices or ``(*, C)`` soft targets
        - output: ``(*, C)``
    """

    in_features: int
    out_features: int
    num_sub_centers: int
    weight: nn.Parameter
    scale: Tensor
    margin: MarginParam
    annealing_lambda: Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_sub_centers: int = 1,
        scale: Optional[float] = None,
        trainable_scale: bool = False,
        margin: MarginParam = 4.0,
        lambda_: float = 0.0,
        *,
        pooling: Pooling = "max",
        pooling_temperature: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        register_margin(self, "margin", margin, *SPHERE_MARGIN_RANGE, "SphereFace", out_features, device, dtype)
        check_lambda(lambda_)
        self.register_buffer(
            "annealing_lambda", torch.tensor(float(lambda_), dtype=statistics_dtype(dtype), device=device)
        )
        init_head(
            self, in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_scale=lambda: MF.heuristic_scale(out_features, typical_margin(margin), margin_type="sphere"),
            pooling=pooling, pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_class_weight(self.weight)

    def forward(self, input: Tensor, labels: Optional[Tensor] = None) -> Tensor:
        cosine, labels = margin_inputs(self, input, labels)
        if labels is None:  # eval mode: no margin
            return cosine * self.scale
        return sphere_margin_unchecked(cosine, labels, self.margin, self.annealing_lambda, self.scale)

    def loss(
        self, input: Tensor, labels: Tensor, *, reduction: str = "mean", chunk_size: Optional[int] = None
    ) -> Tensor:
        """``F.cross_entropy(self(input, labels), labels)`` over class chunks: see
        :func:`mll.functional.margin_cross_entropy`."""
        params = (self.margin, self.annealing_lambda)
        return chunked_loss_with(self, input, labels, reduction, chunk_size, _sphere_value_and_slope, params)

    def extra_repr(self) -> str:
        return head_repr(self, f"margin={margin_repr(self.margin)}", f"lambda_={float(self.annealing_lambda):g}")

    @property
    def lambda_(self) -> Tensor:
        """SphereFace's annealing weight λ (the ``annealing_lambda`` buffer); assign a float or a 0-dim tensor."""
        return self.annealing_lambda

    @lambda_.setter
    def lambda_(self, value: float | Tensor) -> None:
        check_lambda(value)
        with torch.no_grad():
            self.annealing_lambda.fill_(value.detach().reshape(()) if isinstance(value, Tensor) else float(value))


class _Elastic(nn.Module):
    """ElasticFace's shared body: draw a margin per sample around ``margin`` in training mode, then apply the base
    margin with it (see :func:`mll.functional.elastic_margins`)."""

    in_features: int
    out_features: int
    num_sub_centers: int
    weight: nn.Parameter
    scale: Tensor
    margin: MarginParam
    _kind: str
    _range: tuple[float, float]

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_sub_centers: int,
        scale: Optional[float],
        trainable_scale: bool,
        margin: MarginParam,
        std: float,
        generator: Optional[torch.Generator],
        pooling: Pooling,
        pooling_temperature: float,
        device,
        dtype,
    ) -> None:
        super().__init__()
        kind = type(self).__name__
        register_margin(self, "margin", margin, *self._range, kind, out_features, device, dtype)
        check_nonnegative(std, f"{kind} std")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, but got {type(generator).__name__}")
        self.std, self.generator = float(std), generator
        init_head(
            self, in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_scale=lambda: MF.heuristic_scale(out_features, typical_margin(margin), margin_type=self._kind),  # type: ignore[arg-type]
            pooling=pooling, pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        self.reset_parameters()

    def reset_parameters(self) -> None:
        reset_class_weight(self.weight)

    def sample_margins(self, input: Tensor, labels: Tensor) -> Tensor:
        """This step's margins for features ``input`` ``(*, d)``: ``(*, 1)`` (or ``(*, C)`` for per-class margins
        with soft targets)."""
        logits_shape = torch.Size((*input.shape[:-1], self.out_features))
        mean: MarginParam = self.margin
        if isinstance(mean, Tensor) and not is_soft(labels):
            mean = _at_target(mean, logits_shape, labels).unsqueeze(-1)  # each sample's class mean, (*, 1)
        dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        return MF.elastic_margins(
            mean, self.std, (*input.shape[:-1], 1), bounds=self._range, generator=self.generator,
            dtype=dtype, device=input.device,
        )  # fmt: skip

    def forward(self, input: Tensor, labels: Optional[Tensor] = None, *, margins: Optional[Tensor] = None) -> Tensor:
        """Logits with this step's margins: drawn from the generator, or ``margins`` when given (e.g. drawn with
        :meth:`sample_margins` outside a ``torch.compile``-d region, which cannot trace a seeded generator)."""
        cosine, labels = margin_inputs(self, input, labels)
        if labels is None:  # eval mode: no margin
            return cosine * self.scale
        margins = self._margins(input, labels, margins)
        if self._kind == "arc":
            return arc_margin_unchecked(cosine, labels, margins, False, self.scale)
        return cos_margin_unchecked(cosine, labels, margins, self.scale)

    def _margins(self, input: Tensor, labels: Tensor, margins: Optional[Tensor]) -> Tensor:
        if margins is None:
            return self.sample_margins(input, labels)
        check_margin_param(margins, *self._range, type(self).__name__, (*input.shape[:-1], self.out_features),
                           name="margins")  # fmt: skip
        return margins

    def loss(
        self,
        input: Tensor,
        labels: Tensor,
        *,
        reduction: str = "mean",
        chunk_size: Optional[int] = None,
        margins: Optional[Tensor] = None,
    ) -> Tensor:
        """``F.cross_entropy(self(input, labels), labels)`` over class chunks (draws margins like a forward, or takes
        ``margins``): see :func:`mll.functional.margin_cross_entropy`."""
        fn = _arc_fn(False) if self._kind == "arc" else _cos_fn
        if not self.training:
            return chunked_loss_with(self, input, labels, reduction, chunk_size, fn, (0.0,))
        labels = check_target(labels, torch.Size((*input.shape[:-1], self.out_features)), name="labels")
        margins = self._margins(input, labels, margins)
        return chunked_loss_with(self, input, labels, reduction, chunk_size, fn, (margins,))

    def extra_repr(self) -> str:
        seeded = "" if self.generator is None else ", generator=<seeded>"
        return head_repr(self, f"margin={margin_repr(self.margin)}, std={self.std}{seeded}")


class ElasticArcFace(_Elastic):
    r"""ElasticFace-Arc: :math:`s\cos(\theta_y + m_i)` with :math:`m_i \sim \mathcal N(m, \sigma^2)` drawn per sample
    and step.

    "ElasticFace: Elastic Margin Loss for Deep Face Recognition" (Boutros et al., CVPRW 2022,
    https://arxiv.org/abs/2109.09416), Eq. 4. See :func:`mll.functional.elastic_margins` and
    :func:`mll.functional.arc_margin`. Draws are clipped to ArcFace's range [0, π/2).

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): sub-centers per class ``K``.
        scale (float, optional): ``s > 0``; ``None`` uses the heuristic for ArcFace with margin ``m``.
        trainable_scale (bool): learn ``s``.
        margin (float or Tensor): mean ``m`` in ``[0, π/2)`` (default 0.5); per class as a ``(C,)`` tensor.
        std (float): σ (default 0.05, the paper's configuration; its code's default is 0.0125).
        generator (torch.Generator, optional): source of the draws, on the head's device; seed it for
            reproducible training. Not saved in the state dict. ``torch.compile`` cannot trace a generator: draw
            with ``head.sample_margins(x, y)`` outside the compiled function and pass ``margins=`` to it.
        pooling (str): how sub-centers pool: ``"max"`` (Sub-center ArcFace) or ``"soft"`` (SoftTriple).
        pooling_temperature (float): γ > 0 of soft pooling (see :func:`mll.functional.cosine_logits`).

    Shape:
        - input: ``(*, d)``; labels: ``(*)`` class indices or ``(*, C)`` soft targets
        - output: ``(*, C)``
    """

    _kind = "arc"
    _range = ARC_MARGIN_RANGE

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_sub_centers: int = 1,
        scale: Optional[float] = None,
        trainable_scale: bool = False,
        margin: MarginParam = 0.5,
        std: float = 0.05,
        *,
        generator: Optional[torch.Generator] = None,
        pooling: Pooling = "max",
        pooling_temperature: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            in_features, out_features, num_sub_centers, scale, trainable_scale, margin, std, generator, pooling,
            pooling_temperature, device, dtype,
        )  # fmt: skip


class ElasticCosFace(_Elastic):
    r"""ElasticFace-Cos: :math:`s(\cos\theta_y - m_i)` with :math:`m_i \sim \mathcal N(m, \sigma^2)` drawn per sample
    and step.

    "ElasticFace: Elastic Margin Loss for Deep Face Recognition" (Boutros et al., CVPRW 2022,
    https://arxiv.org/abs/2109.09416), Eq. 5. See :func:`mll.functional.elastic_margins` and
    :func:`mll.functional.cos_margin`. Draws are clipped to CosFace's range [0, 1).

    Args:
        in_features (int): feature size ``d``.
        out_features (int): number of classes ``C >= 2``.
        num_sub_centers (int): sub-centers per class ``K``.
        scale (float, optional): ``s > 0``; ``None`` uses the heuristic for CosFace with margin ``m``.
        trainable_scale (bool): learn ``s``.
        margin (float or Tensor): mean ``m`` in ``[0, 1)`` (default 0.35); per class as a ``(C,)`` tensor.
        std (float): σ (default 0.05).
        generator (torch.Generator, optional): source of the draws, on the head's device.
        pooling (str): how sub-centers pool: ``"max"`` (Sub-center ArcFace) or ``"soft"`` (SoftTriple).
        pooling_temperature (float): γ > 0 of soft pooling (see :func:`mll.functional.cosine_logits`).

    Shape:
        - input: ``(*, d)``; labels: ``(*)`` class indices or ``(*, C)`` soft targets
        - output: ``(*, C)``
    """

    _kind = "cos"
    _range = COS_MARGIN_RANGE

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_sub_centers: int = 1,
        scale: Optional[float] = None,
        trainable_scale: bool = False,
        margin: MarginParam = 0.35,
        std: float = 0.05,
        *,
        generator: Optional[torch.Generator] = None,
        pooling: Pooling = "max",
        pooling_temperature: float = 0.1,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(
            in_features, out_features, num_sub_centers, scale, trainable_scale, margin, std, generator, pooling,
            pooling_temperature, device, dtype,
        )  # fmt: skip
