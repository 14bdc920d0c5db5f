"""Sub-center clean-up: a bad head, dominant, features, labels, max_angle or batch_size is named, not an IndexError."""

import math

import pytest
import torch

import mll
from mll import functional as MF
from tests.faults import assert_raises_exactly

D, C, K, N = 6, 5, 3, 10


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(C * K, D, generator=g, dtype=torch.float64)
    return x, weight, torch.arange(N) % C


X, W, Y = _data()
DOMINANT = torch.tensor([0, 1, 2, 0, 1])
HEAD = mll.ArcFace(D, C, K, dtype=torch.float64)

# what every function says about a bad dominant: (dominant, error, message)
BAD_DOMINANT = [
    (
        torch.full((C,), K),
        ValueError,
        "dominant must hold sub-center indices in [0, 3), but got dominant[0] = 3, "
        "dominant[1] = 3, dominant[2] = 3, dominant[3] = 3, dominant[4] = 3",
    ),
    (
        torch.tensor([0, 1, -1, 2, 7]),
        ValueError,
        "dominant must hold sub-center indices in [0, 3), but got dominant[2] = -1, dominant[4] = 7",
    ),
    (
        torch.zeros(C),
        TypeError,
        "dominant must be a tensor of sub-center indices of shape (5,), one per class "
        "(an integer dtype), but got dtype torch.float32",
    ),
    (torch.zeros(C, dtype=torch.bool), TypeError, "(an integer dtype), but got dtype torch.bool"),
    (
        torch.zeros(C, 1, dtype=torch.long),
        ValueError,
        "dominant must have shape (5,), one sub-center per class, but got (5, 1)",
    ),
    (
        torch.zeros(C - 1, dtype=torch.long),
        ValueError,
        "dominant must have shape (5,), one sub-center per class, but got (4,)",
    ),
    ([0] * C, TypeError, "dominant must be a tensor of sub-center indices of shape (5,), one per class, but got list"),
]


@pytest.mark.parametrize(("dominant", "error", "message"), BAD_DOMINANT)
def test_sub_center_outliers_names_a_bad_dominant(dominant, error, message) -> None:
    assert_raises_exactly(lambda: MF.sub_center_outliers(X, W, Y, dominant, K), error, message)


@pytest.mark.parametrize(("dominant", "error", "message"), BAD_DOMINANT)
def test_keep_dominant_sub_centers_names_a_bad_dominant(dominant, error, message) -> None:
    assert_raises_exactly(lambda: mll.nn.keep_dominant_sub_centers(HEAD, dominant), error, message)


def test_a_narrow_integer_dominant_is_accepted() -> None:
    for dtype in (torch.int32, torch.uint8):
        kept = mll.nn.keep_dominant_sub_centers(HEAD, DOMINANT.to(dtype))
        assert torch.equal(kept.weight, HEAD.weight[torch.arange(C) * K + DOMINANT])
        assert torch.equal(
            MF.sub_center_outliers(X, W, Y, DOMINANT.to(dtype), K), MF.sub_center_outliers(X, W, Y, DOMINANT, K)
        )


NOT_A_HEAD = (
    "head must be a head of this library with num_sub_centers, out_features and a weight of shape "
    "(out_features * num_sub_centers, d), but got "
)


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (
            lambda: MF.sub_center_outliers(X, W, Y, DOMINANT, K, max_angle=75.0),
            ValueError,
            "max_angle must be in (0, π] radians, but got 75.0; for 75° pass math.radians(75) = 1.309",
        ),
        (
            lambda: MF.sub_center_outliers(X, W, Y, DOMINANT, K, max_angle=0.0),
            ValueError,
            "max_angle must be in (0, π] radians, but got 0.0",
        ),
        (
            lambda: MF.sub_center_outliers(X, W, Y, DOMINANT, K, max_angle=math.nan),
            ValueError,
            "max_angle must be in (0, π] radians, but got nan",
        ),
        (
            lambda: MF.sub_center_outliers(X, W, Y, DOMINANT, K, max_angle="1"),
            TypeError,
            "max_angle must be a float in (0, π] radians, but got str",
        ),
        (
            lambda: MF.sub_center_outliers(X, W, Y, DOMINANT, K, max_angle=torch.tensor(1.0)),
            TypeError,
            "max_angle must be a float in (0, π] radians, but got Tensor",
        ),
        # these read weight.shape before checking it: a ZeroDivisionError and an AttributeError
        (
            lambda: MF.sub_center_outliers(X, W, Y, DOMINANT, 0),
            ValueError,
            "num_sub_centers must be an integer >= 1, but got 0",
        ),
        (
            lambda: MF.sub_center_outliers(X, W.tolist(), Y, DOMINANT, K),
            TypeError,
            "weight must be a torch.Tensor, but got list",
        ),
        (
            lambda: MF.sub_center_outliers(X, W, Y + 1, DOMINANT, K),
            ValueError,
            "target must hold class indices in [0, 5), but got values from 1 to 5",
        ),
        (
            lambda: MF.sub_center_counts(X, W, torch.full((N, C), 1 / C), K),
            ValueError,
            "sub-center clean-up needs class indices (an integer tensor of shape (*)), not soft targets",
        ),
        (lambda: MF.dominant_sub_centers([[1, 2]]), TypeError, "counts must be a tensor of shape (C, K), but got list"),
        (
            lambda: MF.dominant_sub_centers(torch.zeros(C, 0)),
            ValueError,
            "counts must be a tensor of shape (C, K) with K >= 1, but got (5, 0)",
        ),
        (
            lambda: MF.dominant_sub_centers(torch.zeros(C)),
            ValueError,
            "counts must be a tensor of shape (C, K) with K >= 1, but got (5,)",
        ),
        (
            lambda: MF.dominant_sub_centers(torch.zeros(C, K, dtype=torch.bool)),
            TypeError,
            "counts must have an integer or floating dtype, but got torch.bool",
        ),
        (lambda: mll.nn.keep_dominant_sub_centers(mll.DeepNCM(D, C), DOMINANT), TypeError, NOT_A_HEAD + "DeepNCM"),
        (lambda: mll.nn.keep_dominant_sub_centers(torch.nn.Linear(D, C), DOMINANT), TypeError, NOT_A_HEAD + "Linear"),
        (
            lambda: mll.nn.keep_dominant_sub_centers(mll.ShardedArcFace(D, C, K, class_range=(0, 2)), DOMINANT),
            ValueError,
            "head.weight must have shape (out_features * num_sub_centers, d) = (15, d), but got (6, 6)",
        ),
        (lambda: mll.clean_sub_centers(torch.nn.Linear(D, C), X, Y), TypeError, NOT_A_HEAD + "Linear"),
        # an AttributeError ('list' object has no attribute 'shape') before
        (
            lambda: mll.clean_sub_centers(HEAD, X, Y.tolist()),
            TypeError,
            "labels must be a tensor of class indices of shape (10,), but got list",
        ),
        (
            lambda: mll.clean_sub_centers(HEAD, X, Y.float()),
            TypeError,
            "labels must be class indices of an integer dtype, but got torch.float32",
        ),
        (
            lambda: mll.clean_sub_centers(HEAD, X, Y[:3]),
            ValueError,
            "labels must have shape (10,), one per row of features, but got (3,)",
        ),
        (
            lambda: mll.clean_sub_centers(HEAD, X, Y + 5),
            ValueError,
            "labels must be class indices in [0, 5), but got values from 5 to 9",
        ),
        (
            lambda: mll.clean_sub_centers(HEAD, X.tolist(), Y),
            TypeError,
            "features must be a tensor of shape (N, 6), but got list",
        ),
        (
            lambda: mll.clean_sub_centers(HEAD, X.long(), Y),
            TypeError,
            "features must have a floating-point dtype, but got torch.int64",
        ),
        (
            lambda: mll.clean_sub_centers(HEAD, X[:, :4], Y),
            ValueError,
            "features must have shape (N, 6) (d: the head's in_features), but got (10, 4)",
        ),
        (
            lambda: mll.clean_sub_centers(HEAD, X[0], Y),
            ValueError,
            "features must have shape (N, 6) (d: the head's in_features), but got (6,)",
        ),
        (
            lambda: mll.clean_sub_centers(HEAD, X.float(), Y),
            TypeError,
            "features must have the head's dtype torch.float64 outside autocast, but got torch.float32",
        ),
        (
            lambda: mll.clean_sub_centers(HEAD, X.to("meta"), Y),
            ValueError,
            "features must be on the head's device cpu, but are on meta",
        ),
        (
            lambda: mll.clean_sub_centers(HEAD, X, Y, max_angle=75),
            ValueError,
            "max_angle must be in (0, π] radians, but got 75.0; for 75° pass math.radians(75) = 1.309",
        ),
        (
            lambda: mll.clean_sub_centers(HEAD, X, Y, batch_size=0),
            ValueError,
            "batch_size must be an integer >= 1, but got 0",
        ),
        (
            lambda: mll.clean_sub_centers(HEAD, X, Y, batch_size=2.0),
            ValueError,
            "batch_size must be an integer >= 1, but got 2.0",
        ),
        (
            lambda: mll.clean_sub_centers(HEAD, X, Y, batch_size=True),
            ValueError,
            "batch_size must be an integer >= 1, but got True",
        ),
    ],
)
def test_bad_arguments_are_named(call, error, message) -> None:
    assert_raises_exactly(call, error, message)


def test_a_failed_clean_up_leaves_the_head_alone() -> None:
    head = mll.ArcFace(D, C, K, dtype=torch.float64)
    before = {k: v.clone() for k, v in head.state_dict().items()}
    with pytest.raises(ValueError):
        mll.clean_sub_centers(head, X, Y + 5)
    with pytest.raises(ValueError):
        mll.nn.keep_dominant_sub_centers(head, torch.full((C,), K))
    after = head.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert head.num_sub_centers == K


def test_empty_feature_sets_and_autocast_still_work() -> None:
    empty = mll.clean_sub_centers(HEAD, X[:0], Y[:0])
    assert empty.counts.sum() == 0 and empty.outliers.shape == (0,) and empty.head.num_sub_centers == 1
    with torch.autocast("cpu", dtype=torch.bfloat16):  # stored low-precision features, a float64 head
        mixed = mll.clean_sub_centers(HEAD, X.bfloat16(), Y)
    assert mixed.counts.sum() == N
