"""Resume anywhere: a training state saved on A ranks, loaded on B ranks, each rank reading only its own rows.

A sharded head's state is its block of per-class rows (the weights; DeepNCM's means), small replicated tensors (the
scale, per-class margins, running statistics, ``class_range``) and its random state (``mll/nn/_sampling.py``); its
optimizer's state for the weights is per row too (SGD's momentum, Adam's two moments), beside a replicated part
(step counts, the backbone's state). :func:`load_resharded` gives a head of any block — a rank of a world of B, or
a single-process head — its part of every one of them from the A ranks' files: each file is memory-mapped
(``torch.load(mmap=True)``) and only the rows that fall in the head's block are read, a bounded number of rows at a
time, straight into the head's tensors and the optimizer's new state; the C×d matrix never exists anywhere.

Importers for other layouts (InsightFace's per-rank files, pytorch-metric-learning's (D, C) weights) are the same
function with ``blocks=`` (for files that do not say which classes they hold) and ``transform=`` (to present a state
in mll's layout, as views of the mapped tensors): :mod:`mll.compat.checkpoints`.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Union

import torch
from torch import Tensor, nn

from mll.nn._head import Head
from mll.nn._sampling import RANDOM_STATE_KEYS
from mll.nn._sharded import PER_CLASS, Sharded

__all__ = ["load_resharded"]

Checkpoint = Union[str, "os.PathLike[str]", Mapping[str, Any]]
#: ``transform(head_state, optimizer_state) -> (head_state, optimizer_state)``, both in mll's layout
Transform = Callable[
    [Mapping[str, Any], Optional[Mapping[str, Any]]], tuple[Mapping[str, Any], Optional[Mapping[str, Any]]]
]
#: replicated tensors up to this many entries are compared between the checkpoints
_COMPARED = 2**20


@dataclass
class _Target:
    """The head being loaded: its block ``[start, stop)`` of ``num_classes``, K rows per class, its per-class keys."""

    start: int
    stop: int
    num_classes: int
    k: int
    rows: dict[str, Tensor]  # per-class key -> the head's parameter or buffer (written in place)


@dataclass
class _Source:
    """One checkpoint: how to open it, the block it holds, and (per key) its per-row tensors' rows."""

    checkpoint: Checkpoint
    block: tuple[int, int] = (0, 0)
    rows: int = 0
    optimizer_rows: dict[int, list[str]] = field(default_factory=dict)  # parameter position -> per-row entries


def _target(head: nn.Module) -> _Target:
    state = head.state_dict(keep_vars=True)
    if isinstance(head, Sharded):
        start, stop, c, k = head.class_start, head.class_stop, head.out_features, head.num_sub_centers
    elif isinstance(head, Head):
        start, stop, c, k = 0, head.out_features, head.out_features, head.num_sub_centers
    elif all(hasattr(head, name) for name in ("class_start", "num_local", "num_classes")):  # InsightFace's names
        start, c, k = int(head.class_start), int(head.num_classes), 1  # type: ignore[arg-type]
        stop = start + int(head.num_local)  # type: ignore[arg-type]
    else:
        raise TypeError(
            f"load_resharded needs an mll head (sharded or not) or a module with InsightFace's class_start, num_local "
            f"and num_classes, but got {type(head).__name__}"
        )
    return _Target(int(start), int(stop), int(c), int(k), {key: state[key] for key in PER_CLASS if key in state})


def _open(checkpoint: Checkpoint) -> Mapping[str, Any]:
    if isinstance(checkpoint, Mapping):
        return checkpoint
    try:
        return torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError as error:
        if "mmap" not in str(error):
            raise
        # a file in torch's legacy format cannot be mapped: read whole (it holds one rank's block)
        return torch.load(checkpoint, map_location="cpu", weights_only=True)


def _views(
    opened: Mapping[str, Any], head_key: Optional[str], optimizer_key: Optional[str], transform: Optional[Transform]
) -> tuple[Mapping[str, Any], Optional[Mapping[str, Any]]]:
    for key in (head_key, optimizer_key):
        if key is not None and key not in opened:
            raise ValueError(
                f"a checkpoint has no {key!r} (it holds {sorted(opened)[:8]}): check head_key, optimizer_key"
            )
    head_state = opened[head_key] if head_key is not None else opened
    optimizer_state = opened[optimizer_key] if optimizer_key is not None else None
    if transform is not None:
        head_state, optimizer_state = transform(head_state, optimizer_state)
    return head_state, optimizer_state


def load_resharded(
    head: nn.Module,
    checkpoints: Sequence[Checkpoint],
    optimizer: Optional[torch.optim.Optimizer] = None,
    *,
    head_key: Optional[str] = None,
    optimizer_key: Optional[str] = None,
    blocks: Optional[Sequence[tuple[int, int]]] = None,
    strict: bool = True,
    transform: Optional[Transform] = None,
    chunk_bytes: int = 2**26,
) -> None:
    """Load this rank's part of a training state saved by any number of ranks: the head and, optionally, its optimizer.

    Every rank of the new world calls it with every old rank's checkpoint (any order) and its own head — built with
    the hyper-parameters of the run it resumes, on its new block of classes (a sharded head of any world size, or a
    single-process head). Each checkpoint is a file written by ``torch.save`` (memory-mapped, read with
    ``weights_only=True``) or an already loaded dict. The head's per-class rows are read from the checkpoints whose
    blocks overlap its own, ``chunk_bytes`` at a time, into its tensors in place; its other entries (replicated) must
    agree between the checkpoints. The random state carries over where it means the same on the new ranks:
    ElasticFace's generator and the key of ``sampling="class"`` always, a rank's ``sampling="block"`` stream only to
    a head of the same block (on another split the block sample draws anew: use ``sampling="class"`` to resume on
    another number of ranks and draw what the uninterrupted run draws).

    With ``optimizer`` — built like the old one, over the same parameters in the same order (the backbone's too) —
    its state is the old one with the head's per-class rows re-sharded: every per-row entry (SGD's momentum, Adam's
    ``exp_avg`` and ``exp_avg_sq``, …) is cut to the new block, and every other entry (step counts, the backbone's
    state, the learning rates of the parameter groups) comes from the checkpoints, which hold it alike.

    Everything is checked before anything is written: the blocks must tile ``[0, C)`` for the head's C (a missing
    rank's file, a checkpoint of another C, another ``in_features`` or number of sub-centers is refused, naming it).

    Args:
        head (nn.Module): this rank's head: an mll head (sharded or not), or a module with InsightFace's
            ``class_start``, ``num_local``, ``num_classes`` (``mll.compat.insightface.PartialFC_V2``).
        checkpoints (sequence of path or dict): every old rank's checkpoint.
        optimizer (torch.optim.Optimizer, optional): this rank's optimizer, to load with the re-sharded state.
        head_key (str, optional): where each checkpoint holds the head's ``state_dict`` (None: it is the checkpoint).
        optimizer_key (str, optional): where each checkpoint holds the optimizer's ``state_dict`` (with ``optimizer``).
        blocks (sequence of (int, int), optional): each checkpoint's classes ``(start, stop)``, for states that do not
            record them in ``class_range`` (default: ``class_range``, or every class for a state with C·K rows).
        strict (bool): every entry of the head's ``state_dict`` must be in the checkpoints, and nothing else; False:
            entries they lack keep the head's values (a scale that InsightFace's checkpoints do not hold), others are
            ignored.
        transform (callable, optional): ``transform(head_state, optimizer_state) -> (head_state, optimizer_state)``,
            applied to each opened checkpoint: another layout presented as mll's (views of the mapped tensors).
        chunk_bytes (int): how much of a checkpoint's rows is mapped at a time.
    """
    target = _target(head)
    if not isinstance(checkpoints, Sequence) or isinstance(checkpoints, (str, bytes)) or len(checkpoints) == 0:
        raise ValueError("checkpoints must be a non-empty sequence of every old rank's checkpoint (paths or dicts)")
    if blocks is not None and (len(blocks) != len(checkpoints)):
        raise ValueError(
            f"blocks must give one (start, stop) per checkpoint: {len(checkpoints)}, but got {len(blocks)}"
        )
    if optimizer is not None and optimizer_key is None:
        raise ValueError("optimizer_key must say where each checkpoint holds the optimizer's state_dict")
    current = {key: value for key, value in head.state_dict().items() if key not in RANDOM_STATE_KEYS}
    params = [p for group in optimizer.param_groups for p in group["params"]] if optimizer is not None else []
    per_class_params = {i: key for i, p in enumerate(params) for key, rows in target.rows.items() if p is rows}
    sources = [_Source(c) for c in checkpoints]
    replicated, random_state, optimizer_first = _survey(
        sources, target, current, per_class_params, head_key, optimizer_key, blocks, strict, transform, len(params)
    )
    _check_tiling([s.block for s in sources], target.num_classes)
    # everything checked: write. First the optimizer's new per-row state, then the rows, source by source.
    new_state: dict[int, dict[str, Any]] = {}
    if optimizer_first is not None:
        for position, entries in optimizer_first["state"].items():
            new_state[position] = dict(entries)
            like = params[position]
            for name in optimizer_first["rows"].get(position, []):
                new_state[position][name] = torch.empty((target.stop - target.start) * target.k, *like.shape[1:],
                                                        dtype=like.dtype, device=like.device)  # fmt: skip
    for source in sorted(sources, key=lambda s: s.block):
        _copy_rows(source, target, new_state, head_key, optimizer_key, transform, chunk_bytes)
    state = {**current, **replicated}
    own = head.state_dict()
    if isinstance(head, Sharded):  # its load hook checks the sampling rule
        state.update(random_state)
    else:
        state.update({key: value for key, value in random_state.items() if key in own})
        apply_random_state_dense(head, random_state)
    head.load_state_dict(state, strict=True)
    if optimizer is not None and optimizer_first is not None:
        optimizer.load_state_dict({"state": new_state, "param_groups": optimizer_first["param_groups"]})


def apply_random_state_dense(head: nn.Module, saved: Mapping[str, Tensor]) -> None:
    """A single-process ElasticFace takes the margins' generator state (a dense head has no sampling)."""
    generator = getattr(head, "generator", None)
    if "generator" in saved and isinstance(generator, torch.Generator) and not isinstance(head, Sharded):
        generator.set_state(saved["generator"].detach().to("cpu", torch.uint8))


def _own(value: Any) -> Any:
    """A copy out of the mapped file (a file may be rewritten by the next checkpoint while the state lives on)."""
    return value.clone() if isinstance(value, Tensor) else copy.deepcopy(value)


def _survey(
    sources: list[_Source], target: _Target, current: dict[str, Tensor], per_class_params: dict[int, str],
    head_key: Optional[str], optimizer_key: Optional[str], blocks: Optional[Sequence[tuple[int, int]]], strict: bool,
    transform: Optional[Transform], num_params: int,
) -> tuple[dict[str, Tensor], dict[str, Tensor], Optional[dict[str, Any]]]:  # fmt: skip
    """Pass one: every checkpoint's block and shapes, checked against the head and each other; the replicated entries
    (copied out of the first checkpoint), the random state, the first checkpoint's optimizer state."""
    replicated: dict[str, Tensor] = {}
    random_state: dict[str, Tensor] = {}
    optimizer_first: Optional[dict[str, Any]] = None
    for index, source in enumerate(sources):
        where = f"checkpoint {index}"
        head_state, optimizer_state = _views(_open(source.checkpoint), head_key, optimizer_key, transform)
        rows_key = next(iter(target.rows))
        if rows_key not in head_state:
            raise ValueError(f"{where} has no {rows_key!r}: it is not a state of this kind of head (head_key?)")
        rows = head_state[rows_key]
        source.block = _block_of(head_state, rows, target, None if blocks is None else blocks[index], where)
        source.rows = (source.block[1] - source.block[0]) * target.k
        for key, mine in target.rows.items():
            theirs = head_state.get(key)
            if theirs is None or tuple(theirs.shape) != (source.rows, *mine.shape[1:]):
                got = None if theirs is None else tuple(theirs.shape)
                raise ValueError(
                    f"{where} holds {key} of shape {got} for classes {list(source.block)}, but this head needs "
                    f"({source.rows}, {', '.join(map(str, mine.shape[1:]))}) rows for them (K={target.k} rows per "
                    "class): another in_features or number of sub-centers?"
                )
        for key, value in head_state.items():
            if key in target.rows or key == "class_range":
                continue
            if key in RANDOM_STATE_KEYS:
                _random_entry(random_state, key, value, source.block == (target.start, target.stop), where)
            elif key not in current:
                if strict:
                    raise ValueError(f"{where} holds {key!r}, which this head does not have (strict=False ignores it)")
            elif tuple(value.shape) != tuple(current[key].shape):
                raise ValueError(f"{where} holds {key} of shape {tuple(value.shape)}, this head's is "
                                 f"{tuple(current[key].shape)}")  # fmt: skip
            elif key not in replicated:
                replicated[key] = value.detach().clone()
            elif value.numel() <= _COMPARED and not torch.equal(replicated[key], value.detach()):
                raise ValueError(f"the checkpoints must hold the same {key} (it is replicated on every rank), but "
                                 f"checkpoint 0 and {where} differ")  # fmt: skip
        missing = [k for k in current if k not in target.rows and k != "class_range" and k not in head_state]
        if missing and strict:
            raise ValueError(f"{where} lacks {missing} (strict=False keeps this head's values for them)")
        if per_class_params or num_params:
            optimizer_first = _survey_optimizer(source, optimizer_state, per_class_params, num_params, optimizer_first,
                                                where)  # fmt: skip
    return replicated, random_state, optimizer_first


def _block_of(
    state: Mapping[str, Any], rows: Tensor, target: _Target, given: Optional[tuple[int, int]], where: str
) -> tuple[int, int]:
    if "class_range" in state:
        block = tuple(int(v) for v in state["class_range"].tolist())
    elif given is not None:
        block = tuple(int(v) for v in given)
    elif rows.shape[0] == target.num_classes * target.k:
        block = (0, target.num_classes)
    else:
        raise ValueError(
            f"{where} does not say which classes it holds (no class_range, {rows.shape[0]} rows, not the "
            f"{target.num_classes}·{target.k} of every class): pass blocks=[(start, stop), …], one per checkpoint"
        )
    if len(block) != 2 or not 0 <= block[0] <= block[1]:
        raise ValueError(f"{where}'s block of classes must be (start, stop) with 0 <= start <= stop, got {block}")
    return (block[0], block[1])


def _random_entry(out: dict[str, Tensor], key: str, value: Tensor, same_block: bool, where: str) -> None:
    if key == "sampling_generator":  # each rank's own stream: only to a head of the same block
        if same_block:
            out[key] = value.detach().clone()
        return
    if key in out and not torch.equal(out[key], value):
        raise ValueError(f"the checkpoints must hold the same {key} (the same on every rank), but {where} differs")
    out[key] = value.detach().clone()


def _survey_optimizer(
    source: _Source, state: Optional[Mapping[str, Any]], per_class_params: dict[int, str], num_params: int,
    first: Optional[dict[str, Any]], where: str,
) -> dict[str, Any]:  # fmt: skip
    """One checkpoint's optimizer state: which entries of the head's per-class parameters are per row; the rest
    (copied out of the first checkpoint, re-keyed by position as torch numbers parameters) must agree between them."""
    if not isinstance(state, Mapping) or "state" not in state or "param_groups" not in state:
        raise ValueError(f"{where} holds no optimizer state_dict at optimizer_key")
    ids = [i for group in state["param_groups"] for i in group["params"]]
    if len(ids) != num_params:
        raise ValueError(
            f"{where}'s optimizer has {len(ids)} parameters, this one {num_params}: build the optimizer over the same "
            "parameters, in the same order, as the run that saved it"
        )
    for position in per_class_params:
        entries = state["state"].get(ids[position], {})
        source.optimizer_rows[position] = sorted(
            n for n, v in entries.items() if isinstance(v, Tensor) and v.dim() >= 1 and v.shape[0] == source.rows
        )
    rest = {
        position: {n: v for n, v in state["state"][i].items() if n not in source.optimizer_rows.get(position, [])}
        for position, i in enumerate(ids)
        if i in state["state"]
    }
    if first is None:
        groups, start = copy.deepcopy(list(state["param_groups"])), 0
        for group in groups:
            group["params"] = list(range(start, start + len(group["params"])))
            start += len(group["params"])
        own = {p: {n: _own(v) for n, v in entries.items()} for p, entries in rest.items()}
        return {"state": own, "param_groups": groups, "rows": dict(source.optimizer_rows)}
    if set(rest) != set(first["state"]) or source.optimizer_rows != first["rows"]:
        raise ValueError(
            f"checkpoint 0 and {where} hold optimizer state for different parameters or entries: were they saved at "
            "the same step, by the same optimizer?"
        )
    for position in per_class_params:  # the step counts of the rows' optimizer
        for name, value in rest.get(position, {}).items():
            if (
                isinstance(value, Tensor)
                and value.numel() <= _COMPARED
                and not torch.equal(value, first["state"][position][name])
            ):
                raise ValueError(f"checkpoint 0 and {where} hold different optimizer {name} for the head's rows")
    return first


def _check_tiling(blocks: list[tuple[int, int]], num_classes: int) -> None:
    filled = sorted(b for b in blocks if b[1] > b[0])
    at = 0
    for start, stop in filled:
        if start > at:
            raise ValueError(
                f"classes [{at}, {start}) are in no checkpoint (a rank's file missing?): the checkpoints hold "
                f"{sorted(blocks)}"
            )
        if start < at:
            raise ValueError(f"classes [{start}, {min(at, stop)}) are in two checkpoints: {sorted(blocks)}")
        at = stop
    if at != num_classes:
        raise ValueError(
            f"the checkpoints hold classes [0, {at}), but this head has {num_classes} classes (another num_classes?)"
        )


def _copy_rows(
    source: _Source, target: _Target, new_state: dict[int, dict[str, Any]], head_key: Optional[str],
    optimizer_key: Optional[str], transform: Optional[Transform], chunk_bytes: int,
) -> None:  # fmt: skip
    """Pass two: the rows of ``source`` that fall in the head's block, into the head and the new optimizer state, a
    chunk of rows per mapping of the file (its pages are released when the chunk is done)."""
    lo, hi = max(source.block[0], target.start), min(source.block[1], target.stop)
    if lo >= hi:
        return
    k = target.k
    row_bytes = sum(t[0].numel() * t.element_size() for t in target.rows.values() if t.shape[0] > 0)
    states = [new_state[i][n] for i, names in source.optimizer_rows.items() for n in names]
    row_bytes += sum(t[0].numel() * t.element_size() for t in states if t.shape[0] > 0)
    step = max(1, chunk_bytes // max(1, row_bytes * k))
    for first in range(lo, hi, step):
        last = min(hi, first + step)
        head_state, optimizer_state = _views(_open(source.checkpoint), head_key, optimizer_key, transform)
        src = slice((first - source.block[0]) * k, (last - source.block[0]) * k)
        dst = slice((first - target.start) * k, (last - target.start) * k)
        with torch.no_grad():
            for key, mine in target.rows.items():
                mine[dst].copy_(head_state[key][src])
            if optimizer_state is not None and source.optimizer_rows:
                ids = [i for group in optimizer_state["param_groups"] for i in group["params"]]
                for position, names in source.optimizer_rows.items():
                    for name in names:
                        new_state[position][name][dst].copy_(optimizer_state["state"][ids[position]][name][src])
        del head_state, optimizer_state
