"""The demo in a tiny configuration: it runs, writes its files, and its table is sane."""

import math
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

import torch

from mll import demo


@pytest.mark.slow
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


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        # --epochs 0 and --seeds 0 ran into an IndexError, --dim -1 into a RuntimeError, after loading the data
        (["--epochs", "0"], "--epochs must be >= 1, but got 0"),
        (["--epochs", "-3"], "--epochs must be >= 1, but got -3"),
        (["--seeds", "0"], "--seeds must be >= 1, but got 0"),
        (["--dim", "0"], "--dim must be >= 1, but got 0"),
        (["--dim", "-1"], "--dim must be >= 1, but got -1"),
        (["--heads", "ArcFace", "SoftMax"], "argument --heads: invalid choice: 'SoftMax' (choose from"),
        (["--heads", "ArcFace", "CosFace", "ArcFace"], "--heads names ArcFace more than once"),
        (["--epochs", "many"], "argument --epochs: invalid int value: 'many'"),
        (
            ["--seed", str(2**64 - 2)],
            "--seed must be in [-9223372036854775808, 18446744073709551613] with --seeds 3 "
            "(torch takes seeds in [-9223372036854775808, 18446744073709551615]), but got 18446744073709551614",
        ),
    ],
)
def test_bad_flags_exit_2_before_anything_runs(flags, message, tmp_path, capsys, monkeypatch) -> None:
    def no_data(seed):
        raise AssertionError("the flags were not checked before loading the data")

    monkeypatch.setattr(demo, "load_digits_split", no_data)
    out = tmp_path / "new"
    with pytest.raises(SystemExit) as info:
        demo.main([*flags, "--out", str(out), "--quiet"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"python -m mll.demo: error: {message}" in err and "Traceback" not in err
    assert not out.exists(), "a refused run leaves no output folder behind"


def test_out_must_be_a_writable_folder(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(demo, "load_digits_split", lambda seed: pytest.fail("--out was not checked first"))
    a_file = tmp_path / "results"
    a_file.write_text("not a folder")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "results.md").mkdir()
    cases = [
        (a_file, f"--out {a_file} is a file, not a folder"),
        (a_file / "sub", f"--out {a_file / 'sub'} is not a writable folder: Not a directory"),
        (
            tmp_path / "taken",
            f"--out {tmp_path / 'taken'} holds a folder named results.md, where the demo writes a file",
        ),
    ]
    for out, message in cases:
        with pytest.raises(SystemExit) as info:
            demo.main(["--out", str(out), "--quiet"])
        assert info.value.code == 2
        assert f"python -m mll.demo: error: {message}\n" in capsys.readouterr().err
    assert a_file.read_text() == "not a folder"


def test_the_command_line_reports_a_bad_flag_in_one_line(tmp_path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mll.demo", "--epochs", "0", "--out", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines()[-1] == "python -m mll.demo: error: --epochs must be >= 1, but got 0"
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_the_table_is_written_when_plotting_fails(tmp_path, capsys, monkeypatch) -> None:
    def broken_plot(*args):
        raise RuntimeError("cannot open display\n(a second line)")

    monkeypatch.setattr(demo, "plot", broken_plot)
    runs = demo.main(["--epochs", "1", "--seeds", "1", "--heads", "CosFace", "--out", str(tmp_path), "--quiet"])
    assert [r.name for r in runs] == ["CosFace"]
    assert "| CosFace |" in (tmp_path / "results.md").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.md"], "the write probe is gone"
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        "warning: plotting failed, so results.md is written but the plots may be missing "
        "(RuntimeError: cannot open display (a second line))"
    ]
    assert f"wrote {tmp_path}/results.md\n" in captured.out


def test_angles_take_the_nearest_sub_center() -> None:
    from mll.demo import angles

    weights = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])  # 2 classes × 2 sub-centers
    features = torch.tensor([[0.0, 2.0], [0.0, -3.0]])  # class 0's second sub-center, class 1's second
    target, other = angles(features, weights, torch.tensor([0, 1]), num_sub_centers=2)
    torch.testing.assert_close(target, torch.zeros(2))
    torch.testing.assert_close(other, torch.full((2,), 90.0))


def test_the_demo_trains_the_proxy_heads(tmp_path) -> None:
    pytest.importorskip("sklearn")
    from mll import demo

    heads = ["ProxyNCAPlusPlus", "ProxyAnchor"]
    runs = demo.main(["--epochs", "3", "--seeds", "1", "--heads", *heads, "--out", str(tmp_path), "--quiet",
                      "--no-plots"])  # fmt: skip
    assert [r.name for r in runs] == heads
    for run in runs:
        assert all(0.0 <= v <= 1.0 for v in (run.accuracy, run.recall_at_1, run.map_at_r)), run
        assert all(math.isfinite(v) for v in run.losses), run


def test_the_demos_all_is_the_default_set_and_the_zoo(tmp_path, monkeypatch) -> None:
    pytest.importorskip("sklearn")
    from mll import demo

    monkeypatch.setattr(demo, "train_one", lambda name, *args, **kwargs: demo.Run(name))
    runs = demo.main(["--heads", "all", "--seeds", "1", "--out", str(tmp_path), "--quiet", "--no-plots"])
    assert [r.name for r in runs] == [*demo.HEADS, *demo.ZOO_HEADS]
    assert {"ProxyNCAPlusPlus", "ProxyAnchor"} <= set(demo.ZOO_HEADS)
