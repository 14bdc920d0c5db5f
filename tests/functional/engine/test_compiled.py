"""The compiled chunk kernel (``mll/functional/_engine/compiled.py``, ``set_chunk_kernel("compiled")``) against the
eager kernel, its reference: the loss and every gradient, for each kind of spec the engine serves, with the logits kept
and recomputed. Each variant compiles once (seconds on the CPU), so the matrix is small but covers every branch of
the two bodies: plain scaled cosines, sub-centers (max and soft pooling), a non-target part (CurricularFace),
dense and few-hot soft targets, a scale and a margin that need gradients, half precision and a sharded block."""

import warnings

import pytest
import torch
import torch._inductor.exc

from mll import functional as MF
from mll.functional._engine import compiled as _compiled

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]  # every test compiles a chunk body

N, D, C = 12, 8, 40
CHUNK = 16  # three chunks, the last narrower (two compiled shapes)


@pytest.fixture
def kernel():
    """Restore the process's choice after each test."""
    before = MF.chunk_kernel()
    yield
    MF.set_chunk_kernel(before)


def _problem(dtype, k=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=torch.float64).to(dtype)
    w = torch.randn(C * k, D, generator=g, dtype=torch.float64).to(dtype)
    y = torch.randint(0, C, (N,), generator=g)
    return x, w, y, g


def _run(mode, x, w, target, scale=30.0, margin=None, sharded=False, **kwargs):
    MF.set_chunk_kernel(mode)
    xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    s = scale.clone().requires_grad_(True) if isinstance(scale, torch.Tensor) else scale
    m = margin
    if isinstance(margin, torch.Tensor):
        m = margin.clone().requires_grad_(True)
    margin_kwargs = {"margin": MF.ARC(0.5)} if margin is None else {"margin": m, "margin_type": "cos"}
    if not isinstance(m, torch.Tensor) and margin is not None:
        margin_kwargs = {"margin": m}
    if sharded:
        loss = MF.sharded_margin_cross_entropy(
            xi, wi, target, class_start=0, num_classes=C, scale=s, chunk_size=CHUNK, **margin_kwargs, **kwargs
        )
    else:
        loss = MF.margin_cross_entropy(xi, wi, target, scale=s, chunk_size=CHUNK, **margin_kwargs, **kwargs)
    leaves = [xi, wi] + [t for t in (s, m) if isinstance(t, torch.Tensor)]
    grads = torch.autograd.grad(loss, leaves)
    return [loss.detach(), *grads]


def _compare(x, w, target, tol, **kwargs):
    eager = _run("eager", x, w, target, **kwargs)
    compiled = _run("compiled", x, w, target, **kwargs)
    assert len(eager) == len(compiled)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, **tol)


F64 = {"rtol": 1e-12, "atol": 1e-12}


@pytest.mark.parametrize(
    "case",
    ["plain", "sub_centers_max", "sub_centers_soft", "negatives", "dense_soft", "few_hot", "scale_and_margin_grad",
     "sharded"],
)  # fmt: skip
def test_compiled_equals_eager_in_float64(case, kernel, kernel_mode) -> None:
    if kernel_mode == "dense":
        pytest.skip("the dense path has no chunk kernel to compile")
    k = 3 if case.startswith("sub_centers") else 1
    x, w, y, g = _problem(torch.float64, k)
    kwargs: dict = {}
    target = y
    if k > 1:
        kwargs = {"num_sub_centers": k, "pooling": "soft" if case.endswith("soft") else "max"}
    if case == "negatives":
        kwargs = {"margin": MF.CURRICULAR(0.5, torch.tensor(0.2, dtype=torch.float64))}
    if case == "dense_soft":
        target = torch.softmax(torch.randn(N, C, generator=g, dtype=torch.float64), -1)
    if case == "few_hot":
        other = torch.randint(0, C, (N,), generator=g)
        lam = torch.rand(N, generator=g, dtype=torch.float64)
        target = (torch.stack([y, other], 1), torch.stack([lam, 1 - lam], 1))
    if case == "scale_and_margin_grad":
        kwargs = {"scale": torch.tensor(20.0, dtype=torch.float64), "margin": torch.tensor(0.3, dtype=torch.float64)}
    _compare(x, w, target, F64, sharded=case == "sharded", **kwargs)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_equals_eager_in_single_and_half_precision(dtype, kernel) -> None:
    """float32 within 1e-5; bfloat16 inputs accumulate in float32 in both kernels, within 1e-4 of each other."""
    x, w, y, _ = _problem(dtype)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-4, "atol": 1e-4}
    _compare(x, w, y, tol)


def test_compiled_equals_eager_under_bf16_autocast(kernel) -> None:
    """float32 inputs under CPU bf16 autocast: the chunk GEMMs in bf16, the bodies in float32, in both kernels."""
    x, w, y, _ = _problem(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _compare(x, w, y, {"rtol": 1e-5, "atol": 1e-5})


def test_a_compiler_failure_warns_once_and_runs_eagerly(kernel, monkeypatch) -> None:
    x, w, y, _ = _problem(torch.float64)
    with MF.set_loss_path("keep"):  # the compiled kernel's plan (its chunks kept), which the failed call then runs
        expected = _run("eager", x, w, y)

    def broken(fn, **kwargs):
        def call(*args, **kw):
            raise torch._inductor.exc.InductorError(RuntimeError("no C++ compiler"), "")

        return call

    monkeypatch.setattr(_compiled, "_compiled", {})
    monkeypatch.setattr(_compiled, "_warned", False)
    monkeypatch.setattr(torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="chunk kernel failed.*eager kernel runs instead"):
        got = _run("compiled", x, w, y)
    assert MF.chunk_kernel() == "eager"
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        MF.set_chunk_kernel("compiled")
        _run("compiled", x, w, y)  # fails again, silently this time


def test_errors_of_the_maths_are_not_swallowed(kernel, monkeypatch) -> None:
    def wrong(fn, **kwargs):
        def call(*args, **kw):
            raise ValueError("a bug in the body")

        return call

    monkeypatch.setattr(_compiled, "_compiled", {})
    monkeypatch.setattr(torch, "compile", wrong)
    x, w, y, _ = _problem(torch.float64)
    with pytest.raises(ValueError, match="a bug in the body"):
        _run("compiled", x, w, y)


def test_set_chunk_kernel_names_what_it_accepts(kernel) -> None:
    with pytest.raises(ValueError, match="kernel must be 'eager' or 'compiled', but got 'triton'"):
        MF.set_chunk_kernel("triton")
    MF.set_chunk_kernel("compiled")
    assert MF.chunk_kernel() == "compiled"
