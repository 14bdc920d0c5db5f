"""A re-shard reads only the rank's rows: in a fresh process (``benchmarks/reshard.py``'s probe), the peak resident
set of ``load_resharded`` above the process's own stays far below the whole matrix and its momentum."""

from __future__ import annotations

import pytest

from benchmarks import reshard

pytestmark = pytest.mark.slow  # writes ~200 MB and starts a process


def test_a_rank_of_three_reads_its_third_of_two_ranks_files(tmp_path) -> None:
    classes, features = 400_000, 64
    reshard.write(str(tmp_path), classes, features, 2, "sgd")
    got = reshard.run_probe(str(tmp_path), classes, features, 3, 1, "sgd")
    whole = 2 * classes * features * 4 / 2**20  # the weights and the momentum of every class: 195 MB
    assert got["block_mb"] == pytest.approx(whole / 6, rel=1e-3)
    assert got["kept_mb"] == pytest.approx(got["block_mb"], abs=4)  # the momentum of the block, allocated by the load
    assert got["peak_above_mb"] < 0.6 * whole, got  # read whole, the two files alone would be `whole`
