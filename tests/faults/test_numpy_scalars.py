"""NumPy scalars work wherever a Python number does, and give the same result as that number.

Covers every numeric argument of the public functions in ``metric_learning_layers/utils.py``,
``mll/functional/margin_values.py``, ``mll/functional/sub_centers.py``, ``mll/nn/sub_centers.py`` and ``mll/demo.py``.
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


CASES = [
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
