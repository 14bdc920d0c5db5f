"""margin_cross_entropy: the chunked loss equals the dense path, value and gradients, for every chunk size."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import mll
from mll import functional as MF

# every test runs with the kernel keeping its logits and with it recomputing them
pytestmark = pytest.mark.usefixtures("kernel_mode")

MARGINS = {"arc": 0.5, "cos": 0.35, "none": 0.0}


def dense_loss(x, w, target, scale, margin_type, k, reduction="mean", easy=False):
    cos = MF.cosine_logits(x, w, k)
    m = MARGINS[margin_type]
    if margin_type == "arc":
        logits = MF.arc_margin(cos, target, m, easy_margin=easy, scale=scale)
    else:
        logits = MF.cos_margin(cos, target, m, scale=scale)
    flat = logits.reshape(-1, logits.shape[-1])
    t = target.reshape(-1, logits.shape[-1]) if target.is_floating_point() else target.reshape(-1)
    out = F.cross_entropy(flat, t, reduction=reduction)
    return out.reshape(target.shape[: target.dim() - target.is_floating_point()]) if reduction == "none" else out


@st.composite
def problems(draw):
    n, d, c, k = draw(st.integers(1, 6)), draw(st.integers(1, 5)), draw(st.integers(2, 9)), draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    w = torch.randn(c * k, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, c, (n,), generator=g)
    soft = torch.softmax(3 * torch.randn(n, c, generator=g, dtype=torch.float64), -1)
    target = soft if draw(st.booleans()) else y
    return x, w, target, k, draw(st.integers(1, c + 2)), draw(st.sampled_from(list(MARGINS)))


@given(problems(), st.sampled_from(["mean", "sum", "none"]), st.booleans())
def test_equals_the_dense_path_in_float64(problem, reduction, easy) -> None:
    x, w, target, k, chunk, margin_type = problem
    x.requires_grad_(True)
    w.requires_grad_(True)
    scale = torch.tensor(7.0, dtype=torch.float64, requires_grad=True)
    dense = dense_loss(x, w, target, scale, margin_type, k, reduction, easy)
    chunked = MF.margin_cross_entropy(
        x, w, target, scale=scale, margin=MARGINS[margin_type], margin_type=margin_type, easy_margin=easy,
        num_sub_centers=k, chunk_size=chunk, reduction=reduction,
    )  # fmt: skip
    torch.testing.assert_close(chunked, dense, rtol=1e-10, atol=1e-10)
    weights = torch.randn(dense.shape, dtype=torch.float64)
    g_dense = torch.autograd.grad((dense * weights).sum(), (x, w, scale))
    g_chunked = torch.autograd.grad((chunked * weights).sum(), (x, w, scale))
    for i, (a, b) in enumerate(zip(g_chunked, g_dense)):
        if i < 2 and x.shape[-1] == 1:
            # d = 1: a normalised feature or weight is ±1 whatever its value, so both paths' gradients are 0 up to
            # the rounding of terms that cancel — and at cos = ±1 ArcFace's slope reaches cot θ ≈ 1/√ε ≈ 7e7, so
            # the rounding is ~1e-8
            torch.testing.assert_close(a, torch.zeros_like(a), rtol=0, atol=1e-6)
            continue
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("margin_type", list(MARGINS))
@pytest.mark.parametrize("soft", [False, True])
def test_float32_matches_dense_to_1e_5(margin_type, soft) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 32, generator=g, requires_grad=True)
    w = torch.randn(3 * 300, 32, generator=g, requires_grad=True)
    y = torch.randint(0, 300, (64,), generator=g)
    target = torch.softmax(torch.randn(64, 300, generator=g), -1) if soft else y
    dense = dense_loss(x, w, target, 30.0, margin_type, 3)
    chunked = MF.margin_cross_entropy(
        x, w, target, scale=30.0, margin=MARGINS[margin_type], margin_type=margin_type, num_sub_centers=3, chunk_size=37
    )
    torch.testing.assert_close(chunked, dense, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(chunked, (x, w)), torch.autograd.grad(dense, (x, w))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("margin_type", list(MARGINS))
def test_gradcheck(margin_type) -> None:
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(10, 3, dtype=torch.float64, requires_grad=True)
    s = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 4, 2, 4])

    def f(x, w, s):
        return MF.margin_cross_entropy(
            x, w, y, scale=s, margin=MARGINS[margin_type], margin_type=margin_type, num_sub_centers=2, chunk_size=2
        )

    assert torch.autograd.gradcheck(f, (x, w, s))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_accumulates_in_float32(dtype) -> None:
    g = torch.Generator().manual_seed(3)
    x32, w32 = torch.randn(16, 8, generator=g), torch.randn(50, 8, generator=g)
    y = torch.randint(0, 50, (16,), generator=g)
    x, w = x32.to(dtype).requires_grad_(True), w32.to(dtype).requires_grad_(True)
    loss = MF.margin_cross_entropy(x, w, y, scale=30.0, margin=0.5, margin_type="arc", chunk_size=7)
    assert loss.dtype == torch.float32
    reference = dense_loss(x.detach().float(), w.detach().float(), y, 30.0, "arc", 1)
    torch.testing.assert_close(loss, reference, rtol=5e-2, atol=5e-2)
    loss.backward()
    assert x.grad.dtype == dtype and torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("name", ["ScaledNormalizedLinear", "CosFace", "ArcFace"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("soft", [False, True])
def test_module_loss_equals_cross_entropy_of_forward(name, training, soft) -> None:
    head = getattr(mll, name)(6, 9, 2, dtype=torch.float64).train(training)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 9, (2, 5))
    target = torch.softmax(torch.randn(2, 5, 9, dtype=torch.float64), -1) if soft else y
    logits = head(x, target)
    dense = F.cross_entropy(logits.reshape(10, 9), target.reshape(10, 9) if soft else y.reshape(10))
    chunked = head.loss(x, target, chunk_size=4)
    torch.testing.assert_close(chunked, dense, rtol=1e-10, atol=1e-10)
    g_dense = torch.autograd.grad(dense, (x, head.weight))
    g_chunked = torch.autograd.grad(chunked, (x, head.weight))
    for a, b in zip(g_chunked, g_dense):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    assert head.loss(x, target, reduction="none").shape == (2, 5)


@pytest.mark.parametrize("reduction", ["sum", "none", "mean"])
def test_empty_batch_matches_the_dense_path(reduction) -> None:
    x = torch.randn(0, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(0, dtype=torch.long)
    dense = dense_loss(x, w, y, 10.0, "arc", 2, reduction)
    chunked = MF.margin_cross_entropy(x, w, y, scale=10.0, margin=0.5, margin_type="arc", num_sub_centers=2,
                                      reduction=reduction)  # fmt: skip
    torch.testing.assert_close(chunked, dense, equal_nan=True)
    if reduction != "mean":
        chunked.sum().backward()
        assert torch.equal(w.grad, torch.zeros_like(w))


def test_soft_targets_that_require_grad_are_refused() -> None:
    target = torch.softmax(torch.randn(3, 5), -1).requires_grad_(True)
    with pytest.raises(ValueError, match="does not differentiate soft targets"):
        MF.margin_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), target, scale=10.0)


def test_default_chunk_size() -> None:
    # about 2^18 logits per chunk on the CPU, never fewer than 512 classes (narrower GEMMs run far below the
    # machine's rate), never more than C
    assert MF.chunked.default_chunk_size(256, 1_000_000, 1) == 2**18 // 256 == 1024
    assert MF.chunked.default_chunk_size(4096, 1_000_000, 1) == 512
    assert MF.chunked.default_chunk_size(2**19, 10, 1) == 10
    assert MF.chunked.default_chunk_size(4, 10, 1) == 10
    # per device type: accelerators get 16 times the CPU's chunk (larger GEMMs, fewer launches)
    assert MF.chunked.default_chunk_size(256, 1_000_000, 1, "cuda") == 2**22 // 256 == 16384
    assert MF.chunked.default_chunk_size(256, 1_000_000, 2, torch.device("cuda", 1)) == 8192
    assert MF.chunked.default_chunk_size(256, 1_000_000, 1, torch.device("cpu")) == 1024
    assert MF.chunked.default_chunk_size(512, 10_000, 1, "cuda") == 8192


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"chunk_size": 0}, r"chunk_size must be None or an integer >= 1, but got 0"),
        ({"reduction": "avg"}, r"reduction must be 'mean', 'sum' or 'none', but got 'avg'"),
        (
            {"margin_type": "tan"},
            r"margin_type must be one of \['arc', 'arc_easy', 'combined', 'cos', 'none', 'sphere'\]",
        ),
        ({"margin_type": "sphere"}, r"the sphere margin has parameters \['margin', 'lambda_'\]: pass margin=SPHERE"),
        ({"margin": 2.0, "margin_type": "arc"}, r"ArcFace margin must be in"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        MF.margin_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), torch.tensor([0, 1, 2]), scale=10.0, **kwargs)


# ---------------------------------------------------------------------------------------------- .grad in place


class _LargeAllocations(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the outputs of at least ``numel`` elements (``exact``: of ``numel`` elements) that a region
    allocates."""

    def __init__(self, numel: int, exact: bool = False) -> None:
        super().__init__()
        self.numel, self.exact, self.seen = numel, exact, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        known = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):  # new storage only: views and in-place ops allocate nothing
            size = t.numel() if isinstance(t, torch.Tensor) else 0
            if (
                size == self.numel or (size > self.numel and not self.exact)
            ) and t.untyped_storage().data_ptr() not in known:
                self.seen.append(str(func))
        return out


def test_an_existing_grad_is_accumulated_into_in_place(kernel_mode) -> None:
    """Gradient accumulation adds each chunk's weight gradient into .grad: no C×d buffer in the backward, the same
    numbers as autograd's accumulation; torch.autograd.grad, backward(inputs=...) and hooks are left alone. The row
    tiles form the weight gradient in the forward, and the dense path's GEMM forms it in backward: one C×d buffer,
    which autograd adds into .grad."""
    torch.manual_seed(0)
    # more weight elements than the fold's scratch block (2^19), so that only C×d buffers are counted
    head = mll.ArcFace(300, 2000, 2, dtype=torch.float64)
    x, y = torch.randn(6, 300, dtype=torch.float64), torch.randint(0, 2000, (6,))
    head.loss(x, y, chunk_size=300).backward()
    once = head.weight.grad.clone()
    big = head.weight.numel()
    with _LargeAllocations(big) as fresh:  # no .grad yet: the gradient itself is the one C×d allocation
        head.weight.grad = None
        head.loss(x, y, chunk_size=300).backward()
    assert len(fresh.seen) >= 1
    with _LargeAllocations(big) as accumulating:
        head.loss(x, y, chunk_size=300).backward()
    forms_its_own = kernel_mode in ("row_tiles", "row_groups", "dense")
    assert len(accumulating.seen) == (1 if forms_its_own else 0), accumulating.seen
    torch.testing.assert_close(head.weight.grad, 2 * once, rtol=1e-12, atol=1e-12)
    (g,) = torch.autograd.grad(head.loss(x, y), [head.weight])
    torch.testing.assert_close(g, once, rtol=1e-12, atol=1e-12)
    xr = x.clone().requires_grad_()
    head.loss(xr, y).backward(inputs=[xr])
    torch.testing.assert_close(head.weight.grad, 2 * once, rtol=1e-12, atol=1e-12)  # untouched
    seen = []
    handle = head.weight.register_hook(lambda grad: seen.append(grad) or grad * 0.5)
    head.loss(x, y).backward()
    handle.remove()
    assert len(seen) == 1
    torch.testing.assert_close(head.weight.grad, 2.5 * once, rtol=1e-12, atol=1e-12)


def test_the_cost_model_picks_three_gemms_where_the_budget_allows() -> None:
    with MF.set_loss_path("auto"):  # the cost model itself, whatever path the kernel_mode fixture forced
        _cost_model_checks()


def _cost_model_checks() -> None:
    # the automatic budget: an eighth of one N×C·K logits buffer, raised to 256 rows of it but not above a quarter,
    # within [16 MB, 1 GB] on the CPU
    assert MF.loss_plan(256, 10_000).budget == 1 << 24
    assert MF.loss_plan(4096, 100_000).budget == 4096 * 100_000 * 4 // 8
    assert MF.loss_plan(2048, 100_000).budget == 256 * 100_000 * 4  # 256 rows: an eighth would be 256 rows too
    assert MF.loss_plan(1024, 100_000).budget == 256 * 100_000 * 4  # raised to 256 rows (a quarter)
    assert MF.loss_plan(512, 100_000).budget == 512 * 100_000 * 4 // 4  # 256 rows would be half: a quarter
    assert MF.loss_plan(8192, 1_000_000).budget == 1 << 30
    assert MF.loss_plan(256, 10_000, device="meta").budget == 1 << 26  # an accelerator's floor is larger
    # a loss that cannot take the row tiles (per-row losses): all the logits within the budget are kept (three GEMMs)
    per_row = {"reduction": "none"}
    assert MF.loss_plan(256, 16_384, **per_row).path == "keep"
    assert MF.loss_plan(256, 16_385, **per_row).path != "keep"
    assert MF.loss_plan(256, 8_192, dtype=torch.float64, **per_row).path == "keep"
    assert MF.loss_plan(256, 8_193, dtype=torch.float64, **per_row).path != "keep"  # 8 bytes per logit
    assert MF.loss_plan(256, 4_096, dtype=torch.bfloat16, plain=False, **per_row).path == "keep"  # four buffers
    assert MF.loss_plan(256, 4_097, dtype=torch.bfloat16, plain=False, **per_row).path != "keep"
    # a single process's scalar loss takes the row tiles even where every logit fits: one tile of all the rows here
    for classes in (129, 1_000, 16_384):
        assert (MF.loss_plan(256, classes).path, MF.loss_plan(256, classes).rows) == ("row_tiles", 256)
    assert (MF.loss_plan(256, 10_000, requires_grad=False).path, MF.loss_plan(64, 6, chunk_size=2).path) == (
        "keep",
        "row_tiles",
    )
    # a scalar loss whose tile of >= 96 rows fits: row tiles (three GEMMs); else the logits are recomputed
    plan = MF.loss_plan(4096, 100_000)
    assert (plan.path, plan.rows) == ("row_tiles", 512)
    # a tile's elementwise work runs on groups of rows: one buffer per tile whatever the logits (a non-target part,
    # sub-centers, soft targets), where a chunk of the chunk kernel holds four
    assert (MF.loss_plan(1024, 100_000, plain=False).path, MF.loss_plan(1024, 100_000, plain=False).rows) == (
        "row_tiles",
        256,
    )
    assert (MF.loss_plan(1024, 50_000, 2).path, MF.loss_plan(1024, 50_000, 2).rows) == ("row_tiles", 256)
    assert MF.loss_plan(256, 4_097, plain=False).path == "row_tiles"  # one tile of 256 rows (a tile holds one buffer)
    assert MF.loss_plan(4096, 100_000, reduction="none").path == "recompute"
    assert MF.loss_plan(4096, 100_000, requires_grad=False).path == "recompute"
    plan = MF.loss_plan(256, 100_000)  # a quarter of the logits: tiles of 64 rows
    assert (plan.path, plan.rows) == ("row_tiles", 64)
    assert MF.loss_plan(128, 100_000).path == "recompute"  # the least budget, 16 MB, holds 40 rows: skinny GEMMs
    # a planned tile's rows are a multiple of 32 (the GEMM's blocks): 16 MB of 10^4 logits a row is 419 rows
    assert MF.loss_plan(1024, 10_000).rows == 416
    with MF.set_memory_budget(100 * 100_000 * 4):
        assert MF.loss_plan(1024, 100_000).rows == 96
    with MF.set_memory_budget(20 * 100_000 * 4), MF.set_loss_path("row_tiles"):
        assert MF.loss_plan(1024, 100_000).rows == 20  # below 32 rows: as they are
    with MF.set_memory_budget(1 << 20):
        assert MF.loss_plan(4096, 100_000).path == "recompute"
    with MF.set_memory_budget(1 << 34):  # every logit fits: one tile of all the rows, or kept for per-row losses
        assert (MF.loss_plan(4096, 100_000).path, MF.loss_plan(4096, 100_000).rows) == ("row_tiles", 4096)
        assert MF.loss_plan(4096, 100_000, reduction="none").path == "keep"
    with MF.set_loss_path("row_tiles", rows=5):
        assert (MF.loss_plan(256, 100_000).path, MF.loss_plan(256, 100_000).rows) == ("row_tiles", 5)
        assert MF.loss_plan(256, 100_000, reduction="none").path == "recompute"
    with MF.set_loss_path("keep"):
        assert MF.loss_plan(8192, 1_000_000).path == "keep"
    assert MF.loss_plan(4096, 100_000).path == "row_tiles"  # the settings are restored
    # a tiny single-process step: the dense logits (the kernel's Python would cost more); not with a chunk size
    assert MF.loss_plan(64, 6).path == "dense"
    assert MF.loss_plan(64, 6, chunk_size=2, reduction="none").path == "keep"
    assert MF.loss_plan(128, 129).path == "row_tiles"  # 2^14 + 128 logits: the kernel, in one tile
    with pytest.raises(ValueError, match="path must be one of 'auto', 'dense', 'keep', 'row_tiles', 'recompute'"):
        MF.set_loss_path("fused")
    with pytest.raises(ValueError, match="budget must be None or a number of bytes >= 0, but got -1"):
        MF.set_memory_budget(-1)


@pytest.mark.parametrize("path", ["auto", "dense", "keep", "row_tiles", "recompute"])
def test_the_early_dense_answer_is_the_plans(path) -> None:
    """``chunked_loss`` asks :func:`dense_first` before it prepares the kernel; ``plan`` must say the same."""
    from mll.functional._engine.plan import dense_first, plan

    shapes = [(64, 6, 1), (64, 6, 3), (128, 128, 1), (128, 129, 1), (1, 16_384, 1), (1, 16_385, 1), (4096, 10, 1)]
    with MF.set_loss_path(path):
        for rows, classes, k in shapes:
            for chunk in (None, 2):
                for scalar in (False, True):
                    chosen = plan(rows, classes, k, 1, torch.float32, scalar_loss=scalar, chunk=chunk, dense=True)
                    assert dense_first(rows, classes, k, chunk) == (chosen.path == "dense"), (rows, classes, k, chunk)


def test_a_second_backward_gives_the_same_gradients(kernel_mode) -> None:
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 11, (5,))
    loss = MF.margin_cross_entropy(x, w, y, scale=8.0, margin=MF.ARC(0.4), chunk_size=4)
    first = torch.autograd.grad(loss, [x, w], retain_graph=True)
    second = torch.autograd.grad(loss, [x, w])
    for a, b in zip(first, second):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["CurricularFace", "NPCFace", "ArcFace"])
def test_an_empty_batch_with_sub_centers_gives_empty_losses(name, kernel_mode) -> None:
    """The target cosines of an empty batch pool over K sub-centers too (a reshape of zero rows crashed here)."""
    head = getattr(mll, name)(8, 5, 2, dtype=torch.float64)
    x = torch.randn(0, 8, dtype=torch.float64, requires_grad=True)
    y = torch.zeros(0, dtype=torch.int64)
    assert head.loss(x, y, reduction="none").shape == (0,)
    loss = head.loss(x, y)
    assert torch.isnan(loss)  # the mean of nothing, as F.cross_entropy's
    loss.backward()
    assert x.grad is not None and x.grad.shape == (0, 8)


@pytest.mark.parametrize(
    ("name", "k", "soft"),
    [("ScaledNormalizedLinear", 1, False), ("ArcFace", 1, False), ("CurricularFace", 1, False), ("ArcFace", 2, False),
     ("ScaledNormalizedLinear", 1, True)],
)  # fmt: skip
def test_row_tiles_hold_one_tile_sized_buffer(name: str, k: int, soft: bool, monkeypatch) -> None:
    """Every row tile's GEMM writes into one buffer, allocated once per step, and the tile's elementwise work runs on
    groups of rows: a family's non-target part (CurricularFace), the sub-centers' pooling, soft targets make
    temporaries of a group's size, never of a tile's. The same loss and gradients as the chunk kernel keeping its
    logits."""
    from mll.functional._engine import row_tiles

    monkeypatch.setattr(row_tiles, "GROUP_ELEMENTS", 1)  # groups of one row: temporaries far below a tile
    torch.manual_seed(0)
    n, c, d, rows = 16, 5000, 3, 4  # a tile has 4·C·K logits, more than the weight (3·C·K) or anything else
    # training mode (an eval-mode loss never forms its gradient in the forward); a twin for the tiles, so that
    # CurricularFace's t moves alike in both
    head = getattr(mll, name)(d, c, k, dtype=torch.float64)
    twin = copy.deepcopy(head)
    x = torch.randn(n, d, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, c, (n,))
    target = torch.softmax(torch.randn(n, c, dtype=torch.float64), 1) if soft else y
    with MF.set_loss_path("keep"):
        want = head.loss(x, target)
        want_grads = torch.autograd.grad(want, [x, head.weight])
    # (exactly a tile's size: the soft targets' checks make N×C temporaries of their own before the loss)
    with MF.set_loss_path("row_tiles", rows=rows), _LargeAllocations(rows * c * k, exact=soft) as tiled:
        got = twin.loss(x, target)
    assert tiled.seen == ["aten.empty.memory_format"], tiled.seen
    got_grads = torch.autograd.grad(got, [x, twin.weight])
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
