"""The benchmarks' smoke runs: each must run and print its tables. Timings are printed, never asserted.

Every entry point's main() runs in this process, its output captured: what the process environment would change
(glibc's MALLOC_* settings, read at start-up) is what the benchmarks' own children are for, and those start as in
a real run — one per --allocator setting, per chunked probe, per sharded rank — from the repository root.
"""

import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from benchmarks import cases, chunked, gpu, metrics, run, scale, sharded
from benchmarks.cases import SUITES, Config, make_data

pytestmark = pytest.mark.slow  # runs the benchmark harness

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def in_process(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """For a benchmark's main() in this process: the repository root as working directory (its children run
    ``python -m benchmarks.…``), no os.execve (it would replace the test process), torch's thread count as it was
    afterwards (a quick run sets one thread)."""

    def execve(*args: object) -> None:
        raise AssertionError(f"the benchmark would replace the test process: os.execve{args[:2]}")

    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(os, "execve", execve)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_memory_probe_measures_a_step() -> None:
    # in a fresh process, as the benchmarks measure: in this one, earlier tests leave freed blocks of the step's
    # size resident in the heap, which the step would reuse unseen
    cfg = Config(batch=64, features=32, classes=20_000)
    index = next(i for i, case in enumerate(SUITES["int labels"]) if case.head == "ArcFace" and case.impl == "mll")
    peak = run.measure_memory("int labels", index, cfg)
    assert peak is not None
    assert peak >= 64 * 20_000 * 4 / 2**20  # at least the N×C float32 logits (4.9 MB) must show


@pytest.mark.slow
# numpy 2's, raised inside pytorch-metric-learning's SphereFaceLoss (scipy.special.binom): a peer's, not ours
@pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")
def test_quick_run_prints_a_table_per_suite(
    in_process: None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # the default allocator, without MALLOC_* variables, is this process's own: main() runs here, not re-executed
    for name in [name for name in os.environ if name.startswith("MALLOC_")]:
        monkeypatch.delenv(name)
    run.main(["--quick", "--no-memory", "--allocator", "default"])
    out = capsys.readouterr().out
    for suite in run.PLAN:
        assert f"### {suite}: N=32, d=64, C=500, K={run.PLAN[suite][1]}; allocator: default" in out
    assert "| ArcFace | mll |" in out
    for impl in ("limit", "floor", "mll dense + F.cross_entropy", "mll loss() (chunked)"):
        assert f"| {impl} |" in out
    assert "| × limit (median) | × floor (median) |" in out


def test_allocator_settings_environments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    tuned = run.allocator_env("tuned")
    assert all(tuned[k] == v for k, v in run.TIMING_ENV.items())
    assert tuned["MALLOC_ARENA_MAX"] == "2"
    assert not [k for k in run.allocator_env("default") if k.startswith("MALLOC_")]


def test_a_run_restarts_itself_under_the_tuned_allocator(in_process: None, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def execve(path: str, argv: list[str], env: dict[str, str]) -> None:
        calls.append((path, argv, env))
        raise SystemExit(0)  # as the real one: nothing after it runs here

    monkeypatch.setattr(os, "execve", execve)
    for name in run.TIMING_ENV:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(SystemExit):
        run.main(["--quick", "--suites", "limit"])
    # the command it restarts with runs in the tuned child of test_both_allocators_print_a_table_each
    ((path, argv, env),) = calls
    assert path == sys.executable
    assert argv == [sys.executable, "-m", "benchmarks.run", "--quick", "--suites", "limit"]
    assert env == run.allocator_env("tuned")


@pytest.mark.slow
def test_both_allocators_print_a_table_each(in_process: None, capfd: pytest.CaptureFixture[str]) -> None:
    run.main(["--quick", "--no-memory", "--suites", "limit", "--allocator", "both"])
    out = capfd.readouterr().out  # the children's tables: written to this process's file descriptor 1
    for setting in run.ALLOCATORS:
        heading = f"## allocator: {run.allocator_description(setting)}"
        title = f"### limit: N=32, d=64, C=500, K=1; allocator: {setting}"
        assert heading in out and title in out
        assert out.index(heading) < out.index(title)  # each setting's heading, then its child's table
    assert "allocator (timing): default (glibc's: no MALLOC_* variables)" in out


@pytest.mark.slow
def test_chunked_quick_run_prints_its_table(in_process: None, capsys: pytest.CaptureFixture[str]) -> None:
    chunked.main(["--quick"])
    out = capsys.readouterr().out
    for impl in chunked.IMPLEMENTATIONS:
        assert f"| 20000 | {impl} |" in out
    assert "failed" not in out  # a probe that failed prints its row too, with its error


@pytest.mark.slow
def test_metrics_quick_run_prints_its_table(in_process: None, capsys: pytest.CaptureFixture[str]) -> None:
    metrics.main(["--quick"])  # its children time the floor and mll together, and measure each one's memory
    out = capsys.readouterr().out
    assert "N = M = 4000 (a self-search), d = 32, classes of 100, K = 99 neighbours" in out
    for name in ("floor: topk over blocks of x̂ @ x̂ᵀ | ", "mll.metrics.retrieval_metrics | "):
        row = next(line for line in out.splitlines() if line.startswith(f"| {name}"))
        median, low, ratio, cpu, cpu_ratio, memory = (float(cell) for cell in row.split("|")[2:8])
        assert 0 < low <= median and ratio > 0 and cpu > 0 and cpu_ratio > 0 and memory >= 0
    assert "| 1.000 |" in out  # the floor's own row
    assert "threads: 2" in out or f"threads: {torch.get_num_threads()}" in out


@pytest.mark.slow
def test_sharded_quick_run_prints_its_tables(in_process: None, capsys: pytest.CaptureFixture[str]) -> None:
    sharded.main(["--quick"])  # a rank that fails raises, with its stderr
    out = capsys.readouterr().out
    for world, threads, classes in ((1, 1, 4000), (2, 1, 2000)):  # a quick run: one thread per rank
        assert f"| {world} | {threads} | {classes} |" in out
    assert "| 2 | 65536 | 1024 | 3072 | 65536 | 132 | 132.1 |" in out


def test_sharded_floor_option_times_each_rank_beside_its_floor(in_process: None, capsys) -> None:
    sharded.main(["--quick", "--floor", "--worlds", "2"])
    out = capsys.readouterr().out
    rows = re.findall(r"^\| 2 \| ([01]) \| 2000 \| [\d.]+ \| [\d.]+ \| ([\d.]+) \|$", out, flags=re.M)
    assert [r[0] for r in rows] == ["0", "1"] and all(float(r[1]) > 0 for r in rows), out


def test_the_ten_million_class_script_checks_its_loss_in_float64(in_process: None, capsys) -> None:
    scale.main(["--quick"])  # C = 2·10^4 on 2 ranks
    out = capsys.readouterr().out
    found = re.search(r"float32 sharded vs float64 over all 20000 classes: max abs difference ([\d.e+-]+)", out)
    assert found is not None and float(found.group(1)) < 1e-4, out
    assert "| 3 |" in out and "peak RSS, all ranks together" in out


def test_limit_suite_shares_one_weight_and_accumulates_only_where_asked() -> None:
    cfg = Config(batch=8, features=16, classes=50)
    data = make_data(cfg)
    steps = {case.impl: case.factory(cfg, data) for case in SUITES["limit"]}
    (weight,) = [v for k, v in data.shared.items() if k[0] == "weight"]  # one class-weight matrix for every case
    assert len(data.shared) == 2  # and one ArcFace head on it
    steps["limit"]()  # the three GEMMs touch no gradient
    assert weight.grad is None
    steps["mll loss() (chunked)"]()
    once = weight.grad.clone()
    steps["mll loss() (chunked)"]()  # gradients set to None first: the same gradient again
    torch.testing.assert_close(weight.grad, once)
    accumulating = next(impl for impl in steps if "accumulating" in impl)
    steps[accumulating]()  # added to the .grad already there
    torch.testing.assert_close(weight.grad, 2 * once)
    steps["floor"]()
    dense = weight.grad.clone()
    steps["floor, torch.compile"]()  # the floor compiled: the same gradient
    torch.testing.assert_close(weight.grad, dense)
    steps["mll dense + F.cross_entropy"]()
    dense = weight.grad.clone()
    steps["mll dense + F.cross_entropy, torch.compile"]()  # ArcFace's dense step compiled: the same gradient
    torch.testing.assert_close(weight.grad, dense)


def test_gpu_largest_classes_doubles_by_memory_and_halves_by_time() -> None:
    plan = gpu.FULL
    per_million = gpu.floor_step_bytes(plan.batch, plan.features, 1_000_000)
    assert gpu.largest_by_memory(plan, free_bytes=0) == 1_000_000  # never below the last fixed stage
    four = gpu.largest_by_memory(plan, free_bytes=int(4.5 * per_million / gpu.MEMORY_FRACTION))
    assert four == 4_000_000
    assert gpu.cap_by_time(four, 1_000_000, seconds_at_start=10.0, seconds_left=1000.0) == four
    assert gpu.cap_by_time(four, 1_000_000, seconds_at_start=10.0, seconds_left=30.0) == 2_000_000
    assert gpu.cap_by_time(four, 1_000_000, seconds_at_start=10.0, seconds_left=1.0) == 1_000_000


def test_gpu_dry_run_prints_the_plan(in_process: None, capsys: pytest.CaptureFixture[str]) -> None:
    gpu.main(["--dry-run"])
    out = capsys.readouterr().out
    assert "dry run: no device used" in out
    assert "largest by memory with 139 GiB free: C=4000000" in out
    for case in gpu.CASES:
        assert case.name in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_benchmark_fails_fast_without_a_gpu(in_process: None, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        gpu.main([])
    message = exited.value.code
    assert isinstance(message, str)  # what Python prints to stderr, with exit status 1
    assert "no CUDA device" in message
    assert "--device cpu --quick" in message
    assert capsys.readouterr().out == ""  # before anything ran


def test_gpu_quick_cpu_run_prints_every_case_and_the_sync_table(
    in_process: None, capsys: pytest.CaptureFixture[str]
) -> None:
    gpu.main(["--device", "cpu", "--quick", "--compile-backend", "eager"])
    out = capsys.readouterr().out
    for classes in gpu.QUICK.classes:
        assert f"### C={classes}\n" in out
    assert f"### C={gpu.QUICK.max_classes} (the largest that fits)" in out
    assert "| floor | " in out and "| 1.000 |" in out
    for case in gpu.CASES:
        assert f"| {case.name} | " in out
        if case.package is None:  # mll and torch cases must run; the anchors need their package and a GPU
            assert f"| {case.name} | failed" not in out, out
    assert "| ArcFace | dense | n/a on cpu (the step ran) |" in out
    assert "| ArcFace | loss() | n/a on cpu (the step ran) |" in out


def test_a_step_that_would_not_fit_in_memory_is_skipped_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(run, "available_memory", lambda: 1)
    monkeypatch.setattr(run, "apart_needed", lambda *args: False)
    results = run.time_suite("limit", Config(batch=8, features=16, classes=50), rounds=1, memory=False)
    skipped = {r.impl for r in results if r.note}
    assert skipped == {
        "floor",
        "mll dense + F.cross_entropy",
        "mll dense + F.cross_entropy, torch.compile",
        "floor, torch.compile",
    }
    assert all(r.times for r in results if not r.note)
    printed = run.table(results)
    assert "| floor | floor | skipped: a step needs ~0 GiB, 0 GiB available |" in printed
    assert "| 1.000 | — | 1.000 | — |" in printed  # the limit row: no floor, no ratio to it


@pytest.mark.slow  # a process per case
def test_cases_that_do_not_fit_in_memory_together_run_one_process_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where the steps would not fit in one process together (the tuned allocator at N = 4096, C = 10^5), each case
    is timed in a process of its own, the floor's first and last: every available case gets its rounds, the floor
    twice as many, and the table its ratios."""
    cfg = Config(batch=8, features=16, classes=50, soft=True)
    results = run.time_suite("soft targets", cfg, rounds=2, memory=False, apart=True)
    timed = [r for r in results if r.times]
    assert len(timed) >= 3 and all(r.note is None for r in timed)  # the floor, CosFace, ArcFace (and 0.1.6's)
    assert [len(r.times) for r in timed] == [4 if r.impl == "floor" else 2 for r in timed]
    printed = run.table(results)
    assert "| floor | " in printed and "| 1.000 | 1.000 | — | — |" in printed  # the floor's row: ratios 1
    assert printed.count("| — | — |") == len(timed)  # every timed row has its ratios (no memory columns here)


def test_the_zoo_benchmark_cases_run_a_step() -> None:
    from benchmarks.cases import SUITES, Config, make_data

    cfg = Config(batch=16, features=8, classes=50)
    data = make_data(cfg)
    cases = [case for case in SUITES["zoo"] if "Proxy" in case.head]
    assert {case.impl for case in cases} >= {"mll", "mll dense", "mll loss() (chunked)"}
    for case in cases:
        if case.available():
            case.factory(cfg, data)()
            assert data.x.grad is not None and torch.isfinite(data.x.grad).all(), case


def test_the_batch_suites_limit_tiles_the_same_three_gemms(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = Config(batch=10, features=8, classes=30)
    whole = cases.three_gemm_limit(cfg, make_data(cfg))
    monkeypatch.setattr(cases, "LIMIT_TILE_ROWS", 4)  # tiles of 4, 4 and 2 rows
    (case,) = [case for case in SUITES["batch"] if case.impl == "limit"]
    tiled = case.factory(cfg, make_data(cfg))
    assert isinstance(whole, cases.GemmLimit) and isinstance(tiled, cases.GemmLimit)
    assert tiled.logits.shape == (4 * 30,) and tiled.class_major and not whole.class_major and not case.probe
    tiled.w_hat.copy_(whole.w_hat)  # the same operands (the limit suite's weight is shared, the batch suite's not)
    for step in (whole, tiled, tiled):  # twice: the weight's product is written by the first tile, not added to
        step()
    torch.testing.assert_close(tiled.grad_x, whole.grad_x)
    torch.testing.assert_close(tiled.grad_w, whole.grad_w)
    z = tiled.x_hat @ tiled.w_hat.t()  # written out: G = the logits
    torch.testing.assert_close(whole.grad_w, z.t() @ tiled.x_hat)
    torch.testing.assert_close(whole.grad_x, z @ tiled.w_hat)


@pytest.mark.slow  # a process per case
def test_a_case_past_its_time_limit_is_stopped_and_said_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--case-minutes``: a case's process still running at the limit is stopped; its row says so and the others
    keep their rounds (PyTorch's chunked ``F.linear_cross_entropy`` took more than 9 minutes a step at N = 4096,
    C = 10^6)."""
    import subprocess

    real = subprocess.run
    calls = []

    def slow_second(args, **kwargs):  # the second case's child "hangs": the limit is what stops it
        calls.append(kwargs.get("timeout"))
        if len(calls) == 2:
            raise subprocess.TimeoutExpired(args, kwargs["timeout"])
        return real(args, **kwargs)

    monkeypatch.setattr(run.subprocess, "run", slow_second)
    cfg = Config(batch=8, features=16, classes=50, soft=True)
    results = run.time_suite("soft targets", cfg, rounds=2, memory=False, apart=True, case_limit_s=90.0)
    assert len(calls) >= 4 and set(calls) == {90.0}  # the limit reaches every child (the floor's twice)
    stopped = [r for r in results if r.note and r.note.startswith("stopped after 90 s")]
    assert len(stopped) == 1 and not stopped[0].times
    assert all(r.times for r in results if r.note is None)
    assert "stopped after 90 s: its warm-up and 2 rounds took longer" in run.table(results)
    for bad in ("0", "-1", "nan", "inf", "1e300"):
        with pytest.raises(SystemExit):
            run.main(["--case-minutes", bad])


def test_skipped_implementations_get_a_row_that_says_so() -> None:
    cfg = Config(batch=8, features=16, classes=50)
    results = run.time_suite("limit", cfg, rounds=1, memory=False, skip=("limit",))
    skipped = [r for r in results if r.impl == "limit"]
    assert len(skipped) == 1 and skipped[0].note == "skipped (--skip)" and not skipped[0].times
    assert all(r.times for r in results if r.impl != "limit")
    with pytest.raises(SystemExit):
        run.main(["--skip", "F.linear_cross_entropy chunked"])  # (a typo: the comma)
