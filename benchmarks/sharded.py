"""Class-sharded ArcFace at C = 10^6 on gloo: per-rank memory and step time for world sizes 1, 2 and 4.

    python -m benchmarks.sharded            # C = 10^6, d = 128, N = 256 (about 10 minutes on 2 cores)
    python -m benchmarks.sharded --quick    # a smoke run: C = 4000, worlds 1 and 2 (see below)
    python -m benchmarks.sharded --floor --worlds 2 --batch 4096 --classes 100000 --features 512
                                            # a global batch of 4096 on 2 ranks, each rank's step against the floor
                                            # over its block (the same GEMMs: N_global × d against C/world × d)

Every configuration runs as fresh processes (one per rank, joined through a ``file://`` store): world 1 with two
threads, worlds 2 and 4 with one thread per rank. Each rank holds ``mll.ShardedArcFace``'s block of C/world
classes and ``N/world`` of the global batch of N features; a step is the head's loss and its backward (the
sharded loss's all-gathers and all-reduces included). After one warm-up step (the weight gradient exists) the
ranks meet at a barrier before each timed step; the table gives rank 0's best and median step times.

Memory per rank, from one more launch per configuration: the weights and their gradient (C/world·d float32 each,
read from the tensors), the peak resident set of a step above the resident set after warm-up (``VmHWM`` reset
through ``/proc/self/clear_refs``), which is everything else — the chunks of logits, the gathered features,
temporaries — and the whole peak resident set (torch itself included). Gradients are set to None before each step,
as ``optimizer.zero_grad()`` does. Those launches use ``MALLOC_MMAP_THRESHOLD_=65536``, so that freed tensors leave
the resident set.

The configurations are interleaved round by round. The machine is shared and an OpenMP GEMM with two threads
suffers badly when another process takes a core, so the ratios use the best step of each configuration (over
all rounds, and per round); the CPU pressure stall share (``/proc/pressure/cpu``) is printed as a witness.
The timed processes run with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=100000000000`` (large tensors are not
mmapped and unmapped per step).

``--quick`` checks that all of this runs, in seconds: C = 4000, worlds 1 and 2 with one thread per rank, started
at once (their times are not comparable), one round of two steps, the memory read from those same processes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mll
from benchmarks.run import MEMORY_ENV, TIMING_ENV, _vm_kb

#: (world size, threads per rank)
CONFIGS = ((1, 2), (2, 1), (4, 1))


def worker(
    rank: int, world: int, threads: int, classes: int, features: int, batch: int, steps: int, store: str,
    floor: bool = False,
) -> dict:  # fmt: skip
    torch.set_num_threads(threads)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)
        head = mll.ShardedArcFace(features, classes, margin=0.5, scale=64.0)
        rows = batch // world + (1 if rank < batch % world else 0)
        x = torch.randn(rows, features, requires_grad=True)
        y = torch.randint(0, classes, (rows,))

        def step() -> None:
            head(x, y).backward()

        step()  # warm-up: the weight gradient is resident from here on
        weight_mb = head.weight.numel() * head.weight.element_size() / 2**20
        grad_mb = head.weight.grad.numel() * head.weight.grad.element_size() / 2**20
        gc.collect()
        baseline = _vm_kb("VmRSS")
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")
        times, floor_times = [], []
        block = floor_step(head, batch, features) if floor else None
        for _ in range(steps):
            x.grad = head.weight.grad = None
            if world > 1:
                dist.barrier()
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
            if block is not None:  # interleaved, in this process: the ratio is the rank's own
                start = time.perf_counter()
                block()
                floor_times.append(time.perf_counter() - start)
        return {
            "rank": rank,
            "classes": head.class_stop - head.class_start,
            "weight_mb": weight_mb,
            "grad_mb": grad_mb,
            "extra_mb": (_vm_kb("VmHWM") - baseline) / 1024,
            "peak_rss_mb": _vm_kb("VmHWM") / 1024,
            "times": times,
            "floor_times": floor_times,
        }
    finally:
        if world > 1:
            dist.barrier()
            dist.destroy_process_group()


def floor_step(head: torch.nn.Module, batch: int, features: int) -> Callable[[], None]:
    """The floor over this rank's block: ``F.cross_entropy(s·F.linear(F.normalize(x), F.normalize(W_block)), y)`` for
    the global batch of N features against the block's weights (labels within the block) — the GEMMs every rank's
    share of the sharded step performs, without the collectives."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, features, generator=g, requires_grad=True)
    w = torch.nn.Parameter(head.weight.detach().clone())
    y = torch.randint(0, w.shape[0], (batch,), generator=g)

    def step() -> None:
        x.grad = w.grad = None
        F.cross_entropy(64.0 * F.linear(F.normalize(x), F.normalize(w)), y).backward()

    step()
    return step


def launch(
    world: int, threads: int, classes: int, features: int, batch: int, steps: int, memory: bool = False,
    floor: bool = False,
) -> list[dict]:  # fmt: skip
    """One configuration in fresh processes; every rank's result."""
    env = {k: v for k, v in os.environ.items() if k not in TIMING_ENV}
    env.update(MEMORY_ENV if memory else TIMING_ENV)
    env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        args = [str(v) for v in (world, threads, classes, features, batch, steps, int(floor))]
        command = [sys.executable, "-m", "benchmarks.sharded", "--worker"]
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
        procs = [subprocess.Popen([*command, str(rank), *args, store], env=env, **pipes) for rank in range(world)]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=1800)
            if proc.returncode != 0:
                raise RuntimeError(f"a rank of world {world} failed:\n{err[-3000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    return sorted(results, key=lambda r: r["rank"])


def launch_configs(
    configs: tuple[tuple[int, int], ...],
    classes: int,
    features: int,
    batch: int,
    steps: int,
    together: bool,
    floor: bool = False,
) -> dict[int, list[dict]]:
    """Every configuration's ranks' results, by world size: one configuration after the other, or, ``together``,
    all of them at once (a smoke run: their processes then compete for the cores and the times mean nothing)."""
    if not together:
        return {
            world: launch(world, threads, classes, features, batch, steps, floor=floor) for world, threads in configs
        }
    with ThreadPoolExecutor(len(configs)) as pool:
        running = {
            w: pool.submit(launch, w, threads, classes, features, batch, steps, False, floor) for w, threads in configs
        }
        return {world: future.result() for world, future in running.items()}


def cpu_pressure() -> str:
    """The share of the last minute in which some runnable task waited for a CPU (the machine is shared)."""
    try:
        with open("/proc/pressure/cpu") as pressure:
            return pressure.readline().split()[2].split("=")[1] + "%"
    except (OSError, IndexError):
        return "unknown"


def traffic_bytes(world: int, batch: int, features: int) -> dict[str, float]:
    """Bytes each rank sends per step in the ring algorithms (on paper): float32 features, int64 labels."""
    share = (world - 1) / world
    return {
        "features all-gather (N·d)": share * batch * features * 4,
        "labels all-gather (N)": share * batch * 8,
        "all-reduce max (N) and sum (2N)": 2 * share * 3 * batch * 4,
        "feature-gradient reduce-scatter (N·d)": share * batch * features * 4,
        "sizes exchange, upstream gradients": share * world * (16 * 8 + 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--batch", type=int, default=256, help="global batch N")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--floor", action="store_true", help="time each rank's floor over its block beside its step")
    parser.add_argument("--worlds", type=int, nargs="*", help="world sizes (default 1, 2, 4)")
    parser.add_argument("--worker", nargs=9, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        rank, world, threads, classes, features, batch, steps, floor = (int(v) for v in args.worker[:8])
        print(json.dumps(worker(rank, world, threads, classes, features, batch, steps, args.worker[8], bool(floor))))
        return
    configs: tuple[tuple[int, int], ...] = CONFIGS
    if args.worlds:
        configs = tuple((w, 2 if w == 1 else 1) for w in args.worlds)
    if args.quick:  # each process pays seconds to import torch: few of them, all started at once, one thread each
        args.classes, args.steps, args.rounds = 4_000, 2, 1
        configs = tuple((world, 1) for world, _ in CONFIGS[:2])
    c, d, n = args.classes, args.features, args.batch
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; ShardedArcFace C={c}, d={d}, global N={n}, float32")
    print(f"CPU pressure (/proc/pressure/cpu, some avg60) at the start: {cpu_pressure()}")
    allocator = " ".join(f"{k}={v}" for k, v in TIMING_ENV.items())
    together = ", the configurations side by side (times not comparable)" if args.quick else ""
    print(f"allocator: {allocator}; {args.steps} timed steps per configuration, {args.rounds} rounds{together}")
    rounds: list[dict[int, list[dict]]] = []
    for index in range(args.rounds):
        results = launch_configs(configs, c, d, n, args.steps, together=args.quick, floor=args.floor)
        rounds.append(results)
        times = ", ".join(f"world {w}: {min(r[0]['times']):.2f} s" for w, r in results.items())
        print(f"round {index + 1}: {times}", flush=True)
    print(f"CPU pressure (/proc/pressure/cpu, some avg60) at the end: {cpu_pressure()}")
    if args.quick:
        memory = rounds[-1]
    else:
        memory = {world: launch(world, threads, c, d, n, 1, memory=True) for world, threads in configs}
    print(
        "\n| world | threads per rank | classes per rank | weights MB per rank | weight grads MB per rank "
        "| other peak MB per rank (max) | peak RSS MB per rank (max) | best step s | median step s | × world 1 (best) "
        "| × world 1 (median round) |"
    )
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    best = {w: min(t for r in rounds for t in r[w][0]["times"]) for w, _ in configs}
    for world, threads in configs:
        per_round = [r[world] for r in rounds]
        # (against world 1 where it ran: --worlds may leave it out)
        ratios = [min(r[world][0]["times"]) / min(r[1][0]["times"]) for r in rounds if 1 in r]
        to_one = f"{best[world] / best[1]:.3f}" if 1 in best else "—"
        to_one_median = f"{statistics.median(ratios):.3f}" if ratios else "—"
        ranks = per_round[-1]
        median = statistics.median(t for r in per_round for t in r[0]["times"])
        extra = max(rank["extra_mb"] for rank in memory[world])
        rss = max(rank["peak_rss_mb"] for rank in memory[world])
        print(
            f"| {world} | {threads} | {ranks[0]['classes']} | {ranks[0]['weight_mb']:.1f} | {ranks[0]['grad_mb']:.1f} "
            f"| {extra:.1f} | {rss:.0f} | {best[world]:.2f} | {median:.2f} | {to_one} | {to_one_median} |"
        )
    if args.floor:
        print(
            "\neach rank's step against the floor over its block (global N × d against its C/world × d; medians of the"
        )
        print("interleaved steps of every round, in the rank's own process):\n")
        print("| world | rank | classes | step s | floor over the block s | × floor |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: |")
        for world, _ in configs:
            for rank in range(world):
                step = statistics.median(t for r in rounds for t in r[world][rank]["times"])
                fl = statistics.median(t for r in rounds for t in r[world][rank]["floor_times"])
                classes = rounds[-1][world][rank]["classes"]
                print(f"| {world} | {rank} | {classes} | {step:.2f} | {fl:.2f} | {step / fl:.3f} |")
    print("\nper-step traffic per rank, on paper (bytes sent, ring algorithms):\n")
    names = " | ".join(traffic_bytes(2, n, d))
    print(f"| world | {names} | total KB | replicated head's gradient all-reduce MB |")
    print("| ---: |" + " ---: |" * 7)
    for world, _ in configs:
        parts = traffic_bytes(world, n, d)
        replicated = 2 * (world - 1) / world * c * d * 4 / 2**20
        cells = " | ".join(f"{v:.0f}" for v in parts.values())
        print(f"| {world} | {cells} | {sum(parts.values()) / 1024:.1f} | {replicated:.1f} |")


if __name__ == "__main__":
    main()
