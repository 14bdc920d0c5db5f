"""The benchmark's smoke run: it must run and print its tables. Timings are printed, never asserted."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu, run
from benchmarks.cases import SUITES, Config, make_data

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quick_run_prints_a_table_per_suite() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--no-memory"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for suite in run.PLAN:
        assert f"### {suite}: N=32, d=64, C=500" in done.stdout
    assert "| ArcFace | mll |" in done.stdout
    for impl in ("limit", "floor", "mll dense + F.cross_entropy", "mll loss() (chunked)"):
        assert f"| {impl} |" in done.stdout
    assert "| × limit (median) | × floor (median) |" in done.stdout


def test_memory_probe_measures_a_step() -> None:
    cfg = Config(batch=64, features=32, classes=20_000)
    index = next(i for i, case in enumerate(SUITES["int labels"]) if case.head == "ArcFace" and case.impl == "mll")
    peak = run.probe_memory("int labels", index, cfg)
    assert peak >= 64 * 20_000 * 4 / 2**20  # at least the N×C float32 logits (4.9 MB) must show


def test_allocator_settings_environments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    monkeypatch.delenv("MALLOC_MMAP_MAX_", raising=False)
    tuned = run.allocator_env("tuned")
    assert all(tuned[k] == v for k, v in run.TIMING_ENV.items())
    assert tuned["MALLOC_ARENA_MAX"] == "2"
    assert not [k for k in run.allocator_env("default") if k.startswith("MALLOC_")]


@pytest.mark.slow
def test_both_allocators_print_a_table_each() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--quick", "--no-memory", "--suites", "limit", "--allocator", "both"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for setting in run.ALLOCATORS:
        assert f"## allocator: {run.allocator_description(setting)}" in done.stdout
        assert f"### limit: N=32, d=64, C=500, K=1; allocator: {setting}" in done.stdout
    assert "allocator (timing): default (glibc's: no MALLOC_* variables)" in done.stdout


@pytest.mark.slow
def test_chunked_quick_run_prints_its_table() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.chunked", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for impl in ("dense", "chunked", "torch linear_cross_entropy"):
        assert f"| 20000 | {impl} |" in done.stdout


@pytest.mark.slow
def test_sharded_quick_run_prints_its_tables() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.sharded", "--quick"], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for world, threads, classes in ((1, 2, 4000), (2, 1, 2000)):
        assert f"| {world} | {threads} | {classes} |" in done.stdout
    assert "| 2 | 65536 | 1024 | 3072 | 65536 | 132 | 132.1 |" in done.stdout


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
    steps["mll dense + F.cross_entropy"]()
    assert weight.grad.shape == weight.shape


def test_gpu_largest_classes_doubles_by_memory_and_halves_by_time() -> None:
    plan = gpu.FULL
    per_million = gpu.floor_step_bytes(plan.batch, plan.features, 1_000_000)
    assert gpu.largest_by_memory(plan, free_bytes=0) == 1_000_000  # never below the last fixed stage
    four = gpu.largest_by_memory(plan, free_bytes=int(4.5 * per_million / gpu.MEMORY_FRACTION))
    assert four == 4_000_000
    assert gpu.cap_by_time(four, 1_000_000, seconds_at_start=10.0, seconds_left=1000.0) == four
    assert gpu.cap_by_time(four, 1_000_000, seconds_at_start=10.0, seconds_left=30.0) == 2_000_000
    assert gpu.cap_by_time(four, 1_000_000, seconds_at_start=10.0, seconds_left=1.0) == 1_000_000


def test_gpu_dry_run_prints_the_plan() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--dry-run"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "dry run: no device used" in done.stdout
    assert "largest by memory with 139 GiB free: C=4000000" in done.stdout
    for case in gpu.CASES:
        assert case.name in done.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_gpu_benchmark_fails_fast_without_a_gpu() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode != 0
    assert "no CUDA device" in done.stderr
    assert "--device cpu --quick" in done.stderr


def test_gpu_quick_cpu_run_prints_every_case_and_the_sync_table() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--device", "cpu", "--quick", "--compile-backend", "eager"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
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
    results = run.time_suite("limit", Config(batch=8, features=16, classes=50), rounds=1, memory=False)
    skipped = {r.impl for r in results if r.note}
    assert skipped == {"floor", "mll dense + F.cross_entropy"}
    assert all(r.times for r in results if not r.note)
    printed = run.table(results)
    assert "| floor | floor | skipped: a step needs ~0 GiB, 0 GiB available |" in printed
    assert "| 1.000 | — | 1.000 | — |" in printed  # the limit row: no floor, no ratio to it
