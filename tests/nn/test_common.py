"""Cross-rank statistics: AdaCos, DeepNCM, CurricularFace and AdaFace under torch.distributed (gloo, CPU) equal one
process."""

import pytest
import torch

import mll

WORLD = 2
SPLIT = (5, 3)  # uneven per-rank batches
D, C = 6, 7


def global_batch():
    g = torch.Generator().manual_seed(11)
    x = torch.randn(sum(SPLIT), D, generator=g)
    y = torch.randint(0, C, (sum(SPLIT),), generator=g)
    soft = torch.softmax(torch.randn(sum(SPLIT), C, generator=g), -1)
    return x, y, soft


def heads():
    torch.manual_seed(3)
    return mll.AdaCos(D, C), mll.DeepNCM(D, C, alpha=0.7), mll.CurricularFace(D, C, decay=0.5), mll.AdaFace(D, C)


def run_steps(adacos, ncm, curricular, ada, x, y, soft):
    """Two steps each (hard then soft labels; CurricularFace takes class indices only); returns the state after
    each step."""
    out = []
    for target in (y, soft):
        adacos(x, target)
        ncm(x, target)
        curricular(x, y)
        ada(x, target)
        ada_state = _module(ada)
        out.append(
            (
                _module(adacos).scale.clone(),
                _module(ncm).means.clone(),
                _module(curricular).t.clone(),
                torch.stack([ada_state.norm_mean, ada_state.norm_std]),
            )
        )
    return out


def _module(head):
    return getattr(head, "_orig_mod", head)


VARIANTS = {"eager-uneven": (SPLIT, False), "compiled-even": ((4, 4), True)}  # compiled: equal per-rank batches


def run_statistics(rank: int, world: int) -> dict:
    """Worker side (world 2, in the shared spawn of tests/distributed/test_sharded.py): each variant's states."""
    out = {}
    for name, (split, compiled) in VARIANTS.items():
        x, y, soft = global_batch()
        lo = sum(split[:rank])
        part = slice(lo, lo + split[rank])
        modules = heads()
        if compiled:  # the statistics must be shared under torch.compile too
            modules = tuple(torch.compile(m, fullgraph=True, backend="aot_eager") for m in modules)
        second = y if compiled else soft  # compiled: class indices twice (a soft step would compile every head again)
        out[name] = run_steps(*modules, x[part], y[part], second[part])
    return out


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_statistics_are_gathered_across_ranks(spawned, variant) -> None:
    split, compiled = VARIANTS[variant]
    x, y, soft = global_batch()
    expected = run_steps(*heads(), x, y, y if compiled else soft)
    for result in spawned(WORLD):
        got = result["common_statistics"][variant]
        for step, want_step in zip(got, expected):
            for state, want in zip(step, want_step):
                torch.testing.assert_close(state, want, rtol=1e-6, atol=1e-6)
    local = run_steps(*heads(), *(t[: split[0]] for t in global_batch()))
    for i in range(4):  # the test must tell local from global statistics, for every head
        assert not torch.allclose(local[0][i], expected[0][i]), i


# ------------------------------------------------------------------------ one faulty rank: every rank raises, fast


def run_faulty(rank: int, world: int) -> dict:
    """Worker side (in the shared spawn of tests/distributed/test_sharded.py)."""
    out: dict = {}
    x, y, _ = global_batch()
    x, y = x[:4], y[:4]
    for name, head in zip(("AdaCos", "DeepNCM", "CurricularFace", "AdaFace"), heads()):
        bad = y.clone()
        if rank == 1:
            bad[0] = C  # one label out of range, on one rank
        for call in ("forward", "loss"):
            run = head if call == "forward" else head.loss
            try:
                run(x, bad)
                out[(name, call)] = "no error"
            except ValueError as error:
                out[(name, call)] = str(error)
        run = head.loss
        out[(name, "after")] = float(run(x, y))  # the group still works
    # a NaN feature on rank 0 only: every rank leaves that row out, and all hold the same state
    for name, head in zip(("AdaCos", "DeepNCM", "CurricularFace", "AdaFace"), heads()):
        poisoned = x.clone()
        if rank == 0:
            poisoned[1, 0] = float("nan")
        head(poisoned, y)
        out[(name, "state after NaN")] = {k: v.clone() for k, v in head.state_dict().items() if k != "weight"}
    wide = mll.DeepNCM(D, C + rank)  # a different number of classes per rank
    try:
        wide(x, y)
        out["sizes"] = "no error"
    except ValueError as error:
        out["sizes"] = str(error)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_a_bad_label_on_one_rank_raises_on_every_rank(spawned, world) -> None:
    got = [r["common_faults"] for r in spawned(world)]  # a rank left hanging fails the spawn, never stalls CI
    for name in ("AdaCos", "DeepNCM", "CurricularFace", "AdaFace"):
        for call in ("forward", "loss"):
            messages = {g[(name, call)] for g in got}
            assert len(messages) == 1, messages  # the same error on every rank
            (message,) = messages
            assert message.startswith("invalid input on rank 1: labels must hold class indices in [0, 7)"), message
        assert len({g[(name, "after")] for g in got}) == 1
    # the call after the errors is the single-process loss of the global batch (every rank held the same 4 samples)
    x, y, _ = global_batch()
    for name, head in zip(("AdaCos", "DeepNCM", "CurricularFace", "AdaFace"), heads()):
        want = float(head.loss(x[:4].repeat(world, 1), y[:4].repeat(world)).detach())
        assert got[0][(name, "after")] == pytest.approx(want, rel=1e-6), name
    for name, head in zip(("AdaCos", "DeepNCM", "CurricularFace", "AdaFace"), heads()):
        clean = torch.cat([x[:4]] * world)  # the global batch without rank 0's poisoned row
        keep = torch.ones(len(clean), dtype=torch.bool)
        keep[1] = False
        head(clean[keep], y[:4].repeat(world)[keep])
        for key, want in head.state_dict().items():
            if key == "weight":
                continue
            for g in got:
                assert torch.isfinite(g[(name, "state after NaN")][key]).all(), (name, key)
                torch.testing.assert_close(g[(name, "state after NaN")][key], want, rtol=1e-5, atol=1e-6)
    sizes = [C + rank for rank in range(world)]
    assert {g["sizes"] for g in got} == {f"out_features must be the same on every rank, but got {sizes} (by rank)"}
