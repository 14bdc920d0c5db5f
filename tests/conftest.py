import faulthandler
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import HealthCheck, settings
from torch.multiprocessing.spawn import ProcessException

# dev: fast feedback, failures print a reproduction blob; ci: reproducible (same examples every run).
settings.register_profile("dev", deadline=None, print_blob=True, max_examples=40)
settings.register_profile(
    "ci",
    deadline=None,
    print_blob=True,
    derandomize=True,
    database=None,
    max_examples=40,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.load_profile("ci" if os.environ.get("CI") else "dev")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(params=["kept", "recomputed", "row_tiles", "row_groups", "dense"])
def kernel_mode(request, monkeypatch) -> Any:
    """Run a test on each exact path of the chunked loss: the chunk kernel keeping its logits from forward to
    backward, the chunk kernel recomputing them, the row tiles forming the gradient during the forward (three rows
    per tile, so that a small batch has several and a ragged last one; a loss that is not a scalar with a gradient to
    build takes the cost model's path there) — a tile's elementwise work in one group of rows, one sub-center's logits
    of a single process class-major in blocks of two classes (the last one ragged), and ("row_groups") every family's
    row-major in groups of two rows, the last one ragged — and the dense logits (a single process; the sharded loss
    takes the cost model's path)."""
    from mll.functional import set_loss_path
    from mll.functional._engine import row_tiles

    path = {"kept": "keep", "recomputed": "recompute", "dense": "dense"}.get(request.param, "row_tiles")
    if request.param == "row_tiles":
        monkeypatch.setattr(row_tiles, "block_columns", lambda rows, width: 2)
    if request.param == "row_groups":
        single = row_tiles.group_rows
        monkeypatch.setattr(row_tiles, "group_rows", lambda spec, columns: min(2, single(spec, columns)))
        monkeypatch.setattr(row_tiles, "CLASS_MAJOR", False)
    with set_loss_path(path, rows=3 if path == "row_tiles" else None):
        yield request.param


ALL_DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def exported_heads(*, sharded: bool) -> list[str]:
    """The names of the head classes ``mll`` exports (``nn.Module`` subclasses), sorted: the class-sharded ones
    too, or not."""
    import mll

    return sorted(
        name
        for name in mll.__all__
        if isinstance(getattr(mll, name), type) and issubclass(getattr(mll, name), torch.nn.Module)
        and (sharded or not name.startswith("Sharded"))
    )  # fmt: skip


_SPAWNED: dict[int, list[dict[str, Any]]] = {}


def _logged(rank: int, worker: Callable[[int, int, str], None], world: int, path: str) -> None:
    """A spawned rank's entry: its stdout and stderr go to ``path / f"rank{rank}.log"``, and a fatal signal (an abort
    in C++, a crash) writes every thread's Python stack there first, so that a failed spawn can say where it died."""
    with open(os.path.join(path, f"rank{rank}.log"), "w") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    faulthandler.enable(file=sys.stderr, all_threads=True)  # fd 2, the log, to the process's very end
    worker(rank, world, path)
    # The rank has saved its results and destroyed its process group: leave without the interpreter's finalisation,
    # where gloo's C++ threads can still be torn down after Python (std::terminate, SIGABRT: seen in CI on a rank
    # that had saved its results). A worker that raises still goes through spawn's error reporting.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _log_tails(path: Path, world: int, lines: int = 25) -> str:
    """The last lines each rank wrote, on one line (a failed spawn's message, whole in CI's short summary)."""
    parts = []
    for rank in range(world):
        log = path / f"rank{rank}.log"
        text = log.read_text(errors="replace").splitlines()[-lines:] if log.exists() else ["(no log)"]
        parts.append(f"rank {rank}: " + " | ".join(line.strip() for line in text if line.strip()))
    return " || ".join(parts)


def run_world(worker: Callable[[int, int, str], None], world: int, path: Path) -> list[dict[str, Any]]:
    """Run ``worker(rank, world, str(path))`` in ``world`` spawned processes and return what each rank saved to
    ``path / f"rank{rank}.pt"``; a rank left waiting in a collective fails the test after 600 s, never stalls CI, and
    a rank that fails or dies fails the test with the end of every rank's output (``path / f"rank{rank}.log"``)."""
    context = mp.start_processes(_logged, args=(worker, world, str(path)), nprocs=world, join=False)
    start = time.monotonic()
    try:
        while not context.join(timeout=1):
            if time.monotonic() - start > 600:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"world {world}: a rank hung; {_log_tails(path, world)}")
    except ProcessException as error:
        pytest.fail(f"world {world}: {error}; {_log_tails(path, world)}")
    return [torch.load(path / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


@pytest.fixture(scope="session")
def spawned(tmp_path_factory):
    """``spawned(world)``: every rank's results of the one multi-process run per world size (gloo, CPU), shared by
    every test that needs several processes — each process pays seconds to import torch, so they run every job
    once (``tests/distributed/test_sharded.py::_worker``) and the tests compare what they saved."""
    from tests.distributed.test_sharded import _worker

    def results(world: int) -> list[dict[str, Any]]:
        if world not in _SPAWNED:
            _SPAWNED[world] = run_world(_worker, world, tmp_path_factory.mktemp(f"world{world}"))
        return _SPAWNED[world]

    return results
