"""Speed and memory of mll's heads against the floor and against peers. Run ``python -m benchmarks.run``."""
