"""Every head's sharded form against its dense head, on the global batch: the worker side and the reference.

Each case builds a dense head (same seed on every rank and in the test), cuts each rank's block with ``from_dense``,
and runs two training steps (running statistics must evolve as the dense head's do on the global batch) and one
eval step on the rank's rows; the test runs the dense head on all rows and compares the losses, every rank's
feature gradient, every block's weight gradient, the trainable scale's gradient and — through
``dense_state_dict`` — the state after each step. Float64; ElasticFace's draws come from a generator in the same
state on every rank and in the reference: the sharded head draws over the global batch and keeps its rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import nn

import mll
from mll import functional as MF

D, C = 5, 9
SPLITS = {"uneven": {2: (4, 3), 3: (4, 3, 2)}, "empty-rank": {2: (0, 5), 3: (4, 0, 3)}}
STEPS = 3
#: the chunked loss's path per training step: every exact path of the sharded loss once
PATHS = (("row_tiles", 2), ("keep", None), ("recompute", None))


def _per_class(low: float, high: float) -> torch.Tensor:
    return torch.linspace(low, high, C, dtype=torch.float64)


@dataclasses.dataclass(frozen=True)
class HeadCase:
    name: str
    head: str
    build: Callable[[], nn.Module]
    target: str = "hard"  # "hard", "soft" (N, C) or "pair" ((N, 2), (N, 2))
    split: str = "uneven"
    reduction: str = "mean"
    feature_norm: float = 1.0  # MagFace reads the magnitudes: give it features of norm in its range


def _f64(cls: Any, *args: Any, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: cls(D, C, *args, dtype=torch.float64, **kwargs)


# one configuration per line, each run with every kind of target its sharded form takes (splits and reductions
# alternate): K sub-centers, soft pooling, per-class margins and trainable scales spread over the heads
CONFIGS = [
    ("normalized-soft-pooling", "NormalizedLinear", _f64(mll.NormalizedLinear, 2, pooling="soft"), 1.0),
    ("scaled-trainable", "ScaledNormalizedLinear", _f64(mll.ScaledNormalizedLinear, 3, trainable_scale=True), 1.0),
    ("sqrt", "ScaledNormalizedLinearSqrt", _f64(mll.ScaledNormalizedLinearSqrt, 2), 1.0),
    ("fixed-adacos", "FixedAdaCos", _f64(mll.FixedAdaCos, 1), 1.0),
    ("cosface-per-class", "CosFace", _f64(mll.CosFace, 1, 6.0, True, _per_class(0.1, 0.5)), 1.0),
    ("cosface-sub-centers", "CosFace", _f64(mll.CosFace, 2, 6.0, margin=0.3), 1.0),
    (
        "arcface-per-class-soft-pooling",
        "ArcFace",
        _f64(mll.ArcFace, 3, margin=_per_class(0.2, 0.6), pooling="soft"),
        1.0,
    ),
    ("arcface-easy", "ArcFace", _f64(mll.ArcFace, 1, margin=0.4, easy_margin=True), 1.0),
    ("combined-per-class", "CombinedMargin", _f64(mll.CombinedMargin, 2, m1=_per_class(1.0, 1.4)), 1.0),
    ("sphereface", "SphereFace", _f64(mll.SphereFace, 2, 5.0, lambda_=2.0), 1.0),
    ("elastic-arc-per-class", "ElasticArcFace", _f64(mll.ElasticArcFace, margin=_per_class(0.3, 0.6)), 1.0),
    ("elastic-cos", "ElasticCosFace", _f64(mll.ElasticCosFace, 2, std=0.1, pooling="soft"), 1.0),
    ("adaface", "AdaFace", _f64(mll.AdaFace, 1, 8.0, margin=_per_class(0.2, 0.5)), 20.0),
    ("adaface-sub-centers", "AdaFace", _f64(mll.AdaFace, 2, trainable_scale=True), 20.0),
    ("magface", "MagFace", _f64(mll.MagFace, 1, 16.0, margin_low=_per_class(0.3, 0.5)), 40.0),
    ("magface-easy", "MagFace", _f64(mll.MagFace, 2, easy_margin=True, trainable_scale=True), 60.0),
    ("curricular", "CurricularFace", _f64(mll.CurricularFace, 2, margin=_per_class(0.3, 0.5), decay=0.5), 1.0),
    ("curricular-soft-pooling", "CurricularFace", _f64(mll.CurricularFace, 3, decay=0.7, pooling="soft"), 1.0),
    ("mv-am-per-class", "MVSoftmax", _f64(mll.MVSoftmax, 2, 6.0, margin=_per_class(0.2, 0.4), t=0.3), 1.0),
    ("mv-arc-fixed", "MVSoftmax", _f64(mll.MVSoftmax, margin_type="arc", adaptive=False, pooling="soft"), 1.0),
    ("npcface-per-class", "NPCFace", _f64(mll.NPCFace, 2, 6.0, margin=_per_class(0.3, 0.6)), 1.0),
    ("npcface-soft-pooling", "NPCFace", _f64(mll.NPCFace, 3, m0=0.5, m1=0.3, pooling="soft"), 1.0),
    ("arcneg-per-class", "ArcNegFace", _f64(mll.ArcNegFace, 2, 6.0, margin=_per_class(0.3, 0.6)), 1.0),
    ("arcneg-soft-pooling", "ArcNegFace", _f64(mll.ArcNegFace, 3, alpha=1.5, sigma=0.5, pooling="soft"), 1.0),
    ("circle-per-class", "CircleLoss", _f64(mll.CircleLoss, 2, 8.0, margin=_per_class(0.1, 0.4)), 1.0),
    ("circle-exact-trainable", "CircleLoss", _f64(mll.CircleLoss, 3, 8.0, True, detach_weights=False), 1.0),
    ("adacos", "AdaCos", _f64(mll.AdaCos, 2, pooling="soft"), 1.0),
    ("adacos-plain", "AdaCos", _f64(mll.AdaCos), 1.0),
    ("deepncm", "DeepNCM", _f64(mll.DeepNCM, 0.5), 1.0),
    ("deepncm-slow", "DeepNCM", _f64(mll.DeepNCM, 0.8), 1.0),
    ("proxy-nca-pp-soft-pooling", "ProxyNCAPlusPlus", _f64(mll.ProxyNCAPlusPlus, 2, 0.2, pooling="soft"), 1.0),
    ("proxy-anchor", "ProxyAnchor", _f64(mll.ProxyAnchor, 1, 16.0, 0.2), 1.0),
    ("proxy-anchor-soft-pooling", "ProxyAnchor", _f64(mll.ProxyAnchor, 2, pooling="soft"), 1.0),
    ("adam-per-class", "AdaMSoftmax", _f64(mll.AdaMSoftmax, 1, 6.0, margin=_per_class(0.1, 0.5), lambda_=2.0), 1.0),
    ("adam-soft-pooling", "AdaMSoftmax", _f64(mll.AdaMSoftmax, 2, trainable_scale=True, pooling="soft"), 1.0),
    ("soft-triple", "SoftTriple", _f64(mll.SoftTriple, 3, 6.0, margin=_per_class(0.0, 0.1), tau=0.5), 1.0),
    ("soft-triple-max-pooling", "SoftTriple", _f64(mll.SoftTriple, 2, trainable_scale=True, pooling="max"), 1.0),
    ("l-softmax-per-class", "LargeMarginSoftmax", _f64(mll.LargeMarginSoftmax, margin=_per_class(1.0, 4.0)), 2.0),
    ("l-softmax-annealed", "LargeMarginSoftmax", _f64(mll.LargeMarginSoftmax, 1, 2.0, True, lambda_=3.0), 1.0),
]
#: what each sharded form takes besides class indices
TARGETS = {
    "CurricularFace": (),
    "ElasticArcFace": (),
    "ProxyAnchor": (),
    "MVSoftmax": (),
    "NPCFace": (),
    "ArcNegFace": (),
    "CircleLoss": (),
}
#: heads whose loss is one number per batch (no per-sample losses to sum or return)
MEAN_ONLY = {"ProxyAnchor"}
SPLIT_CYCLE = ("uneven", "empty-rank")
REDUCTION_CYCLE = ("mean", "sum", "mean", "none")


def _cases() -> list[HeadCase]:
    cases = []
    for name, head, build, norm in CONFIGS:
        for target in ("hard", *TARGETS.get(head, ("soft", "pair"))):
            i = len(cases)
            split, reduction = SPLIT_CYCLE[i % 2], REDUCTION_CYCLE[(i // 2) % 4]
            reduction = "mean" if head in MEAN_ONLY else reduction
            cases.append(HeadCase(f"{name}-{target}", head, build, target, split, reduction, norm))
    return cases


HEAD_CASES = _cases()


def dense_head(case: HeadCase) -> nn.Module:
    torch.manual_seed(11)
    head = case.build()
    if isinstance(head, mll.DeepNCM):  # start from non-zero means, so that the first step's loss means something
        with torch.no_grad():
            head.means.copy_(torch.randn(C, D, dtype=torch.float64))
    return head


def batch(case: HeadCase, world: int, step: int) -> dict[str, Any]:
    """The global batch of one step: features, targets (dense form for the reference, the case's form per rank)."""
    split = SPLITS[case.split][world]
    g = torch.Generator().manual_seed(1000 * step + 17)
    n = sum(split)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    x = x / x.norm(dim=-1, keepdim=True) * case.feature_norm * (1 + 0.5 * torch.rand(n, 1, generator=g, dtype=x.dtype))
    hard = torch.randint(0, C, (n,), generator=g)
    second = (hard + 1 + torch.randint(0, C - 1, (n,), generator=g)) % C
    share = 0.6 + 0.3 * torch.rand(n, generator=g, dtype=torch.float64)
    soft = torch.zeros(n, C, dtype=torch.float64)
    soft[torch.arange(n), hard] = share
    soft[torch.arange(n), second] += 1 - share
    pair = (torch.stack([hard, second], 1), torch.stack([share, 1 - share], 1))
    return {"x": x, "split": split, "hard": hard, "soft": soft, "pair": pair}


def rows(split: tuple[int, ...], rank: int) -> slice:
    start = sum(split[:rank])
    return slice(start, start + split[rank])


def target_of(case: HeadCase, data: dict[str, Any], part: slice) -> Any:
    if case.target == "pair":
        return data["pair"][0][part], data["pair"][1][part]
    return data[case.target][part]


def dense_target(case: HeadCase, data: dict[str, Any]) -> Any:
    return data["hard"] if case.target == "hard" else data["soft"]


def elastic_generator() -> torch.Generator:
    """ElasticFace's generator: seeded alike on every rank and in the reference."""
    return torch.Generator().manual_seed(100)


def trainable(head: nn.Module) -> list[torch.Tensor]:
    return [p for p in head.parameters() if p.requires_grad]


def run_heads(rank: int, world: int) -> dict[str, Any]:
    """Worker side: every case's per-step losses, gradients and state on this rank."""
    out: dict[str, Any] = {}
    for case in HEAD_CASES:
        dense = dense_head(case)
        extra = {"generator": elastic_generator()} if "Elastic" in case.head else {}
        shard = getattr(mll, "Sharded" + case.head).from_dense(dense, feature_grad_scale=1.0, **extra)
        steps = []
        for step in range(STEPS + 1):
            shard.train(step < STEPS)
            data = batch(case, world, step)
            part = rows(data["split"], rank)
            x = data["x"][part].clone().requires_grad_(True)
            # the row tiles (two rows each: collectives per tile, and a ragged last tile), the kept logits and the
            # recomputed ones, a step each (eval: the cost model)
            path, tile = PATHS[step] if step < STEPS else ("auto", None)
            with MF.set_loss_path(path, rows=tile):
                loss = shard.loss(x, target_of(case, data, part), reduction=case.reduction)
                objective = loss.sum() if case.reduction == "none" else loss
                grads = torch.autograd.grad(objective, [x, *trainable(shard)])
            steps.append(
                {"loss": loss.detach(), "grads": grads, "state": {k: v.clone() for k, v in shard.state_dict().items()}}
            )
        out[case.name] = {"steps": steps, "range": (shard.class_start, shard.class_stop), "repr": repr(shard)}
    return out


def reference(case: HeadCase, world: int) -> list[dict[str, Any]]:
    """The dense head on the global batch, step by step (ElasticFace's margins from the ranks' generator state)."""
    dense = dense_head(case)
    if "Elastic" in case.head:
        dense.generator = elastic_generator()
    steps = []
    for step in range(STEPS + 1):
        dense.train(step < STEPS)
        data = batch(case, world, step)
        x = data["x"].clone().requires_grad_(True)
        loss = dense.loss(x, dense_target(case, data), reduction=case.reduction)
        if case.head == "ProxyAnchor":  # the dense loss itself, from the N×C cosines
            loss = mll.functional.proxy_anchor_loss(dense.cosine(x), data["hard"], alpha=dense.alpha, delta=dense.delta)
        objective = loss.sum() if case.reduction == "none" else loss
        grads = torch.autograd.grad(objective, [x, *trainable(dense)])
        state = {k: v.clone() for k, v in dense.state_dict().items()}
        steps.append({"loss": loss.detach(), "grads": grads, "state": state, "split": data["split"]})
    return steps


def run_elastic_sampling(rank: int, world: int) -> dict[str, Any]:
    """ElasticFace with class sampling: two training steps; the margins' generator before and after each (it must stay
    in the same state on every rank although each rank samples its own block) and the margins of this rank's rows
    drawn from the state before the step."""
    torch.manual_seed(11)
    dense = mll.ElasticArcFace(D, 4 * C, dtype=torch.float64)
    shard = mll.ShardedElasticArcFace.from_dense(dense, generator=elastic_generator(), sample_rate=0.3)
    before, states, margins = [], [], []
    for step in range(STEPS):
        data = batch(HEAD_CASES[0], world, step)
        part = rows(data["split"], rank)
        x, y = data["x"][part], data["hard"][part] * 3  # classes all over the 4·C
        before.append(shard.generator.get_state())
        margins.append(shard.sample_margins(x, y))
        shard.loss(x, y)
        states.append(shard.generator.get_state())
    return {"before": before, "states": states, "margins": margins}


# ---------------------------------------------------------------------------------------------- faults

STATEFUL = ["AdaCos", "CurricularFace", "AdaFace", "DeepNCM", "MagFace", "ArcFace"]


def fault_head(name: str) -> nn.Module:
    torch.manual_seed(13)
    head = getattr(mll, name)(D, C, dtype=torch.float64)
    if isinstance(head, mll.DeepNCM):
        with torch.no_grad():
            head.means.copy_(torch.randn(C, D, dtype=torch.float64))
    return head


def fault_batch(world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three rows per rank; rank 0's first row is NaN, rank 1's second +inf."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3 * world, D, generator=g, dtype=torch.float64) * 30
    x[0, 1], x[4, 0] = torch.nan, torch.inf
    return x, torch.randint(0, C, (3 * world,), generator=g)


def run_faults(rank: int, world: int) -> dict[str, Any]:
    """Per stateful head: a bad label on rank 1 only (every rank must raise, no state change), then a step with
    non-finite rows (the state must be the dense head's on the finite rows)."""
    out: dict[str, Any] = {}
    x, y = fault_batch(world)
    part = slice(3 * rank, 3 * rank + 3)
    for name in STATEFUL:
        shard = getattr(mll, "Sharded" + name).from_dense(fault_head(name), feature_grad_scale=1.0)
        before = {k: v.clone() for k, v in shard.state_dict().items()}
        bad = y[part].clone()
        if rank == 1:
            bad[0] = C  # out of range
        try:
            shard.loss(x[part], bad)
            error = None
        except ValueError as e:
            error = str(e)
        unchanged = all(torch.equal(v, shard.state_dict()[k]) for k, v in before.items())
        # disagreements only the loss's own agreement used to see, after the statistics had moved: a reduction,
        # a mode (train on rank 1, eval on the others: a collective the others skip), grad mode
        mismatches = {}
        for what in ("reduction", "training", "grad"):
            kwargs = {"reduction": "sum" if rank == 1 and what == "reduction" else "mean"}
            shard.train(not (rank == 1 and what == "training"))
            try:
                with torch.set_grad_enabled(not (rank == 1 and what == "grad")):
                    xr = x[part].clone().requires_grad_()
                    shard.loss(xr, y[part], **kwargs)
                mismatches[what] = None
            except ValueError as e:
                mismatches[what] = str(e)
        shard.train()
        unchanged = unchanged and all(torch.equal(v, shard.state_dict()[k]) for k, v in before.items())
        loss = shard.loss(x[part], y[part])
        state = {k: v.clone() for k, v in shard.state_dict().items()}
        out[name] = {
            "error": error,
            "unchanged": unchanged,
            "state": state,
            "loss": loss.detach(),
            "mismatches": mismatches,
        }
    return out
