"""A prepared GPU benchmark: mll heads against the floor, the compiled floor and margin-free fused anchors.

    python -m benchmarks.gpu                        # on one CUDA device, in under 8 minutes
    python -m benchmarks.gpu --dry-run              # the plan and the memory estimate; touches no device
    python -m benchmarks.gpu --device cpu --quick   # every case at tiny shapes on the CPU: a smoke run

Shapes: N=512 features of d=512, fp32 class weights, bf16 autocast (the default case of a GPU training step);
C = 10^5, 10^6 and the largest C that fits: doubled from 10^6 while a memory estimate of the floor's step fits in
the free device memory, then halved while the time the 10^6 stage took, scaled to that C, does not fit in what is
left of ``--budget-s``. If the floor runs out of memory there anyway, C is halved again.

Cases, one training step each (gradients set to None first, as ``optimizer.zero_grad()`` does; forward under
autocast; backward):

- the floor, ``F.cross_entropy(s * F.linear(F.normalize(x), F.normalize(W)), y)``;
- the same floor through ``torch.compile`` (compile time, the first step less a steady step, reported apart);
- ``mll.ArcFace`` and ``mll.CosFace`` + ``F.cross_entropy`` (dense), and their chunked ``head.loss(x, y)``
  (default chunk size, one GPU-sized chunk for ArcFace, and ArcFace's with the compiled chunk kernel,
  ``mll.functional.set_chunk_kernel("compiled")``, its compile time reported apart);
- margin-free anchors on the normalised operands: Liger-Kernel's fused linear cross-entropy and Apple's Cut
  Cross-Entropy (its default gradient filtering), when installed.

Per case: the median of several steps timed with CUDA events after two warm-up steps, and
``torch.cuda.max_memory_allocated`` over those steps (peak reset per case; "above weights" is the peak less what
was allocated before the timed steps: W, its gradient set to None, x, y). Every case runs in a ``try``: one failure
(out of memory, a missing package) prints a "failed:" or "not installed" row and the run goes on. After the first
stage, one training step of every mll head (dense and ``loss()``) runs under ``torch.cuda.set_sync_debug_mode
("error")`` and the table says "sync-free" or the error's first line.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.metadata
import importlib.util
import inspect
import statistics
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import mll
from benchmarks.cases import ARC_MARGIN, COS_MARGIN, SCALE, with_chunk_kernel

GiB = 2**30
#: the H200 this benchmark is prepared for (139 GiB usable), for a dry run without a device
DRY_RUN_MEMORY_GIB = 139.0
#: classes per chunk of the "GPU-sized chunk" case: N·chunk = 4M float32 logits (16 MB) per chunk at N = 512
GPU_CHUNK = 8192
#: fraction of the free memory the estimate may fill, and slack on the estimate itself
MEMORY_FRACTION, ESTIMATE_SLACK = 0.9, 1.25
MIN_STEPS, MAX_STEPS, WARMUP = 3, 25, 2


@dataclass(frozen=True)
class Plan:
    batch: int
    features: int
    classes: tuple[int, ...]  # the fixed stages; the largest is probed from the last of them
    max_classes: int  # the probe never goes beyond this
    case_seconds: float  # timed steps of one case fill about this long


FULL = Plan(batch=512, features=512, classes=(100_000, 1_000_000), max_classes=1 << 27, case_seconds=4.0)
QUICK = Plan(batch=16, features=32, classes=(500, 1_000), max_classes=2_000, case_seconds=0.02)


def floor_step_bytes(batch: int, features: int, classes: int) -> int:
    """Estimated peak memory of one floor step under bf16 autocast (fp32 weights), with ESTIMATE_SLACK.

    Per class: the weight, its gradient, its normalised copy and that copy's bf16 cast, the bf16 gradient of the
    cast and normalize's fp32 gradients (4+4+4+2+2+4+4 bytes per feature); the bf16 logits and scaled logits, the
    fp32 log-softmax and its gradient, their bf16 casts (2+2+4+4+4+2+2 bytes per sample)."""
    per_class = 24 * features + 20 * batch
    return int(ESTIMATE_SLACK * per_class * classes)


def largest_by_memory(plan: Plan, free_bytes: int) -> int:
    """Double from the plan's last stage while the floor's estimate fits in MEMORY_FRACTION of ``free_bytes``."""
    c = plan.classes[-1]
    while 2 * c <= plan.max_classes and floor_step_bytes(plan.batch, plan.features, 2 * c) <= MEMORY_FRACTION * (
        free_bytes
    ):
        c *= 2
    return c


def cap_by_time(classes: int, start: int, seconds_at_start: float, seconds_left: float) -> int:
    """Halve ``classes`` (never below ``start``) while the last stage's time, scaled linearly from ``start``
    classes, exceeds 80% of the time left."""
    while classes > start and seconds_at_start * classes / start > 0.8 * seconds_left:
        classes //= 2
    return max(classes, start)


# ----------------------------------------------------------------------------------------------------------------
# one stage: the operands of one class count, and the cases as factories of training steps


@dataclass
class Problem:
    device: torch.device
    batch: int
    features: int
    classes: int
    compile_backend: str
    x: torch.Tensor = field(init=False)
    y: torch.Tensor = field(init=False)
    weight: torch.nn.Parameter = field(init=False)

    def __post_init__(self) -> None:
        g = torch.Generator(device=self.device).manual_seed(0)
        self.x = torch.randn(self.batch, self.features, device=self.device, generator=g).requires_grad_(True)
        self.y = torch.randint(0, self.classes, (self.batch,), device=self.device, generator=g)
        w = torch.randn(self.classes, self.features, device=self.device, generator=g)
        self.weight = torch.nn.Parameter(w)

    def autocast(self) -> torch.autocast:
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def zero_grad(self) -> None:
        self.x.grad = self.weight.grad = None


Step = Callable[[], None]


def _floor_loss(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(SCALE * F.linear(F.normalize(x), F.normalize(w)), y)


def _step(p: Problem, loss: Callable[[], torch.Tensor]) -> Step:
    def step() -> None:
        p.zero_grad()
        with p.autocast():
            value = loss()
        value.backward()

    return step


def floor(p: Problem) -> Step:
    return _step(p, lambda: _floor_loss(p.x, p.weight, p.y))


def compiled_floor(p: Problem) -> Step:
    compiled = torch.compile(_floor_loss, backend=p.compile_backend)
    return _step(p, lambda: compiled(p.x, p.weight, p.y))


def head_on(p: Problem, name: str, **kwargs: object) -> torch.nn.Module:
    """An mll head built on the device, holding the stage's weight matrix."""
    with p.device:
        head = getattr(mll, name)(p.features, p.classes, **kwargs)
    if hasattr(head, "weight"):
        head.weight = p.weight  # its own initial weights are freed here
    return head.train()


def dense(name: str, **kwargs: object) -> Callable[[Problem], Step]:
    def make(p: Problem) -> Step:
        head = head_on(p, name, **kwargs)
        return _step(p, lambda: F.cross_entropy(head(p.x, p.y), p.y))

    return make


def chunked(name: str, chunk_size: Optional[int] = None, **kwargs: object) -> Callable[[Problem], Step]:
    def make(p: Problem) -> Step:
        head = head_on(p, name, **kwargs)
        if chunk_size is None:
            return _step(p, lambda: head.loss(p.x, p.y))
        return _step(p, lambda: head.loss(p.x, p.y, chunk_size=chunk_size))

    return make


def compiled_kernel(name: str, **kwargs: object) -> Callable[[Problem], Step]:
    """``head.loss`` with ``mll.functional.set_chunk_kernel("compiled")`` for the step (Inductor's Triton bodies)."""

    def make(p: Problem) -> Step:
        return with_chunk_kernel("compiled", chunked(name, **kwargs)(p))

    return make


def _normalised_bf16(p: Problem) -> tuple[torch.Tensor, torch.Tensor]:
    """s·x̂ and Ŵ in bf16, as the floor's GEMM sees them under autocast."""
    return (SCALE * F.normalize(p.x)).to(torch.bfloat16), F.normalize(p.weight).to(torch.bfloat16)


def liger(p: Problem) -> Step:
    from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

    loss_fn = LigerFusedLinearCrossEntropyLoss()

    def loss() -> torch.Tensor:
        x, w = _normalised_bf16(p)
        return loss_fn(w, x, p.y)  # Liger takes the weight first

    return _step(p, loss)


def cut_cross_entropy(p: Problem) -> Step:
    from cut_cross_entropy import linear_cross_entropy

    def loss() -> torch.Tensor:
        x, w = _normalised_bf16(p)
        return linear_cross_entropy(x, w, p.y)

    return _step(p, loss)


@dataclass(frozen=True)
class Case:
    name: str
    make: Callable[[Problem], Step]
    package: Optional[str] = None  # the distribution an anchor needs
    compiled: bool = False


CASES = [
    Case("floor", floor),
    Case("floor, torch.compile", compiled_floor, compiled=True),
    Case("ArcFace dense + F.cross_entropy", dense("ArcFace", scale=SCALE, margin=ARC_MARGIN)),
    Case("CosFace dense + F.cross_entropy", dense("CosFace", scale=SCALE, margin=COS_MARGIN)),
    Case("ArcFace loss() (chunked, default chunk)", chunked("ArcFace", scale=SCALE, margin=ARC_MARGIN)),
    Case("CosFace loss() (chunked, default chunk)", chunked("CosFace", scale=SCALE, margin=COS_MARGIN)),
    Case(
        "ArcFace loss(), compiled chunk kernel",
        compiled_kernel("ArcFace", scale=SCALE, margin=ARC_MARGIN),
        compiled=True,
    ),
    Case(
        f"ArcFace loss(chunk_size={GPU_CHUNK})",
        chunked("ArcFace", chunk_size=GPU_CHUNK, scale=SCALE, margin=ARC_MARGIN),
    ),
    Case("Liger fused linear CE (no margin)", liger, package="liger-kernel"),
    Case("Cut Cross-Entropy (no margin)", cut_cross_entropy, package="cut-cross-entropy"),
]


# ----------------------------------------------------------------------------------------------------------------
# running a case


@dataclass
class Row:
    case: str
    seconds: Optional[float] = None  # median per step
    steps: int = 0
    peak_bytes: Optional[int] = None
    above_bytes: Optional[int] = None
    compile_seconds: Optional[float] = None
    wall_seconds: float = 0.0  # everything the case took, warm-up and compile included
    failure: Optional[str] = None


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"[:160]


def where_in_mll(error: BaseException) -> str:
    """The innermost frame of the error's traceback inside the mll package, as `mll/…py:line`, or ''."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if "/mll/" in f.filename.replace("\\", "/")]
    if not frames:
        return ""
    path = frames[-1].filename.replace("\\", "/")
    return f" (at mll/{path.rsplit('/mll/', 1)[1]}:{frames[-1].lineno})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed_steps(step: Step, device: torch.device, n: int) -> list[float]:
    if device.type != "cuda":
        times = []
        for _ in range(n):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]
    for start, end in events:
        start.record()
        step()
        end.record()
    torch.cuda.synchronize(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def run_case(case: Case, p: Problem, case_seconds: float, deadline: float) -> Row:
    row = Row(case.name)
    begin = time.monotonic()
    if time.monotonic() > deadline:
        row.failure = "skipped: time budget spent"
        return row
    if case.package and importlib.util.find_spec(case.package.replace("-", "_")) is None:
        row.failure = f"not installed ({case.package})"
        return row
    try:
        step = case.make(p)
        walls = []
        for _ in range(WARMUP):  # the first: compile, autotuning, allocations; the second estimates a step
            start = time.perf_counter()
            step()
            synchronize(p.device)
            walls.append(time.perf_counter() - start)
        left = deadline - time.monotonic()
        n = min(MAX_STEPS, max(MIN_STEPS, int(case_seconds / max(walls[-1], 1e-6))))
        n = max(1, min(n, int(left / max(walls[-1], 1e-6))))
        p.zero_grad()
        synchronize(p.device)
        if p.device.type == "cuda":
            base = torch.cuda.memory_allocated(p.device)
            torch.cuda.reset_peak_memory_stats(p.device)
        times = timed_steps(step, p.device, n)
        if p.device.type == "cuda":
            row.peak_bytes = torch.cuda.max_memory_allocated(p.device)
            row.above_bytes = row.peak_bytes - base
        row.seconds, row.steps = statistics.median(times), n
        if case.compiled:
            row.compile_seconds = max(0.0, walls[0] - row.seconds)
    except ImportError as error:
        row.failure = f"not installed ({case.package or error.name}): {first_line(error)}"
    except Exception as error:  # out of memory, a kernel that does not run here, an API that changed
        row.failure = f"failed: {first_line(error)}{where_in_mll(error)}"
    finally:
        step = None  # type: ignore[assignment]
        p.zero_grad()
        release(p.device)
        row.wall_seconds = time.monotonic() - begin
    return row


def _gib(value: Optional[int]) -> str:
    return "—" if value is None else f"{value / GiB:.2f}"


def _times(value: Optional[float], base: Optional[float]) -> str:
    return "—" if value is None or not base else f"{value / base:.3f}"


def table(rows: list[Row]) -> str:
    floor_row = next((r for r in rows if r.case == "floor" and r.failure is None), None)
    base_s = floor_row.seconds if floor_row else None
    base_b = floor_row.peak_bytes if floor_row else None
    lines = [
        "| case | median ms | × floor | peak GiB | above weights GiB | × floor memory | steps | compile s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r.failure is not None:
            lines.append(f"| {r.case} | {r.failure.replace('|', '/')} | | | | | | |")
            continue
        assert r.seconds is not None
        comp = "—" if r.compile_seconds is None else f"{r.compile_seconds:.1f}"
        lines.append(
            f"| {r.case} | {r.seconds * 1e3:.2f} | {_times(r.seconds, base_s)} | {_gib(r.peak_bytes)} | "
            f"{_gib(r.above_bytes)} | {_times(r.peak_bytes, base_b)} | {r.steps} | {comp} |"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# host-device synchronisation


def sync_heads() -> list[str]:
    """Every public mll head class but the sharded ones (they need a process group)."""
    names = []
    for name in mll.__all__:
        obj = getattr(mll, name)
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and not name.startswith("Sharded"):
            names.append(name)
    return names


def sync_check(p: Problem) -> str:
    """One training step of every head, dense and ``loss()``, under ``set_sync_debug_mode("error")`` after one
    unchecked warm-up step; a Markdown table of the outcomes."""
    lines = [
        '| head | path | one training step under set_sync_debug_mode("error") |',
        "| --- | --- | --- |",
    ]
    for name in sync_heads():
        for path in ("dense", "loss()"):
            lines.append(f"| {name} | {path} | {_sync_outcome(p, name, path)} |")
    lines.append("| Sharded* | both | not checked: they need a torch.distributed process group |")
    return "\n".join(lines)


def _sync_outcome(p: Problem, name: str, path: str) -> str:
    try:
        head = head_on(p, name)
    except Exception as error:
        return f"failed to build: {first_line(error)}".replace("|", "/")
    if path == "loss()" and not hasattr(head, "loss"):
        return "— (no loss())"

    takes_labels = len(inspect.signature(head.forward).parameters) >= 2

    def loss() -> torch.Tensor:
        if path == "loss()":
            return head.loss(p.x, p.y)
        return F.cross_entropy(head(p.x, p.y) if takes_labels else head(p.x), p.y)

    step = _step(p, loss)
    try:
        step()  # warm-up, unchecked: lazy initialisations may synchronise once
        synchronize(p.device)
    except Exception as error:
        return f"failed (warm-up): {first_line(error)}{where_in_mll(error)}".replace("|", "/")
    if p.device.type != "cuda":
        return f"n/a on {p.device.type} (the step ran)"
    outcome = "sync-free"
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    except Exception as error:
        outcome = f"{first_line(error)}{where_in_mll(error)}"
    finally:
        torch.cuda.set_sync_debug_mode("default")
        synchronize(p.device)
        p.zero_grad()
    return outcome.replace("|", "/")


# ----------------------------------------------------------------------------------------------------------------


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def header(device: torch.device, plan: Plan, args: argparse.Namespace) -> str:
    if args.dry_run:
        where = "dry run: no device used"
    elif device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    else:
        where = f"{device.type}, {torch.get_num_threads()} threads"
    return "\n".join(
        [
            f"# mll GPU benchmark — {where}; torch {torch.__version__}",
            "",
            f"N={plan.batch}, d={plan.features}, bf16 autocast, fp32 weights, s={SCALE}, ArcFace m={ARC_MARGIN}, "
            f"CosFace m={COS_MARGIN}; gradients set to None before each step; torch.compile backend: "
            f"{args.compile_backend}",
            f"anchors: liger-kernel {_version('liger-kernel')}, cut-cross-entropy {_version('cut-cross-entropy')} "
            "(margin-free, on s·x̂ and Ŵ in bf16; Cut Cross-Entropy with its default gradient filtering)",
            "time: median of the timed steps (CUDA events on a GPU) after two warm-up steps; memory: "
            "torch.cuda.max_memory_allocated over the timed steps, reset per case",
        ]
    )


def available_bytes(device: torch.device, override_gib: Optional[float]) -> int:
    if override_gib is not None:
        return int(override_gib * GiB)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GiB


def dry_run(plan: Plan, args: argparse.Namespace) -> None:
    free = int((args.memory_gib or DRY_RUN_MEMORY_GIB) * GiB)
    largest = largest_by_memory(plan, free)
    print("\n## Plan (dry run)\n")
    print(f"- stages: C = {', '.join(str(c) for c in plan.classes)}, then the largest that fits")
    for c in (*plan.classes, largest):
        print(f"  - C={c}: estimated floor step {floor_step_bytes(plan.batch, plan.features, c) / GiB:.1f} GiB")
    print(
        f"- largest by memory with {free / GiB:.0f} GiB free: C={largest} (then capped by the time left of "
        f"{args.budget_s:.0f} s)"
    )
    print(f"- cases: {'; '.join(case.name for case in CASES)}")
    for case in CASES:
        if case.package:
            found = importlib.util.find_spec(case.package.replace("-", "_")) is not None
            print(f"  - {case.name}: {case.package} {'installed' if found else 'not installed'}")
    print(f'- host-device sync check (set_sync_debug_mode("error")), dense and loss(): {", ".join(sync_heads())}')


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, or cpu (with --quick: a smoke run)")
    parser.add_argument("--quick", action="store_true", help=f"tiny shapes ({QUICK.batch}×{QUICK.features})")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and the memory estimate, run nothing")
    parser.add_argument("--budget-s", type=float, default=420.0, help="seconds for the whole run (default 420)")
    parser.add_argument("--memory-gib", type=float, default=None, help="free memory to plan with (default: probed)")
    parser.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled floor")
    parser.add_argument("--no-largest", action="store_true", help="skip the probed largest C")
    args = parser.parse_args(argv)
    start = time.monotonic()
    deadline = start + args.budget_s
    plan = QUICK if args.quick else FULL
    device = torch.device(args.device)

    if args.dry_run:
        print(header(device, plan, args))
        dry_run(plan, args)
        return
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(
            f"benchmarks.gpu: no CUDA device (torch.cuda.is_available() is False; torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}). Run it on a GPU machine, or test it here with --dry-run or "
            "--device cpu --quick."
        )

    if args.quick and device.type == "cpu":
        torch.set_num_threads(1)  # a smoke run: tiny steps, and no OpenMP stalls on a busy machine
    print(header(device, plan, args), flush=True)
    # what exists now (the interpreter, torch, mll) lives as long as the run: out of every collection of release(),
    # which otherwise walks those hundreds of thousands of objects after each case (a fifth of a second each)
    gc.freeze()
    try:
        run_stages(device, plan, args, deadline)
    finally:
        gc.unfreeze()
    print(f"\ntotal wall time {time.monotonic() - start:.0f} s", flush=True)


def run_stages(device: torch.device, plan: Plan, args: argparse.Namespace, deadline: float) -> None:
    """The fixed stages (the sync check after the first), then the probed largest C unless ``--no-largest``."""
    stage_seconds: dict[int, float] = {}
    for index, classes in enumerate(plan.classes):
        stage_seconds[classes] = run_stage(device, plan, classes, args, deadline)
        if index == 0:
            print(f"\n### Host-device synchronisation (C={classes})\n", flush=True)
            p = Problem(device, plan.batch, plan.features, classes, args.compile_backend)
            print(sync_check(p), flush=True)
            del p
            release(device)

    if not args.no_largest:
        last = plan.classes[-1]
        largest = largest_by_memory(plan, available_bytes(device, args.memory_gib))
        largest = cap_by_time(largest, last, stage_seconds[last], deadline - time.monotonic())
        if largest <= last:
            print(f"\n(no larger C: the memory estimate or the time left stops at C={last})", flush=True)
        else:
            while largest > last:
                if run_stage(device, plan, largest, args, deadline, largest=True) >= 0:
                    break
                largest //= 2  # the floor ran out of memory: halve


def run_stage(
    device: torch.device, plan: Plan, classes: int, args: argparse.Namespace, deadline: float, largest: bool = False
) -> float:
    """Time every case at ``classes``, print the table; the stage's seconds, or -1 when (at the probed largest C)
    the floor ran out of memory, before any other case ran."""
    begin = time.monotonic()
    title = f"C={classes}" + (" (the largest that fits)" if largest else "")
    try:
        p = Problem(device, plan.batch, plan.features, classes, args.compile_backend)
    except Exception as error:  # out of memory for W itself
        print(f"\n### {title}: failed: {first_line(error)}", flush=True)
        release(device)
        return -1.0 if largest else time.monotonic() - begin
    rows = []
    for case in CASES:
        rows.append(run_case(case, p, plan.case_seconds, deadline))
        if largest and case.name == "floor" and rows[-1].failure and "OutOfMemory" in rows[-1].failure:
            print(f"\n### {title}: the floor ran out of memory; halving C", flush=True)
            del p
            release(device)
            return -1.0
    del p
    release(device)
    print(f"\n### {title}\n\n{table(rows)}", flush=True)
    return time.monotonic() - begin


if __name__ == "__main__":
    main()
