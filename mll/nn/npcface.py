"""NPCFace: hard negatives raised, the target's angular margin grown with them."""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from mll import functional as MF
from mll.functional.npcface import check_npcface_options, hard_mean, hard_mean_chunked
from mll.nn._head import Head
from mll.nn._state import check_margin_arg, margin_repr, register_margin

__all__ = ["NPCFace"]


class NPCFace(Head):
    r"""NPCFace head: :math:`s\cos(\theta_y + m')` on the target, :math:`s(t\cos\theta_j + a)` on hard negatives.

    "NPCFace: Negative-Positive Collaboration Training for Large-scale Face Recognition" (Zeng et al., 2020,
    https://arxiv.org/abs/2007.10172). See :func:`mll.functional.npcface_margin`. Each training step first reads
    every sample's mean hard-negative cosine — from the dense cosines in ``forward``, from one extra pass over the
    class chunks in ``loss()`` (:func:`mll.functional.npcface_statistics_chunked`) — and gives the target the margin
    :math:`m' = m_0 + m_1 \cdot` that mean. No running state. Class indices only. Otherwise as the margin heads (see
    :mod:`mll.nn.margin`); the default scale is solved for ArcFace at ``m0``.

    Args:
        margin (float or Tensor): the hard-negative threshold's ``m`` (default 0.5), radians in ``[0, π/2)``, or
            ``(C,)``.
        m0 (float): the base positive margin (default 0.4).
        m1 (float): its growth with the mean hard-negative cosine (default 0.2); ``0 <= m1 <= m0``,
            ``m0 + m1 < π/2``.
        t (float): the hard negatives' factor, ``>= 0`` (default 1.1).
        a (float): the hard negatives' offset, ``>= 0`` (default 0.2).
    """

    soft_targets = False
    margin: Any

    def __init__(
        self, in_features: int, out_features: int, num_sub_centers: int = 1, scale: Optional[float] = None,
        trainable_scale: bool = False, margin: Any = 0.5, *, m0: float = 0.4, m1: float = 0.2, t: float = 1.1,
        a: float = 0.2, pooling: str = "max", pooling_temperature: float = 0.1, device: Any = None,
        dtype: Any = None,
    ) -> None:  # fmt: skip
        check_npcface_options(m0, m1)
        for value, spec in zip((t, a), MF.NPC.parameters[2:]):
            if isinstance(value, Tensor):  # one value for every row (a per-class t is not the paper's)
                raise TypeError(f"NPCFace {spec.name} must be a float, but got a tensor of shape {tuple(value.shape)}")
            spec.check(value, "NPCFace")
        check_margin_arg(margin, MF.NPC.parameters[0], "NPCFace", out_features)
        super().__init__(
            in_features, out_features, num_sub_centers, scale=scale, trainable_scale=trainable_scale,
            default_margin=MF.ARC(float(m0)), pooling=pooling, pooling_temperature=pooling_temperature,
            device=device, dtype=dtype,
        )  # fmt: skip
        register_margin(self, "margin", margin, MF.NPC.parameters[0], "NPCFace", out_features, device, dtype)
        self.m0, self.m1, self.t, self.a = float(m0), float(m1), float(t), float(a)
        self.reset_parameters()

    def step_margin(self, input: Tensor, labels: Tensor, cosine: Optional[Tensor]) -> MF.Margin:
        if cosine is not None:
            mean = hard_mean(cosine, labels, self.margin)
        else:
            tau = self.pooling_temperature if self.pooling == "soft" and self.num_sub_centers > 1 else None
            mean = hard_mean_chunked(input, self.weight, labels, self.margin, self.num_sub_centers, tau)
        return MF.NPC(self.margin, self.m0 + self.m1 * mean, self.t, self.a)

    def head_options(self) -> dict[str, Any]:
        return {"margin": self.initial("margin"), "m0": self.m0, "m1": self.m1, "t": self.t, "a": self.a}

    def extra_options(self) -> list[str]:
        return [f"margin={margin_repr(self.margin)}", f"m0={self.m0}", f"m1={self.m1}", f"t={self.t}", f"a={self.a}"]
