"""examples/train_sharded.py: two gloo processes under torchrun train and save shards; one process reassembles."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_train_with_torchrun_then_reassemble(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "examples" / "train_sharded.py")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = ["--out", str(tmp_path), "--steps", "5", "--sample-rate", "0.5"]
    done = subprocess.run([*launch, script, *args], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "world 2: rank 0 holds classes [0, 100) of 200" in done.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pt", "head-rank0.pt", "head-rank1.pt"]
    done = subprocess.run([sys.executable, script, "--reassemble", "--out", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok: the reassembled head reproduces the shards' loss" in done.stdout
