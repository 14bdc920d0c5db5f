"""Train a backbone in DDP with a class-sharded ArcFace head, checkpoint the shards, and reassemble them.

    torchrun --standalone --nproc_per_node 2 examples/train_sharded.py            # train on 2 CPU processes (gloo)
    python examples/train_sharded.py --reassemble                                 # one process: the dense head

Each rank holds the weights of half of the classes (``mll.ShardedArcFace``); the backbone is replicated and
wrapped in ``DistributedDataParallel``; the head is not (DDP would average different shards). One optimizer
takes both. After training every rank saves its shard of the head, rank 0 the backbone and the loss of a probe
batch; ``--reassemble`` builds a single-process ``mll.ArcFace`` from the shard files, checks that its loss on
the probe batch is the one the shards computed together, and reports its accuracy on new samples.

Synthetic data, no download: each class is a random prototype in 64 dimensions, a sample is its prototype plus
noise. Run without torchrun, the same script trains in one process (a world of one).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import mll

IN, FEATURES, HIDDEN = 64, 32, 128


def prototypes(num_classes: int) -> torch.Tensor:
    return torch.randn(num_classes, IN, generator=torch.Generator().manual_seed(0))


def batch(protos: torch.Tensor, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, protos.shape[0], (size,), generator=g)
    return protos[y] + 0.7 * torch.randn(size, IN, generator=g), y


def make_backbone() -> nn.Module:
    torch.manual_seed(1)  # the same start on every rank (DDP broadcasts rank 0's anyway)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, FEATURES))


def train(args: argparse.Namespace) -> None:
    distributed = "RANK" in os.environ  # launched by torchrun
    if distributed:
        dist.init_process_group("gloo")  # "nccl" on GPUs, with tensors and modules moved to cuda:LOCAL_RANK
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    protos = prototypes(args.classes)
    backbone = make_backbone()
    model = nn.parallel.DistributedDataParallel(backbone) if distributed else backbone
    # rank r holds classes shard_bounds(C, world)[r]; features get world × their gradient, which DDP averages
    head = mll.ShardedArcFace(
        FEATURES, args.classes, margin=0.3, sample_rate=args.sample_rate,
        generator=torch.Generator().manual_seed(100 + rank),
    )  # fmt: skip
    optimizer = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=args.lr, momentum=0.9)
    if rank == 0:
        print(f"world {world}: rank 0 holds classes [{head.class_start}, {head.class_stop}) of {args.classes}")
        print(head)
    start = time.perf_counter()
    for step in range(args.steps):
        x, y = batch(protos, args.batch, seed=1 + step * world + rank)  # every rank its own samples
        loss = head.loss(model(x), y)  # the same value on every rank: the mean over the global batch
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:4d}  loss {loss.item():.4f}")
    if rank == 0:
        print(f"{args.steps} steps in {time.perf_counter() - start:.1f} s")

    # a probe batch, split over the ranks: its loss in eval mode (no margin) is recorded for --reassemble
    probe_x, probe_y = batch(protos, 16 * world, seed=-1)
    mine = slice(16 * rank, 16 * (rank + 1))
    head.eval()
    with torch.no_grad():
        probe_loss = head.loss(backbone(probe_x[mine]), probe_y[mine])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), out / f"head-rank{rank}.pt")  # weights of this rank's classes + class_range
    if rank == 0:
        meta = {"classes": args.classes, "world": world, "probe_loss": float(probe_loss)}
        torch.save({"backbone": backbone.state_dict(), "meta": meta}, out / "backbone.pt")
        print(f"saved {world} head shards and the backbone to {out}/")
    if distributed:
        del model  # DDP's reducer before its process group: torn down the other way round, gloo can hang at exit
        dist.barrier()
        dist.destroy_process_group()


def reassemble(args: argparse.Namespace) -> None:
    out = Path(args.out)
    saved = torch.load(out / "backbone.pt")
    meta = saved["meta"]
    shards = [torch.load(out / f"head-rank{r}.pt") for r in range(meta["world"])]
    head = mll.ArcFace(FEATURES, meta["classes"], margin=0.3)  # the sharded heads' hyper-parameters
    head.load_state_dict(mll.nn.dense_state_dict(shards))
    backbone = make_backbone()
    backbone.load_state_dict(saved["backbone"])
    head.eval()
    protos = prototypes(meta["classes"])
    probe_x, probe_y = batch(protos, 16 * meta["world"], seed=-1)
    with torch.no_grad():
        probe_loss = float(head.loss(backbone(probe_x), probe_y))
        test_x, test_y = batch(protos, 2000, seed=-2)
        accuracy = float((head(backbone(test_x)).argmax(1) == test_y).float().mean())
    print(f"reassembled {meta['world']} shards into {head}")
    print(f"probe loss: shards {meta['probe_loss']:.6f}, dense head {probe_loss:.6f}")
    print(f"accuracy on 2000 new samples: {accuracy:.3f} (chance {1 / meta['classes']:.3f})")
    if abs(probe_loss - meta["probe_loss"]) > 1e-5 * max(1.0, abs(probe_loss)):
        raise SystemExit("the reassembled head does not reproduce the shards' loss")
    print("ok: the reassembled head reproduces the shards' loss")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reassemble", action="store_true", help="build the single-process head from the shards")
    parser.add_argument("--out", default="sharded-checkpoints", help="folder of the checkpoints")
    parser.add_argument("--classes", type=int, default=200)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=64, help="samples per rank and step")
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--sample-rate", type=float, default=1.0, help="Partial FC: fraction of each shard per step")
    args = parser.parse_args(argv)
    if args.reassemble:
        reassemble(args)
    else:
        train(args)


if __name__ == "__main__":
    main()
