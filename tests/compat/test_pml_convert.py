"""Checkpoints both ways: a pml ``state_dict`` loads into ``mll.compat.pml`` unchanged and back into pml; ``to_head``
and ``from_head`` carry a loss to its native ``mll.nn`` head and back, keeping the numbers (SphereFace: the weights
and cosines), and refuse what pml cannot express."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

import mll
import mll.compat.pml as M
from tests.compat.side_by_side import NAMES, data, pair, pml_losses, relative

C, D = 6, 5
SIZES = {"num_classes": C, "embedding_size": D}
OPTIONS: dict[str, dict[str, Any]] = {
    "ArcFaceLoss": {"margin": 20.0, "scale": 30.0},
    "SubCenterArcFaceLoss": {"margin": 20.0, "scale": 30.0, "sub_centers": 3},
    "CosFaceLoss": {"margin": 0.2, "scale": 16.0},
    "SphereFaceLoss": {"margin": 3, "scale": 2.0},
    "LargeMarginSoftmaxLoss": {"margin": 3, "scale": 2.0},
    "NormalizedSoftmaxLoss": {"temperature": 0.1},
    "ProxyAnchorLoss": {"margin": 0.2, "alpha": 16.0},
    "ProxyNCALoss": {"softmax_scale": 4.0},
    "SoftTripleLoss": {"centers_per_class": 3, "la": 10.0, "gamma": 0.2, "margin": 0.05},
}
NATIVE = {
    "ArcFaceLoss": mll.ArcFace,
    "SubCenterArcFaceLoss": mll.ArcFace,
    "CosFaceLoss": mll.CosFace,
    "SphereFaceLoss": mll.SphereFace,
    "LargeMarginSoftmaxLoss": mll.LargeMarginSoftmax,
    "NormalizedSoftmaxLoss": mll.ScaledNormalizedLinear,
    "ProxyAnchorLoss": mll.ProxyAnchor,
    "ProxyNCALoss": mll.ProxyNCAPlusPlus,
    "SoftTripleLoss": mll.SoftTriple,
}


@pytest.mark.parametrize("name", NAMES)
def test_checkpoints_load_both_ways(name: str) -> None:
    """pml → mll.compat.pml → pml: the same keys, shapes and values, and the losses agree."""
    ours, theirs = pair(name, seed=4, **SIZES, **OPTIONS[name])
    for key, value in theirs.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape and torch.equal(ours.state_dict()[key], value)
    with torch.no_grad():
        next(iter(ours.parameters())).mul_(1.5)  # ours trains on: its checkpoint now differs from the first
    back = getattr(pml_losses, name)(**SIZES, **OPTIONS[name])
    back.load_state_dict(ours.state_dict())
    assert list(back.state_dict()) == list(ours.state_dict())
    x, y = data(12, D, C, torch.float64)
    assert relative(ours.double()(x, y), back.double()(x, y)) < 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_to_head_and_from_head(name: str) -> None:
    """loss → head: ``head.loss`` equals the loss in value and gradients (SphereFace: the same cosines); head → loss:
    the same weights and hyper-parameters, bit for bit."""
    torch.manual_seed(0)
    loss = getattr(M, name)(**SIZES, **OPTIONS[name], dtype=torch.float64)
    head = M.to_head(loss)
    assert type(head) is NATIVE[name] and head.weight.dtype == torch.float64 and head.training
    x, y = data(16, D, C, torch.float64, seed=5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    if name == "SphereFaceLoss":  # pml scales by ‖x‖, mll.SphereFace by s: the same cosines
        cos = loss.get_logits(x) / (x.norm(dim=1, keepdim=True) * loss.scale)
        assert relative(head.cosine(x), cos) < 1e-12
    else:
        a, b = loss(xa, y), head.loss(xb, y)
        a.backward()
        b.backward()
        assert relative(b, a) < 1e-12 and relative(xb.grad, xa.grad, 1e-2) < 1e-12
        assert relative(head.weight.grad, _rows(loss, getattr(loss, loss.parameter_name).grad), 1e-2) < 1e-12
    again = M.from_head(head)
    assert type(again) is type(loss)
    for key, value in loss.state_dict().items():
        assert torch.equal(again.state_dict()[key], value), key
    for option in OPTIONS[name]:
        assert getattr(again, option) == getattr(loss, option), option
    if name == "SoftTripleLoss":
        assert again.gamma == loss.gamma


def _rows(loss: torch.nn.Module, tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t() if type(loss).__name__ not in ("ProxyAnchorLoss", "ProxyNCALoss") else tensor


def test_from_head_of_a_trained_native_head_loads_into_pml() -> None:
    head = mll.ArcFace(D, C, num_sub_centers=2, scale=24.0, margin=0.4, dtype=torch.float64)
    x, y = data(16, D, C, torch.float64)
    torch.optim.SGD(head.parameters(), lr=0.5).zero_grad()
    head.loss(x, y).backward()
    with torch.no_grad():
        head.weight -= 0.5 * head.weight.grad
    loss = M.from_head(head)
    theirs = pml_losses.SubCenterArcFaceLoss(num_classes=C, embedding_size=D, margin=math.degrees(0.4), scale=24.0,
                                             sub_centers=2).double()  # fmt: skip
    theirs.load_state_dict(loss.state_dict())
    assert relative(theirs(x, y), head.loss(x, y)) < 1e-12


@pytest.mark.parametrize(
    ("head", "message"),
    [
        (mll.ArcFace(D, C, margin=torch.full((C,), 0.3)), r"ArcFace margin must be one float for pml, not a per-class"),
        (mll.ArcFace(D, C, easy_margin=True), r"ArcFace easy_margin must be False for pml"),
        (mll.ArcFace(D, C, 2, pooling="soft"), r"ArcFace pooling must be 'max' for pml, but got 'soft'"),
        (mll.CosFace(D, C, 2), r"CosFace num_sub_centers must be 1 for pml .* but got 2"),
        (mll.SphereFace(D, C, margin=2.5), r"SphereFace margin must be an integer for pml .* but got 2.5"),
        (mll.SphereFace(D, C, lambda_=5.0), r"SphereFace lambda_ must be 0 for pml .* but got 5"),
        (mll.LargeMarginSoftmax(D, C, lambda_=1.0), r"LargeMarginSoftmax lambda_ must be 0 for pml"),
        (mll.SoftTriple(D, C, 3), r"SoftTriple tau must be 0 for pml, .* but got 0.2: set head.tau = 0.0 first"),
        (mll.SoftTriple(D, C, 3, tau=0.0, pooling="max"), r"SoftTriple pooling must be 'soft' for pml"),
    ],
)
def test_from_head_refuses_what_pml_cannot_express(head: torch.nn.Module, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        M.from_head(head)


def test_to_head_and_from_head_refuse_what_has_no_counterpart() -> None:
    with pytest.raises(TypeError, match=r"from_head takes one of the heads pml has a loss for .* but got AdaCos"):
        M.from_head(mll.AdaCos(D, C))
    with pytest.raises(TypeError, match=r"but got ShardedArcFace"):
        M.from_head(mll.ShardedArcFace.from_dense(mll.ArcFace(D, C)))
    with pytest.raises(TypeError, match=r"to_head takes a loss of mll.compat.pml .* but got ArcFace"):
        M.to_head(mll.ArcFace(D, C))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"SphereFaceLoss margin=10 has no native head: mll.SphereFace takes margins"):
        M.to_head(M.SphereFaceLoss(**SIZES, margin=10))
    dot = pytest.importorskip("pytorch_metric_learning.distances").DotProductSimilarity(normalize_embeddings=False)
    with pytest.raises(ValueError, match=r"normalize_embeddings=False\) has no native head"):
        M.to_head(M.NormalizedSoftmaxLoss(**SIZES, distance=dot))
