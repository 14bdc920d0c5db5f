"""What each rank runs for ``tests/nn/test_resharding.py``: a DDP backbone and a sharded head trained with one
optimizer (as InsightFace trains), checkpointed per rank after two steps, and resumed on another number of ranks."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

import mll

D_IN, D, C, N = 6, 5, 40, 12  # N: the global batch, split evenly over 1, 2 or 3 ranks
SAVED_AFTER, STEPS = 2, 4


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    head: str = "ShardedArcFace"
    optimizer: str = "sgd"
    sample_rate: float = 1.0
    sampling: str = "block"
    trainable_scale: bool = False


CASES = [
    Case("arcface-sgd"),
    Case("arcface-adam", optimizer="adam", trainable_scale=True),
    Case("arcface-sgd-sampled", sample_rate=0.4, sampling="class"),
    Case("arcface-adam-sampled", optimizer="adam", sample_rate=0.4, sampling="class"),
    Case("elastic-sgd-sampled", head="ShardedElasticArcFace", sample_rate=0.4, sampling="class"),
    Case("deepncm-sgd", head="ShardedDeepNCM"),  # per-class buffers: the class means
    Case("arcface-sgd-block-sampling", sample_rate=0.4),  # the same world only: its sample depends on the blocks
]
BY_NAME = {case.name: case for case in CASES}


def build(case: Case, seed: int) -> tuple[nn.Module, nn.Module]:
    """The backbone and this rank's block of the head: the same global weights on any number of ranks for a seed."""
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(D_IN, 8), nn.Tanh(), nn.Linear(8, D)).double()
    dense_type = getattr(mll, case.head).dense
    kwargs: dict[str, Any] = {"dtype": torch.float64}
    if dense_type is not mll.DeepNCM:
        kwargs.update(scale=8.0, trainable_scale=case.trainable_scale)
        kwargs.update(margin=0.4)
    dense = dense_type(D, C, **kwargs)
    if dense_type is mll.DeepNCM:
        with torch.no_grad():
            dense.means.copy_(torch.randn(C, D, dtype=torch.float64))
    sharding: dict[str, Any] = {"sample_rate": case.sample_rate, "sampling": case.sampling}
    sharding["generator"] = torch.Generator().manual_seed(seed)  # alike on every rank: the class-sampling seed
    return backbone, getattr(mll, case.head).from_dense(dense, **sharding)


def make_optimizer(case: Case, backbone: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
    params = [*backbone.parameters(), *[p for p in head.parameters() if p.requires_grad]]
    if case.optimizer == "adam":
        return torch.optim.Adam(params, lr=0.05)
    return torch.optim.SGD(params, lr=0.5, momentum=0.9, weight_decay=1e-3)


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    x, y = torch.randn(N, D_IN, generator=g, dtype=torch.float64), torch.randint(0, C, (N,), generator=g)
    part = slice(rank * N // world, (rank + 1) * N // world)
    return x[part], y[part]


def train(case: Case, model: nn.Module, head: nn.Module, opt: torch.optim.Optimizer, steps: range, rank: int,
          world: int) -> list[dict[str, Any]]:  # fmt: skip
    out = []
    for step in steps:
        x, y = batch(step, rank, world)
        loss = head.loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        rows = head.rows() if hasattr(head, "rows") else head.weight
        backbone = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
        out.append({"loss": loss.detach(), "rows": rows.detach().clone(),
                    "block": (head.class_start, head.class_stop) if hasattr(head, "class_start") else (0, C),
                    "backbone": [p.detach().clone() for p in backbone.parameters()],
                    "scale": head.scale.detach().clone()})  # fmt: skip
    return out


def wrap(backbone: nn.Module, world: int) -> nn.Module:
    return nn.parallel.DistributedDataParallel(backbone) if world > 1 else backbone


def first_run(case: Case, rank: int, world: int, folder: str) -> list[dict[str, Any]]:
    """Two steps, a checkpoint per rank, two more steps: the uninterrupted run."""
    backbone, head = build(case, seed=1)
    model = wrap(backbone, world)
    opt = make_optimizer(case, backbone, head)
    done = train(case, model, head, opt, range(SAVED_AFTER), rank, world)
    os.makedirs(folder, exist_ok=True)
    torch.save({"backbone": backbone.state_dict(), "head": head.state_dict(), "optimizer": opt.state_dict()},
               f"{folder}/rank{rank}.pt")  # fmt: skip
    dist.barrier()
    return done + train(case, model, head, opt, range(SAVED_AFTER, STEPS), rank, world)


def resumed(case: Case, rank: int, world: int, folder: str, dense: bool = False) -> list[dict[str, Any]]:
    """A fresh model (another seed), its backbone from rank 0's file, its head and optimizer re-sharded from every
    rank's file; the steps after the checkpoint."""
    backbone, head = build(case, seed=2)
    if dense:  # a single-process head (world 1): the same state, reassembled
        head = head.dense(D, C, dtype=torch.float64, **head.options())
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("rank"))
    backbone.load_state_dict(torch.load(files[0], mmap=True, weights_only=True)["backbone"])
    opt = make_optimizer(case, backbone, head)
    mll.nn.load_resharded(head, files, opt, head_key="head", optimizer_key="optimizer")
    return train(case, wrap(backbone, world), head, opt, range(SAVED_AFTER, STEPS), rank, world)


def stale_rank(rank: int, world: int, folder: str) -> str:
    """Rank 1 resumes from a checkpoint of another step (its class-sampling key is behind): every rank raises the
    same error at the next step, and the group is usable once the rank is fixed."""
    case = BY_NAME["arcface-sgd-sampled"]
    backbone, head = build(case, seed=2)
    files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.startswith("rank"))
    mll.nn.load_resharded(head, files, head_key="head")
    if rank == 1:
        head.sampling_step -= 1
    x, y = batch(SAVED_AFTER, rank, world)
    try:
        head.loss(backbone(x), y)
        message = ""
    except ValueError as error:
        message = str(error)
    head.sampling_step = SAVED_AFTER
    assert torch.isfinite(head.loss(backbone(x), y))
    return message


def worker(rank: int, world: int, path: str) -> None:
    """``path``'s name says the job: ``first`` (world 2, and world 1 for the 1 → any direction) or ``resume``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}/store", rank=rank, world_size=world)
    root = os.path.dirname(path)
    jobs: dict[str, Callable[[], Any]] = {}
    try:
        if os.path.basename(path).startswith("first"):
            for case in CASES if world == 2 else [BY_NAME["arcface-sgd-sampled"]]:  # world 1: the 1 → 3 direction
                jobs[case.name] = lambda case=case: first_run(case, rank, world, f"{root}/ckpt-w{world}-{case.name}")
        else:
            for case in CASES:
                jobs[case.name] = lambda case=case: resumed(case, rank, world, f"{root}/ckpt-w2-{case.name}")
            if world > 1:
                jobs["stale"] = lambda: stale_rank(rank, world, f"{root}/ckpt-w2-arcface-sgd-sampled")
            if world == 1:
                name = "arcface-adam"
                jobs["dense"] = lambda: resumed(BY_NAME[name], rank, world, f"{root}/ckpt-w2-{name}", dense=True)
            if os.path.isdir(f"{root}/ckpt-w1-arcface-sgd-sampled"):
                jobs["from-1"] = lambda: resumed(BY_NAME["arcface-sgd-sampled"], rank, world,
                                                 f"{root}/ckpt-w1-arcface-sgd-sampled")  # fmt: skip
        results = {name: job() for name, job in jobs.items()}
        torch.save(results, f"{path}/rank{rank}.pt")
        dist.barrier()  # no rank shuts its connections while another still works (gloo aborts on that)
    finally:
        dist.destroy_process_group()
