"""Resume anywhere: a model trained two steps on two gloo ranks (a DDP backbone and a sharded head under one
optimizer), checkpointed per rank, resumed on 1, 2 and 3 ranks with ``mll.nn.load_resharded``: its next two steps
are the uninterrupted run's (float64, 1e-10; bit for bit on the same two ranks), with and without class sampling,
SGD with momentum and Adam, the weights, per-class buffers (DeepNCM's means), a trained scale and ElasticFace's
generator. One process tests the refusals (``tests/nn/test_resharding_errors.py``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import run_world
from tests.nn import resharding_world as R

pytestmark = pytest.mark.slow  # multi-process
TOL = {"rtol": 1e-10, "atol": 1e-10}
_RUNS: dict[str, list[dict[str, Any]]] = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    """Every spawn, once: the first runs (world 2, and world 1 for the 1 → 3 direction), then the resumes."""
    if not _RUNS:
        root = tmp_path_factory.mktemp("resharding")
        for name, world in (("first-w2", 2), ("first-w1", 1), ("resume-w1", 1), ("resume-w2", 2), ("resume-w3", 3)):
            (root / name).mkdir()
            _RUNS[name] = run_world(R.worker, world, Path(root / name))
    return _RUNS


def assembled(ranks: list[dict[str, Any]], job: str, step: int) -> dict[str, Any]:
    """One step of one job, every rank's block of rows put back in class order."""
    steps = [r[job][step] for r in ranks]
    order = sorted(range(len(steps)), key=lambda i: steps[i]["block"])
    return {"loss": [s["loss"] for s in steps], "rows": torch.cat([steps[i]["rows"] for i in order]),
            "backbone": steps[0]["backbone"], "scale": steps[0]["scale"]}  # fmt: skip


def differences(got: dict[str, Any], want: dict[str, Any]) -> float:
    """The largest absolute difference over the losses (every rank's), the head's rows, the scale and the backbone."""
    pairs = [(g, want["loss"][0]) for g in got["loss"]] + [(got["rows"], want["rows"]), (got["scale"], want["scale"])]
    pairs += list(zip(got["backbone"], want["backbone"]))
    return max(float((a - b).abs().max()) for a, b in pairs)


def check(got_ranks: list[dict[str, Any]], job: str, want_ranks: list[dict[str, Any]], want_job: str,
          bitwise: bool = False) -> float:  # fmt: skip
    worst = 0.0
    for step in range(R.SAVED_AFTER, R.STEPS):
        got = assembled(got_ranks, job, step - R.SAVED_AFTER)
        want = assembled(want_ranks, want_job, step)
        for key in ("rows", "scale"):
            assert got[key].shape == want[key].shape, key
        worst = max(worst, differences(got, want))
        if bitwise:
            assert worst == 0.0, (job, step, worst)
    assert worst <= 1e-10, (job, worst)
    return worst


RESUMABLE = [case.name for case in R.CASES if case.name != "arcface-sgd-block-sampling"]


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("name", RESUMABLE)
def test_a_resume_on_any_world_size_continues_the_uninterrupted_run(runs, world: int, name: str) -> None:
    check(runs[f"resume-w{world}"], name, runs["first-w2"], name, bitwise=world == 2)


def test_a_single_process_head_resumes_from_every_ranks_file(runs) -> None:
    check(runs["resume-w1"], "dense", runs["first-w2"], "arcface-adam")


def test_a_run_of_one_process_resumes_on_three(runs) -> None:
    check(runs["resume-w3"], "from-1", runs["first-w1"], "arcface-sgd-sampled")


def test_block_sampling_resumes_bit_for_bit_on_the_same_ranks_and_anew_on_others(runs) -> None:
    name = "arcface-sgd-block-sampling"
    check(runs["resume-w2"], name, runs["first-w2"], name, bitwise=True)
    for world in (1, 3):  # its sample depends on the blocks: another draw, another step
        got, want = assembled(runs[f"resume-w{world}"], name, 0), assembled(runs["first-w2"], name, R.SAVED_AFTER)
        assert all(torch.isfinite(loss) for loss in got["loss"])
        assert differences(got, want) > 1e-6


def test_the_sampled_runs_did_sample(runs) -> None:
    """(Else the sampled cases would test nothing the others do not.) A step's kept classes: fewer than C."""
    first = assembled(runs["first-w2"], "arcface-sgd-sampled", 0)
    plain = assembled(runs["first-w2"], "arcface-sgd", 0)
    assert not torch.allclose(first["loss"][0], plain["loss"][0])


@pytest.mark.parametrize("world", [2, 3])
def test_a_rank_resumed_from_another_step_is_refused_on_every_rank(runs, world: int) -> None:
    messages = [r["stale"] for r in runs[f"resume-w{world}"]]
    assert all(m == messages[0] for m in messages)
    assert "ShardedArcFace's class-sampling step (load every rank's checkpoint of one step) must be the same on " \
        "every rank, but got [2, 1" in messages[0]  # fmt: skip
