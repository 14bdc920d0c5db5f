"""Bad arguments to dynamic_margins and elastic_margins are named; valid odd forms (an int size) are accepted."""

import math

import numpy as np
import pytest
import torch

from mll import functional as MF
from tests.faults import assert_raises_exactly

COUNTS = torch.tensor([1, 4, 9])


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        # an infinite bound made the clip's top NaN: every margin came back NaN
        (
            lambda: MF.elastic_margins(0.5, 0.1, (3,), bounds=(0.0, math.inf)),
            ValueError,
            "bounds must be finite (low, high) with low < high, but got (0.0, inf)",
        ),
        (
            lambda: MF.elastic_margins(0.5, 0.1, (3,), bounds=(-math.inf, 1.0)),
            ValueError,
            "bounds must be finite (low, high) with low < high, but got (-inf, 1.0)",
        ),
        (
            lambda: MF.elastic_margins(0.5, 0.1, (3,), bounds=(0.0, math.nan)),
            ValueError,
            "bounds must be finite (low, high) with low < high, but got (0.0, nan)",
        ),
        (
            lambda: MF.elastic_margins(0.5, 0.1, (3,), bounds=(1.0, 0.0)),
            ValueError,
            "bounds must be finite (low, high) with low < high, but got (1.0, 0.0)",
        ),
        (
            lambda: MF.elastic_margins(0.5, 0.1, (3,), bounds=1.0),
            TypeError,
            "bounds must be a pair (low, high) of floats, but got 1.0",
        ),
        (
            lambda: MF.elastic_margins(0.5, 0.1, (3,), bounds=(0.0, 1.0, 2.0)),
            TypeError,
            "bounds must be a pair (low, high) of floats, but got (0.0, 1.0, 2.0)",
        ),
        (
            lambda: MF.elastic_margins(0.5, 0.1, (3,), bounds=(0.0, "1")),
            TypeError,
            "bounds must be a pair (low, high) of floats, but got (0.0, '1')",
        ),
        (
            lambda: MF.elastic_margins(0.0, 0.1, (3,), bounds=(0.0, 1e-9)),
            ValueError,
            "bounds must be more than a few torch.float32 ulps of high apart, but got (0.0, 1e-09)",
        ),
        (
            lambda: MF.elastic_margins(0.5, 0.1, (2, -1)),
            ValueError,
            "size must have no negative entries, but got (2, -1)",
        ),
        (
            lambda: MF.elastic_margins(0.5, 0.1, (2, 1.0)),
            TypeError,
            "size must be an int or a sequence of ints (a shape), but got (2, 1.0)",
        ),
        (
            lambda: MF.elastic_margins(0.5, 0.1, 3.0),
            TypeError,
            "size must be an int or a sequence of ints (a shape), but got float",
        ),
        (
            lambda: MF.elastic_margins(0.5, 0.1, "3"),
            TypeError,
            "size must be an int or a sequence of ints (a shape), but got str",
        ),
        (
            lambda: MF.elastic_margins(0.5, 0.1, True),
            TypeError,
            "size must be an int or a sequence of ints (a shape), but got bool",
        ),
        (
            lambda: MF.elastic_margins(torch.tensor([0.1, 0.2]), 0.1, (3,)),
            ValueError,
            "margin of shape (2,) must broadcast against size (3,)",
        ),
        (
            lambda: MF.elastic_margins(torch.tensor([0.1, 2.2]), 0.1, (3, 2)),
            ValueError,
            "ElasticFace margin (the mean) must lie in bounds [0, 1.571), but got values from 0.1 to 2.2",
        ),
        (
            lambda: MF.elastic_margins(torch.tensor([1, 2]), 0.1, (3, 2)),
            TypeError,
            "margin must have a floating-point dtype, but got torch.int64",
        ),
        (lambda: MF.elastic_margins("0.5", 0.1, (3,)), TypeError, "margin must be a float or a tensor, but got str"),
        (
            lambda: MF.elastic_margins(math.nan, 0.1, (3,)),
            ValueError,
            "ElasticFace margin (the mean) must lie in bounds [0, 1.571), but got nan",
        ),
        (
            lambda: MF.elastic_margins(0.5, -0.1, (3,)),
            ValueError,
            "ElasticFace std must be a finite float >= 0, but got -0.1",
        ),
        (
            lambda: MF.elastic_margins(0.5, 0.1, (3,), dtype=torch.int64),
            TypeError,
            "dtype must be a floating-point torch.dtype, but got torch.int64",
        ),
        (
            lambda: MF.elastic_margins(0.5, 0.1, (3,), generator=0),
            TypeError,
            "generator must be a torch.Generator or None, but got int",
        ),
        (lambda: MF.dynamic_margins([1, 2]), TypeError, "class_counts must be a tensor of shape (C,), but got list"),
        (
            lambda: MF.dynamic_margins(torch.tensor([True])),
            TypeError,
            "class_counts must have an integer or floating dtype, but got torch.bool",
        ),
        (
            lambda: MF.dynamic_margins(torch.tensor([[1, 2]])),
            ValueError,
            "class_counts must be a non-empty tensor of shape (C,), but got (1, 2)",
        ),
        (
            lambda: MF.dynamic_margins(torch.tensor([0, 2])),
            ValueError,
            "class_counts must all be >= 1, but got a minimum of 0",
        ),
        (
            lambda: MF.dynamic_margins(torch.tensor([math.nan, 2.0])),
            ValueError,
            "class_counts must all be >= 1, but got a minimum of nan",
        ),
        (
            lambda: MF.dynamic_margins(COUNTS, rescale="no"),
            TypeError,
            "dynamic_margins rescale must be a bool, but got 'no'",
        ),
        (lambda: MF.dynamic_margins(COUNTS, -0.1), ValueError, "dynamic_margins a must be a finite float >= 0"),
        (
            lambda: MF.dynamic_margins(COUNTS, power=0),
            ValueError,
            "dynamic_margins power must be a positive finite float, but got 0",
        ),
    ],
)
def test_bad_arguments_are_named(call, error, message) -> None:
    assert_raises_exactly(call, error, message)


@pytest.mark.parametrize("size", [4, np.int64(4), (4,), [4], torch.Size([4]), (np.int32(4),)])
def test_elastic_size_may_be_an_int_or_a_shape_like_torch(size) -> None:
    draw = MF.elastic_margins(0.5, 0.1, size, generator=torch.Generator().manual_seed(0))
    expected = torch.randn(4, generator=torch.Generator().manual_seed(0)) * 0.1 + 0.5
    torch.testing.assert_close(draw, expected)


def test_finite_custom_bounds_still_clip() -> None:
    draw = MF.elastic_margins(0.5, 10.0, (1000,), bounds=[-1.0, 2.0], generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(draw).all() and draw.min() == -1.0 and draw.max() < 2.0


def test_np_bool_rescale_and_vmap_are_accepted() -> None:
    torch.testing.assert_close(
        MF.dynamic_margins(COUNTS, 0.2, 0.1, rescale=np.bool_(False)), 0.2 * COUNTS.float().pow(-0.25) + 0.1
    )
    # the count check reads values: skipped inside a transform, so vmap still works
    batched = torch.func.vmap(MF.dynamic_margins)(torch.stack([COUNTS, COUNTS * 2]))
    torch.testing.assert_close(batched, torch.stack([MF.dynamic_margins(COUNTS), MF.dynamic_margins(COUNTS * 2)]))
