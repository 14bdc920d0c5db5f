"""Chunked margin cross-entropy against the dense path at 10^5–10^6 classes: peak memory and step time.

    python -m benchmarks.chunked            # C = 100k, 400k, 1M (about 10 minutes on 2 cores)
    python -m benchmarks.chunked --quick    # a smoke run at C = 20k: its probes side by side, one thread each

Every (implementation, C) runs in a fresh process with the default allocator: one warm-up step (so the parameter
gradients exist), then the peak resident set of the timed steps above the resident set before them (``VmHWM``
reset through ``/proc/self/clear_refs``) — memory *above the parameters and their gradients* — and the median
step time. Gradients are set to None before each step, as ``optimizer.zero_grad()`` does by default.

Implementations, all forward+backward of an ArcFace-sized problem (N=256, d=512, s=30):

- ``dense``: ``F.cross_entropy(head(x, y), y)`` with ``mll.ArcFace`` (m = 0.5);
- ``chunked``: ``head.loss(x, y)`` — :func:`mll.functional.margin_cross_entropy`, default chunk size;
- ``torch linear_cross_entropy``: ``F.linear_cross_entropy`` of the normalised features and weights with
  ``LinearCrossEntropyOptions()`` (torch's own chunking, over the batch; no margin).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

import mll
from benchmarks.run import _vm_kb
from mll.functional.chunked import default_chunk_size

IMPLEMENTATIONS = ("dense", "chunked", "torch linear_cross_entropy")


def probe(impl: str, classes: int, batch: int, features: int, steps: int) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(batch, features, requires_grad=True)
    y = torch.randint(0, classes, (batch,))
    head = mll.ArcFace(features, classes, scale=30.0, margin=0.5)

    def step() -> None:
        if impl == "dense":
            loss = F.cross_entropy(head(x, y), y)
        elif impl == "chunked":
            loss = head.loss(x, y)
        else:
            loss = F.linear_cross_entropy(
                mll.functional.normalize(x) * 30.0,
                mll.functional.normalize(head.weight),
                y,
                options=torch.nn.LinearCrossEntropyOptions(),
            )
        loss.backward()

    step()  # warm-up: parameters and their gradients are resident from here on
    baseline = _vm_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")
    times = []
    for _ in range(steps):
        # as optimizer.zero_grad() does by default: the step's gradient becomes .grad, with no accumulation buffer
        x.grad = head.weight.grad = None
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"peak_mb": (_vm_kb("VmHWM") - baseline) / 1024, "seconds": statistics.median(times)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--classes", type=int, nargs="*", default=[100_000, 400_000, 1_000_000])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--probe", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        impl, classes, batch, features, steps = args.probe
        print(json.dumps(probe(impl, int(classes), int(batch), int(features), int(steps))))
        return
    batch, features = (64, 64) if args.quick else (256, 512)
    classes_list = [20_000] if args.quick else args.classes
    steps = 2 if args.quick else args.steps
    # a smoke run starts the probes of a C side by side, one thread each: every process still measures its own
    # memory, but their step times are no longer comparable (each pays seconds to import torch: that is what a smoke
    # run saves), and OpenMP threads that wait for a busy core would spin through the machine's time
    together = len(IMPLEMENTATIONS) if args.quick else 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if args.quick else None
    threads = 1 if args.quick else torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; N={batch}, d={features}; ArcFace m=0.5, s=30")
    rows = "fresh process per row" + (", all rows of a C at once (times not comparable)" if together > 1 else "")
    print(f"{rows}, default allocator; memory above parameters and gradients; median of", steps, "steps")
    print("\n| C | implementation | peak MB | × dense memory | step s | × dense time | chunk (classes) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for classes in classes_list:
        results = {}
        sizes = [str(v) for v in (classes, batch, features, steps)]
        commands = [[sys.executable, "-m", "benchmarks.chunked", "--probe", impl, *sizes] for impl in IMPLEMENTATIONS]
        with ThreadPoolExecutor(together) as pool:
            runs = pool.map(lambda command: subprocess.run(command, env=env, capture_output=True, text=True), commands)
            probes = dict(zip(IMPLEMENTATIONS, runs))
        for impl, done in probes.items():
            if done.returncode != 0:
                print(f"| {classes} | {impl} | failed: {done.stderr.strip().splitlines()[-1][:80]} | | | | |")
                continue
            results[impl] = json.loads(done.stdout.strip().splitlines()[-1])
        dense = results.get("dense")
        for impl, r in results.items():
            # a tiny quick run's dense peak can be 0 MB (the heap had room already): no ratio then
            mem = f"{r['peak_mb'] / dense['peak_mb']:.3f}" if dense and dense["peak_mb"] > 0 else "—"
            tim = f"{r['seconds'] / dense['seconds']:.3f}" if dense and dense["seconds"] > 0 else "—"
            chunk = default_chunk_size(batch, classes, 1) if impl == "chunked" else "—"
            print(
                f"| {classes} | {impl} | {r['peak_mb']:.0f} | {mem} | {r['seconds']:.2f} | {tim} | {chunk} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
