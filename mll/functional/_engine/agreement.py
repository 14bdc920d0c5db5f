"""The ranks' agreement before a collective step: every rank raises the same error, or every rank goes on.

Each rank checks its own arguments and inputs and fills a :class:`Report`; one all-gather of the reports (a few
dozen integers) tells every rank whether any rank failed and whether the settings that must match do. On a failure
the ranks exchange the failing ranks' messages (a second collective, on the error path only) and all raise the same
error naming the rank. No rank is left waiting in a collective the others never reach, and since every rank took
part in the same collectives the group stays usable for the next call.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from mll.functional._engine.checks import (
    check_chunk_size,
    check_feature_grad_scale,
    check_features,
    check_num_classes,
    check_num_sub_centers,
    check_pooling,
    is_int,
)
from mll.functional._engine.distributed import all_gather_ints, bits_float, float_bits, rank_and_world
from mll.functional._engine.numerics import has_values

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_REDUCTIONS = ("mean", "sum", "none")
#: margin parameters compared between ranks (tensors — per class or per sample — are not compared)
_PARAM_SLOTS = 6
_NOT_A_FLOAT = float_bits(math.nan)


@dataclass
class Report:
    """What one rank says about its call, as integers (floats travel as their bits). The fields after
    ``class_stop`` must be the same on every rank."""

    error: bool = False
    rows: int = 0
    entries: int = 0  # targets per row: 1 for class indices, P for few-hot pairs
    class_start: int = 0
    class_stop: int = 0
    num_classes: int = 0
    in_features: int = 0
    num_sub_centers: int = 0
    pooling: bool = False  # soft sub-center pooling
    soft: bool = False  # soft targets (dense or pairs) rather than class indices
    dtype: int = -1
    reduction: int = -1
    margin: int = 0  # crc32 of the family's name
    margin_params: list[int] = field(default_factory=lambda: [_NOT_A_FLOAT] * _PARAM_SLOTS)
    scale: int = _NOT_A_FLOAT
    requires_grad: int = 0  # bits: input, weight, scale

    def set_scale(self, scale: object) -> None:
        if not has_values(scale):  # a scale on the meta device or fake: no value to compare
            self.scale = _NOT_A_FLOAT
            return
        value = float(scale.detach()) if isinstance(scale, Tensor) else float(scale)  # type: ignore[arg-type]
        self.scale = float_bits(value)

    def set_margin(self, name: str, params: tuple[Any, ...]) -> None:
        """The margin family's (or loss's) name and its float parameters (tensors, per class or per sample, are not
        compared)."""
        self.margin = name_code(name)
        for i, value in enumerate(params[:_PARAM_SLOTS]):
            self.margin_params[i] = _NOT_A_FLOAT if isinstance(value, Tensor) else float_bits(float(value))

    def set_reduction(self, reduction: str) -> None:
        self.reduction = _REDUCTIONS.index(reduction)

    def set_dtype(self, dtype: torch.dtype) -> None:
        self.dtype = dtype_code(dtype)

    def set_requires_grad(self, input: Tensor, weight: Tensor, scale: object) -> None:
        grad = torch.is_grad_enabled()
        flags = (input.requires_grad, weight.requires_grad, isinstance(scale, Tensor) and scale.requires_grad)
        self.requires_grad = sum(int(grad and f) << i for i, f in enumerate(flags))

    def encode(self) -> list[int]:
        out: list[int] = []
        for f in fields(self):
            value = getattr(self, f.name)
            out += value if isinstance(value, list) else [int(value)]
        return out

    @classmethod
    def decode(cls, values: list[int]) -> Report:
        report, i = cls(), 0
        for f in fields(cls):
            current = getattr(report, f.name)
            if isinstance(current, list):
                setattr(report, f.name, list(values[i : i + len(current)]))
                i += len(current)
            else:
                setattr(report, f.name, type(current)(values[i]))
                i += 1
        return report


_NAMES: dict[int, str] = {}
_FIRST_SHARED = "num_classes"


def name_code(name: str) -> int:
    """A margin family's (or loss's) name as the integer a report carries; remembered, so that a disagreement is
    shown by name (every family registers its name when it is made, so another rank's name is known here too)."""
    code = zlib.crc32(name.encode())
    _NAMES[code] = name
    return code


def _show(name: str, value: Any) -> Any:
    """A report field in the user's terms."""
    if name == "dtype":
        return str(_DTYPES[value]) if 0 <= value < len(_DTYPES) else "not floating"
    if name == "reduction":
        return _REDUCTIONS[value] if 0 <= value < len(_REDUCTIONS) else "?"
    if name == "margin":
        return _NAMES.get(value, f"family #{value}")
    if name == "scale":
        return bits_float(value)
    if name == "margin_params":
        return [None if v == _NOT_A_FLOAT else bits_float(v) for v in value]
    if name == "requires_grad":
        return {k: bool(value >> i & 1) for i, k in enumerate(("input", "weight", "scale"))}
    if name == "pooling":
        return "soft" if value else "max"
    if name == "soft":
        return "soft targets" if value else "class indices"
    return value


_TITLES = {
    "margin": "the margin family",
    "margin_params": "the margin's float parameters",
    "soft": "the kind of target",
    "requires_grad": "requires_grad (input, weight, scale) with grad mode",
    "pooling": "the sub-center pooling",
}


def agree(report: Report, problem: Optional[Exception], device: torch.device, group: Any, world: int,
          num_classes: int) -> list[Report]:  # fmt: skip
    """Exchange the reports; raise the same error on every rank if any rank failed or the ranks disagree."""
    if world == 1:
        if problem is not None:
            raise problem
        reports = [report]
    else:
        report.error = problem is not None
        rows = all_gather_ints(report.encode(), device, group, world)
        reports = [Report.decode(r) for r in rows]
        failed = [r for r, rep in enumerate(reports) if rep.error]
        if failed:
            _raise_everywhere(problem, failed, group, world)
    names = [f.name for f in fields(Report)]
    for name in names[names.index(_FIRST_SHARED) :]:
        values = [getattr(r, name) for r in reports]
        if any(v != values[0] for v in values):
            shown = [_show(name, v) for v in values]
            if name == "margin_params":  # leave out the slots no rank uses
                used = max((i + 1 for row in shown for i, v in enumerate(row) if v is not None), default=0)
                shown = [row[:used] for row in shown]
            title = _TITLES.get(name, name)
            raise ValueError(f"{title} must be the same on every rank, but got {shown} (by rank)")
    check_tiling([(r.class_start, r.class_stop) for r in reports], num_classes)
    return reports


def check_tiling(by_rank: list[tuple[int, int]], num_classes: int) -> None:
    """The ranks' class blocks must tile ``[0, C)`` (any order, empty blocks allowed)."""
    ranges = sorted(r for r in by_rank if r[1] > r[0])
    tiles = (
        bool(ranges)
        and all(0 <= start <= stop <= num_classes for start, stop in by_rank)
        and ranges[0][0] == 0
        and ranges[-1][1] == num_classes
        and all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    )
    if not tiles:
        raise ValueError(
            f"the ranks' class blocks [class_start, class_start + weight rows / num_sub_centers) must tile "
            f"[0, {num_classes}) without gaps or overlaps, but got {by_rank} (by rank)"
        )


def _raise_everywhere(problem: Optional[Exception], failed: list[int], group: Any, world: int) -> None:
    """Every rank raises one error that quotes each failing rank's message (a second, error-path-only exchange)."""
    mine = None if problem is None else (type(problem).__name__, str(problem))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, mine, group=group)
    parts = [f"rank {r}: {gathered[r][1]}" for r in failed if gathered[r] is not None]
    kind = TypeError if gathered[failed[0]] is not None and gathered[failed[0]][0] == "TypeError" else ValueError
    error = kind(f"invalid input on {'; '.join(parts)} (every rank of the group raises this error)")
    raise error from problem


def agree_on_call(
    problem: Optional[Exception], shared: Mapping[str, int | float], device: torch.device, group: Any = None,
    block: Optional[tuple[int, int]] = None, num_classes: int = 0,
) -> None:  # fmt: skip
    """For a module whose step shares statistics across ranks (AdaCos, DeepNCM, CurricularFace, AdaFace, every
    sharded head): before its first collective, every rank says whether its checks passed and what must match
    (``shared``: sizes, dtype, mode…, in order, an error names the first that differs by its key; a ``float`` value
    travels as its bits and shows as a float; and, for a sharded head, its ``block`` of classes, which must tile
    ``[0, num_classes)``); then every rank raises the same error, or every rank goes on. One small all-gather per
    step; none in a world of one or while compiling (where ranks must match by construction: the collectives' own
    errors apply)."""
    world = 1 if torch.compiler.is_compiling() else _world(group)
    if world == 1:
        if problem is not None:
            raise problem
        if block is not None:
            check_tiling([block], num_classes)
        return
    extra = [] if block is None else list(block)
    values = [float_bits(v) if isinstance(v, float) else int(v) for v in shared.values()]
    rows = all_gather_ints([int(problem is not None), *values, *extra], device, group, world)
    failed = [r for r, row in enumerate(rows) if row[0]]
    if failed:
        _raise_everywhere(problem, failed, group, world)
    for i, name in enumerate(shared, start=1):
        by_rank = [row[i] for row in rows]
        if any(v != by_rank[0] for v in by_rank):
            shown = [bits_float(v) if isinstance(shared[name], float) else _show(name, v) for v in by_rank]
            raise ValueError(f"{_TITLES.get(name, name)} must be the same on every rank, but got {shown} (by rank)")
    if block is not None:
        check_tiling([(row[-2], row[-1]) for row in rows], num_classes)


def call_report(input: object, weight: Tensor, scale: object, reduction: object) -> dict[str, int]:
    """The fields of a sharded call that :func:`agree` compares and a module can know before its step (the same
    keys whatever the arguments: every rank sends as many integers); −1 where an argument is invalid (its check
    fails on that rank anyway)."""
    report = Report()
    out = {"reduction": -1, "scale": report.scale, "requires_grad": -1}
    if reduction in _REDUCTIONS:
        out["reduction"] = _REDUCTIONS.index(reduction)
    if isinstance(scale, (Tensor, float, int)) and (not isinstance(scale, Tensor) or scale.numel() == 1):
        report.set_scale(scale)
        out["scale"] = report.scale
    if isinstance(input, Tensor):
        report.set_requires_grad(input, weight, scale)
        out["requires_grad"] = report.requires_grad
    return out


def dtype_code(dtype: object) -> int:
    """A floating dtype as the small integer :func:`agree_on_call` compares and prints by name (``"dtype"``)."""
    return _DTYPES.index(dtype) if dtype in _DTYPES else -1


def _world(group: Any) -> int:
    return rank_and_world(group)[1]


def check_backward_agreement(device: torch.device, group: Any, world: int) -> None:
    """At the first collective of a backward: every rank refuses a double backward if any rank asked for one."""
    double = torch.is_grad_enabled()
    flags = [[int(double)]] if world == 1 else all_gather_ints([int(double)], device, group, world)
    asked = [r for r, row in enumerate(flags) if row[0]]
    if asked:
        raise RuntimeError(
            "the sharded loss gives first derivatives only: backward with create_graph=True (double backward, "
            f"gradient penalties) is not supported (asked for on rank(s) {asked})"
        )


def check_block(
    report: Report, input: Any, weight: Any, class_start: Any, num_classes: Any, num_sub_centers: Any, pooling: Any,
    pooling_temperature: Any, chunk_size: Any, feature_grad_scale: Any,
) -> tuple[int, tuple[int, ...]]:  # fmt: skip
    """The checks every class-sharded call shares — its block of classes, the features and the weights, the chunking,
    the pooling and the features' gradient scale — filling ``report`` with what must agree between the ranks.
    Returns ``(K, the features' leading shape)``."""
    check_chunk_size(chunk_size)
    if not is_int(class_start) or class_start < 0:
        raise ValueError(f"class_start must be an integer >= 0, but got {class_start!r}")
    check_num_classes(num_classes, "num_classes")
    check_num_sub_centers(num_sub_centers)
    check_pooling(pooling, pooling_temperature)
    check_feature_grad_scale(feature_grad_scale)
    k = int(num_sub_centers)
    report.num_classes, report.num_sub_centers, report.pooling = int(num_classes), k, (pooling == "soft")
    check_features(input, weight, k)
    report.in_features = input.shape[-1]
    report.set_dtype(input.dtype)
    report.class_start, report.class_stop = int(class_start), int(class_start) + weight.shape[0] // k
    lead = tuple(input.shape[:-1])
    report.rows = math.prod(lead)
    return k, lead
