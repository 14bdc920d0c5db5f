"""Fetch metric-learning-layers 0.1.6 into benchmarks/_peers/ (git-ignored): ``python -m benchmarks.fetch_legacy``."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from benchmarks.peers import LEGACY_DIR


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", tmp,
             "metric-learning-layers==0.1.6"],
            check=True,
        )  # fmt: skip
        (wheel,) = Path(tmp).glob("*.whl")
        LEGACY_DIR.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(LEGACY_DIR)
    print(f"0.1.6 unpacked into {LEGACY_DIR}")


if __name__ == "__main__":
    main()
