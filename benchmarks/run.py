"""Time and measure every head side by side with the floor and the peers; print Markdown tables of ratios.

    python -m benchmarks.run                      # the full run (about 25 minutes on 2 cores, 8 of them at C=10^6)
    python -m benchmarks.run --quick              # a smoke run: small shapes, few rounds, one thread
    python -m benchmarks.run --suites limit       # the three-GEMM limit, the floor, dense ArcFace and its loss()
    python -m benchmarks.run --allocator both     # every table twice: tuned allocator, then glibc's default
    python -m benchmarks.run --suites batch       # N = 256…8192 × C = 10^4…10^6: floor, peers, dense and loss()
    python -m benchmarks.run --suites small       # N = 64, d = 32, C = 6, one thread: every head pml has, and pml

Timing: forward+backward of head + cross-entropy (training mode), every implementation interleaved round by round in
this one process with ``torch.utils.benchmark`` (where the implementations' steps do not fit in memory together, one
process each, in turn, the floor's first and last; the table's title says so); the median (and the minimum) per
implementation, and their ratios to the floor of the same suite and class count (and, in the "limit" suite, to the
three GEMMs a cosine head cannot avoid). With ``--allocator tuned`` (the default) the process re-executes itself
with ``MALLOC_MMAP_MAX_=0`` and a large ``MALLOC_TRIM_THRESHOLD_`` (the same for every implementation) so that large
tensors are not mmapped and unmapped on every step (page faults otherwise take a third of the time at C=50k);
``--allocator default`` re-executes without any ``MALLOC_*`` variable (glibc's defaults, what a user gets); ``both``
runs the suites once under each, in a child process per setting. Every table's title names its allocator.

Memory: each implementation runs in a fresh process; after a warm-up step (gradient buffers allocated) the peak
resident set of one more step is read from ``VmHWM`` (reset through ``/proc/self/clear_refs``), minus the resident
set before it. Those processes use ``MALLOC_MMAP_THRESHOLD_=65536`` instead, whatever ``--allocator`` says, so
freed tensors leave the RSS.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch.utils import benchmark

from benchmarks.cases import SUITES, Case, Config, make_data
from benchmarks.peers import load_legacy, pml_version

TIMING_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
ALLOCATORS = ("tuned", "default")


def allocator_env(setting: str) -> dict[str, str]:
    """This process's environment with the allocator variables of ``setting``: TIMING_ENV added for "tuned", every
    ``MALLOC_*`` variable removed for "default"."""
    if setting == "tuned":
        return {**os.environ, **TIMING_ENV}
    return {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}


def allocator_description(setting: str) -> str:
    if setting == "tuned":
        return f"tuned ({' '.join(f'{k}={v}' for k, v in TIMING_ENV.items())})"
    return "default (glibc's: no MALLOC_* variables)"


# suite -> (class counts, sub-centers, soft targets) for the full and the quick run
PLAN = {
    "int labels": ([1_000, 10_000, 100_000], 1, False),
    "sub-centers": ([10_000], 3, False),
    "soft targets": ([10_000], 1, True),
    "DeepNCM": ([100_000], 1, False),
    "margin families": ([1_000, 10_000, 100_000], 1, False),
    "limit": ([1_000, 10_000, 100_000, 1_000_000], 1, False),
    "zoo": ([10_000, 100_000], 1, False),
    "batch": ([10_000, 100_000, 1_000_000], 1, False),
    "small": ([6], 1, False),
}
#: the batch sizes per suite (default: Config's, 256)
BATCHES = {"batch": [256, 1024, 4096, 8192], "small": [64]}
#: the suites' own feature sizes and thread counts (default: Config's 512, and the process's threads)
FEATURES = {"small": 32}
THREADS = {"small": 1}
#: steps per timed measurement where one step is too short to time alone (default 1)
NUMBER = {"small": 20}
#: suites whose steps are too small for the resident set's resolution: no memory probes
NO_MEMORY = {"small"}
QUICK = Config(batch=32, features=64)
QUICK_CLASSES = 500


@dataclass
class Result:
    suite: str
    head: str
    impl: str
    classes: int
    times: list[float]
    memory_mb: float | None = None
    note: str | None = None  # why it was not timed


def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe_memory(suite: str, index: int, cfg: Config) -> float:
    """Peak extra resident memory (MB) of one steady-state step, in this (fresh) process."""
    case = SUITES[suite][index]
    data = make_data(cfg)
    step = case.factory(cfg, data)
    step()  # warm-up: gradient buffers exist from here on
    gc.collect()
    baseline = _vm_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current RSS
    step()
    return (_vm_kb("VmHWM") - baseline) / 1024


def measure_memory(suite: str, index: int, cfg: Config) -> float | None:
    env = {k: v for k, v in os.environ.items() if k not in TIMING_ENV}
    env.update(MEMORY_ENV)
    args = [sys.executable, "-m", "benchmarks.run", "--probe", suite, str(index), json.dumps(cfg.__dict__)]
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"memory probe failed for {SUITES[suite][index].head} ({suite}):\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    return float(done.stdout.strip().splitlines()[-1])


def release_heap() -> None:
    """Give freed heap memory back to the OS (glibc's ``malloc_trim``; the tuned allocator never trims on its own)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc
        ctypes.CDLL(None).malloc_trim(0)


def available_memory() -> int:
    """MemAvailable of /proc/meminfo, in bytes."""
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


#: resident memory a step may take, as a multiple of its live tensors' peak: with mmap off (the tuned allocator)
#: glibc reuses freed multi-GB blocks poorly — a floor step at C = 10^6 grew the resident set by 15 GB for 7.8 GB
#: of live tensors, and the machine thrashed
RESIDENT_PER_LIVE = {"tuned": 2.0, "default": 1.25}


def time_suite(
    suite: str,
    cfg: Config,
    rounds: int,
    memory: bool,
    warmup: int = 2,
    allocator: str = "tuned",
    number: int = 1,
    apart: bool | None = None,
    case_limit_s: float | None = None,
    skip: tuple[str, ...] = (),
) -> list[Result]:
    """Time the suite's available cases interleaved, after ``warmup`` steps each; a case whose step would not fit in
    the memory left once every case is built gets a "skipped" row instead. Where the cases do not fit in memory
    together (``apart``; None: :func:`apart_needed` decides), one process per case instead (:func:`time_apart`), each
    stopped after ``case_limit_s`` seconds if given. Implementations named in ``skip`` get a "skipped" row."""
    cases = [case for case in SUITES[suite] if case.available()]
    results = [Result(suite, case.head, case.impl, cfg.classes, []) for case in cases]
    apart = apart_needed(suite, cfg, allocator) if apart is None else apart
    data = None if apart else make_data(cfg)
    steps = [None if apart else case.factory(cfg, data) for case in cases]
    free = available_memory()
    for case, result in zip(cases, results):
        if case.step_bytes is not None:
            need = RESIDENT_PER_LIVE[allocator] * case.step_bytes(cfg)
            if need > 0.9 * free:
                result.note = f"skipped: a step needs ~{need / 2**30:.0f} GiB, {free / 2**30:.0f} GiB available"
        if case.impl in skip:
            result.note = "skipped (--skip)"
    if apart:
        return time_apart(suite, cfg, cases, results, rounds, memory, warmup, number, case_limit_s)
    timed = [(step, result) for step, result in zip(steps, results) if result.note is None]
    # warm-up, and allocate the gradient buffers
    timers = [(_timer(step, _warm_up(step, warmup)), result) for step, result in timed]
    for _ in range(rounds):
        for timer, result in timers:
            result.times.append(timer(number))
    del steps, timed, timers, data
    release_heap()  # the probes' processes need that memory: at C = 10^6 this one holds 10 GB once freed
    if memory:
        for case, result in zip(cases, results):
            if result.note is None and case.probe:
                result.memory_mb = measure_memory(suite, SUITES[suite].index(case), cfg)
    return results


def apart_needed(suite: str, cfg: Config, allocator: str) -> bool:
    """Whether the suite's cases must run one process each: the resident memory they need at once in one process
    would pass what is available (with the tuned allocator at N = 4096, C = 10^5 it passed 24 GB; with glibc's
    default the same cell ran in one process, 16.8 GB at its peak)."""
    cases = [case for case in SUITES[suite] if case.available() and case.step_bytes is not None]
    needs = [RESIDENT_PER_LIVE[allocator] * case.step_bytes(cfg) for case in cases]  # type: ignore[misc]
    if not needs:
        return False
    if allocator == "default":  # glibc unmaps a step's large buffers: what stays is each case's weights and gradients
        kept = 8 * cfg.classes * cfg.sub_centers * cfg.features
        return len(needs) * kept + max(needs) > 0.9 * available_memory()
    return sum(needs) > 0.9 * available_memory()  # no trim, no mmap: the heap keeps what every step took


def time_apart(
    suite: str, cfg: Config, cases: list[Case], results: list[Result], rounds: int, memory: bool, warmup: int,
    number: int, case_limit_s: float | None = None,
) -> list[Result]:  # fmt: skip
    """:func:`time_suite` where the cases do not fit in memory together: one child process per case, in turn, each
    timing its own rounds; the floor's child runs first and again last, and its times are both runs' (the drift of
    a shared machine over the run shows as their spread). Not interleaved: read these ratios as coarser. A child
    still running after ``case_limit_s`` seconds is stopped, and its row says so (at N = 4096, C = 10^6 PyTorch's
    chunked ``F.linear_cross_entropy`` took more than 9 minutes a step: its warm-up and three rounds, 38 minutes
    and more, would have been half the run)."""
    order = [i for i, result in enumerate(results) if result.note is None]
    floors = [i for i in order if cases[i].impl == "floor"]
    for i in floors + [i for i in order if i not in floors] + floors:
        index = SUITES[suite].index(cases[i])
        args = [sys.executable, "-m", "benchmarks.run", "--time", suite, str(index), json.dumps(cfg.__dict__),
                str(rounds), str(warmup), str(number)]  # fmt: skip
        try:
            done = subprocess.run(args, env=dict(os.environ), capture_output=True, text=True, timeout=case_limit_s)
        except subprocess.TimeoutExpired:
            print(f"stopped {cases[i].head} ({cases[i].impl}) after {case_limit_s:.0f} s", file=sys.stderr)
            if not results[i].times:  # (the floor's second run stopped: its first run's rounds stand)
                results[i].note = f"stopped after {case_limit_s:.0f} s: its warm-up and {rounds} rounds took longer"
            continue
        if done.returncode != 0:
            results[i].note = f"its process failed (exit status {done.returncode})"
            print(f"timing failed for {cases[i].head} ({cases[i].impl}):\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        results[i].times += json.loads(done.stdout.strip().splitlines()[-1])
    if memory:
        for case, result in zip(cases, results):
            if result.times and case.probe:
                result.memory_mb = measure_memory(suite, SUITES[suite].index(case), cfg)
    return results


def time_alone(suite: str, index: int, cfg: Config, rounds: int, warmup: int, number: int) -> list[float]:
    """One case's timed rounds in this (fresh) process, after ``warmup`` steps: :func:`time_apart`'s child."""
    case = SUITES[suite][index]
    step = case.factory(cfg, make_data(cfg))
    timer = _timer(step, _warm_up(step, warmup))
    return [timer(number) for _ in range(rounds)]


#: the longest ``--case-minutes`` (a week; ``subprocess`` refuses a timeout far beyond it: OverflowError)
MAX_CASE_MINUTES = 10_000

#: a step that took at least this long in its warm-up is timed one call per round: ``Timer.timeit`` runs its
#: statement twice more first, as its own warm-up, which at N = 4096, C = 10^6 made each case of a run 10 steps of
#: a minute or more instead of 4, and changes nothing that a step of seconds measures
LONG_STEP_S = 1.0


def _warm_up(step: Callable[[], None], warmup: int) -> float:
    """Run ``step`` ``warmup`` times; the seconds the last one took (0 for none)."""
    took = 0.0
    for _ in range(warmup):
        start = time.perf_counter()
        step()
        took = time.perf_counter() - start
    return took


def _timer(step: Callable[[], None], warm_step_s: float = 0.0) -> Callable[[int], float]:
    """Seconds per call of ``step()``, ``number`` calls a round, at this process's thread count
    (``torch.utils.benchmark.Timer`` sets its own, 1 unless told: every table before 2026-12-07 was timed on one thread
    whatever its header said); a step of at least :data:`LONG_STEP_S` in its warm-up, one call timed alone."""
    if warm_step_s >= LONG_STEP_S:

        def alone(number: int) -> float:
            start = time.perf_counter()
            for _ in range(number):
                step()
            return (time.perf_counter() - start) / number

        return alone
    timer = benchmark.Timer(stmt="step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return lambda number: timer.timeit(number).median


def _ratio(value: float | None, base: float | None) -> str:
    return "—" if value is None or not base else f"{value / base:.3f}"


def table(results: list[Result]) -> str:
    """One row per implementation: median ms, its ratios to the floor (median and min), peak step memory and its
    ratio to the floor's. With a "limit" row (the three GEMMs), ratios to it as well."""
    timed = [r for r in results if r.times]
    base = next((r for r in timed if r.impl == "floor"), None if any(r.impl == "floor" for r in results) else timed[0])
    limit = next((r for r in timed if r.impl == "limit"), None)
    with_limit = any(r.impl == "limit" for r in results)
    columns = ["median ms", "× floor (median)", "× floor (min)", "peak step MB", "× floor memory"]
    if with_limit:
        columns[1:3] = ["× limit (median)", "× floor (median)", "× limit (min)", "× floor (min)"]
    lines = [
        f"| head | implementation | {' | '.join(columns)} |",
        f"| --- | --- |{' ---: |' * len(columns)}",
    ]
    for r in results:
        if not r.times:
            lines.append(f"| {r.head} | {r.impl} | {r.note or 'not timed'} |{' |' * (len(columns) - 1)}")
            continue
        median, least = statistics.median(r.times), min(r.times)
        to_floor = [_ratio(median, base and statistics.median(base.times)), _ratio(least, base and min(base.times))]
        if with_limit:
            to_limit = [
                _ratio(median, limit and statistics.median(limit.times)),
                _ratio(least, limit and min(limit.times)),
            ]
            ratios = [to_limit[0], to_floor[0], to_limit[1], to_floor[1]]
        else:
            ratios = to_floor
        mem = "—" if r.memory_mb is None else f"{r.memory_mb:.1f}"
        ms = median * 1e3
        cells = [f"{ms:.1f}" if ms >= 10 else f"{ms:.3g}", *ratios, mem, _ratio(r.memory_mb, base and base.memory_mb)]
        lines.append(f"| {r.head} | {r.impl} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _relative(path: object) -> str:
    """A path relative to the working directory: no machine paths in printed (and committed) results."""
    return os.path.relpath(str(path))


def header(args: argparse.Namespace) -> str:
    legacy = load_legacy()
    return "\n".join(
        [
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{platform.processor() or platform.machine()}",
            f"peers: pytorch-metric-learning {pml_version() or 'not installed'}; "
            f"metric-learning-layers 0.1.6 {'loaded from ' + _relative(legacy.__file__) if legacy else 'not fetched'}",
            f"allocator (timing): {allocator_description(args.allocator)}; "
            f"(memory, one process per head): {' '.join(f'{k}={v}' for k, v in MEMORY_ENV.items())}",
            f"rounds per implementation: {args.rounds or 'auto'}; quick={args.quick}",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small shapes and few rounds: a smoke run")
    parser.add_argument("--suites", nargs="*", default=list(PLAN), choices=list(PLAN))
    parser.add_argument("--rounds", type=int, default=0, help="timed rounds per implementation (0: auto)")
    parser.add_argument("--classes", type=int, nargs="*", help="class counts for every suite (default: the plan's)")
    parser.add_argument("--batches", type=int, nargs="*", help="batch sizes for every suite (default: the plan's)")
    parser.add_argument("--no-memory", action="store_true", help="skip the per-process memory probes")
    parser.add_argument(
        "--allocator",
        choices=[*ALLOCATORS, "both"],
        default="tuned",
        help="glibc malloc settings of the timing process: tuned (no mmap, no trim), default, or both in turn",
    )
    parser.add_argument(
        "--apart",
        action="store_true",
        help="one process per case, in turn, whatever the memory estimate says (it missed glibc's default allocator "
        "at N = 8192, C = 10^5: the interleaved process was killed at 24 GB)",
    )
    parser.add_argument(
        "--case-minutes",
        type=float,
        help="with one process per case: stop a case's process after this many minutes (its row says so)",
    )
    parser.add_argument(
        "--skip",
        nargs="*",
        default=[],
        metavar="IMPL",
        help='implementations to leave out, named as in the tables (e.g. "F.linear_cross_entropy, chunked")',
    )
    parser.add_argument("--probe", nargs=3, metavar=("SUITE", "INDEX", "CONFIG"), help=argparse.SUPPRESS)
    parser.add_argument("--time", nargs=6, help=argparse.SUPPRESS)  # SUITE INDEX CONFIG ROUNDS WARMUP NUMBER
    raw = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(raw)
    if args.case_minutes is not None and not 0 < args.case_minutes <= MAX_CASE_MINUTES:  # (inf: subprocess overflows)
        parser.error(f"--case-minutes must be in (0, {MAX_CASE_MINUTES}] minutes, but got {args.case_minutes}")
    unknown = set(args.skip) - {case.impl for cases in SUITES.values() for case in cases}
    if unknown:
        parser.error(f"--skip names no implementation of the tables: {', '.join(sorted(map(repr, unknown)))}")

    if args.probe:
        suite, index, cfg = args.probe
        print(probe_memory(suite, int(index), Config(**json.loads(cfg))))
        return
    if args.time:  # time_apart's child, in the parent's allocator environment already
        suite, index, cfg, rounds, warmup, number = args.time
        torch.set_num_threads(THREADS.get(suite, torch.get_num_threads()))
        print(json.dumps(time_alone(suite, int(index), Config(**json.loads(cfg)), int(rounds), int(warmup),
                                    int(number))))  # fmt: skip
        return
    if args.allocator == "both":
        # glibc reads its settings at start-up: one child per setting (the last --allocator on a command line wins),
        # started with that setting's environment so that it need not start Python a second time (execve below)
        failed = []
        for setting in ALLOCATORS:
            print(f"\n## allocator: {allocator_description(setting)}\n", flush=True)
            child = [sys.executable, "-m", "benchmarks.run", *raw, "--allocator", setting]
            done = subprocess.run(child, env=allocator_env(setting))
            if done.returncode != 0:  # e.g. killed for memory: say so, and still run the other setting
                print(f"the run with the {setting} allocator failed (exit status {done.returncode})", file=sys.stderr)
                failed.append(setting)
        if failed:
            sys.exit(f"failed: the runs with the {' and '.join(failed)} allocator")
        return
    env = allocator_env(args.allocator)
    if env != dict(os.environ):
        os.execve(sys.executable, [sys.executable, "-m", "benchmarks.run", *raw], env)

    if args.quick:
        torch.set_num_threads(1)  # a smoke run: tiny steps, and no OpenMP stalls on a busy machine (as in gpu.py)
    print(header(args), flush=True)
    # what exists now (the interpreter, torch, mll) lives as long as the run: out of every collection of
    # release_heap, which otherwise walks those hundreds of thousands of objects each time (a quarter of a second)
    gc.freeze()
    try:
        run_suites(args)
    finally:
        gc.unfreeze()


def run_suites(args: argparse.Namespace) -> None:
    """Time the suites of ``args`` at their class counts and print a table for each."""
    for suite in args.suites:
        classes, sub_centers, soft = PLAN[suite]
        batches = [None] if args.quick else (args.batches or BATCHES.get(suite, [None]))
        for n, c in [(n, c) for n in batches for c in ([QUICK_CLASSES] if args.quick else (args.classes or classes))]:
            base = QUICK if args.quick else Config()
            cfg = replace(base, classes=c, sub_centers=sub_centers, soft=soft, batch=n or base.batch)
            if not args.quick:
                cfg = replace(cfg, features=FEATURES.get(suite, cfg.features))
            work = cfg.batch * c * sub_centers  # logits per step: 256 × 10^6 takes seconds
            rounds = args.rounds or (3 if args.quick or work >= 256 * 10**6 else (9 if work >= 256 * 10**5 else 25))
            warmup = 1 if work >= 256 * 10**6 else 2
            threads = torch.get_num_threads()
            torch.set_num_threads(THREADS.get(suite, threads))
            try:
                memory = not args.no_memory and suite not in NO_MEMORY
                apart = args.apart or apart_needed(suite, cfg, args.allocator)
                limit_s = None if args.case_minutes is None else 60 * args.case_minutes
                results = time_suite(suite, cfg, rounds, memory, warmup, args.allocator, NUMBER.get(suite, 1),
                                     apart, limit_s, tuple(args.skip))  # fmt: skip
            finally:
                torch.set_num_threads(threads)
            title = f"{suite}: N={cfg.batch}, d={cfg.features}, C={c}, K={sub_centers}; allocator: {args.allocator}"
            if suite in THREADS:
                title += f"; {THREADS[suite]} thread(s)"
            if apart:
                title += "; one process per case, in turn (the floor's first and last): not interleaved"
            load = " / ".join(f"{x:.1f}" for x in os.getloadavg())
            print(f"\n### {title}\n\n{table(results)}\n\nload average (1/5/15 min) after: {load}", flush=True)


if __name__ == "__main__":
    main()
