"""``mll.compat.insightface`` against InsightFace's equations (``insightface_reference.py``, float64): the logits of
``CombinedMarginLoss``, and ``PartialFC_V2``'s loss and gradients on 2 and 3 gloo ranks — InsightFace's numbers by
default (straight-through ArcFace, the 1e-30 floor, its sampling), mll's exact ones with ``exact=True``, equal to
``mll.ShardedArcFace``/``ShardedCosFace`` on the same weights."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import mll
from mll import functional as MF
from mll.compat.insightface import CombinedMarginLoss, PartialFC_V2
from tests.compat import insightface_world as W
from tests.compat.insightface_reference import insightface_loss, kept_classes, their_logits
from tests.conftest import run_world

TOL = {"rtol": 1e-10, "atol": 1e-10}
WORLDS = (2, 3)
_RESULTS: dict[int, list[dict[str, Any]]] = {}


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory):
    def results(world: int) -> list[dict[str, Any]]:
        if world not in _RESULTS:
            _RESULTS[world] = run_world(W.worker, world, tmp_path_factory.mktemp(f"insightface-world{world}"))
        return _RESULTS[world]

    return results


def reference(case: W.Case, world: int) -> dict[str, torch.Tensor]:
    """InsightFace's loss on the global batch with all weights, and its gradients (autograd of the reference)."""
    d = W.data(case, world)
    x, w = d["x"].clone().requires_grad_(True), d["w"].clone().requires_grad_(True)
    blocks = MF.shard_bounds(W.C, world)
    kept = kept_classes(d["y"], blocks, case.rate, [W.SEED + r for r in range(world)])
    loss = insightface_loss(x, w, d["y"], s=W.S, m2=case.m2, m3=case.m3, threshold=case.threshold, exact=case.exact,
                            kept=kept)  # fmt: skip
    grad_x, grad_w = torch.autograd.grad(loss, (x, w))
    return {"loss": loss.detach(), "grad_x": grad_x, "grad_w": grad_w}


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", W.CASES, ids=lambda case: case.name)
def test_partial_fc_gives_insightfaces_loss_and_gradients(spawned, world: int, case: W.Case) -> None:
    """Every rank's loss is the reference's; its features get ``world`` times their gradient (InsightFace's
    all-gather backward) and its block of weights theirs. float16: the GEMM in half precision, as InsightFace's."""
    want = reference(case, world)
    tol = {"rtol": 2e-2, "atol": 2e-2} if case.fp16 else TOL
    ranks = spawned(world)
    for rank, got in enumerate(ranks):
        got = got["cases"][case.name]
        torch.testing.assert_close(got["loss"].double(), want["loss"], **tol)
        part = W.rows(case, world, rank)
        torch.testing.assert_close(got["grad_x"].double(), world * want["grad_x"][part], **tol)
        start, stop = got["block"]
        torch.testing.assert_close(got["grad_w"].double(), want["grad_w"][start:stop], **tol)
    assert [r["cases"][case.name]["block"] for r in ranks] == MF.shard_bounds(W.C, world)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", [c for c in W.CASES if c.exact and c.threshold == 0 and c.rate == 1],
                         ids=lambda case: case.name)  # fmt: skip
def test_exact_mode_is_mlls_sharded_head(spawned, world: int, case: W.Case) -> None:
    for got in spawned(world):
        got = got["cases"][case.name]
        for key in ("loss", "grad_x", "grad_w"):
            torch.testing.assert_close(got[key], got["head"][key], **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_their_numbers_are_not_the_exact_ones_on_these_weights(spawned, world: int) -> None:
    """The straight-through gradient and the floor change the numbers (else the modes would be one test)."""
    ranks = spawned(world)
    theirs, exact = ranks[0]["cases"]["arcface"], ranks[0]["cases"]["arcface-exact"]
    assert theirs["loss"] < exact["loss"] - 1  # the floor caps the samples past −ln 1e-30
    assert not torch.allclose(theirs["grad_w"], exact["grad_w"], rtol=0.05)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_a_faulty_rank_raises_the_same_error_on_every_rank(spawned, world: int) -> None:
    faults = [r["faults"] for r in spawned(world)]
    for name, pattern in {
        "label": rf"invalid input on rank 1: .*\[0, {W.C}\)",
        "fp16": r"PartialFC_V2 fp16 must be the same on every rank, but got \[0, 1",
        "exact": r"must be the same on every rank",
        "features": r"rank 0",
    }.items():
        assert all(f[name] == faults[0][name] for f in faults), name
        assert re_search(pattern, faults[0][name]), (name, faults[0][name])
    assert all(f["after"] == "True" for f in faults)


def re_search(pattern: str, text: str) -> bool:
    import re

    return re.search(pattern, text) is not None


# ------------------------------------------------------------------------------------------- one process


def cosines_and_labels(n: int = 9, b: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    cos = (torch.rand(n, b, generator=g, dtype=torch.float64) * 1.9 - 0.95).requires_grad_(True)
    labels = torch.randint(-1, b, (n, 1), generator=g)
    labels[0], labels[1] = -1, 2
    return cos, labels


@pytest.mark.parametrize(
    "args",
    [
        (64, 1.0, 0.5, 0.0, 0),
        (64, 1.0, 0.5, 0.0, 0.3),
        (30, 1.0, 0.0, 0.35, 0),
        (30, 1.0, 0.0, 0.35, 0.3),
        (64, 1.0, 1.2, 0.0, 0),
    ],
    ids=["arcface", "arcface-filtered", "cosface", "cosface-filtered", "arcface-past-pi-minus-m"],
)
@pytest.mark.parametrize("exact", [False, True], ids=["theirs", "exact"])
def test_combined_margin_loss_gives_their_logits_and_gradients(args, exact) -> None:
    cos, labels = cosines_and_labels()
    module = CombinedMarginLoss(*args, exact=exact)
    got = module(cos, labels)
    want = their_logits(cos, labels, s=args[0], m2=args[2], m3=args[3], threshold=args[4], exact=exact)
    torch.testing.assert_close(got, want, **TOL)
    probe = torch.randn_like(got)
    torch.testing.assert_close(torch.autograd.grad(got, cos, probe)[0], torch.autograd.grad(want, cos, probe)[0], **TOL)
    assert torch.equal(labels[1], torch.tensor([2]))  # unchanged (InsightFace's changes its logits in place)


def test_straight_through_and_exact_differ_where_the_paper_says() -> None:
    """The target's gradient: s (theirs) against s·(cos m + sin m·cos θ / sin θ) (exact), for θ < π − m."""
    cos = torch.tensor([[0.2, 0.9, -0.5]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1])
    theirs = torch.autograd.grad(CombinedMarginLoss(64, 1, 0.5, 0)(cos, labels)[0, 1], cos)[0][0, 1]
    exact = torch.autograd.grad(CombinedMarginLoss(64, 1, 0.5, 0, exact=True)(cos, labels)[0, 1], cos)[0][0, 1]
    sin = math.sqrt(1 - 0.81)
    assert float(theirs) == 64.0
    assert float(exact) == pytest.approx(64 * (math.cos(0.5) + math.sin(0.5) * 0.9 / sin), rel=1e-12)


def test_partial_fc_in_one_process_keeps_insightfaces_state_dict_and_init() -> None:
    torch.manual_seed(0)
    module = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 16, 100)
    torch.manual_seed(0)
    assert torch.equal(module.weight, torch.normal(0, 0.01, (100, 16)))  # InsightFace's init, draw for draw
    assert list(module.state_dict()) == ["weight"]
    assert (module.num_local, module.class_start, module.rank, module.world_size) == (100, 0, 0, 1)
    # an InsightFace checkpoint (state_dict_softmax_fc): a dict with one tensor, loaded strictly
    theirs = {"weight": torch.randn(100, 16)}
    module.load_state_dict(theirs)
    assert torch.equal(module.weight, theirs["weight"])
    sampled = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 16, 100, sample_rate=0.2)
    assert list(sampled.state_dict()) == ["weight", "sampling_generator"]
    sampled.load_state_dict(theirs)  # without the sampling state: the module keeps its own stream


def test_partial_fc_with_sampling_resumes_bit_identically_from_its_state_dict() -> None:
    make = lambda: PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 200, sample_rate=0.1,  # noqa: E731
                                dtype=torch.float64)  # fmt: skip
    module = make()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randint(0, 200, (6,), generator=g))
               for _ in range(4)]  # fmt: skip
    for x, y in batches[:2]:
        module(x, y).backward()
    saved = io.BytesIO()
    torch.save(module.state_dict(), saved)
    twin = make()
    twin.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    for x, y in batches[2:]:
        module.weight.grad = twin.weight.grad = None
        a, b = module(x, y), twin(x, y)
        a.backward()
        b.backward()
        assert torch.equal(a, b) and torch.equal(module.weight.grad, twin.weight.grad)


def test_partial_fc_in_one_process_is_the_reference_with_and_without_sampling() -> None:
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, 8, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 40, (10,), generator=g)
    for rate in (1.0, 0.3):
        module = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 40, sample_rate=rate, dtype=torch.float64)
        if rate < 1:
            module.sampling_generator = torch.Generator().manual_seed(9)
        loss = module(x, y)
        w = module.weight.detach().clone().requires_grad_(True)
        want = insightface_loss(x, w, y, s=64.0, m2=0.5, kept=kept_classes(y, [(0, 40)], rate, [9]))
        torch.testing.assert_close(loss, want, **TOL)
        got = torch.autograd.grad(loss, (x, module.weight))
        for a, b in zip(got, torch.autograd.grad(want, (x, w))):
            torch.testing.assert_close(a, b, **TOL)


def test_the_floor_caps_the_value_and_not_the_gradient() -> None:
    """A sample whose exact loss exceeds −ln 1e-30 counts 69.0776 in the mean; its gradient is the exact one."""
    module = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.0, 0.4), 2, 2, dtype=torch.float64)
    with torch.no_grad():
        module.weight.copy_(torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64))
    x = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=torch.float64, requires_grad=True)  # each opposite its class
    y = torch.tensor([0, 0])
    loss = module(x, y)
    exact = F.cross_entropy(64 * torch.tensor([[-1.4, 1.0], [0.6, -1.0]], dtype=torch.float64), y, reduction="none")
    assert float(exact[0]) > -math.log(1e-30) > float(exact[1])
    assert float(loss.detach()) == pytest.approx((-math.log(1e-30) + float(exact[1])) / 2, rel=1e-12)
    module.weight.grad = None
    loss.backward()
    plain = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.0, 0.4, exact=True), 2, 2, dtype=torch.float64)
    plain.load_state_dict(module.state_dict())
    plain(x.detach(), y).backward()
    torch.testing.assert_close(module.weight.grad, plain.weight.grad, **TOL)


@pytest.mark.parametrize(
    ("call", "error", "pattern"),
    [
        (lambda: CombinedMarginLoss(64, 0.9, 0.4, 0.0), ValueError, r"InsightFace's two forms, ArcFace \(m1=1, m3=0\)"),
        (lambda: CombinedMarginLoss(64, 1.0, 28.6, 0.0), ValueError, r"m2 radians \(0.5 rad = 28.6°\): .*\[0, 1.571\)"),
        (lambda: CombinedMarginLoss(64, 1.0, 0.0, 1.5), ValueError, r"CombinedMarginLoss m3: CosFace margin"),
        (lambda: CombinedMarginLoss(0, 1.0, 0.5, 0.0), ValueError, r"CombinedMarginLoss s must be"),
        (
            lambda: CombinedMarginLoss(64, 1.0, 0.5, 0.0, -0.1),
            ValueError,
            r"interclass_filtering_threshold must be >= 0",
        ),
        (lambda: CombinedMarginLoss(64, 1.0, "0.5", 0.0), TypeError, r"m2 must be a finite float, but got '0.5'"),
        (lambda: CombinedMarginLoss(64, 1.0, 0.5, 0.0, exact=1), TypeError, r"exact must be a bool"),
        (
            lambda: PartialFC_V2(lambda logits, labels: logits, 8, 10),
            TypeError,
            r"margin_loss must be a CombinedMargin",
        ),
        (lambda: PartialFC_V2(CombinedMarginLoss(64, 1, 0.5, 0), 8, 10, fp16="yes"), TypeError, r"fp16 must be a bool"),
        (lambda: PartialFC_V2(CombinedMarginLoss(64, 1, 0.5, 0), 8, 10, sample_rate=0), ValueError, r"sample_rate"),
        (lambda: PartialFC_V2(CombinedMarginLoss(64, 1, 0.5, 0), 0, 10), ValueError, r"embedding_size must be an int"),
        (
            lambda: PartialFC_V2(CombinedMarginLoss(64, 1, 0.5, 0), 8, 10)(torch.randn(3, 8), torch.tensor([0, 1, 10])),
            ValueError,
            r"\[0, 10\)",
        ),
        (
            lambda: CombinedMarginLoss(64, 1, 0.5, 0)(torch.rand(3, 4), torch.tensor([0, 4, -1])),
            ValueError,
            r"labels must be in \[0, 4\) or −1",
        ),
        (
            lambda: CombinedMarginLoss(64, 1, 0.5, 0)(torch.rand(3, 4), torch.tensor([0, 1])),
            ValueError,
            r"labels must be an integer tensor \(N,\) or \(N, 1\) with N = 3",
        ),
    ],
)
def test_bad_arguments_are_named(call, error, pattern) -> None:
    with pytest.raises(error, match=pattern):
        call()


def test_cosface_ignores_m1_and_m2_as_insightface_does_and_says_so() -> None:
    with pytest.warns(UserWarning, match=r"ignores m1 and m2 when m3 > 0"):
        module = CombinedMarginLoss(64, 1.0, 0.5, 0.2)
    cos, labels = cosines_and_labels()
    torch.testing.assert_close(module(cos, labels), their_logits(cos, labels, s=64, m3=0.2), **TOL)


def test_insightfaces_own_margin_object_is_read_as_ours() -> None:
    class Theirs:  # InsightFace's CombinedMarginLoss, by its attributes
        s, m1, m2, m3, interclass_filtering_threshold = 64, 1.0, 0.5, 0.0, 0.0

    module = PartialFC_V2(Theirs(), 8, 10)
    assert isinstance(module.margin_softmax, CombinedMarginLoss) and not module.margin_softmax.exact
    assert module.margin_softmax.margin().family.name == "insightface_arc"
    assert "m2=0.5" in repr(module)


def test_a_world_of_one_needs_no_process_group_and_eval_mode_changes_nothing() -> None:
    module = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 8, 10, dtype=torch.float64)
    x, y = torch.randn(4, 8, dtype=torch.float64), torch.tensor([0, 3, 9, 9])
    train = module(x, y)
    assert torch.equal(module.eval()(x, y), train)  # as InsightFace's: the loss with its margin in either mode
    assert mll.functional.shard_bounds(10, 1) == [(0, 10)]


def test_an_empty_batch_and_a_tiny_sample_rate() -> None:
    """No sample on any rank: the mean of nothing, NaN (InsightFace's crashes), and a zero gradient. A rate whose
    share rounds to no class (int(0.01 · 10) = 0): the positives alone, as InsightFace's."""
    module = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 4, 10)
    loss = module(torch.zeros(0, 4, requires_grad=True), torch.zeros(0, dtype=torch.long))
    loss.backward()
    assert torch.isnan(loss) and torch.equal(module.weight.grad, torch.zeros(10, 4))
    tiny = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), 4, 10, sample_rate=0.01)
    assert tiny.num_sample == 0
    loss = tiny(torch.randn(3, 4), torch.tensor([1, 1, 7]))
    loss.backward()
    assert torch.isfinite(loss)
    assert (tiny.weight.grad.abs().sum(1) > 0).nonzero().squeeze(1).tolist() == [1, 7]
