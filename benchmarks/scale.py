"""Ten million classes on this one machine: class-sharded ArcFace over gloo processes, three SGD steps with momentum.

    python -m benchmarks.scale                  # C = 10^7, d = 128, 4 ranks, global N = 512 (under 10 minutes, 2 cores)
    python -m benchmarks.scale --quick          # a smoke run: C = 2·10^4, 2 ranks, N = 64

InsightFace's Partial FC reaches 10^7 identities with 8 GPUs and sampling; here 4 CPU processes hold C/4 classes
each (``mll.ShardedArcFace``, every class kept: no sampling), chunked inside each rank. Each rank: its block of
weights, their gradient and SGD's momentum — 3·C/4·d float32 numbers, 3.8 GB at 10^7 × 128 —, its share of the
global batch as features that require a gradient (a backbone's output) and random labels over all C classes.
The loss's working memory is held to ``MLL_MEMORY_BUDGET`` (default here 64 MB per rank), so the chunk kernel
recomputes its chunks (four GEMMs: the row tiles would need a tile of at least 128 rows × C/4 logits).

Printed: the time of each step (every rank's, the slowest counts), each rank's peak resident set (``VmHWM``), the
bytes each rank sends per step (on paper, from the collectives of the sharded loss), and a check: the loss of 8
sampled rows of the global batch recomputed in float64 over all 10^7 classes (every rank its block, in chunks, the
blocks' log-sum-exps joined with an all-reduce) against the float32 per-row losses of the sharded loss.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

import mll
from benchmarks.run import _vm_kb
from benchmarks.sharded import traffic_bytes

SCALE, MARGIN = 64.0, 0.5
SAMPLED = 8


def worker(rank: int, world: int, classes: int, features: int, batch: int, steps: int, store: str) -> dict:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        start, stop = mll.functional.shard_bounds(classes, world)[rank]
        head = mll.ShardedArcFace(features, classes, margin=MARGIN, scale=SCALE, class_range=(start, stop))
        with torch.no_grad():  # a deterministic start: each block from its own seed
            head.weight.normal_(generator=torch.Generator().manual_seed(1000 + rank))
        opt = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
        rows = batch // world
        g = torch.Generator().manual_seed(rank)
        x = torch.randn(rows, features, generator=g, requires_grad=True)
        y = torch.randint(0, classes, (rows,), generator=g)
        check = sampled_check(head, x, y, rank, world)
        times = []
        for _ in range(steps):
            dist.barrier()
            begin = time.perf_counter()
            loss = head(x, y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            x.grad = None
            times.append(time.perf_counter() - begin)
        return {"rank": rank, "classes": stop - start, "times": times, "loss": float(loss), **check,
                "peak_rss_mb": _vm_kb("VmHWM") / 1024}  # fmt: skip
    finally:
        dist.barrier()
        dist.destroy_process_group()


def sampled_check(head: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, rank: int, world: int) -> dict:
    """The first ``SAMPLED`` rows of rank 0: their float32 losses from the sharded loss (``reduction="none"``), and
    the same losses in float64 over every class, each rank its block in chunks of 10^5 classes."""
    with torch.no_grad():
        losses = head.loss(x, y, reduction="none")
        mine = torch.cat([x.detach(), y.unsqueeze(1).to(x.dtype)], 1)[:SAMPLED].contiguous()
        dist.broadcast(mine, src=0)
        xs, ys = mine[:, :-1].double(), mine[:, -1].long()
        x_hat = F.normalize(xs, dim=-1)
        top = torch.full((SAMPLED,), -math.inf, dtype=torch.float64)
        total = torch.zeros(SAMPLED, dtype=torch.float64)
        target = torch.zeros(SAMPLED, dtype=torch.float64)
        blocks = []
        for first in range(0, head.weight.shape[0], 100_000):
            w = F.normalize(head.weight[first : first + 100_000].detach().double(), dim=-1)
            cos = x_hat @ w.t()
            classes = torch.arange(head.class_start + first, head.class_start + first + w.shape[0])
            hit = classes == ys[:, None]
            theta = torch.acos(cos.clamp(-1, 1))
            arc = torch.where(theta + MARGIN < math.pi, torch.cos(theta + MARGIN), cos - MARGIN * math.sin(MARGIN))
            logits = SCALE * torch.where(hit, arc, cos)
            target += torch.where(hit, logits, 0.0).sum(1)
            blocks.append(logits.amax(1))
            new_top = torch.maximum(top, logits.amax(1))
            total = total * torch.exp(top - new_top) + torch.exp(logits - new_top[:, None]).sum(1)
            top = new_top
        global_top = top.clone()
        dist.all_reduce(global_top, op=dist.ReduceOp.MAX)
        stats = torch.stack([total * torch.exp(top - global_top), target])
        dist.all_reduce(stats)
        reference = global_top + torch.log(stats[0]) - stats[1]
    got = losses[:SAMPLED].double() if rank == 0 else reference
    return {"check_max_abs": float((got - reference).abs().max()), "check_loss": reference.tolist()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--classes", type=int, default=10_000_000)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--world", type=int, default=4)
    parser.add_argument("--batch", type=int, default=512, help="global batch N")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--worker", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        rank, world, classes, features, batch, steps = (int(v) for v in args.worker[:6])
        print(json.dumps(worker(rank, world, classes, features, batch, steps, args.worker[6])))
        return
    if args.quick:
        args.classes, args.world, args.batch = 20_000, 2, 64
    c, d, n, world = args.classes, args.features, args.batch, args.world
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    env.setdefault("MLL_MEMORY_BUDGET", str(64 << 20))
    print(f"torch {torch.__version__}; ShardedArcFace C={c}, d={d}, global N={n}, {world} gloo ranks (1 thread "
          f"each), SGD momentum 0.9, {args.steps} steps; MLL_MEMORY_BUDGET={env['MLL_MEMORY_BUDGET']}")  # fmt: skip
    begin = time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        store = os.path.join(folder, "store")
        command = [sys.executable, "-m", "benchmarks.scale", "--worker"]
        values = [str(v) for v in (world, c, d, n, args.steps)]
        procs = [
            subprocess.Popen(
                [*command, str(r), *values, store],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for r in range(world)
        ]
        results = []
        for proc in procs:
            out, err = proc.communicate(timeout=3600)
            if proc.returncode != 0:
                raise SystemExit(f"a rank failed:\n{err[-3000:]}")
            results.append(json.loads(out.strip().splitlines()[-1]))
    results.sort(key=lambda r: r["rank"])
    print(f"wall time {time.perf_counter() - begin:.0f} s (start-up, weights, check and steps)\n")
    print("| step | slowest rank s | " + " | ".join(f"rank {r['rank']} s" for r in results) + " |")
    print("| ---: | ---: |" + " ---: |" * world)
    for step in range(args.steps):
        times = [r["times"][step] for r in results]
        print(f"| {step + 1} | {max(times):.1f} | " + " | ".join(f"{t:.1f}" for t in times) + " |")
    print("\n| rank | classes | peak RSS MB |\n| ---: | ---: | ---: |")
    for r in results:
        print(f"| {r['rank']} | {r['classes']} | {r['peak_rss_mb']:.0f} |")
    print(f"peak RSS, all ranks together: {sum(r['peak_rss_mb'] for r in results) / 1024:.1f} GB")
    sent = traffic_bytes(world, n, d)
    print(f"bytes sent per rank per step (on paper, ring algorithms): {sum(sent.values()) / 1024:.1f} KB "
          f"({', '.join(f'{k}: {v / 1024:.1f} KB' for k, v in sent.items())})")  # fmt: skip
    losses = ", ".join(f"{v:.4f}" for v in results[0]["check_loss"])
    print(f"check: the loss of {SAMPLED} sampled rows, float32 sharded vs float64 over all {c} classes: max abs "
          f"difference {results[0]['check_max_abs']:.2e} (losses {losses})")  # fmt: skip
    print(f"final loss (rank 0): {results[0]['loss']:.4f}")


if __name__ == "__main__":
    main()
