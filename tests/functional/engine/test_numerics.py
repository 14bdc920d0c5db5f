"""The hard-negative mask as a number (``numerics.above``) and the families that use it: the same values and slopes
as a boolean mask with ``where``, in every dtype and layout, under ``vmap`` too. The softmax passes' exponential
(``numerics.exp_``, ``numerics.exp``): e^t to float rounding over the whole range, subnormal results and ±inf
included, with its gradient."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import mll.functional as MF
from mll.functional._engine.numerics import above, exp, exp_, scratch, scratch_pool
from mll.functional.curricular import _curricular_negatives
from mll.functional.insightface import ARC_FILTERED

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", DTYPES)
@given(rows=st.integers(0, 9), cols=st.integers(0, 9), seed=st.integers(0, 2**16), class_major=st.booleans())
def test_above_is_the_comparison_as_a_number(dtype, rows, cols, seed, class_major) -> None:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(cols, rows, generator=g).t() if class_major else torch.randn(rows, cols, generator=g)
    values = values.to(dtype)  # (a transposed view stays one: the class-major layout)
    threshold = torch.randn(rows, 1, generator=g).to(dtype)
    if rows and cols:  # the edges: equal to the threshold, NaN, ±inf
        values[0, 0] = threshold[0, 0]
        values[-1, -1] = float("nan")
        values[0, -1] = float("inf")
        values[-1, 0] = -float("inf")
    with torch.no_grad():
        got = above(values, threshold)
    assert got.dtype == dtype and got.stride() == values.stride()
    assert torch.equal(got, (values > threshold).to(dtype))
    # out of place where in-place writes are not allowed (grad mode, torch.func)
    assert torch.equal(above(values, threshold), got)
    if rows:  # under vmap: each row against the first row's threshold
        batched = torch.func.vmap(lambda v: above(v, threshold[:1]))(values.unsqueeze(1)).squeeze(1)
        assert torch.equal(batched, (values > threshold[:1]).to(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_curricular_negatives_without_a_graph_equal_the_masked_form(dtype) -> None:
    """The arithmetic (no-graph) branch against the ``where`` branch (grad mode on): the values exactly, the slopes
    to an ulp (t + 2c against (c + t) + c), on both layouts and at a cosine equal to the threshold."""
    g = torch.Generator().manual_seed(3)
    margin, t = torch.tensor(0.5, dtype=dtype), torch.tensor(0.27)
    target = (torch.rand(33, 1, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    threshold = target * torch.cos(margin) - ((1 - target) * (1 + target)).clamp(min=0).sqrt() * torch.sin(margin)
    for layout in ("row", "class"):
        cosine = (torch.rand(33, 70, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
        cosine[:, 0:1] = threshold  # not hard: c > T fails
        if layout == "class":
            cosine = cosine.t().contiguous().t()
        with torch.no_grad():
            value, slope = _curricular_negatives(cosine, target, margin, t)
        with torch.enable_grad():
            ref_value, ref_slope = _curricular_negatives(cosine.clone().requires_grad_(True), target, margin, t)
        assert torch.equal(value, ref_value.detach())
        ulp = torch.finfo(dtype).eps * 4
        torch.testing.assert_close(slope, ref_slope.to(dtype), rtol=ulp, atol=ulp)
        assert torch.equal(slope[:, 0], torch.ones_like(slope[:, 0]))


def test_scratch_reuses_a_buffer_per_slot_inside_a_pool_only() -> None:
    """Outside a pool: a fresh tensor each call (``empty_like``). Inside: the same storage for a slot whatever the
    call, another for another slot or dtype, grown for a larger request, in the caller's layout (a class-major block
    stays column-major); grad mode (a graph being recorded) gets fresh tensors; leaving the pool drops it."""
    row = torch.randn(4, 6)
    block = torch.randn(6, 4).t()  # class-major
    assert scratch(row, 0).data_ptr() != scratch(row, 0).data_ptr()
    with torch.no_grad(), scratch_pool():  # (no graph recorded: the engine's loops)
        a, b = scratch(row, 0), scratch(row, 1)
        assert a.shape == row.shape and a.is_contiguous() and a.data_ptr() != b.data_ptr()
        assert scratch(block, 0).data_ptr() == a.data_ptr() and scratch(block, 0).stride() == block.stride()
        assert scratch(row[:2], 0).data_ptr() == a.data_ptr()  # a smaller request: the front of the buffer
        assert scratch(row.double(), 0).data_ptr() != a.data_ptr()
        big = scratch(torch.empty(8, 6), 0)
        assert big.shape == (8, 6) and scratch(row, 0).data_ptr() == big.data_ptr()  # grown, then reused
        with torch.enable_grad():
            assert scratch(row, 0).data_ptr() != big.data_ptr()
    assert scratch(row, 0).data_ptr() != scratch(row, 0).data_ptr()


@pytest.mark.parametrize("layout", ["row", "class"])
def test_the_non_target_parts_are_the_same_from_a_pool(layout) -> None:
    """Every family whose non-target part takes scratch buffers gives the same values and slopes inside a pool as
    outside (the two outputs in distinct slots), called twice in a row — the second call overwrites the first's."""
    g = torch.Generator().manual_seed(5)
    cosine = torch.rand(9, 40, generator=g, dtype=torch.float64) * 2 - 1
    if layout == "class":
        cosine = cosine.t().contiguous().t()
    target = torch.rand(9, 1, generator=g, dtype=torch.float64) * 2 - 1
    m = torch.tensor(0.4, dtype=torch.float64)
    cases = [
        (MF.CURRICULAR.negatives, (target, m, torch.tensor(0.3))),
        (MF.NPC.negatives, (target, m, m, torch.tensor(1.1), torch.tensor(0.2))),
        (MF.MV_ARC.negatives, (target, m, torch.tensor(0.2))),
        (ARC_FILTERED.negatives, (target, m, torch.tensor(0.1, dtype=torch.float64))),
    ]
    for negatives, args in cases:
        with torch.no_grad():
            want = [t.clone() for t in negatives(cosine, *args)]
            with scratch_pool():
                first = negatives(cosine, *args)
                first = [t.clone() for t in first]
                second = negatives(cosine, *args)
        for got in (first, second):
            for a, b in zip(got, want):
                assert torch.equal(a, b), negatives


@pytest.mark.parametrize("dtype", DTYPES)
def test_exp_is_e_to_the_t_over_the_whole_range(dtype) -> None:
    """Against float64's exp of the same (rounded) arguments: within a few units in the last place of a float32 or
    float64 result wherever it is normal, within the subnormals' spacing below, exact at ±inf, 0 and NaN; half
    precision unchanged (``exp`` itself)."""
    low = {torch.float16: -20.0, torch.bfloat16: -100.0, torch.float32: -110.0, torch.float64: -760.0}[dtype]
    high = {torch.float16: 11.0, torch.bfloat16: 88.0, torch.float32: 88.7, torch.float64: 709.7}[dtype]
    t = torch.cat([torch.linspace(low, high, 100_003, dtype=torch.float64).to(dtype),
                   torch.tensor([float("-inf"), float("inf"), float("nan"), 0.0, -0.0], dtype=dtype)])  # fmt: skip
    want = torch.exp(t.double())
    for got in (exp(t), exp_(t.clone())):
        assert got.dtype == dtype
        if dtype in (torch.float16, torch.bfloat16):
            torch.testing.assert_close(got, torch.exp(t), rtol=0, atol=0, equal_nan=True)
            continue
        info = torch.finfo(dtype)
        # the argument's product by log2(e) is rounded once more: |t|·eps of relative error at most, plus the ulp
        bound = want * (t.double().abs() * info.eps + 4 * info.eps) + info.smallest_normal * info.eps
        diff = (got.double() - want).abs()
        finite = torch.isfinite(t)
        assert (diff[finite] <= bound[finite]).all(), t[finite][diff[finite] > bound[finite]][:5]
        assert got[t == -torch.inf].eq(0).all() and got[t == torch.inf].eq(torch.inf).all()
        assert got[t.isnan()].isnan().all() and got[t == 0].eq(1).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_gradient_is_its_value(dtype) -> None:
    t = torch.linspace(-30, 30, 101, dtype=dtype, requires_grad=True)
    (g,) = torch.autograd.grad(exp(t).sum(), t)
    torch.testing.assert_close(g, torch.exp(t.detach()), rtol=64 * torch.finfo(dtype).eps, atol=0)
    u = t.detach().clone().requires_grad_()
    (g_,) = torch.autograd.grad(exp_(u * 1.0).sum(), u)  # in place on a fresh tensor, recorded
    torch.testing.assert_close(g_, g, rtol=0, atol=0)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(exp, (t.detach()[::10].clone().requires_grad_(),))
