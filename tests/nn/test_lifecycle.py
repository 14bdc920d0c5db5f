"""Every exported head — and its class-sharded form — through the life of a model: built on the CPU, on the meta
device (FSDP's path: ``to_empty`` then ``reset_parameters``) and in float64; pickled, saved whole and as a
``state_dict`` (``torch.load(weights_only=True)``), deep-copied; trained two steps, checkpointed with its optimizer
and resumed; re-sharded to two blocks of classes and back; re-initialised; compiled after all that.

Each head is built with what makes its state non-trivial where it takes it: a trainable scale, two sub-centers and
per-class margins as tensors, so that every stage sees parameters and buffers besides the weights. The list of heads
is ``mll``'s exports (``tests.conftest.exported_heads``): a new head runs every stage without being named here.
"""

from __future__ import annotations

import copy
import inspect
import io
import pickle
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mll
from tests.conftest import exported_heads

D, C, N = 6, 5, 7
ALL = exported_heads(sharded=True)
DENSE = exported_heads(sharded=False)
#: per-class values of each margin argument (a tensor ``(C,)`` in the argument's range); "margin" for the others
PER_CLASS = {
    "CombinedMargin": {"m2": (0.1, 0.3)},
    "MagFace": {"margin_low": (0.3, 0.4)},
    "MVSoftmax": {"margin": (0.1, 0.3), "t": (0.1, 0.3)},
    "SphereFace": {"margin": (1.5, 3.0)},
    "LargeMarginSoftmax": {"margin": (1.5, 3.0)},
}


def dense_of(name: str) -> type:
    cls = getattr(mll, name)
    return cls.dense if name.startswith("Sharded") else cls


def build(name: str, **factory: Any) -> nn.Module:
    """The head ``name`` with a trainable scale, two sub-centers and per-class margins where it takes them."""
    dense = dense_of(name)
    params = inspect.signature(dense).parameters
    kwargs: dict[str, Any] = {}
    if "trainable_scale" in params:
        kwargs["trainable_scale"] = True
    if "num_sub_centers" in params and dense is not mll.LargeMarginSoftmax:
        kwargs["num_sub_centers"] = 2
    margins = PER_CLASS.get(dense.__name__, {"margin": (0.1, 0.3)} if "margin" in params else {})
    # given on the CPU, under torch.device("meta") too: a head needs their values (see the test of the meta margin)
    kwargs.update({arg: torch.linspace(low, high, C, device="cpu") for arg, (low, high) in margins.items()})
    return getattr(mll, name)(D, C, **kwargs, **factory)


def batch(step: int = 0, dtype: torch.dtype = torch.float32, norm: float = 20.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Features of about ``norm`` (AdaFace's and MagFace's margins read it; L-Softmax's logits grow with it, so its
    steps take norm 1: a large step would drive its trainable scale negative) and class indices."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(N, D, generator=g, dtype=dtype)
    return x / x.norm(dim=-1, keepdim=True) * norm, torch.randint(0, C, (N,), generator=g)


def optimizer(head: nn.Module) -> torch.optim.Optimizer | None:
    params = [p for p in head.parameters() if p.requires_grad]
    # a large step: AdaM-Softmax's margins leave [0, 1] (the next step projects them back), scales move
    return torch.optim.SGD(params, lr=0.05, momentum=0.9) if params else None


def train_step(head: nn.Module, opt: torch.optim.Optimizer | None, step: int) -> torch.Tensor:
    head.train()
    x, y = batch(step, norm=1.0 if isinstance(head, mll.LargeMarginSoftmax) else 20.0)
    torch.manual_seed(step)  # ElasticFace draws its margins from the default generator
    loss = head.loss(x.requires_grad_(), y)
    if opt is not None:
        opt.zero_grad()
    loss.backward()
    if opt is not None:
        opt.step()
    return loss.detach()


def trained(name: str, steps: int = 2) -> tuple[nn.Module, torch.optim.Optimizer | None]:
    torch.manual_seed(0)
    head = build(name)
    opt = optimizer(head)
    for step in range(steps):
        train_step(head, opt, step)
    return head, opt


def assert_same(got: nn.Module, want: nn.Module) -> None:
    """The same head: class, state (keys, dtypes, values), which parameters train, hyper-parameters, initial values."""
    assert type(got) is type(want)
    mine, theirs = got.state_dict(), want.state_dict()
    assert mine.keys() == theirs.keys()
    for key, value in theirs.items():
        assert mine[key].dtype == value.dtype and mine[key].device == value.device, key
        assert torch.equal(mine[key], value), key
    assert [n for n, p in got.named_parameters()] == [n for n, p in want.named_parameters()]
    assert [p.requires_grad for p in got.parameters()] == [p.requires_grad for p in want.parameters()]
    assert repr(got) == repr(want)
    assert got.initial_values.keys() == want.initial_values.keys()
    for key, value in want.initial_values.items():
        other = got.initial_values[key]
        assert torch.equal(other, value) if isinstance(value, torch.Tensor) else other == value, key
    assert_same_options(got.options(), want.options())


def assert_same_options(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got.keys() == want.keys()
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key
        elif key != "generator":
            assert got[key] == value, key


def eval_logits(head: nn.Module) -> torch.Tensor:
    return head.eval()(batch(9)[0])


@pytest.mark.parametrize("name", ALL)
def test_builds_on_the_meta_device_and_in_float64(name) -> None:
    """On the meta device (as an argument, or under ``torch.device("meta")``) every tensor is meta and the head
    prints and reports its options; in float64 every floating tensor is float64 and a training step is finite."""
    for head in (build(name, device="meta"), _under_meta(name)):
        tensors = [*head.parameters(), *head.buffers()]
        assert tensors and all(t.is_meta for t in tensors)
        assert "meta" in repr(head) or not hasattr(head, "scale")
        assert_same_options(head.options(), build(name).options())
    head = build(name, dtype=torch.float64)
    floating = [t for t in [*head.parameters(), *head.buffers()] if t.is_floating_point()]
    assert all(t.dtype == torch.float64 for t in floating)
    x, y = batch(0, torch.float64)
    loss = head.loss(x.requires_grad_(), y)
    loss.backward()
    assert loss.dtype == torch.float64 and torch.isfinite(loss) and torch.isfinite(x.grad).all()


def shape_step(head: nn.Module, x: torch.Tensor, y: torch.Tensor) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """A training step through both paths — ``F.cross_entropy(head(x, y), y)`` (Proxy-Anchor: its cosines' sum; a
    class-sharded head: its loss) and ``head.loss(x, y)``, per-row losses too where the head has them — and an eval
    forward: each result with the feature gradient its backward left."""
    out = []
    for what in ("dense", "loss", "per-row", "eval"):
        head.train(what != "eval")
        if what == "dense":
            logits = head(x, y)  # (Proxy-Anchor's cosines; a class-sharded head's loss)
            plain = logits.dim() == 2 and not isinstance(head, mll.ProxyAnchor)
            result = F.cross_entropy(logits, y) if plain else logits.sum()
        elif what == "eval":
            result = head(x)
        else:
            reduction = "none" if what == "per-row" else "mean"
            if reduction == "none" and "reduction" not in inspect.signature(head.loss).parameters:
                continue
            if reduction == "none" and isinstance(head, mll.ProxyAnchor):
                continue  # (a loss over classes: no per-row losses)
            result = head.loss(x, y, reduction=reduction)
        x.grad = None
        result.sum().backward()
        out.append((what, result, x.grad))
    head.train()
    return out


@pytest.mark.parametrize("name", ALL)
def test_a_step_runs_on_the_meta_device(name) -> None:
    """Shape inference, as PyTorch's own layers allow it: a head on the meta device runs a training step through both
    paths and an eval forward on meta features and labels — no value is read (the checks of values, the path
    choices that would read one, a class-sharded step's collectives in a world of 1) — and gives results and
    gradients of the shapes a CPU step gives. Also at a size whose ``loss()`` takes the chunked and row-tiled
    paths (nothing is allocated on the meta device)."""
    cpu = build(name)
    x, y = batch(0)
    want = shape_step(cpu, x.clone().requires_grad_(), y)
    head = build(name, device="meta")
    got = shape_step(head, x.to("meta").requires_grad_(), y.to("meta"))
    assert [what for what, _, _ in got] == [what for what, _, _ in want]
    for (what, result, grad), (_, result_cpu, grad_cpu) in zip(got, want):
        assert result.is_meta and grad.is_meta, what
        assert result.shape == result_cpu.shape and result.dtype == result_cpu.dtype, what
        assert grad.shape == grad_cpu.shape and grad.dtype == grad_cpu.dtype, what
    assert all(p.grad is None or p.grad.is_meta for p in head.parameters())
    big = getattr(mll, name)(64, 200_000, device="meta")
    xb = torch.empty(512, 64, device="meta", requires_grad=True)
    loss = big.loss(xb, torch.empty(512, dtype=torch.int64, device="meta"))
    loss.backward()
    assert loss.is_meta and loss.shape == () and xb.grad.shape == xb.shape
    assert all(p.grad is None or p.grad.shape == p.shape for p in big.parameters())


@pytest.mark.parametrize("name", DENSE)
def test_a_step_runs_under_fake_tensors(name) -> None:
    """Under ``FakeTensorMode`` (shapes without storage, as ``torch.export`` and memory estimators trace a model) a
    head built on the CPU runs both paths' step: its real buffers (a scale, a statistic) meet fake features and no
    value is read."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    head = build(name)
    x, y = batch(0)
    want = shape_step(build(name), x.clone().requires_grad_(), y)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        got = shape_step(head, mode.from_tensor(x).requires_grad_(), mode.from_tensor(y))
    assert [(w, r.shape, g.shape) for w, r, g in got] == [(w, r.shape, g.shape) for w, r, g in want]


def test_a_per_class_margin_on_the_meta_device_is_refused_with_the_reason() -> None:
    with torch.device("meta"), pytest.raises(ValueError, match=r"ArcFace margin is a tensor on the meta device: its"):
        mll.ArcFace(D, C, margin=torch.linspace(0.1, 0.3, C))


def _under_meta(name: str) -> nn.Module:
    with torch.device("meta"):
        return build(name)


@pytest.mark.parametrize("name", ALL)
def test_materialises_from_the_meta_device_as_built_directly(name) -> None:
    """``to_empty`` then ``reset_parameters`` after the same seed: the state of a head built directly — the scale,
    per-class margins and running statistics too, which ``to_empty`` leaves as uninitialised memory."""
    torch.manual_seed(3)
    direct = build(name)
    for head in (build(name, device="meta"), _under_meta(name)):
        head.to_empty(device="cpu")
        torch.manual_seed(3)
        head.reset_parameters()
        assert_same(head, direct)
        torch.testing.assert_close(eval_logits(head), eval_logits(direct), rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_pickles_saves_and_copies_to_an_equal_head(name) -> None:
    """A trained head through ``pickle``, ``torch.save`` of the module and of its ``state_dict`` (loaded with
    ``weights_only=True`` into a fresh head), and ``deepcopy``: an equal head, whose next training step is the
    original's; the copy is independent."""
    head, _ = trained(name)
    whole = io.BytesIO()
    torch.save(head, whole)
    weights = io.BytesIO()
    torch.save(head.state_dict(), weights)
    fresh = build(name)
    fresh.load_state_dict(torch.load(io.BytesIO(weights.getvalue()), weights_only=True))
    copies = {
        "pickle": pickle.loads(pickle.dumps(head)),
        "torch.save": torch.load(io.BytesIO(whole.getvalue()), weights_only=False),
        "state_dict": fresh,
        "deepcopy": copy.deepcopy(head),
    }
    for how, twin in copies.items():
        assert_same(twin, head) if how != "state_dict" else assert_same_state(twin, head)
        torch.testing.assert_close(train_step(twin, None, 5), train_step(copy.deepcopy(head), None, 5), rtol=0, atol=0)
    with torch.no_grad():
        copies["deepcopy"].get_parameter("weight").add_(1.0) if hasattr(head, "weight") else None
    assert not hasattr(head, "weight") or not torch.equal(head.weight, copies["deepcopy"].weight)


def assert_same_state(got: nn.Module, want: nn.Module) -> None:
    mine = got.state_dict()
    for key, value in want.state_dict().items():
        assert torch.equal(mine[key], value), key


@pytest.mark.parametrize("name", ALL)
def test_trains_checkpoints_and_resumes(name) -> None:
    """Two training steps, a checkpoint of the head and its optimizer (``weights_only=True``), a fresh head resumed
    from it: its third step is the uninterrupted head's. A head rebuilt from ``options()`` loads the checkpoint too
    (AdaM-Softmax's trained margins lie outside [0, 1] until its next step projects them)."""
    head, opt = trained(name)
    buffer = io.BytesIO()
    torch.save({"head": head.state_dict(), "opt": None if opt is None else opt.state_dict()}, buffer)
    checkpoint = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    torch.manual_seed(7)
    resumed = build(name)
    resumed.load_state_dict(checkpoint["head"])
    resumed_opt = optimizer(resumed)
    if resumed_opt is not None:
        resumed_opt.load_state_dict(checkpoint["opt"])
    rebuilt = type(head)(D, C, **head.options())
    rebuilt.load_state_dict(checkpoint["head"])
    assert_same_state(rebuilt, head)
    want = train_step(head, opt, 2)
    torch.testing.assert_close(train_step(resumed, resumed_opt, 2), want, rtol=0, atol=0)
    assert_same_state(resumed, head)


@pytest.mark.parametrize("name", DENSE)
def test_reshards_to_two_blocks_and_back(name) -> None:
    """A trained dense head cut into two blocks of classes (``from_dense``: each rank's part of a world of two), each
    block saved and loaded into a sharded head built from the dense head's ``options()``, then reassembled
    (``dense_state_dict``): the dense head's state. Each block keeps the dense head's initial values."""
    dense, _ = trained(name)
    sharded = getattr(mll, "Sharded" + name)
    blocks = []
    for class_range in ((0, 2), (2, C)):
        shard = sharded.from_dense(dense, class_range=class_range)
        saved = io.BytesIO()
        torch.save(shard.state_dict(), saved)
        again = sharded(D, C, class_range=class_range, **dense.options())
        again.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
        for key, value in dense.initial_values.items():
            mine = again.initial_values[key]
            assert torch.equal(mine, value) if isinstance(value, torch.Tensor) else mine == value, key
        blocks.append(again.state_dict())
    back = build(name)
    back.load_state_dict(mll.nn.dense_state_dict(blocks))
    assert_same_state(back, dense)
    torch.testing.assert_close(eval_logits(back), eval_logits(dense), rtol=0, atol=0)


@pytest.mark.parametrize("name", ALL)
def test_reset_parameters_restores_the_initial_state(name) -> None:
    """After training (a trainable scale, learned margins, running statistics, annealed weights all moved), and with
    every other tensor changed too: ``reset_parameters`` after a seed gives the head built after that seed;
    ``reset_running_stats`` restores the running statistics alone."""
    torch.manual_seed(5)
    fresh = build(name)
    head, _ = trained(name)
    with torch.no_grad():
        for tensor in [*head.parameters(), *head.buffers()]:
            tensor.add_(1) if tensor.is_floating_point() else None
    moved = {k: v.clone() for k, v in head.state_dict().items()}
    head.reset_running_stats()
    stats = set(getattr(head, "running_stats", ("means",) if isinstance(head, mll.DeepNCM) else ()))
    for key, value in head.state_dict().items():
        assert torch.equal(value, fresh.state_dict()[key] if key in stats else moved[key]), key
    torch.manual_seed(5)
    head.reset_parameters()
    assert_same(head, fresh)


@pytest.mark.slow
@pytest.mark.parametrize("name", DENSE)
def test_compiles_after_its_life(name) -> None:
    """A head built on the meta device, materialised, trained, pickled and reloaded still compiles as one graph
    (``fullgraph=True``, AOTAutograd) — its dense step and its ``loss()`` — and gives the eager step's values,
    gradients and state."""
    with torch.device("meta"):
        head = build(name)
    head.to_empty(device="cpu")
    torch.manual_seed(0)
    head.reset_parameters()
    opt = optimizer(head)
    train_step(head, opt, 0)
    head = pickle.loads(pickle.dumps(head))
    twin = copy.deepcopy(head)

    def step(h: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(h(x, y), y) + h.loss(x, y)

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x, y = batch(1)
    results = []
    for fn, h in ((compiled, head), (step, twin)):
        h.train()
        xs = x.clone().requires_grad_()
        torch.manual_seed(1)
        loss = fn(h, xs, y)
        loss.backward()
        results.append((loss.detach(), xs.grad, [p.grad for p in h.parameters()], [b.clone() for b in h.buffers()]))
    torch.testing.assert_close(results[0], results[1], rtol=1e-5, atol=1e-5)
