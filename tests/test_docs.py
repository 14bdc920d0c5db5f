"""The code of the "Adding a head" page runs, and the head it builds works on every path."""

import re
from pathlib import Path

import torch
import torch.nn.functional as F

import mll
from mll import functional as MF

PAGE = Path(__file__).parents[1] / "docs" / "adding-a-head.md"


def test_the_adding_a_head_example_runs_on_every_path() -> None:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(PAGE), "exec"), namespace)  # the page's code, as written
    head = namespace["Shifted"](5, 7, 2, m=0.2, p=0.5, dtype=torch.float64)
    twin = namespace["Shifted"](5, 7, 2, m=0.2, p=0.5, dtype=torch.float64)
    twin.load_state_dict(head.state_dict())
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 7, (6,))
    dense = F.cross_entropy(head(x, y), y)
    chunked = twin.loss(x, y, chunk_size=3)
    torch.testing.assert_close(chunked, dense, rtol=1e-12, atol=1e-12)
    cos = MF.cosine_logits(x, head.weight, 2).detach()
    onehot = (torch.arange(7) == y[:, None]).double()
    expected = head.scale * (cos - 0.2 * onehot - 0.5 * onehot * (1 - cos))
    torch.testing.assert_close(head(x, y).detach(), expected, rtol=1e-12, atol=1e-12)
    assert head.scale == MF.heuristic_scale(7, namespace["SHIFTED"](0.2, 0.5))
    assert "m=0.2, p=0.5" in repr(head)
    # the sharded form: in a world of one, every class in one block; cut into blocks, it reassembles
    sharded = namespace["ShardedShifted"]
    shard = sharded.from_dense(head)
    torch.testing.assert_close(shard.loss(x, y), dense, rtol=1e-12, atol=1e-12)
    blocks = [sharded.from_dense(head, class_range=r) for r in ((0, 3), (3, 7))]
    assert blocks[1].weight.shape == (8, 5) and "class_range=[3, 7)" in repr(blocks[1])
    merged = mll.nn.dense_state_dict([b.state_dict() for b in blocks])
    assert all(torch.equal(merged[k], v) for k, v in head.state_dict().items())


def test_the_metrics_pages_worked_example_prints_what_the_page_shows(tmp_path, monkeypatch, capsys) -> None:
    import matplotlib

    matplotlib.use("Agg")
    page = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
    example = page.split("## A worked example")[1].split("\n## ")[0]
    code = "\n".join(re.findall(r"```python\n(.*?)```", example, flags=re.S))
    shown = "".join(re.findall(r"```text\n(.*?)```", example, flags=re.S))
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "docs/metrics.md", "exec"), {})
    assert capsys.readouterr().out == shown
    assert (tmp_path / "roc.png").stat().st_size > 0


def test_the_api_reference_lists_every_exported_head() -> None:
    """docs/reference.md renders every head mll exports, sharded forms included (the next head cannot skip it)."""
    from tests.conftest import exported_heads

    text = (Path(__file__).parents[1] / "docs" / "reference.md").read_text()
    listed = set(re.findall(r"^::: mll\.nn\.(\w+)$", text, flags=re.M))
    assert [name for name in exported_heads(sharded=True) if name not in listed] == []
