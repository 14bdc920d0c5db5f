"""mll.metrics at a 10^5 × 10^5 gallery: retrieval_metrics against the floor, time and peak memory.

    python -m benchmarks.metrics                # N = M = 100k, d = 128, 2 rounds (about 8 minutes on 2 cores)
    python -m benchmarks.metrics --quick        # N = M = 4k, d = 32, 1 round: a smoke run
    python -m benchmarks.metrics --faiss        # also the faiss backend (where faiss-cpu is installed)

A self-search of N clustered embeddings (classes of 100 samples, so R = 99 and K = max(99, 8) neighbours), the
setting of pml's ``AccuracyCalculator(k="max_bin_count")`` on a query set that is its own gallery.

- ``floor``: what one writes by hand for an exact top-K — for each block of queries ``x_b``, the scores
  ``x̂_b @ x̂ᵀ`` (self excluded) and one ``torch.topk(·, K)``; nothing else (no metric). Same blocks as mll's.
- ``mll``: :func:`mll.metrics.retrieval_metrics` — the same search plus the ties' rule and every metric.

Time: both in one process, interleaved, ``--rounds`` each; the ratio is the floor's median over mll's (above 1:
mll faster), in wall-clock seconds and in the process's CPU seconds (steadier on a shared machine, where a busy
neighbour stretches the wall clock of whichever run it overlaps). Memory: each implementation once in a fresh
process; the peak resident set above the resident set with the inputs made (``VmHWM`` reset through
``/proc/self/clear_refs``). Threads: torch's default (every core), or ``--threads``.
Allocator: glibc with ``MALLOC_MMAP_MAX_=0`` and a large ``MALLOC_TRIM_THRESHOLD_`` (as the other benchmarks, so
freed blocks are reused rather than returned to the OS) for the timing, or ``--allocator default``; the memory
probes run with glibc's defaults.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

TIMING_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": "100000000000"}
RECALL_AT_K = (1, 2, 4, 8)
PER_CLASS = 100


@dataclass
class Plan:
    n: int
    d: int
    rounds: int


FULL = Plan(n=100_000, d=128, rounds=2)
QUICK = Plan(n=4_000, d=32, rounds=1)


def make_inputs(plan: Plan) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(plan.n) % max(1, plan.n // PER_CLASS)
    centres = torch.randn(int(labels.max()) + 1, plan.d, generator=g)
    return centres[labels] + 1.5 * torch.randn(plan.n, plan.d, generator=g), labels


def neighbours(labels: torch.Tensor) -> int:
    return max(int(torch.bincount(labels).max()) - 1, max(RECALL_AT_K))


def query_block(x: torch.Tensor, k: int) -> int:
    from mll.metrics import _search

    return _search.plan_blocks(len(x), len(x), k, x.element_size(), _search.BLOCK_BYTES, None, None)[0]


def floor(x: torch.Tensor, k: int, block: int) -> None:
    xn = F.normalize(x, dim=1)
    for q0 in range(0, len(x), block):
        scores = xn[q0 : q0 + block] @ xn.T
        scores.diagonal(q0).fill_(-math.inf)
        torch.topk(scores, k, dim=1)


def run_impl(impl: str, x: torch.Tensor, labels: torch.Tensor) -> None:
    if impl == "floor":
        k = neighbours(labels)
        floor(x, k, query_block(x, k))
        return
    from mll import metrics

    metrics.retrieval_metrics(x, labels, recall_at_k=RECALL_AT_K, backend="faiss" if impl == "faiss" else "torch")


def _vm_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child_time(plan: Plan, impls: list[str]) -> dict[str, list[float]]:
    """Wall-clock seconds of each run (``impl``) and the process's CPU seconds (``impl cpu``), interleaved."""
    x, labels = make_inputs(plan)
    times: dict[str, list[float]] = {key: [] for impl in impls for key in (impl, f"{impl} cpu")}
    for _ in range(plan.rounds):
        for impl in impls:
            start, cpu = time.perf_counter(), time.process_time()
            run_impl(impl, x, labels)
            times[impl].append(time.perf_counter() - start)
            times[f"{impl} cpu"].append(time.process_time() - cpu)
    return times


def child_memory(plan: Plan, impl: str) -> float:
    import mll.metrics  # noqa: F401  (resident before the baseline, as the inputs)

    x, labels = make_inputs(plan)
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := the current resident set
    baseline = _vm_kb("VmRSS")
    run_impl(impl, x, labels)
    return (_vm_kb("VmHWM") - baseline) / 1024


def spawn(args: list[str], env: dict[str, str]) -> object:
    done = subprocess.run([sys.executable, "-m", "benchmarks.metrics", *args], env=env, stdout=subprocess.PIPE,
                          text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.metrics", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="N = M = 4k, d = 32, one round")
    parser.add_argument("--rounds", type=int, default=None, help="timed runs of each implementation")
    parser.add_argument("--faiss", action="store_true", help="also mll with backend='faiss'")
    parser.add_argument("--allocator", choices=["tuned", "default"], default="tuned")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, every core)")
    parser.add_argument("--child", choices=["time", "memory"], help=argparse.SUPPRESS)
    parser.add_argument("--plan", help=argparse.SUPPRESS)
    parser.add_argument("--impls", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.child:
        plan = Plan(**json.loads(args.plan))
        result = child_time(plan, args.impls) if args.child == "time" else child_memory(plan, args.impls[0])
        print(json.dumps(result))
        return
    plan = QUICK if args.quick else FULL
    if args.rounds is not None:
        plan = Plan(plan.n, plan.d, args.rounds)
    impls = ["floor", "mll", *(["faiss"] if args.faiss else [])]
    default_env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    timing_env = {**default_env, **TIMING_ENV} if args.allocator == "tuned" else default_env
    x, labels = make_inputs(plan)
    k = neighbours(labels)
    block = query_block(x, k)
    allocator = "glibc, " + (", ".join(f"{k}={v}" for k, v in TIMING_ENV.items()) if args.allocator == "tuned" else
                             "defaults")  # fmt: skip
    print(f"## retrieval_metrics: N = M = {plan.n} (a self-search), d = {plan.d}, classes of {PER_CLASS}, "
          f"K = {k} neighbours, recall_at_k = {RECALL_AT_K}")  # fmt: skip
    print(f"score block: {block} queries × {plan.n} references ({block * plan.n * 4 / 2**20:.0f} MiB of float32); "
          f"threads: {torch.get_num_threads()}; timing allocator: {allocator}; rounds: {plan.rounds}")  # fmt: skip
    del x, labels
    sys.stdout.flush()
    spec = ["--plan", json.dumps(asdict(plan)), *(["--threads", str(args.threads)] if args.threads else [])]
    times = spawn(["--child", "time", *spec, "--impls", *impls], timing_env)
    memory = {impl: spawn(["--child", "memory", *spec, "--impls", impl], default_env) for impl in impls}
    assert isinstance(times, dict)
    floor_median, floor_cpu = statistics.median(times["floor"]), statistics.median(times["floor cpu"])
    print("\n| implementation | median s | min s | speed × floor (medians) | median CPU s | speed × floor (CPU) | "
          "peak MiB above inputs |")  # fmt: skip
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    names = {"floor": "floor: topk over blocks of x̂ @ x̂ᵀ", "mll": "mll.metrics.retrieval_metrics",
             "faiss": "retrieval_metrics, backend='faiss'"}  # fmt: skip
    for impl in impls:
        median, cpu = statistics.median(times[impl]), statistics.median(times[f"{impl} cpu"])
        print(f"| {names[impl]} | {median:.2f} | {min(times[impl]):.2f} | {floor_median / median:.3f} | {cpu:.2f} | "
              f"{floor_cpu / cpu:.3f} | {memory[impl]:.0f} |")  # fmt: skip
    print(f"\ninputs: {plan.n * plan.d * 4 / 2**20:.1f} MiB of float32 embeddings and {plan.n * 8 / 2**20:.1f} MiB "
          "of int64 labels")  # fmt: skip


if __name__ == "__main__":
    main()
