"""NumPy scalars work wherever a Python number does, and give the same result as that number.

Covers the numeric arguments of the public API: every head's constructor, ``forward`` and ``loss``; the functional
core (cosines, margins and margin objects, scales, statistics, the chunked and sharded losses); the sub-center
clean-up, the margin helpers, ``metric_learning_layers.utils`` and the demo.
An integer argument takes NumPy integers; a float argument takes NumPy integers and floats (as it takes a Python int).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import numpy as np
import pytest
import torch

import mll
from metric_learning_layers import utils as legacy
from mll import demo
from mll import functional as MF

D, C, K, N = 6, 5, 3, 12
INT_TYPES = (np.int64, np.int32)
REAL_TYPES = (np.int64, np.float64, np.float32)


class Case(NamedTuple):
    name: str
    call: Callable[[Any], Any]  # the function with the argument under test set to the given value
    value: float  # a valid value for the float types (np.int64 gets round(value))
    integer: bool  # an integer argument (only NumPy integers apply)


def _sub_center_data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(C * K, D, generator=g, dtype=torch.float64)
    return x, weight, torch.arange(N) % C


X, W, Y = _sub_center_data()
DOMINANT = torch.tensor([0, 1, 2, 0, 1])
COUNTS = torch.tensor([1, 4, 9, 30])


def _head() -> torch.nn.Module:
    head = mll.ArcFace(D, C, K, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(W)
    return head


def _elastic(**kwargs: Any) -> torch.Tensor:
    args = {"margin": 0.5, "std": 0.05, "size": (4, 1), "bounds": (0.0, math.pi / 2)} | kwargs
    return MF.elastic_margins(generator=torch.Generator().manual_seed(0), **args)


def _digits(seed: Any) -> demo.Split:
    pytest.importorskip("sklearn")  # the demo's extra
    return demo.load_digits_split(seed)


@functools.cache
def _training_digits() -> demo.Split:
    return _digits(0)


def _train(**kwargs: Any) -> Any:
    pytest.importorskip("tqdm")
    args = {"epochs": 1, "seed": 0, "dim": 4} | kwargs
    run = demo.train_one("ArcFace", _training_digits(), progress=False, **args)
    return run.losses, run.accuracies, run.test_embedding, run.open_embedding


def _head_step(make: Callable[[], torch.nn.Module], **loss_kwargs: Any) -> tuple[Any, ...]:
    """A head built from a fixed seed: its state, its training logits, and its loss (with ``loss_kwargs``)."""
    torch.manual_seed(0)
    head = make()
    x = torch.randn(4, D, dtype=torch.float64) * 3
    y = torch.tensor([0, 1, 2, 4])
    logits = head(x, y)
    return head, logits, head.loss(x, y, **loss_kwargs)


def _h(cls: Any, *args: Any, **kwargs: Any) -> Callable[[], torch.nn.Module]:
    return lambda: cls(*args, dtype=torch.float64, **kwargs)


COS_ = torch.rand(4, C, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2 - 1
Y4 = torch.tensor([0, 1, 2, 4])
NORMS = torch.tensor([2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
X4 = torch.randn(4, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
W5 = torch.randn(C * K, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64)


def _ce(**kwargs: Any) -> torch.Tensor:
    return MF.margin_cross_entropy(X4, W5, Y4, **({"scale": 4.0, "num_sub_centers": K} | kwargs))


def _sharded(**kwargs: Any) -> torch.Tensor:
    args = {"class_start": 0, "num_classes": C, "scale": 4.0, "num_sub_centers": K} | kwargs
    return MF.sharded_margin_cross_entropy(X4, W5, Y4, **args)


API = [
    Case("ArcFace in_features", lambda v: _head_step(_h(mll.ArcFace, v, C)), D, True),
    Case("ArcFace out_features", lambda v: _head_step(_h(mll.ArcFace, D, v)), C, True),
    Case("ArcFace num_sub_centers", lambda v: _head_step(_h(mll.ArcFace, D, C, v)), K, True),
    Case("ArcFace scale", lambda v: _head_step(_h(mll.ArcFace, D, C, scale=v)), 12.0, False),
    Case("ArcFace margin", lambda v: _head_step(_h(mll.ArcFace, D, C, margin=v)), 0.4, False),
    Case("CosFace margin", lambda v: _head_step(_h(mll.CosFace, D, C, margin=v)), 0.35, False),
    Case("CombinedMargin m1", lambda v: _head_step(_h(mll.CombinedMargin, D, C, m1=v)), 1.5, False),
    Case("SphereFace lambda_", lambda v: _head_step(_h(mll.SphereFace, D, C, lambda_=v)), 5.0, False),
    Case("CurricularFace decay", lambda v: _head_step(_h(mll.CurricularFace, D, C, decay=v)), 0.25, False),
    Case("AdaFace h", lambda v: _head_step(_h(mll.AdaFace, D, C, h=v)), 1.4, False),
    Case("MagFace lower", lambda v: _head_step(_h(mll.MagFace, D, C, lower=v, upper=9.0)), 2.0, False),
    Case("MagFace lambda_g", lambda v: _head_step(_h(mll.MagFace, D, C, lower=1.0, upper=9.0, lambda_g=v)), 20, False),
    Case(
        "ElasticCosFace std",
        lambda v: _head_step(_h(mll.ElasticCosFace, D, C, std=v, generator=torch.Generator().manual_seed(4))),
        0.05,
        False,
    ),
    Case("AdaCos min_scale", lambda v: _head_step(_h(mll.AdaCos, D, C, min_scale=v)), 0.75, False),
    Case("DeepNCM alpha", lambda v: _head_step(_h(mll.DeepNCM, D, C, alpha=v)), 0.25, False),
    Case(
        "ScaledNormalizedLinear pooling_temperature",
        lambda v: _head_step(_h(mll.ScaledNormalizedLinear, D, C, K, pooling="soft", pooling_temperature=v)),
        1.4,
        False,
    ),
    Case("loss chunk_size", lambda v: _head_step(_h(mll.ArcFace, D, C), chunk_size=v), 2, True),
    Case("cosine_logits num_sub_centers", lambda v: MF.cosine_logits(X4, W5, v), K, True),
    Case(
        "cosine_logits pooling_temperature",
        lambda v: MF.cosine_logits(X4, W5, K, pooling="soft", pooling_temperature=v),
        1.4,
        False,
    ),
    Case("arc_margin margin", lambda v: MF.arc_margin(COS_, Y4, v), 0.4, False),
    Case("arc_margin scale", lambda v: MF.arc_margin(COS_, Y4, 0.4, scale=v), 7.0, False),
    Case("cos_margin margin", lambda v: MF.cos_margin(COS_, Y4, v), 0.25, False),
    Case("combined_margin m2", lambda v: MF.combined_margin(COS_, Y4, 1.0, v, 0.1), 0.25, False),
    Case("sphere_margin margin", lambda v: MF.sphere_margin(COS_, Y4, v), 3.0, False),
    Case("ada_margin mean", lambda v: MF.ada_margin(COS_, Y4, NORMS, mean=v, std=2.0), 3.0, False),
    Case("mag_margin upper", lambda v: MF.mag_margin(COS_, Y4, NORMS, lower=1.0, upper=v), 6.0, False),
    Case("curricular_margin t", lambda v: MF.curricular_margin(COS_, Y4, 0.4, t=v), 0.25, False),
    Case("ARC margin object", lambda v: MF.margin_logits(COS_, Y4, MF.ARC(v)), 0.4, False),
    Case("adacos_scale scale", lambda v: MF.adacos_scale(COS_, Y4, scale=v), 6.0, False),
    Case("ncm_update decay", lambda v: MF.ncm_update(torch.ones(C, D, dtype=torch.float64), X4, Y4, v), 0.25, False),
    Case("curricular_update decay", lambda v: MF.curricular_update(0.1, COS_, Y4, decay=v), 0.25, False),
    Case("margin_cross_entropy chunk_size", lambda v: _ce(chunk_size=v), 2, True),
    Case("margin_cross_entropy margin", lambda v: _ce(margin=v, margin_type="arc"), 0.4, False),
    Case("margin_cross_entropy scale", lambda v: _ce(scale=v), 6.0, False),
    Case("sharded num_classes", lambda v: _sharded(num_classes=v), C, True),
    Case("sharded sample_rate", lambda v: _sharded(sample_rate=v), 1.0, False),
    Case("sharded feature_grad_scale", lambda v: _sharded(feature_grad_scale=v), 2.0, False),
    Case("sharded chunk_size", lambda v: _sharded(chunk_size=v), 2, True),
    Case("shard_bounds world_size", lambda v: MF.shard_bounds(10, v), 3, True),
]

CASES = [
    *API,
    Case("one_hot num_classes", lambda v: legacy.one_hot(torch.tensor([0, 4, 2]), v), 5, True),
    Case("heuristic_scale num_classes", lambda v: legacy.heuristic_scale(v), 10, True),
    Case("heuristic_scale margin", lambda v: legacy.heuristic_scale(10, v), 0.3, False),
    Case("dynamic_margins a", lambda v: MF.dynamic_margins(COUNTS, v), 0.3, False),
    Case("dynamic_margins b", lambda v: MF.dynamic_margins(COUNTS, 0.45, v), 0.07, False),
    Case("dynamic_margins power", lambda v: MF.dynamic_margins(COUNTS, power=v), 1.4, False),
    Case("elastic_margins margin", lambda v: _elastic(margin=v), 0.4, False),
    Case("elastic_margins std", lambda v: _elastic(std=v), 0.05, False),
    Case("elastic_margins size", lambda v: _elastic(size=v), 4, True),
    Case("elastic_margins size entry", lambda v: _elastic(size=(v, 1)), 4, True),
    Case("elastic_margins bounds low", lambda v: _elastic(bounds=(v, 1.5)), 0.1, False),
    Case("elastic_margins bounds high", lambda v: _elastic(bounds=(0.0, v)), 1.2, False),
    Case("sub_center_counts num_sub_centers", lambda v: MF.sub_center_counts(X, W, Y, v), K, True),
    Case("sub_center_outliers num_sub_centers", lambda v: MF.sub_center_outliers(X, W, Y, DOMINANT, v), K, True),
    Case(
        "sub_center_outliers max_angle", lambda v: MF.sub_center_outliers(X, W, Y, DOMINANT, K, max_angle=v), 1.1, False
    ),
    Case("clean_sub_centers max_angle", lambda v: mll.clean_sub_centers(_head(), X, Y, max_angle=v), 1.1, False),
    Case("clean_sub_centers batch_size", lambda v: mll.clean_sub_centers(_head(), X, Y, batch_size=v), 5, True),
    Case("demo load_digits_split seed", _digits, 3, True),
    Case("demo train_one epochs", lambda v: _train(epochs=v), 2, True),
    Case("demo train_one seed", lambda v: _train(seed=v), 3, True),
    Case("demo train_one dim", lambda v: _train(dim=v), 3, True),
]


# heuristic_scale lives in mll/functional/scale.py (outside this change): its arithmetic keeps a NumPy margin's
# type, so it returns np.float64 for an np.int64 or np.float64 margin (torch.tensor of it is float64, not the
# default dtype) and np.float32(5.3971705) for np.float32(0.3), not the 5.3971703... of float(margin)
def _params():
    for case in CASES:
        for kind in INT_TYPES if case.integer else REAL_TYPES:
            yield pytest.param(case, kind, id=f"{case.name}-{kind.__name__}")


def _same(a: Any, b: Any) -> bool:
    """Equal values of equal types, through tensors, modules, tuples, lists and dataclasses."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, torch.nn.Module):
        sa, sb = a.state_dict(), b.state_dict()
        return type(a) is type(b) and sa.keys() == sb.keys() and all(_same(sa[k], sb[k]) for k in sa)
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if dataclasses.is_dataclass(a):
        return type(a) is type(b) and all(_same(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize(("case", "kind"), list(_params()))
def test_numpy_scalars_work_like_python_numbers(case: Case, kind: type) -> None:
    value = kind(round(case.value) if kind in INT_TYPES else case.value)
    python = int(value) if case.integer or kind in INT_TYPES else float(value)
    assert type(python) in (int, float) and python == value
    assert _same(case.call(value), case.call(python))
