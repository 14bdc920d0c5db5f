"""The memory of a re-shard: a sharded training state of C = 10^6 classes saved by A ranks, loaded by each rank of B.

    python -m benchmarks.reshard                    # C = 10^6, d = 128, float32, SGD with momentum; 2→3, 2→1, 1→2, 4→2
    python -m benchmarks.reshard --quick            # C = 20 000, d = 32: a smoke run (seconds)
    python -m benchmarks.reshard --optimizer adam   # Adam: two per-row moments instead of one momentum

The A ranks' checkpoints — ``{"head": ShardedArcFace.state_dict(), "optimizer": optimizer.state_dict()}``, one
file per rank, the weights and the optimizer's per-row state of its block — are written by one process. Then every
rank of B is a fresh process (``python -m benchmarks.reshard --probe``): it imports torch and mll, builds its head
(its block of weights) and optimizer, resets ``VmHWM`` through ``/proc/self/clear_refs`` (``5``: the peak resident
set := the current one) and calls :func:`mll.nn.load_resharded` on the A files. Its line of the table gives, per
rank: the resident set before the load (torch, the head's weights), the peak of the load above it (``VmHWM``, which
counts the pages of the mapped files that the load touches), and what stays after it (the optimizer's per-row state,
allocated by the load). The whole C×d matrix (and each of its optimizer states) is printed beside them: a load that
read it whole would show it in the peak. ``MALLOC_MMAP_THRESHOLD_=65536`` in the probes: freed tensors leave the
resident set.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import torch

import mll
from benchmarks.run import MEMORY_ENV, _vm_kb

PAIRS = ((2, 3), (2, 1), (1, 2), (4, 2))
STATES = {"sgd": 1, "adam": 2}


def make(
    classes: int, features: int, world: int, rank: int, optimizer: str
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    block = mll.functional.shard_bounds(classes, world)[rank]
    head = mll.ShardedArcFace(features, classes, margin=0.5, class_range=block)
    if optimizer == "adam":
        return head, torch.optim.Adam(head.parameters(), lr=1e-3)
    return head, torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)


def write(folder: str, classes: int, features: int, world: int, optimizer: str) -> None:
    """Every rank's checkpoint after one optimizer step, one rank at a time."""
    for rank in range(world):
        head, opt = make(classes, features, world, rank, optimizer)
        head.weight.grad = torch.randn_like(head.weight)
        opt.step()
        torch.save({"head": head.state_dict(), "optimizer": opt.state_dict()}, f"{folder}/rank{rank}.pt")


def probe(folder: str, classes: int, features: int, world: int, rank: int, optimizer: str) -> dict[str, float]:
    head, opt = make(classes, features, world, rank, optimizer)
    files = sorted(os.path.join(folder, name) for name in os.listdir(folder) if name.startswith("rank"))
    before = _vm_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # VmHWM := the current resident set
    mll.nn.load_resharded(head, files, opt, head_key="head", optimizer_key="optimizer")
    peak, after = _vm_kb("VmHWM"), _vm_kb("VmRSS")
    assert opt.state[head.weight], "the optimizer state was not loaded"
    return {
        "classes": head.class_stop - head.class_start,
        "block_mb": head.weight.numel() * 4 / 2**20,
        "rss_before_mb": before / 1024,
        "peak_above_mb": (peak - before) / 1024,
        "kept_mb": (after - before) / 1024,
    }


def run_probe(folder: str, classes: int, features: int, world: int, rank: int, optimizer: str) -> dict[str, float]:
    env = {**os.environ, **MEMORY_ENV}
    args = [sys.executable, "-m", "benchmarks.reshard", "--probe", folder, str(classes), str(features), str(world),
            str(rank), optimizer]  # fmt: skip
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=128)
    parser.add_argument("--optimizer", choices=sorted(STATES), default="sgd")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--probe", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        folder, classes, features, world, rank, optimizer = args.probe
        print(json.dumps(probe(folder, int(classes), int(features), int(world), int(rank), optimizer)))
        return []
    classes, features = (20_000, 32) if args.quick else (args.classes, args.features)
    tensor_mb = classes * features * 4 / 2**20
    states = STATES[args.optimizer]
    print(f"torch {torch.__version__}; ShardedArcFace C={classes}, d={features}, float32, {args.optimizer} "
          f"({states} per-row state); the whole matrix: {tensor_mb:.1f} MB, and as much per state")  # fmt: skip
    print("| A → B | rank | classes | weights MB | resident before MB | peak of the load above it MB | kept MB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for old, new in PAIRS:
            folder = os.path.join(tmp, f"w{old}")
            if not os.path.isdir(folder):
                os.makedirs(folder)
                write(folder, classes, features, old, args.optimizer)
            for rank in range(new):
                got = run_probe(folder, classes, features, new, rank, args.optimizer)
                rows.append({"old": old, "new": new, "rank": rank, **got})
                mb = [f"{got[key]:.1f}" for key in ("block_mb", "rss_before_mb", "peak_above_mb", "kept_mb")]
                cells = [f"{old} → {new}", rank, got["classes"], *mb]
                print("| " + " | ".join(map(str, cells)) + " |")
    return rows


if __name__ == "__main__":
    main()
