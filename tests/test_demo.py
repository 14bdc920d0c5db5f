"""The demo in a tiny configuration: it runs, writes its files, and its table is sane."""

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import torch

from mll import demo


def test_metrics_on_a_known_embedding() -> None:
    labels = torch.tensor([0, 0, 1, 1])
    perfect = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    assert demo.recall_at_1(perfect, labels) == 1.0 and demo.map_at_r(perfect, labels) == 1.0
    swapped = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]])  # every nearest neighbour is wrong
    assert demo.recall_at_1(swapped, labels) == 0.0 and demo.map_at_r(swapped, labels) == 0.0
    # MAP@R scores only the first R neighbours: orders (hit, miss), (hit, miss), (miss, hit) for the three
    # class-0 queries give APs 1/2, 1/2 and 1/4; the lone class-1 sample has R = 0 and is not a query
    mixed = torch.tensor([[1.0, 0.0], [0.99, 0.14], [0.0, 1.0], [0.9, 0.44]])
    assert demo.map_at_r(mixed, torch.tensor([0, 0, 0, 1])) == pytest.approx((0.5 + 0.5 + 0.25) / 3)


def test_tiny_demo_run(tmp_path) -> None:
    heads = ["Linear (softmax)", "ArcFace", "CosFace", "DeepNCM"]
    runs = demo.main(["--epochs", "6", "--heads", *heads, "--out", str(tmp_path), "--quiet"])
    assert [r.name for r in runs] == heads
    for run in runs:
        for value in (run.accuracy, run.recall_at_1, run.map_at_r):
            assert 0.0 <= value <= 1.0
    for run in runs[1:3]:  # margin heads beat chance (4 open-set classes: 0.25) on digits never trained on
        assert run.recall_at_1 > 0.4, run
    for name in ("results.md", "sphere.png", "angles.png", "curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| ArcFace |" in (tmp_path / "results.md").read_text()
