"""Which path a chunked loss takes, and how it tiles: a cost model over the step's shape and a memory budget.

A margin cross-entropy over a block of C classes (K sub-centers each) for N rows of d features has three exact paths
(the same numbers to rounding):

- ``"keep"`` — the chunk kernel keeps every chunk's logits from forward to backward: three GEMMs, N·C·K logits held.
- ``"row_tiles"`` — the loss and its gradient in one pass, a tile of rows at a time (``row_tiles.py``): three GEMMs,
  one tile's logits held; only when the loss ends the graph (``"mean"``/``"sum"``, a gradient asked for, eager).
- ``"recompute"`` — the chunk kernel recomputes each chunk's logits in backward: four GEMMs, one chunk held;
- ``"dense"`` — the dense logits and ``F.cross_entropy``, for a single-process step of at most :data:`DENSE_LOGITS`
  logits and no chunk size given: there the Python of a kernel costs more than the few N×C passes it saves.

The GEMMs are the cost of a large step, so three beat four wherever the memory allows; the budget is the working
memory the loss may hold beyond its inputs and the gradients it returns. By default it is an eighth of one N×C·K
logits buffer (the floor's step holds about three: some 4% of its peak), raised to :data:`EFFICIENT_TILE_ROWS` rows of
logits where that is at most a quarter of the buffer (N ≤ 2048: shorter tiles cost more time than they save memory),
at least :data:`MIN_BUDGET` and at most :data:`MAX_BUDGET` (per device type); :func:`set_memory_budget` (or
``MLL_MEMORY_BUDGET``, in bytes) sets it. A row tile holds one logits-sized buffer in a single process (its
elementwise work runs on cache-sized groups of rows) and, under class sharding, as many as a chunk of the chunk
kernel: one for plain logits, four with sub-centers, a non-target part or dense soft targets. Then, for a single
process's scalar loss, ``"row_tiles"`` when a tile of at least :data:`MIN_TILE_ROWS` rows fits (or all the rows, where
fewer): even where every logit fits, a tile forms the gradient without a second walk over them. Otherwise ``"keep"``
when all the logits fit; else ``"row_tiles"`` (class sharding: its tiles run collectives) when a tile of at least
:data:`MIN_TILE_ROWS` rows fits (smaller tiles make skinny GEMMs and more passes over W than the fourth GEMM costs);
else ``"recompute"``, with chunks of at least :data:`MIN_CHUNK_CLASSES` classes (narrower GEMMs run far below the
machine's rate). :func:`set_loss_path` forces a path (for measurements and tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Optional

import torch

from mll.functional._engine.checks import is_int

PATHS = ("auto", "dense", "keep", "row_tiles", "recompute")

#: the chunk kernel's chunk: about this many logits per chunk (CPU 2^18, 1 MB of float32: a chunk's buffers stay in
#: cache at small batches), but never fewer than :data:`MIN_CHUNK_CLASSES` classes
CHUNK_ELEMENTS = 1 << 18
ACCELERATOR_CHUNK_ELEMENTS = 1 << 22
MIN_CHUNK_CLASSES = 512
#: Proxy-Anchor's one pass holds three N×chunk·K buffers (the cosines, the negatives' terms, the gradient), counted
#: as four: the step's own tensors (the features, their gradient) take a share of the budget too; its chunks hold up
#: to this many logits where the budget allows (larger GEMMs, fewer passes of Python: ProxyAnchor,
#: d = 512, 2 threads, tuned allocator, × the floor's time, chunks of 2^18 logits against larger: N = 1024, C = 10^5
#: 1.074 against 0.989 (2048 classes) and 0.960 (4096); N = 256, C = 10^5 1.042 against 0.917 (8192) and 0.941
#: (16384); N = 1024, C = 10^4 1.081 against 1.031 (1024) and 1.002 (4096))
CLASS_SUMS_MAX_ELEMENTS = 1 << 22
CLASS_SUMS_BUFFERS = 4
#: the default budget's bounds, per device type (CPU; accelerators: chosen, not yet measured)
MIN_BUDGET = 1 << 24
MAX_BUDGET = 1 << 30
ACCELERATOR_MIN_BUDGET = 1 << 26
ACCELERATOR_MAX_BUDGET = 1 << 32
#: the default budget: an eighth of one N×C·K logits buffer (a row tile of N/8 rows: about 4% of the floor's step,
#: which holds about three such buffers), raised to :data:`EFFICIENT_TILE_ROWS` rows' worth but never above a quarter
BUDGET_FRACTION = 0.125
MAX_BUDGET_FRACTION = 0.25
#: a row tile of this many rows streams the class weights few enough times (twice per tile, and the weight gradient
#: once more) that its GEMMs run near the floor's (ArcFace, d = 512, C = 10^5, 2 threads, tuned allocator, × the
#: floor's time: N = 1024 tiles of 256 rows 0.97, 128 rows 1.05; N = 4096 tiles of 1024 rows 1.03, 512 1.03, 256 1.12)
EFFICIENT_TILE_ROWS = 256
#: the smallest row tile worth its skinny GEMMs (N = 256, C = 10^5, d = 512, 2 threads, tuned allocator, × the
#: floor's time: ArcFace tiles of 64 rows 0.97–1.07 against recomputing 1.13–1.17, CurricularFace 1.16 against 1.25)
MIN_TILE_ROWS = 64
#: a planned tile's rows are a multiple of this where they can be (the GEMM's kernels work on blocks of rows: ArcFace,
#: N = 256, C = 10^5, tiles of 64, 80, 86, 96 rows: 1.03, 1.09, 1.12, 0.99× the floor)
TILE_ROW_MULTIPLE = 32
#: a single-process step of at most this many logits takes the dense path (its fixed cost is the kernel's smaller)
DENSE_LOGITS = 1 << 14

_STATE: dict[str, Any] = {"budget": None, "path": "auto", "rows": None}


def _parse_bytes(text: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
    t = text.strip().lower().removesuffix("b").removesuffix("i")
    factor = units.get(t[-1:], 1)
    number = t[:-1] if t[-1:] in units else t
    value = float(number) * factor
    if not 0 <= value < float("inf"):  # no NaN, no infinity (int() of which would raise OverflowError)
        raise ValueError
    return int(value)


if os.environ.get("MLL_MEMORY_BUDGET"):
    try:
        _STATE["budget"] = _parse_bytes(os.environ["MLL_MEMORY_BUDGET"])
    except ValueError:
        raise ValueError(
            f"MLL_MEMORY_BUDGET must be a number of bytes (e.g. 268435456 or 256MB), but got "
            f"{os.environ['MLL_MEMORY_BUDGET']!r}"
        ) from None


class set_memory_budget:
    """Set the working memory a chunked or sharded loss may hold (bytes; None: automatic), for the whole process;
    also a context manager. See the module notes (``docs/chunked.md``: how the path is chosen)."""

    def __init__(self, budget: Optional[int]) -> None:
        if budget is not None and (not is_int(budget) or budget < 0):
            raise ValueError(f"budget must be None or a number of bytes >= 0, but got {budget!r}")
        self.previous = _STATE["budget"]
        _STATE["budget"] = None if budget is None else int(budget)

    def __enter__(self) -> set_memory_budget:
        return self

    def __exit__(self, *exc: object) -> None:
        _STATE["budget"] = self.previous


class set_loss_path:
    """Force the chunked loss's path — ``"dense"``, ``"keep"``, ``"row_tiles"``, ``"recompute"`` or ``"auto"`` (the
    cost model, the default) — for the whole process; also a context manager. ``rows``: rows per tile of
    ``"row_tiles"`` (default: as many as the budget holds). A forced ``"row_tiles"`` falls back to the cost model
    where it cannot run (a per-row loss, no gradient to build, ``torch.compile``, ``torch.func``); a forced
    ``"dense"`` to the chunk kernel in the sharded loss."""

    def __init__(self, path: str, rows: Optional[int] = None) -> None:
        if path not in PATHS:
            raise ValueError(f"path must be one of {', '.join(map(repr, PATHS))}, but got {path!r}")
        if rows is not None and (not is_int(rows) or rows < 1):
            raise ValueError(f"rows must be None or an integer >= 1, but got {rows!r}")
        self.previous = (_STATE["path"], _STATE["rows"])
        _STATE["path"], _STATE["rows"] = path, None if rows is None else int(rows)

    def __enter__(self) -> set_loss_path:
        return self

    def __exit__(self, *exc: object) -> None:
        _STATE["path"], _STATE["rows"] = self.previous


def memory_budget(rows: int, classes: int, sub_centers: int, dtype: torch.dtype, device: Any = "cpu") -> int:
    """The budget in bytes: the user's, or the automatic one for this shape (see the module notes)."""
    if _STATE["budget"] is not None:
        return int(_STATE["budget"])
    cpu = torch.device(device).type == "cpu"
    low, high = (MIN_BUDGET, MAX_BUDGET) if cpu else (ACCELERATOR_MIN_BUDGET, ACCELERATOR_MAX_BUDGET)
    return int(min(high, max(low, _shape_budget(rows, classes, sub_centers, dtype))))


def _shape_budget(rows: int, classes: int, sub_centers: int, dtype: torch.dtype) -> float:
    """The automatic budget before its bounds: an eighth of the N×C·K logits, raised to 256 rows, at most a
    quarter."""
    row = classes * sub_centers * _bytes(dtype)
    logits = rows * row
    return min(MAX_BUDGET_FRACTION * logits, max(BUDGET_FRACTION * logits, EFFICIENT_TILE_ROWS * row))


def class_sums_chunk(rows: int, classes: int, sub_centers: int, dtype: torch.dtype, device: Any = "cpu") -> int:
    """Classes per chunk of Proxy-Anchor's kernel (``class_sums.py``), counted as :data:`CLASS_SUMS_BUFFERS`
    N×chunk·K buffers: on a CPU the budget's share of each (the user's budget, or the automatic one without its
    16 MB floor, which at C = 10^4 would hold a tenth of the dense step's memory and more), between
    :data:`CHUNK_ELEMENTS` and :data:`CLASS_SUMS_MAX_ELEMENTS` logits; a multiple of :data:`MIN_CHUNK_CLASSES`
    classes (at most C, at least 1). Accelerators: :func:`chunk_classes` (not yet measured)."""
    if torch.device(device).type != "cpu":
        return chunk_classes(rows, classes, sub_centers, device)
    user = _STATE["budget"]
    budget = min(MAX_BUDGET, _shape_budget(rows, classes, sub_centers, dtype)) if user is None else user
    elements = int(min(CLASS_SUMS_MAX_ELEMENTS, max(CHUNK_ELEMENTS, budget // (CLASS_SUMS_BUFFERS * _bytes(dtype)))))
    chunk = max(MIN_CHUNK_CLASSES, elements // max(1, rows * sub_centers))
    # a multiple of 512 classes: the GEMMs' blocks (N = 256, C = 10^5, × the floor: 6144 classes 0.949, 6250 1.019)
    return max(1, min(classes, chunk - chunk % MIN_CHUNK_CLASSES))


def chunk_classes(rows: int, classes: int, sub_centers: int, device: Any = "cpu") -> int:
    """Classes per chunk of the chunk kernel: about :data:`CHUNK_ELEMENTS` logits (accelerators
    :data:`ACCELERATOR_CHUNK_ELEMENTS`), at least :data:`MIN_CHUNK_CLASSES` classes, at least 1 and at most C."""
    elements = CHUNK_ELEMENTS if torch.device(device).type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    return max(1, min(classes, max(MIN_CHUNK_CLASSES, elements // max(1, rows * sub_centers))))


@dataclass(frozen=True)
class Plan:
    """A chunked loss's path (``"dense"``, ``"keep"``, ``"row_tiles"`` or ``"recompute"``), its chunk (classes) and
    tile (rows)."""

    path: str
    chunk: int
    rows: int
    budget: int


def plan(
    rows: int, classes: int, sub_centers: int, buffers: int, dtype: torch.dtype, device: Any = "cpu", *,
    scalar_loss: bool = False, chunk: Optional[int] = None, held: int = 0, dense: bool = False,
    tile_buffers: Optional[int] = None,
) -> Plan:  # fmt: skip
    """The path for N = ``rows`` rows and a block of ``classes`` classes with ``sub_centers`` each, whose chunks hold
    ``buffers`` logits-sized tensors (1 for plain scaled cosines; more with sub-centers, a non-target part or dense
    soft targets). ``scalar_loss``: the loss ends the graph (a ``"mean"``/``"sum"`` reduction with a gradient to
    build, eager) — only then can it take ``"row_tiles"``. ``chunk``: the caller's classes per chunk. ``held``: bytes
    the row tiles would hold besides a tile (a weight gradient formed beside an existing ``.grad``). ``dense``: the
    caller can run the dense path (a single process). ``tile_buffers``: the logits-sized tensors a row tile holds
    (default ``buffers``; 1 in a single process, where a tile's elementwise work runs on groups of rows)."""
    budget = memory_budget(rows, classes, sub_centers, dtype, device)
    per_row = max(1, classes * sub_centers * _bytes(dtype) * buffers)
    given = chunk
    chunk = chunk_classes(rows, classes, sub_centers, device) if chunk is None else int(chunk)
    forced = _STATE["path"]
    per_tile_row = max(1, classes * sub_centers * _bytes(dtype) * (buffers if tile_buffers is None else tile_buffers))
    tile = max(1, min(rows, _STATE["rows"] or round_rows(max(0, budget - held) // per_tile_row)))
    if dense and dense_first(rows, classes, sub_centers, given):
        return Plan("dense", chunk, rows, budget)
    if forced == "row_tiles" and scalar_loss:
        return Plan("row_tiles", chunk, tile, budget)
    if forced in ("keep", "recompute"):
        return Plan(forced, chunk, rows, budget)
    if torch.compiler.is_compiling():  # a traced kernel cannot hand its chunks from forward to backward
        return Plan("recompute", chunk, rows, budget)
    # a single process's scalar loss takes the row tiles even where every logit would fit: no second walk over the
    # logits in backward (N = 256, C = 10^4, d = 512: ArcFace 0.90× the floor in one tile against 1.07× kept,
    # CurricularFace 0.96× against 1.14×; N = 64–512, C = 129–4000: 0.88–1.00×, sub-centers 0.92–1.01× and SoftTriple
    # 1.00–1.02× the kept path's time)
    tiles = scalar_loss and tile >= min(MIN_TILE_ROWS, rows)  # (a forced "recompute" returned above)
    if rows * per_row <= budget and not (tiles and dense):
        return Plan("keep", chunk, rows, budget)
    if tiles:
        return Plan("row_tiles", chunk, tile, budget)
    return Plan("recompute", chunk, rows, budget)


def round_rows(rows: int) -> int:
    """A tile's rows rounded down to a multiple of :data:`TILE_ROW_MULTIPLE` (fewer rows: as they are)."""
    return rows - rows % TILE_ROW_MULTIPLE if rows >= TILE_ROW_MULTIPLE else rows


def dense_first(rows: int, classes: int, sub_centers: int, chunk: Optional[int]) -> bool:
    """Whether a single-process step takes the dense path (forced, or at most :data:`DENSE_LOGITS` logits, no chunk
    size given, eager) — :func:`plan`'s first question, askable alone so that a small step pays for nothing else (the
    caller need not build the kernel's specification)."""
    forced = _STATE["path"]
    if forced != "auto":
        return forced == "dense"
    return chunk is None and rows * classes * sub_centers <= DENSE_LOGITS and not torch.compiler.is_compiling()


def _bytes(dtype: torch.dtype) -> int:
    return 8 if dtype == torch.float64 else 4
