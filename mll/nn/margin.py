"""Heads with a margin on the target logit: CosFace, ArcFace, the combined margin, SphereFace, ElasticFace.

Each is a :class:`mll.nn._head.Head` whose :meth:`step_margin` binds its margin family (see
:mod:`mll.functional.margins`) to its hyper-parameters. Shared by all of them (see :class:`ScaledNormalizedLinear`
for the arguments ``in_features``, ``out_features``, ``num_sub_centers``, ``scale``, ``trainable_scale``,
``pooling``, ``pooling_temperature``, ``device``, ``dtype``): the margin applies in training mode with labels
(class indices ``(*)`` or soft targets ``(*, C)``); eval mode returns plain scaled cosines and needs no labels;
``loss(input, labels)`` is the cross-entropy of the training logits over class chunks (no N×C logits); a margin given
as a tensor of shape ``(C,)`` is one margin per class (see :func:`mll.functional.dynamic_margins`), kept as a buffer.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from mll import functional as MF
from mll.functional._engine.checks import check_generator, check_lambda, check_margin_param, check_nonnegative
from mll.functional.margin import at_target
from mll.nn._head import Head
from mll.nn._state import float_repr, margin_repr, register_margin, register_state, statistics_dtype, typical_margin

__all__ = ["ArcFace", "CombinedMargin", "CosFace", "ElasticArcFace", "ElasticCosFace", "SphereFace"]

MarginParam = Any  # float or Tensor
_COS_MARGIN, _ARC_MARGIN = MF.COS.parameters[0], MF.ARC.parameters[0]


class CosFace(Head):
    r"""Large margin cosine head: :math:`s(\cos\theta_y - m)` on the target, :math:`s\cos\theta_j` elsewhere.

    "CosFace: Large Margin Cosine Loss for Deep Face Recognition" (Wang et al., CVPR 2018,
    https://arxiv.org/abs/1801.09414). See :func:`mll.functional.cos_margin` and the module notes.

    Args:
        margin (float or Tensor): ``m`` in ``[0, 1)`` (default 0.5, as in 0.1.6; the paper uses 0.35), or ``(C,)``.
    """

    margin: MarginParam

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None,
        trainable_scale: bool = False, margin: MarginParam = 0.5, *, pooling: str = "max",
        pooling_temperature: float = 0.1, device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        super().__init__(
            in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_margin=MF.COS(typical_margin(margin, _COS_MARGIN, "CosFace", out_features)), pooling=pooling,
            pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        register_margin(self, "margin", margin, _COS_MARGIN, "CosFace", out_features, device, dtype)
        self.reset_parameters()

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        return MF.COS(self.margin)

    def head_options(self) -> dict[str, Any]:
        return {"margin": self.initial("margin")}

    def extra_options(self) -> list[str]:
        return [f"margin={margin_repr(self.margin)}"]


class ArcFace(Head):
    r"""Additive angular margin head: :math:`s\cos(\theta_y + m)` on the target, :math:`s\cos\theta_j` elsewhere.

    "ArcFace: Additive Angular Margin Loss for Deep Face Recognition" (Deng et al., CVPR 2019,
    https://arxiv.org/abs/1801.07698). See :func:`mll.functional.arc_margin` for the numerics (finite at
    cos = ±1, monotone past π − m) and the module notes. ``num_sub_centers > 1`` is Sub-center ArcFace.

    Args:
        margin (float or Tensor): ``m`` in radians, in ``[0, π/2)`` (default 0.5), or ``(C,)``.
        easy_margin (bool): apply the margin only where ``cos θ > 0``.
    """

    margin: MarginParam

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None,
        trainable_scale: bool = False, margin: MarginParam = 0.5, easy_margin: bool = False, *,
        pooling: str = "max", pooling_temperature: float = 0.1, device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        super().__init__(
            in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_margin=MF.ARC(typical_margin(margin, _ARC_MARGIN, "ArcFace", out_features)), pooling=pooling,
            pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        register_margin(self, "margin", margin, _ARC_MARGIN, "ArcFace", out_features, device, dtype)
        self.easy_margin = bool(easy_margin)
        self.reset_parameters()

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        return (MF.ARC_EASY if self.easy_margin else MF.ARC)(self.margin)

    def head_options(self) -> dict[str, Any]:
        return {"margin": self.initial("margin"), "easy_margin": self.easy_margin}

    def extra_options(self) -> list[str]:
        return [f"margin={margin_repr(self.margin)}", f"easy_margin={self.easy_margin}"]


class CombinedMargin(Head):
    r"""InsightFace's combined margin head: :math:`s(\cos(m_1\theta_y + m_2) - m_3)` on the target.

    "ArcFace: Additive Angular Margin Loss for Deep Face Recognition" (Deng et al., CVPR 2019,
    https://arxiv.org/abs/1801.07698), Eq. 4. See :func:`mll.functional.combined_margin` (continued past π as
    SphereFace does, so the target logit stays monotone) and the module notes. ``(1, m, 0)`` is ArcFace below
    π − m, ``(1, 0, m)`` CosFace, ``(m, 0, 0)`` SphereFace.

    Args:
        m1 (float or Tensor): multiplicative angular margin in ``[1, 10)`` (default 1).
        m2 (float or Tensor): additive angular margin in ``[0, π/2)`` (default 0.3, InsightFace's combined setting).
        m3 (float or Tensor): additive cosine margin in ``[0, 1)`` (default 0.2).
    """

    m1: MarginParam
    m2: MarginParam
    m3: MarginParam

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None,
        trainable_scale: bool = False, m1: MarginParam = 1.0, m2: MarginParam = 0.3, m3: MarginParam = 0.2, *,
        pooling: str = "max", pooling_temperature: float = 0.1, device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        typical = [
            typical_margin(v, spec, "combined", out_features) for v, spec in zip((m1, m2, m3), MF.COMBINED.parameters)
        ]
        super().__init__(
            in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_margin=MF.COMBINED(*typical), pooling=pooling, pooling_temperature=pooling_temperature,
            device=device, dtype=dtype,
        )  # fmt: skip
        for name, value, spec in zip(("m1", "m2", "m3"), (m1, m2, m3), MF.COMBINED.parameters):
            register_margin(self, name, value, spec, "combined", out_features, device, dtype)
        self.reset_parameters()

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        return MF.COMBINED(self.m1, self.m2, self.m3)

    def head_options(self) -> dict[str, Any]:
        return {n: self.initial(n) for n in ("m1", "m2", "m3")}

    def extra_options(self) -> list[str]:
        return [f"{n}={margin_repr(getattr(self, n))}" for n in ("m1", "m2", "m3")]


class SphereFace(Head):
    r"""SphereFace's A-Softmax head: :math:`s\,\frac{\lambda\cos\theta_y + \psi(\theta_y)}{1 + \lambda}` on the target,
    :math:`\psi(\theta) = (-1)^k\cos(m\theta) - 2k`.

    "SphereFace: Deep Hypersphere Embedding for Face Recognition" (Liu et al., CVPR 2017,
    https://arxiv.org/abs/1704.08063). See :func:`mll.functional.sphere_margin` and the module notes. Anneal
    ``lambda_`` during training as the paper does, e.g. ``head.lambda_ = max(5.0, 1000.0 / (1 + 0.1 * step))``: it
    is a 0-dim buffer (``annealing_lambda``), so checkpoints keep it and ``torch.compile`` does not recompile when
    it changes. With normalised features and a fixed scale, as every head here (the paper scales by ‖x‖).

    Args:
        margin (float or Tensor): ``m`` in ``[1, 10)`` (default 4, the paper's), or ``(C,)``.
        lambda_ (float): annealing weight ``λ >= 0`` (default 0: pure A-Softmax).
    """

    margin: MarginParam
    annealing_lambda: Tensor

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None,
        trainable_scale: bool = False, margin: MarginParam = 4.0, lambda_: float = 0.0, *, pooling: str = "max",
        pooling_temperature: float = 0.1, device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        check_lambda(lambda_)
        spec = MF.SPHERE.parameters[0]
        super().__init__(
            in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_margin=MF.SPHERE(typical_margin(margin, spec, "SphereFace", out_features), 0.0), pooling=pooling,
            pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        register_margin(self, "margin", margin, spec, "SphereFace", out_features, device, dtype)
        lam = float(lambda_.detach().cpu()) if isinstance(lambda_, Tensor) else float(lambda_)
        register_state(self, "annealing_lambda", lam, statistics_dtype(dtype), device)
        self.reset_parameters()

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        return MF.SPHERE(self.margin, self.annealing_lambda)

    def head_options(self) -> dict[str, Any]:
        return {"margin": self.initial("margin"), "lambda_": self.initial_values["annealing_lambda"]}

    def extra_options(self) -> list[str]:
        return [f"margin={margin_repr(self.margin)}", f"lambda_={float_repr(self.annealing_lambda)}"]

    @property
    def lambda_(self) -> Tensor:
        """SphereFace's annealing weight λ (the ``annealing_lambda`` buffer); assign a float or a 0-dim tensor."""
        return self.annealing_lambda

    @lambda_.setter
    def lambda_(self, value: float | Tensor) -> None:
        check_lambda(value)
        with torch.no_grad():
            self.annealing_lambda.fill_(value.detach().reshape(()) if isinstance(value, Tensor) else float(value))


class _Elastic(Head):
    """ElasticFace's shared body: draw a margin per sample around ``margin`` in training mode, then apply the base
    margin family with it (see :func:`mll.functional.elastic_margins`)."""

    margin: MarginParam
    family: MF.MarginFamily
    #: the mean margin when none is given
    default_margin: float

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None,
        trainable_scale: bool = False, margin: Optional[MarginParam] = None, std: float = 0.05, *,
        generator: Optional[torch.Generator] = None, pooling: str = "max", pooling_temperature: float = 0.1,
        device: Any = None, dtype: Any = None,
    ) -> None:  # fmt: skip
        margin = self.default_margin if margin is None else margin
        kind = type(self).__name__
        spec = self.family.parameters[0]
        check_nonnegative(std, f"{kind} std")
        check_generator(generator)
        super().__init__(
            in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_margin=self.family(typical_margin(margin, spec, kind, out_features)), pooling=pooling,
            pooling_temperature=pooling_temperature, device=device, dtype=dtype,
        )  # fmt: skip
        register_margin(self, "margin", margin, spec, kind, out_features, device, dtype)
        self.std, self.generator = float(std), generator
        self.reset_parameters()

    def sample_margins(self, input: Tensor, labels: Tensor) -> Tensor:
        """This step's margins for features ``input`` ``(*, d)``: ``(*, 1)`` (or ``(*, C)`` for per-class margins
        with soft targets)."""
        logits_shape = torch.Size((*input.shape[:-1], self.out_features))
        mean: MarginParam = self.margin
        if isinstance(mean, Tensor) and not labels.is_floating_point():
            mean = at_target(mean, logits_shape, labels).unsqueeze(-1)  # each sample's class mean, (*, 1)
        dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
        spec = self.family.parameters[0]
        return MF.elastic_margins(
            mean, self.std, (*input.shape[:-1], 1), bounds=(spec.low, spec.high), generator=self.generator,
            dtype=dtype, device=input.device,
        )  # fmt: skip

    def forward(self, input: Tensor, labels: Optional[Tensor] = None, *, margins: Optional[Tensor] = None) -> Tensor:
        """Logits with this step's margins: drawn from the generator, or ``margins`` when given (e.g. drawn with
        :meth:`sample_margins` outside a ``torch.compile``-d region, which cannot trace a seeded generator)."""
        return self.logits(input, labels, None if margins is None else self.given_margins(input, margins))

    def loss(
        self, input: Tensor, labels: Tensor, *, reduction: str = "mean", chunk_size: Optional[int] = None,
        margins: Optional[Tensor] = None,
    ) -> Tensor:  # fmt: skip
        """The chunked cross-entropy of a training step (draws margins like a forward, or takes ``margins``)."""
        given = None if margins is None else self.given_margins(input, margins)
        return self.chunked_loss(input, labels, reduction, chunk_size, given)

    def given_margins(self, input: Tensor, margins: Tensor) -> MF.Margin:
        """This step's margin family bound to ``margins`` given by the caller, checked."""
        spec = self.family.parameters[0]
        shape = (*input.shape[:-1], self.out_features)
        check_margin_param(margins, spec.low, spec.high, type(self).__name__, shape, name="margins")
        return self.family(margins)

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        return self.family(self.sample_margins(input, labels))

    def head_options(self) -> dict[str, Any]:
        return {"margin": self.initial("margin"), "std": self.std, "generator": self.generator}

    def extra_options(self) -> list[str]:
        seeded = "" if self.generator is None else ", generator=<seeded>"
        return [f"margin={margin_repr(self.margin)}, std={self.std}{seeded}"]


class ElasticArcFace(_Elastic):
    r"""ElasticFace-Arc: :math:`s\cos(\theta_y + m_i)` with :math:`m_i \sim \mathcal N(m, \sigma^2)` drawn per sample
    and step.

    "ElasticFace: Elastic Margin Loss for Deep Face Recognition" (Boutros et al., CVPRW 2022,
    https://arxiv.org/abs/2109.09416), Eq. 4. See :func:`mll.functional.elastic_margins`,
    :func:`mll.functional.arc_margin` and the module notes. Draws are clipped to ArcFace's range [0, π/2).

    Args:
        margin (float or Tensor): mean ``m`` in ``[0, π/2)`` (default 0.5), or ``(C,)``.
        std (float): σ (default 0.05, the paper's configuration; its code's default is 0.0125).
        generator (torch.Generator, optional): source of the draws, on the head's device; seed it for
            reproducible training. Not saved in the state dict. ``torch.compile`` cannot trace a generator: draw
            with ``head.sample_margins(x, y)`` outside the compiled function and pass ``margins=`` to it.
    """

    family = MF.ARC
    default_margin = 0.5


class ElasticCosFace(_Elastic):
    r"""ElasticFace-Cos: :math:`s(\cos\theta_y - m_i)` with :math:`m_i \sim \mathcal N(m, \sigma^2)` drawn per sample
    and step.

    "ElasticFace: Elastic Margin Loss for Deep Face Recognition" (Boutros et al., CVPRW 2022,
    https://arxiv.org/abs/2109.09416), Eq. 5. As :class:`ElasticArcFace`, with :func:`mll.functional.cos_margin`;
    draws are clipped to CosFace's range [0, 1).

    Args:
        margin (float or Tensor): mean ``m`` in ``[0, 1)`` (default 0.35), or ``(C,)``.
        std (float): σ (default 0.05).
        generator (torch.Generator, optional): source of the draws, on the head's device.
    """

    family = MF.COS
    default_margin = 0.35
