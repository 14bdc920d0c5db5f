"""What each rank of a gloo world runs for ``tests/compat/test_insightface.py``: ``PartialFC_V2`` on its block, and
``mll.ShardedArcFace``/``ShardedCosFace`` on the same weights, for every case; and a faulty rank."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.distributed as dist

import mll
from mll.compat.insightface import CombinedMarginLoss, PartialFC_V2

D, C, S = 8, 23, 64.0
SEED = 100  # rank r's sampling generator: manual_seed(SEED + r), in the module and in the reference


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    m2: float = 0.5
    m3: float = 0.0
    threshold: float = 0.0
    rate: float = 1.0
    exact: bool = False
    uneven: bool = False
    fp16: bool = False


CASES = [
    Case("arcface"),
    Case("arcface-exact", exact=True),
    Case("cosface", m2=0.0, m3=0.4),
    Case("cosface-exact", m2=0.0, m3=0.4, exact=True),
    Case("arcface-filtered", threshold=0.2),
    Case("arcface-filtered-exact", threshold=0.2, exact=True),
    Case("cosface-filtered", m2=0.0, m3=0.4, threshold=0.2),
    Case("arcface-sampled", rate=0.5),
    Case("arcface-sampled-exact", rate=0.5, exact=True),
    Case("cosface-sampled-uneven", m2=0.0, m3=0.4, rate=0.4, uneven=True),
    Case("arcface-uneven", uneven=True),
    Case("arcface-fp16", fp16=True),
]


def split(case: Case, world: int) -> list[int]:
    return [5, 2, 0][:world] if case.uneven else [4] * world


def data(case: Case, world: int) -> dict[str, torch.Tensor]:
    """The global batch and all weights, the same in every process: a third of the features near their class's
    weight (small losses), a third near its opposite (θ past π − m; losses above −ln 1e-30), a third at random."""
    n = sum(split(case, world))
    g = torch.Generator().manual_seed(7)
    w = torch.randn(C, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, C, (n,), generator=g)
    unit = torch.nn.functional.normalize(w, dim=1)[y]
    noise = 0.3 * torch.randn(n, D, generator=g, dtype=torch.float64)
    kind = torch.arange(n) % 3
    x = torch.where((kind == 0)[:, None], unit + noise, torch.where((kind == 1)[:, None], -unit + noise, 3 * noise))
    return {"x": 2.0 * x, "w": w, "y": y}


def rows(case: Case, world: int, rank: int) -> slice:
    sizes = split(case, world)
    return slice(sum(sizes[:rank]), sum(sizes[: rank + 1]))


def run_case(case: Case, rank: int, world: int) -> dict[str, Any]:
    d = data(case, world)
    dtype = torch.float32 if case.fp16 else torch.float64
    margin = CombinedMarginLoss(S, 1.0, case.m2, case.m3, case.threshold, exact=case.exact)
    module = PartialFC_V2(margin, D, C, sample_rate=case.rate, fp16=case.fp16, dtype=dtype)
    start = module.class_start
    with torch.no_grad():
        module.weight.copy_(d["w"][start : start + module.num_local])
    if module.sampling_generator is not None:
        module.sampling_generator = torch.Generator().manual_seed(SEED + rank)
    part = rows(case, world, rank)
    x = d["x"][part].to(dtype).requires_grad_(True)
    loss = module(x, d["y"][part])
    loss.backward()
    out: dict[str, Any] = {"loss": loss.detach(), "grad_x": x.grad, "grad_w": module.weight.grad,
                           "block": (start, start + module.num_local)}  # fmt: skip
    if case.exact and case.threshold == 0 and case.rate == 1:  # mll's own head on the same weights
        head_type = mll.ShardedArcFace if case.m3 == 0 else mll.ShardedCosFace
        head = head_type(D, C, scale=S, margin=case.m2 if case.m3 == 0 else case.m3, dtype=dtype)
        with torch.no_grad():
            head.weight.copy_(module.weight)
        xh = d["x"][part].to(dtype).requires_grad_(True)
        mine = head.loss(xh, d["y"][part])
        mine.backward()
        out["head"] = {"loss": mine.detach(), "grad_x": xh.grad, "grad_w": head.weight.grad}
    return out


def run_faults(rank: int, world: int) -> dict[str, str]:
    """One faulty rank: every rank raises the same error, and the group is still usable after it."""
    out = {}
    margin = CombinedMarginLoss(S, 1.0, 0.5, 0.0)
    x = torch.randn(3, D, dtype=torch.float64)
    attempts = {
        "label": lambda: PartialFC_V2(margin, D, C, dtype=torch.float64)(
            x, torch.tensor([0, C if rank == 1 else 1, 2])
        ),
        "fp16": lambda: PartialFC_V2(margin, D, C, fp16=rank == 1, dtype=torch.float64)(x, torch.tensor([0, 1, 2])),
        "exact": lambda: PartialFC_V2(CombinedMarginLoss(S, 1.0, 0.5, 0.0, exact=rank == 1), D, C, dtype=torch.float64)(
            x, torch.tensor([0, 1, 2])
        ),
        "features": lambda: PartialFC_V2(margin, D, C, dtype=torch.float64)(
            x[:, :5] if rank == 0 else x, torch.tensor([0, 1, 2])
        ),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            out[name] = ""
        except (ValueError, TypeError) as error:
            out[name] = f"{type(error).__name__}: {error}"
    ok = PartialFC_V2(margin, D, C, dtype=torch.float64)(x, torch.tensor([0, 1, 2]))
    out["after"] = str(bool(torch.isfinite(ok)))
    return out


def worker(rank: int, world: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}/store", rank=rank, world_size=world)
    try:
        results = {
            "cases": {case.name: run_case(case, rank, world) for case in CASES},
            "faults": run_faults(rank, world),
        }
        torch.save(results, f"{path}/rank{rank}.pt")
        dist.barrier()  # no rank shuts its connections while another still works (gloo aborts on that)
    finally:
        dist.destroy_process_group()
