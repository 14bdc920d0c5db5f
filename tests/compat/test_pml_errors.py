"""``mll.compat.pml`` as a hostile pml user meets it: bad arguments and inputs raise errors that name the argument
and the expected value (and change nothing), and the odd-but-valid inputs — half precision, int32 labels, empty
batches, dtype moves, checkpoints of another dtype — behave as pml's or better, as documented."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch

import mll.compat.pml as M
from tests.compat.side_by_side import NAMES, assert_same, data, pair, pml_losses, relative, side_by_side

C, D = 5, 4
SIZES = {"num_classes": C, "embedding_size": D}


@pytest.mark.parametrize(
    ("name", "options", "error", "message"),
    [
        ("ArcFaceLoss", {"margin": 95}, ValueError, r"ArcFaceLoss margin must be a real number in \[0, 90\) degrees"),
        ("ArcFaceLoss", {"margin": -1.0}, ValueError, r"margin must be a real number in \[0, 90\) degrees .*got -1"),
        ("ArcFaceLoss", {"scale": 0}, ValueError, r"ArcFaceLoss scale must be a real number in \(0, inf\), but got 0"),
        ("SubCenterArcFaceLoss", {"sub_centers": 0}, ValueError, r"sub_centers must be an integer >= 1, but got 0"),
        ("CosFaceLoss", {"margin": 1.2}, ValueError, r"CosFaceLoss margin must be a real number in \[0, 1\)"),
        ("SphereFaceLoss", {"margin": 0.5}, ValueError, r"margin must be a real number in \[1, inf\) \(pml uses int"),
        ("LargeMarginSoftmaxLoss", {"scale": math.nan}, ValueError, r"scale must be a real number in \(0, inf\)"),
        ("NormalizedSoftmaxLoss", {"temperature": 0.0}, ValueError, r"temperature must be a real number in \(0, inf"),
        ("ProxyAnchorLoss", {"margin": -0.1}, ValueError, r"ProxyAnchorLoss margin must be a real number in \[0, inf"),
        ("ProxyAnchorLoss", {"alpha": 0}, ValueError, r"alpha must be a real number in \(0, inf\), but got 0"),
        ("ProxyNCALoss", {"softmax_scale": -1}, ValueError, r"softmax_scale must be a real number in \(0, inf\)"),
        ("SoftTripleLoss", {"centers_per_class": 0}, ValueError, r"centers_per_class must be an integer >= 1"),
        ("SoftTripleLoss", {"gamma": 0}, ValueError, r"SoftTripleLoss gamma must be a real number in \(0, inf\)"),
        ("SoftTripleLoss", {"margin": 1.0}, ValueError, r"SoftTripleLoss margin must be a real number in \[0, 1\)"),
        ("ArcFaceLoss", {"num_classes": 0}, ValueError, r"ArcFaceLoss num_classes must be an integer >= 1, but got 0"),
        ("ProxyNCALoss", {"embedding_size": 2.5}, ValueError, r"embedding_size must be an integer >= 1, but got 2.5"),
        ("CosFaceLoss", {"weight_regularizer": "l2"}, TypeError, r"weight_regularizer must be None or a callable"),
        ("CosFaceLoss", {"embedding_regularizer": torch.nn.Module}, TypeError, r"got the class Module \(not an"),
        ("CosFaceLoss", {"weight_reg_weight": "1"}, TypeError, r"CosFaceLoss weight_reg_weight must be a real number"),
        ("SoftTripleLoss", {"reducer": "mean"}, TypeError, r"SoftTripleLoss reducer must be None, an instance of"),
        ("ArcFaceLoss", {"collect_stats": True}, ValueError, r"ArcFaceLoss collect_stats must be None or False"),
        ("ArcFaceLoss", {"scaling": 2}, TypeError, r"unexpected keyword argument 'scaling'"),
    ],
)
def test_bad_arguments_name_themselves(name: str, options: dict, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        getattr(M, name)(**{**SIZES, **options})


def _bad_calls(x: torch.Tensor, y: torch.Tensor) -> list[tuple[dict[str, Any], type, str]]:
    return [
        ({"labels": None}, ValueError, r"needs labels: class indices of shape \(batch_size,\)"),
        ({"labels": y[:, None]}, ValueError, r"labels must be a 1-D tensor of shape \(batch_size,\), but got \(6, 1\)"),
        ({"labels": y[:4]}, ValueError, r"needs one label per embedding: labels of shape \(6,\), but got \(4,\)"),
        ({"labels": y.float()}, TypeError, r"labels must be an integer tensor of class indices"),
        ({"labels": torch.full((6,), C)}, ValueError, r"labels must be class indices in \[0, 5\), but got .* 5 to 5"),
        ({"labels": y - 1}, ValueError, r"labels must be class indices in \[0, 5\), but got values from -1"),
        ({"ref_emb": x.clone()}, ValueError, r"does not take ref_emb or ref_labels \(nor does pml's\)"),
        ({"embeddings": x[:, :3]}, ValueError, r"embeddings must have shape \(batch_size, 4\), but got \(6, 3\)"),
        ({"embeddings": x[None]}, ValueError, r"labels of shape \(1,\), but got \(6,\)"),
        ({"embeddings": x.long()}, TypeError, r"embeddings must be a floating-point tensor of shape \(batch_size, 4\)"),
        ({"indices_tuple": (y, y)}, ValueError, r"indices_tuple must be a miner's tuple .* of length 2"),
        ({"indices_tuple": (x, x, x)}, TypeError, r"indices_tuple must hold 1-D integer tensors of batch indices"),
        ({"indices_tuple": (y, y, y + 4)}, ValueError, r"indices_tuple must index the batch: values in \[0, 6\)"),
    ]


@pytest.mark.parametrize("name", NAMES)
def test_bad_inputs_raise_and_change_nothing(name: str) -> None:
    loss = getattr(M, name)(**SIZES)
    parameter = getattr(
        loss, {"ProxyAnchorLoss": "proxies", "ProxyNCALoss": "proxies", "SoftTripleLoss": "fc"}.get(name, "W")
    )
    before = parameter.detach().clone()
    x, y = data(6, D, C, torch.float64)
    for change, error, message in _bad_calls(x, y):
        call = {"embeddings": x, "labels": y, **change}
        with pytest.raises(error, match=message):
            loss(**call)
        assert parameter.dtype == torch.float32 and torch.equal(parameter, before), "a call that raised moved W"


def test_bad_results_of_user_callables() -> None:
    x, y = data(6, D, C, torch.float64)
    loss = M.CosFaceLoss(**SIZES, weight_regularizer=lambda w: w.norm(dim=1)).double()
    with pytest.raises(ValueError, match=r"weight_regularizer must return a scalar .* but returned a tensor of dtype"):
        loss(x, y)
    loss = M.CosFaceLoss(**SIZES, reducer=lambda losses: losses * 2).double()
    with pytest.raises(ValueError, match=r"CosFaceLoss reducer must reduce the losses to a scalar"):
        loss(x, y)


@pytest.mark.parametrize("threshold", [0, -5, 181, math.nan])
def test_get_outliers_threshold_is_degrees(threshold: float) -> None:
    loss = M.SubCenterArcFaceLoss(**SIZES)
    x, y = data(6, D, C, torch.float32)
    with pytest.raises(ValueError, match=r"threshold must be a real number in \(0, 180\] degrees"):
        loss.get_outliers(x, y, threshold=threshold)


def test_ref_emb_that_is_the_batch_itself_is_accepted_as_by_pml() -> None:
    x, y = data(6, D, C, torch.float64)
    ours, theirs = side_by_side("ArcFaceLoss", x, y, kwargs=SIZES)
    assert relative(ours.module(x, y, ref_emb=x, ref_labels=y), theirs.module(x, y, ref_emb=x, ref_labels=y)) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
def test_half_precision_returns_the_embeddings_dtype(name: str, dtype: torch.dtype) -> None:
    """Computed in float32 (pml: in the half dtype), returned in the half dtype; close to pml's where pml computes
    (its ProxyNCA has no bfloat16: torch.cdist), and to the float64 loss."""
    x, y = data(32, D, C, torch.float64, seed=3)
    ours, theirs = pair(name, **SIZES)
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    xh = x.to(dtype).requires_grad_()
    loss = ours(xh, y)
    loss.backward()
    assert loss.dtype == dtype and torch.isfinite(loss) and torch.isfinite(xh.grad).all()
    exact = getattr(M, name)(**SIZES).double()
    exact.load_state_dict(ours.state_dict())
    assert relative(loss, exact(x, y), 1.0) < 1e-2
    if not (name == "ProxyNCALoss" and dtype == torch.bfloat16):
        assert relative(loss, theirs(x.to(dtype), y), 1.0) < 2e-2


@pytest.mark.parametrize("name", NAMES)
def test_labels_of_any_integer_dtype(name: str) -> None:
    """pml's cross-entropies take int64 labels only; these take any integer dtype, with the same result."""
    x, y = data(12, D, C, torch.float64)
    loss = getattr(M, name)(**SIZES).double()
    reference = loss(x, y)
    for dtype in (torch.int32, torch.int16, torch.uint8):
        assert loss(x, y.to(dtype)).item() == reference.item()


@pytest.mark.parametrize("name", NAMES)
def test_an_empty_batch_gives_pml_s_value(name: str) -> None:
    x, y = data(0, D, C, torch.float64)
    ours, theirs = side_by_side(name, x, y, kwargs=SIZES)
    expected = theirs.loss.item()  # the mean of no losses (NaN), ProxyAnchor's 0
    if math.isnan(expected):
        assert math.isnan(ours.loss.item())
    else:
        assert ours.loss.item() == expected
        assert ours.grad_w is not None and torch.equal(ours.grad_w, torch.zeros_like(ours.grad_w))


@pytest.mark.parametrize("name", NAMES)
def test_the_parameter_follows_the_embeddings_dtype_as_in_pml(name: str) -> None:
    x, y = data(10, D, C, torch.float64)
    ours, theirs = pair(name, **SIZES)
    ours, theirs = ours.to(torch.float64), theirs.to(torch.float64)
    assert_same(*[r for r in (_run(ours, x, y), _run(theirs, x, y))], 1e-12)
    # float32 embeddings after .to(float64): pml casts its parameter back to float32, and so does this
    ours(x.float(), y), theirs(x.float(), y)
    for key, value in theirs.state_dict().items():
        assert ours.state_dict()[key].dtype == value.dtype == torch.float32


def _run(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
    from tests.compat.side_by_side import run

    return run(module, x, y)


@pytest.mark.parametrize("name", NAMES)
def test_a_pml_checkpoint_of_another_dtype_loads(name: str) -> None:
    """A float16 pml checkpoint (saved to bytes and loaded back, as from a file) into a float32 loss."""
    torch.manual_seed(0)
    saved = getattr(pml_losses, name)(**SIZES).half()
    buffer = io.BytesIO()
    torch.save(saved.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    ours, theirs = getattr(M, name)(**SIZES), getattr(pml_losses, name)(**SIZES)
    ours.load_state_dict(state)
    theirs.load_state_dict(state)
    x, y = data(10, D, C, torch.float32)
    assert relative(ours(x, y), theirs(x, y), 1.0) < 1e-5


def test_device_and_dtype_arguments_and_meta() -> None:
    loss = M.SoftTripleLoss(**SIZES, centers_per_class=3, device="meta", dtype=torch.float64)
    assert loss.fc.device.type == "meta" and loss.fc.dtype == torch.float64 and loss.fc.shape == (D, 3 * C)
    loss = loss.to_empty(device="cpu")
    x, y = data(6, D, C, torch.float64)
    assert loss(x, y).dtype == torch.float64


@pytest.mark.parametrize("name", NAMES)
def test_copies_and_pickles_keep_the_loss(name: str) -> None:
    """``copy.deepcopy`` and ``torch.save`` of the whole module (with a pml reducer and regularizer inside)."""
    import copy

    from pytorch_metric_learning import reducers, regularizers

    reducer = None if name == "ProxyAnchorLoss" else reducers.SumReducer()
    loss = getattr(M, name)(**SIZES, reducer=reducer, weight_regularizer=regularizers.LpRegularizer()).double()
    x, y = data(8, D, C, torch.float64)
    buffer = io.BytesIO()
    torch.save(loss, buffer)
    buffer.seek(0)
    for other in (copy.deepcopy(loss), torch.load(buffer, weights_only=False)):
        assert other(x, y).item() == loss(x, y).item()
    assert list(loss.state_dict()) == [loss.parameter_name]
