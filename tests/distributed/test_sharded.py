"""Class-sharded loss on 2 and 3 gloo processes equals the single-process dense loss: float64, to 1e-10.

One spawn per world size runs every case (a worker pays about two seconds to import torch): the workers save
their losses and gradients, and each test here compares one case with the dense computation on the global batch
— ``F.cross_entropy`` of ``arc_margin``/``cos_margin`` of ``cosine_logits`` over the full weight matrix, with
autograd's gradients — for the loss (on every rank), every rank's feature gradient and every block's weight
gradient. Sampled cases compare with the dense loss restricted to the union of the classes the ranks kept.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Callable, Optional

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import mll
from mll import functional as MF
from tests.distributed import sharded_heads, sharded_proxy_anchor
from tests.nn import test_common

D = 5
SCALE = 6.0
MARGINS = {"arc": 0.5, "cos": 0.35, "none": 0.0}
TOL = {"rtol": 1e-10, "atol": 1e-10}
WORLDS = (2, 3)
SPLITS = {  # per-rank batch sizes
    "uneven": {2: (4, 3), 3: (4, 3, 2)},
    "empty-rank": {2: (0, 5), 3: (4, 0, 3)},
}
RANGES = {  # class blocks by rank, when not shard_bounds: out of rank order, one of them empty
    "permuted-empty": {2: ((0, 7), (7, 7)), 3: ((4, 7), (0, 0), (0, 4))},
}


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    classes: int = 7
    k: int = 1
    margin_type: str = "arc"
    target: str = "hard"  # "hard" (N,), "soft" (N, C), "pair" ((N, 2) classes, (N, 2) weights)
    reduction: str = "mean"
    labels: str = "random"  # "random", "edges" (first and last class of every block), "same" (one), "all" (each)
    split: str = "uneven"
    ranges: Optional[str] = None
    sample_rate: float = 1.0
    chunk_size: Optional[int] = None
    easy_margin: bool = False
    trainable_scale: bool = False
    feature_grad_scale: Optional[float] = 1.0
    soft_density: float = 0.6  # fraction of non-zero soft targets
    seed: int = 0


def _cases() -> list[Case]:
    out = []
    for margin_type in MARGINS:
        for k in (1, 3):
            for target in ("hard", "soft", "pair"):
                for reduction in ("mean", "sum", "none"):
                    name = f"{margin_type}-K{k}-{target}-{reduction}"
                    chunk = 2 if k == 3 else None  # several chunks per block, and one chunk per block
                    out.append(Case(name, k=k, margin_type=margin_type, target=target, reduction=reduction,
                                    chunk_size=chunk, seed=len(out)))  # fmt: skip
    out += [
        Case("edge-labels", labels="edges", chunk_size=1),
        Case("edge-labels-pair-K3", labels="edges", target="pair", k=3),
        Case("edge-labels-cos-none", labels="edges", margin_type="cos", reduction="none"),
        Case("duplicate-labels", labels="same"),
        Case("duplicate-pair-classes", labels="same", target="pair", margin_type="cos"),
        Case("easy-margin", easy_margin=True, labels="edges"),
        Case("trainable-scale", trainable_scale=True, k=3, chunk_size=2),
        Case("trainable-scale-soft", trainable_scale=True, target="soft"),
        Case("empty-rank-batch", split="empty-rank"),
        Case("empty-rank-batch-none", split="empty-rank", target="pair", reduction="none"),
        Case("two-classes", classes=2, labels="edges"),  # world 3: one block is empty
        Case("two-classes-soft", classes=2, target="soft", k=3),
        Case("permuted-blocks-one-empty", ranges="permuted-empty", labels="edges"),
        Case("permuted-blocks-one-empty-soft", ranges="permuted-empty", target="soft", reduction="sum"),
        Case("default-feature-grad-scale", feature_grad_scale=None),
        Case("sampled", classes=20, sample_rate=0.3),
        Case("sampled-K3-cos", classes=20, sample_rate=0.3, k=3, margin_type="cos", chunk_size=2),
        Case("sampled-pair", classes=20, sample_rate=0.2, target="pair"),
        Case("sampled-soft-none", classes=20, sample_rate=0.25, target="soft", reduction="none", soft_density=0.08),
        Case("sampled-trainable-scale", classes=20, sample_rate=0.3, trainable_scale=True),
    ]
    return [dataclasses.replace(case, seed=i) for i, case in enumerate(out)]


CASES = _cases()


def split_of(case: Case, world: int) -> tuple[int, ...]:
    return SPLITS[case.split][world]


def ranges_of(case: Case, world: int) -> list[tuple[int, int]]:
    if case.ranges is not None:
        return list(RANGES[case.ranges][world])
    return MF.shard_bounds(case.classes, world)


def make_data(case: Case, world: int) -> dict[str, Any]:
    """The global batch and weights of a case, the same in every process."""
    c, split = case.classes, split_of(case, world)
    n = sum(split)
    g = torch.Generator().manual_seed(1000 + case.seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    w = torch.randn(c * case.k, D, generator=g, dtype=torch.float64)
    if case.labels == "edges":
        edges = [v for a, b in ranges_of(case, world) if b > a for v in (a, b - 1)] + [0, c - 1]
        y = torch.tensor([edges[i % len(edges)] for i in range(n)])
    elif case.labels == "same":
        y = torch.full((n,), c // 2)
    elif case.labels == "all":
        y = torch.arange(n) % c
    else:
        y = torch.randint(0, c, (n,), generator=g)
    soft = torch.softmax(2 * torch.randn(n, c, generator=g, dtype=torch.float64), -1)
    # some zeros: rows need not sum to 1, and Partial FC's positives are a subset
    soft = soft * (torch.rand(n, c, generator=g, dtype=torch.float64) < case.soft_density)
    second = y if case.labels == "same" else torch.randint(0, c, (n,), generator=g)
    pair_classes = torch.stack([y, second], 1)
    lam = torch.rand(n, 1, generator=g, dtype=torch.float64)
    pair_weights = torch.cat([lam, 1 - lam], 1)
    if case.target == "hard":
        dense_target = y
    elif case.target == "soft":
        dense_target = soft
    else:
        rows = torch.arange(n).repeat_interleave(2)
        dense_target = torch.zeros(n, c, dtype=torch.float64)
        dense_target.index_put_((rows, pair_classes.reshape(-1)), pair_weights.reshape(-1), accumulate=True)
    upstream = torch.randn(n, generator=g, dtype=torch.float64)  # for reduction="none"
    return {"x": x, "w": w, "y": y, "soft": soft, "pair": (pair_classes, pair_weights),
            "dense_target": dense_target, "upstream": upstream, "split": split}  # fmt: skip


def rows_of(split: tuple[int, ...], rank: int) -> slice:
    start = sum(split[:rank])
    return slice(start, start + split[rank])


def local_target(case: Case, data: dict[str, Any], rows: slice) -> Any:
    if case.target == "hard":
        return data["y"][rows]
    if case.target == "soft":
        return data["soft"][rows]
    classes, weights = data["pair"]
    return classes[rows], weights[rows]


def positives(case: Case, data: dict[str, Any]) -> torch.Tensor:
    """Classes that are a target of some sample of the global batch (a non-zero soft weight counts)."""
    target = data["dense_target"]
    if case.target == "hard":
        return target.unique()
    return target.nonzero()[:, 1].unique()


# ---------------------------------------------------------------------------------------------- in the workers


def run_case(case: Case, rank: int, world: int, weight: float = 1.0, **overrides: Any) -> dict[str, Any]:
    data = make_data(case, world)
    rows = rows_of(data["split"], rank)
    start, stop = ranges_of(case, world)[rank]
    x = data["x"][rows].clone().requires_grad_(True)
    w = data["w"][start * case.k : stop * case.k].clone().requires_grad_(True)
    scale: Any = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True) if case.trainable_scale else SCALE
    generator = torch.Generator().manual_seed(50 + rank)
    state = generator.get_state()
    kwargs = dict(
        class_start=start, num_classes=case.classes, scale=scale, margin=MARGINS[case.margin_type],
        margin_type=case.margin_type, easy_margin=case.easy_margin, num_sub_centers=case.k,
        sample_rate=case.sample_rate, generator=generator, chunk_size=case.chunk_size,
        feature_grad_scale=case.feature_grad_scale, reduction=case.reduction,
    )  # fmt: skip
    kwargs.update(overrides)
    loss = MF.sharded_margin_cross_entropy(x, w, local_target(case, data, rows), **kwargs)
    objective = (loss * data["upstream"][rows]).sum() if case.reduction == "none" else loss * weight
    inputs = [x, w] + ([scale] if case.trainable_scale else [])
    grads = torch.autograd.grad(objective, inputs)
    result = {"loss": loss.detach(), "grad_x": grads[0], "grad_w": grads[1]}
    if case.trainable_scale:
        result["grad_scale"] = grads[2]
    if kwargs["sample_rate"] < 1:  # the classes this rank kept, drawn again from the same generator state
        positive = torch.zeros(stop - start, dtype=torch.bool)
        mine = positives(case, data)
        positive[mine[(mine >= start) & (mine < stop)] - start] = True
        generator.set_state(state)
        result["kept"] = MF.sample_classes(positive, kwargs["sample_rate"], generator=generator) + start
    else:
        result["generator_untouched"] = torch.equal(generator.get_state(), state)
    return result


def check_rate_one_is_no_sampling(rank: int, world: int) -> dict[str, bool]:
    """A rate of 1, and a rate below 1 where every class is a positive, give bit-identical results to no sampling."""
    keys = ("loss", "grad_x", "grad_w")
    out = {}
    for case in (Case("rate-one", target="pair", k=3, chunk_size=2), Case("rate-one-soft", target="soft")):
        plain = run_case(case, rank, world, sample_rate=1.0, generator=None)
        sampled = run_case(case, rank, world, sample_rate=1.0)
        out[f"{case.name}: no random draw"] = sampled["generator_untouched"]
        out[f"{case.name}: identical"] = all(torch.equal(plain[key], sampled[key]) for key in keys)
    # every class is a target in the batch (7 classes, at least 7 samples): the whole block is kept at any rate
    case = Case("all-positive", labels="all")
    plain, sampled = run_case(case, rank, world), run_case(case, rank, world, sample_rate=0.1)
    out["all-positive: identical"] = all(torch.equal(plain[key], sampled[key]) for key in keys)
    return out


def module_batch(world: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    split = SPLITS["uneven"][world]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(sum(split), D, generator=g, dtype=torch.float64)
    return x, torch.randint(0, 9, (sum(split),), generator=g), split


def dense_heads() -> dict[str, nn.Module]:
    torch.manual_seed(5)
    return {
        "ShardedArcFace": mll.ArcFace(D, 9, 3, margin=0.4, easy_margin=True, dtype=torch.float64),
        "ShardedCosFace": mll.CosFace(D, 9, 1, trainable_scale=True, margin=0.3, dtype=torch.float64),
        "ShardedScaledNormalizedLinear": mll.ScaledNormalizedLinear(D, 9, 2, scale=4.0, dtype=torch.float64),
    }


def run_modules(rank: int, world: int) -> dict[str, Any]:
    """Each sharded module, built from a dense head, in training and eval mode; and its state_dict."""
    x, y, split = module_batch(world)
    rows = rows_of(split, rank)
    out = {}
    for name, dense in dense_heads().items():
        head = getattr(mll, name).from_dense(dense, feature_grad_scale=1.0)
        for training in (True, False):
            head.train(training)
            xr = x[rows].clone().requires_grad_(True)
            loss = head.loss(xr, y[rows])
            params = [p for p in head.parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, [xr, *params])
            out[(name, training)] = {"loss": loss.detach(), "grads": grads, "repr": repr(head)}
        out[(name, "state")] = head.state_dict()
    return out


def run_ddp(rank: int, world: int) -> dict[str, Any]:
    """A backbone in DDP (gloo) before a sharded head with the default feature_grad_scale."""
    x, y, split = module_batch(world)
    rows = rows_of(split, rank)
    backbone, dense = ddp_models()
    model = nn.parallel.DistributedDataParallel(backbone)
    head = mll.ShardedArcFace.from_dense(dense)
    loss = head.loss(model(x[rows]), y[rows])
    loss.backward()
    return {"loss": loss.detach(), "backbone": [p.grad for p in backbone.parameters()], "head": head.weight.grad}


def ddp_models() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(9)
    backbone = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, 4)).double()
    return backbone, mll.ArcFace(4, 9, margin=0.5, dtype=torch.float64)


def error_case_data(world: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch (3 samples per rank) and weights of the fault tests."""
    g = torch.Generator().manual_seed(77)
    x = torch.randn(3 * world, D, generator=g, dtype=torch.float64)
    return x, torch.randn(7, D, generator=g, dtype=torch.float64), torch.tensor([0, 6, 2] * world)


def run_errors(rank: int, world: int) -> dict[str, str]:
    """Bad input on one rank, or ranks that disagree, raise on every rank (and leave the group usable)."""
    x, w_all, y_all = error_case_data(world)
    x = x[3 * rank : 3 * rank + 3]
    start, stop = MF.shard_bounds(7, world)[rank]
    w = w_all[start:stop]
    y = y_all[3 * rank : 3 * rank + 3].clone()
    if rank == 1:
        y[2] = 9
    kwargs = dict(class_start=start, num_classes=7, scale=SCALE, margin=0.5, margin_type="arc")
    out = {}
    attempts: dict[str, Callable[[], Any]] = {
        "bad-label": lambda: MF.sharded_margin_cross_entropy(x, w, y, **kwargs),
        "margins-differ": lambda: MF.sharded_margin_cross_entropy(
            x, w, y.clamp(max=6), **{**kwargs, "margin": 0.5 if rank == 0 else 0.4}
        ),
        "blocks-overlap": lambda: MF.sharded_margin_cross_entropy(
            x, torch.randn(stop - start + 1, D, dtype=torch.float64), y.clamp(max=6), **kwargs
        ),
    }
    # one argument wrong on rank 1 only: every rank raises the same error, naming rank 1 and the argument
    good = y.clamp(max=6)
    one_bad: dict[str, dict[str, Any]] = {
        "margin": {"margin": -0.1},
        "scale": {"scale": -1.0},
        "reduction": {"reduction": "avg"},
        "chunk_size": {"chunk_size": 0},
        "sample_rate": {"sample_rate": 1.5},
        "margin_type": {"margin_type": "tan"},
        "pooling": {"pooling": "min"},
        "feature_grad_scale": {"feature_grad_scale": float("nan")},
    }
    for arg, bad in one_bad.items():
        attempts[f"one-bad-{arg}"] = lambda bad=bad: MF.sharded_margin_cross_entropy(
            x, w, good, **{**kwargs, **(bad if rank == 1 else {})}
        )
    eval_on_one = mll.ShardedArcFace(D, 7, class_range=(start, stop), dtype=torch.float64).train(rank != 1)
    attempts["one-in-eval-mode"] = lambda: eval_on_one.loss(x, good)
    # heads built with different arguments: the argument is named, and the default scale that follows it
    margin_on_one = mll.ShardedArcFace(D, 7, margin=0.3 if rank == 1 else 0.5, dtype=torch.float64)
    attempts["head-margins-differ"] = lambda: margin_on_one.loss(x, good)
    per_class = torch.linspace(0.2, 0.4 if rank == 1 else 0.6, 7, dtype=torch.float64)
    per_class_on_one = mll.ShardedArcFace(D, 7, margin=per_class, dtype=torch.float64)
    attempts["head-per-class-margins-differ"] = lambda: per_class_on_one.loss(x, good)
    scale_on_one = mll.ShardedCosFace(D, 7, scale=30.0 if rank == 1 else 20.0, dtype=torch.float64)
    attempts["head-scales-differ"] = lambda: scale_on_one.loss(x, good)
    attempts["one-bad-dtype"] = lambda: MF.sharded_margin_cross_entropy(
        x.float() if rank == 1 else x, w.float() if rank == 1 else w, good, **kwargs
    )
    attempts["one-bad-soft-target"] = lambda: MF.sharded_margin_cross_entropy(
        x, w, torch.full((3, 7), float("inf") if rank == 1 else 1 / 7, dtype=torch.float64), **kwargs
    )
    xr = x.clone().requires_grad_(True)
    attempts["one-double-backward"] = lambda: torch.autograd.grad(
        MF.sharded_margin_cross_entropy(xr, w, good, **kwargs), xr, create_graph=rank == 1
    )
    for name, attempt in attempts.items():
        try:
            attempt()
            out[name] = "no error"
        except (ValueError, TypeError, RuntimeError) as error:
            out[name] = f"{type(error).__name__}: {error}"
    # the group still works: a valid call after the errors
    out["after"] = repr(float(MF.sharded_margin_cross_entropy(x, w, y.clamp(max=6), **kwargs)))
    return out


FAMILY_CASE = Case("families", k=3, labels="edges", chunk_size=2)
M3 = torch.linspace(0.0, 0.3, FAMILY_CASE.classes, dtype=torch.float64)
M_ARC = torch.linspace(0.2, 0.6, FAMILY_CASE.classes, dtype=torch.float64)


def family_margin(name: str, x: torch.Tensor, start: int, stop: int) -> MF.Margin:
    """The margin of one family for features ``x`` and the classes [start, stop) (all of them for the reference)."""
    if name == "combined-per-class":
        return MF.COMBINED(1.2, 0.2, M3[start:stop])
    if name == "sphere":
        return MF.SPHERE(3.0, 1.5)
    if name == "curricular-per-class":
        return MF.CURRICULAR(M_ARC[start:stop], 0.3)
    magnitude = x.norm(dim=-1, keepdim=True).clamp(1.0, 5.0)  # per sample, with its gradient
    return MF.MAG(magnitude, 1.0, 5.0, 0.2, 0.6)


FAMILIES = ("combined-per-class", "sphere", "curricular-per-class", "mag-per-sample")
POOLINGS = {"combined-per-class": "soft", "sphere": "max", "curricular-per-class": "soft", "mag-per-sample": "max"}


def run_families(rank: int, world: int) -> dict[str, Any]:
    """Every kind of margin parameter through the sharded loss: per class (this block's slice), per sample (with a
    gradient), a family with a non-target part, soft sub-center pooling."""
    case = FAMILY_CASE
    data = make_data(case, world)
    rows = rows_of(data["split"], rank)
    start, stop = ranges_of(case, world)[rank]
    out = {}
    for name in FAMILIES:
        x = data["x"][rows].clone().requires_grad_(True)
        w = data["w"][start * case.k : stop * case.k].clone().requires_grad_(True)
        loss = MF.sharded_margin_cross_entropy(
            x, w, data["y"][rows], class_start=start, num_classes=case.classes, scale=SCALE,
            margin=family_margin(name, x, start, stop), num_sub_centers=case.k, pooling=POOLINGS[name],
            chunk_size=case.chunk_size, feature_grad_scale=1.0,
        )  # fmt: skip
        out[name] = {"loss": loss.detach(), "grads": torch.autograd.grad(loss, [x, w])}
    return out


def run_row_tiles(rank: int, world: int) -> dict[str, Any]:
    """The scalar cases on the row tiles (two rows per tile: a collective pair per tile, ragged last tiles), with every
    rank's upstream gradient 1 — and again with rank r's upstream r + 1, which the formed gradient cannot be a scaling
    of: the tiles are walked again with each row weighted by its rank's upstream."""
    out: dict[str, Any] = {}
    for case in CASES:
        if case.reduction == "none":
            continue
        with MF.set_loss_path("row_tiles", rows=2):
            out[case.name] = run_case(case, rank, world)
            out[case.name + "/weighted"] = run_case(case, rank, world, weight=float(rank + 1))
    return out


def _worker(rank: int, world: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}/store", rank=rank, world_size=world)
    try:
        results = {
            "cases": {case.name: run_case(case, rank, world) for case in CASES},
            "row_tiles": run_row_tiles(rank, world),
            "rate_one": check_rate_one_is_no_sampling(rank, world),
            "modules": run_modules(rank, world),
            "ddp": run_ddp(rank, world),
            "errors": run_errors(rank, world),
            "families": run_families(rank, world),
            "heads": sharded_heads.run_heads(rank, world),
            "elastic_sampling": sharded_heads.run_elastic_sampling(rank, world),
            "head_faults": sharded_heads.run_faults(rank, world),
            "common_faults": test_common.run_faulty(rank, world),
            "sharded_proxy_anchor": sharded_proxy_anchor.run(rank, world),
        }
        if world == test_common.WORLD:
            results["common_statistics"] = test_common.run_statistics(rank, world)
        torch.save(results, f"{path}/rank{rank}.pt")
        dist.barrier()  # no rank shuts its connections while another still works (gloo aborts on that)
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- the references


def dense_loss(case: Case, x, w, target, scale, kept: torch.Tensor) -> torch.Tensor:
    """The single-process loss over the classes ``kept`` (all of them without sampling)."""
    rows = (kept.unsqueeze(1) * case.k + torch.arange(case.k)).reshape(-1)
    cos = MF.cosine_logits(x, w.index_select(0, rows), case.k)
    target = torch.searchsorted(kept, target) if case.target == "hard" else target[:, kept]
    m = MARGINS[case.margin_type]
    if case.margin_type == "arc":
        logits = MF.arc_margin(cos, target, m, easy_margin=case.easy_margin, scale=scale)
    elif case.margin_type == "cos":
        logits = MF.cos_margin(cos, target, m, scale=scale)
    else:
        logits = cos * scale
    return F.cross_entropy(logits, target, reduction=case.reduction)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_equals_the_dense_loss(spawned, world, case) -> None:
    check_against_the_dense_loss(case, world, [r["cases"][case.name] for r in spawned(world)])


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("weighted", [False, True], ids=["same-upstream", "upstream-by-rank"])
@pytest.mark.parametrize("case", [c for c in CASES if c.reduction != "none"], ids=lambda c: c.name)
def test_row_tiles_equal_the_dense_loss(spawned, world, case, weighted) -> None:
    """The loss and its gradient formed in one pass over row tiles, with the ranks' collectives per tile: the dense
    loss's numbers; with rank r's upstream gradient r + 1 each row's gradient is weighted by its rank's."""
    got = [r["row_tiles"][case.name + ("/weighted" if weighted else "")] for r in spawned(world)]
    check_against_the_dense_loss(case, world, got, rank_weights=[r + 1.0 for r in range(world)] if weighted else None)


def check_against_the_dense_loss(
    case: Case, world: int, got: list[dict[str, Any]], rank_weights: Optional[list[float]] = None
) -> None:
    """Every rank's loss, feature gradient, block gradient and scale gradient against the dense loss on the global
    batch; ``rank_weights``: rank r backpropagated ``rank_weights[r]`` times its (scalar) loss."""
    data = make_data(case, world)
    x = data["x"].clone().requires_grad_(True)
    w = data["w"].clone().requires_grad_(True)
    scale: Any = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True) if case.trainable_scale else SCALE
    kept = torch.arange(case.classes)
    if case.sample_rate < 1:
        kept = torch.cat([g["kept"] for g in got]).sort().values
        assert kept.numel() < case.classes, "the sample must leave classes out for this test to mean anything"
        assert torch.isin(positives(case, data), kept).all()
    dense = dense_loss(case, x, w, data["dense_target"], scale, kept)
    if case.reduction == "none":
        objective = (dense * data["upstream"]).sum()
    elif rank_weights is None:
        objective = dense
    else:  # each rank's output stands for its own rows: its weight on its rows' share of the mean or sum
        per_row = dense_loss(dataclasses.replace(case, reduction="none"), x, w, data["dense_target"], scale, kept)
        weights = torch.cat([torch.full((data["split"][r],), rank_weights[r], dtype=torch.float64)
                             for r in range(world)])  # fmt: skip
        objective = (per_row * weights).sum() / (per_row.numel() if case.reduction == "mean" else 1)
    grads = torch.autograd.grad(objective, [x, w] + ([scale] if case.trainable_scale else []))
    feature_scale = world if case.feature_grad_scale is None else case.feature_grad_scale
    for rank, result in enumerate(got):
        rows = rows_of(data["split"], rank)
        start, stop = ranges_of(case, world)[rank]
        torch.testing.assert_close(result["loss"], dense[rows] if case.reduction == "none" else dense, **TOL)
        torch.testing.assert_close(result["grad_x"], feature_scale * grads[0][rows], **TOL)
        torch.testing.assert_close(result["grad_w"], grads[1][start * case.k : stop * case.k], **TOL)
        if case.trainable_scale:
            torch.testing.assert_close(result["grad_scale"], grads[2], **TOL)
        if case.sample_rate == 1:
            assert result["generator_untouched"]
    if case.reduction != "none":  # the same number on every rank, to the bit
        assert all(torch.equal(result["loss"], got[0]["loss"]) for result in got)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_rate_one_is_no_sampling(spawned, world) -> None:
    for r in spawned(world):
        assert all(r["rate_one"].values()), r["rate_one"]


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_modules_equal_their_dense_heads(spawned, world) -> None:
    ranks = spawned(world)
    x, y, split = module_batch(world)
    for name, dense in dense_heads().items():
        shards = [r["modules"][(name, "state")] for r in ranks]
        merged = mll.nn.dense_state_dict(shards)
        for key, value in dense.state_dict().items():
            assert torch.equal(merged[key], value), key
        for training in (True, False):
            dense.train(training)
            xg = x.clone().requires_grad_(True)
            loss = dense.loss(xg, y)
            params = [p for p in dense.parameters() if p.requires_grad]
            grads = torch.autograd.grad(loss, [xg, *params])
            k = dense.num_sub_centers
            for rank, r in enumerate(ranks):
                got = r["modules"][(name, training)]
                start, stop = MF.shard_bounds(9, world)[rank]
                torch.testing.assert_close(got["loss"], loss, **TOL)
                torch.testing.assert_close(got["grads"][0], grads[0][rows_of(split, rank)], **TOL)
                torch.testing.assert_close(got["grads"][1], grads[1][start * k : stop * k], **TOL)
                if len(grads) > 2:  # a trainable scale: the same full gradient on every rank
                    torch.testing.assert_close(got["grads"][2], grads[2], **TOL)
                assert f"class_range=[{start}, {stop})" in got["repr"]


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_ddp_backbone_gets_the_single_process_gradient(spawned, world) -> None:
    ranks = spawned(world)
    x, y, _ = module_batch(world)
    backbone, dense = ddp_models()
    loss = dense.loss(backbone(x), y)
    loss.backward()
    for rank, r in enumerate(ranks):
        got = r["ddp"]
        torch.testing.assert_close(got["loss"], loss.detach(), **TOL)
        for mine, want in zip(got["backbone"], backbone.parameters()):
            torch.testing.assert_close(mine, want.grad, **TOL)
        start, stop = MF.shard_bounds(9, world)[rank]
        torch.testing.assert_close(got["head"], dense.weight.grad[start:stop], **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_bad_input_on_one_rank_raises_on_every_rank(spawned, world) -> None:
    ranks = spawned(world)
    for r in ranks:
        errors = r["errors"]
        # every rank raises the same error, which quotes the faulty rank's own message
        assert errors["bad-label"] == (
            "ValueError: invalid input on rank 1: target must hold class indices in [0, 7), but got values from 0 "
            "to 9 (every rank of the group raises this error)"
        )
        wanted = {
            "margin": r"ValueError: invalid input on rank 1: ArcFace margin must be in \[0, 1.571\), but got -0.1",
            "scale": r"ValueError: invalid input on rank 1: scale must be positive and finite, but got -1.0",
            "reduction": r"ValueError: invalid input on rank 1: reduction must be 'mean', 'sum' or 'none'",
            "chunk_size": r"ValueError: invalid input on rank 1: chunk_size must be None or an integer >= 1",
            "sample_rate": r"ValueError: invalid input on rank 1: sample_rate must be a float in \(0, 1\]",
            "margin_type": r"ValueError: invalid input on rank 1: margin_type must be one of",
            "pooling": r"ValueError: invalid input on rank 1: pooling must be 'max' or 'soft', but got 'min'",
            "feature_grad_scale": r"ValueError: invalid input on rank 1: feature_grad_scale must be None or a finite",
            "dtype": r"ValueError: dtype must be the same on every rank, but got \['torch.float64', 'torch.float32'",
            "soft-target": r"ValueError: invalid input on rank 1: soft target must be non-negative and finite",
            "double-backward": r"RuntimeError: the sharded loss gives first derivatives only.*rank\(s\) \[1\]",
            "in-eval-mode": r"ValueError: training must be the same on every rank, but got \[1, 0",
        }
        for arg, pattern in wanted.items():
            key = f"one-bad-{arg}" if f"one-bad-{arg}" in errors else f"one-{arg}"
            assert re.match(pattern, errors[key]), (arg, errors[key])
        assert (
            "the margin's float parameters must be the same on every rank, but got [[0.5], [0.4]"
            in errors["margins-differ"]
        )
        assert "must tile [0, 7) without gaps or overlaps" in errors["blocks-overlap"]
        assert errors["head-margins-differ"].startswith(
            "ValueError: ShardedArcFace margin (the default scale follows it) must be the same on every rank, but got "
            f"{[0.5, 0.3, 0.5][:world]} (by rank)"
        ), errors["head-margins-differ"]
        assert errors["head-per-class-margins-differ"].startswith(
            "ValueError: ShardedArcFace's default scale (it follows the margin arguments) must be the same on every "
            "rank, but got ["
        ), errors["head-per-class-margins-differ"]
        assert errors["head-scales-differ"].startswith(
            f"ValueError: ShardedCosFace scale must be the same on every rank, but got {[20.0, 30.0, 20.0][:world]}"
        ), errors["head-scales-differ"]
        assert errors["after"] == ranks[0]["errors"]["after"] != "no error"
    # and the call after the errors is the single-process loss
    x, w, y = error_case_data(world)
    y[3 * 1 + 2] = 6  # rank 1's clamped label
    want = MF.margin_cross_entropy(x, w, y, scale=SCALE, margin=MF.ARC(0.5))
    assert float(ranks[0]["errors"]["after"]) == pytest.approx(float(want), rel=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", FAMILIES)
def test_every_kind_of_margin_parameter_is_sharded_exactly(spawned, world, name) -> None:
    ranks = spawned(world)
    case = FAMILY_CASE
    data = make_data(case, world)
    x = data["x"].clone().requires_grad_(True)
    w = data["w"].clone().requires_grad_(True)
    margin = family_margin(name, x, 0, case.classes)
    cos = MF.cosine_logits(x, w, case.k, pooling=POOLINGS[name])
    dense = F.cross_entropy(MF.margin_logits(cos, data["y"], margin, scale=SCALE), data["y"])
    grads = torch.autograd.grad(dense, [x, w])
    for rank, result in enumerate(r["families"][name] for r in ranks):
        rows = rows_of(data["split"], rank)
        start, stop = ranges_of(case, world)[rank]
        torch.testing.assert_close(result["loss"], dense, **TOL)
        torch.testing.assert_close(result["grads"][0], grads[0][rows], **TOL)
        torch.testing.assert_close(result["grads"][1], grads[1][start * case.k : stop * case.k], **TOL)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", sharded_heads.HEAD_CASES, ids=[case.name for case in sharded_heads.HEAD_CASES])
def test_every_head_shards_exactly(spawned, world, case) -> None:
    """Two training steps and an eval step of every head's sharded form equal its dense head's on the global batch:
    losses, gradients, and the state after each step (running statistics included) via dense_state_dict."""
    ranks = [r["heads"][case.name] for r in spawned(world)]
    k = getattr(sharded_heads.dense_head(case), "num_sub_centers", 1)
    for step, want in enumerate(sharded_heads.reference(case, world)):
        for rank, got in enumerate(ranks):
            mine = got["steps"][step]
            part = sharded_heads.rows(want["split"], rank)
            start, stop = got["range"]
            expected = want["loss"][part] if case.reduction == "none" else want["loss"]
            torch.testing.assert_close(mine["loss"], expected, **TOL)
            torch.testing.assert_close(mine["grads"][0], want["grads"][0][part], **TOL)
            for g_mine, g_want in zip(mine["grads"][1:], want["grads"][1:]):
                if g_want.dim() == 2:  # a block of the weights
                    g_want = g_want[start * k : stop * k]
                torch.testing.assert_close(g_mine, g_want, **TOL)
            assert len(mine["grads"]) == len(want["grads"])
        merged = mll.nn.dense_state_dict([got["steps"][step]["state"] for got in ranks])
        assert merged.keys() == want["state"].keys()
        for key, value in want["state"].items():
            where = f"{key} at step {step}"
            torch.testing.assert_close(merged[key], value, **TOL, msg=lambda m, where=where: f"{where}: {m}")
    for got in ranks:
        assert f"class_range=[{got['range'][0]}, {got['range'][1]})" in got["repr"]


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_sharded_elastic_face_draws_stay_in_step_with_class_sampling(spawned, world) -> None:
    """Each rank samples its own block's classes (sample_rate < 1), yet the margins' generator is in the same state on
    every rank after every step, and each step's margins are the rows of one draw over the global batch."""
    got = [r["elastic_sampling"] for r in spawned(world)]
    for step in range(sharded_heads.STEPS):
        assert all(torch.equal(r["states"][step], got[0]["states"][step]) for r in got)
        assert all(torch.equal(r["before"][step], got[0]["before"][step]) for r in got)
        g = torch.Generator().set_state(got[0]["before"][step])
        data = sharded_heads.batch(sharded_heads.HEAD_CASES[0], world, step)
        dense = mll.ElasticArcFace(sharded_heads.D, 4 * sharded_heads.C, dtype=torch.float64, generator=g)
        want = dense.sample_margins(data["x"], data["hard"] * 3)
        torch.testing.assert_close(torch.cat([r["margins"][step] for r in got]), want, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("name", sharded_heads.STATEFUL)
def test_sharded_heads_survive_a_bad_rank(spawned, world, name) -> None:
    """A bad label on rank 1 raises the same error on every rank and changes no state; non-finite rows on two ranks
    leave the state equal to the dense head's on the finite rows only."""
    got = [r["head_faults"][name] for r in spawned(world)]
    for r in got:
        assert r["error"] is not None and "rank 1" in r["error"] and f"[0, {sharded_heads.C})" in r["error"], r
        assert r["unchanged"]
        assert "reduction must be the same on every rank, but got ['mean', 'sum'" in r["mismatches"]["reduction"]
        assert "training must be the same on every rank, but got [1, 0" in r["mismatches"]["training"]
        assert "requires_grad" in r["mismatches"]["grad"], r["mismatches"]
    assert all(r["error"] == got[0]["error"] for r in got)
    x, y = sharded_heads.fault_batch(world)
    dense = sharded_heads.fault_head(name)
    finite = torch.isfinite(x).all(-1)
    twin = sharded_heads.fault_head(name)
    twin.loss(x[finite], y[finite])  # the state the finite rows alone give
    dense.loss(x, y)
    merged = mll.nn.dense_state_dict([r["state"] for r in got])
    for key, value in twin.state_dict().items():
        torch.testing.assert_close(merged[key], value, **TOL)
        torch.testing.assert_close(dense.state_dict()[key], value, **TOL)  # the dense head leaves them out too
