"""``mll.nn.load_resharded`` in one process: blocks cut and joined in any way, chunk by chunk, into sharded and
dense heads; and a hostile user's checkpoints — a missing rank's file, another C, another in_features, ranks that
disagree, a mismatched optimizer — refused with the reason, before anything is written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import mll
from mll import functional as MF

D, C = 4, 11


def shards(world: int, **kwargs) -> list[mll.ShardedCosFace]:
    torch.manual_seed(0)
    dense = mll.CosFace(D, C, 2, trainable_scale=True, dtype=torch.float64)
    return [mll.ShardedCosFace.from_dense(dense, class_range=r, **kwargs) for r in MF.shard_bounds(C, world)]


def saved(tmp_path: Path, heads: list, optimizers: list | None = None) -> list[Path]:
    files = []
    for rank, head in enumerate(heads):
        files.append(tmp_path / f"rank{rank}.pt")
        opt = None if optimizers is None else optimizers[rank].state_dict()
        torch.save({"head": head.state_dict(), "optimizer": opt}, files[-1])
    return files


def stepped(heads: list) -> list[torch.optim.Optimizer]:
    """An Adam step on every block (a gradient of the block's own), as if they had trained."""
    out = []
    for head in heads:
        opt = torch.optim.Adam(head.parameters())
        head.weight.grad = torch.randn_like(head.weight)
        head.scale.grad = torch.tensor(0.5, dtype=torch.float64)
        opt.step()
        out.append(opt)
    return out


@pytest.mark.parametrize(("old", "new"), [(1, 3), (3, 2), (2, 5), (4, 1), (3, 3)])
@pytest.mark.parametrize("chunk_bytes", [1, 2**26], ids=["a-row-per-mapping", "whole-blocks"])
def test_any_split_into_any_other_with_the_optimizer(tmp_path, old, new, chunk_bytes) -> None:
    before = shards(old)
    files = saved(tmp_path, before, stepped(before))
    weight = torch.cat([h.weight for h in before]).detach()
    for start, stop in MF.shard_bounds(C, new):
        head = mll.ShardedCosFace(D, C, 2, trainable_scale=True, class_range=(start, stop), dtype=torch.float64)
        opt = torch.optim.Adam(head.parameters())
        mll.nn.load_resharded(head, files[::-1], opt, head_key="head", optimizer_key="optimizer",
                              chunk_bytes=chunk_bytes)  # fmt: skip
        assert torch.equal(head.weight.detach(), weight[2 * start : 2 * stop])
        assert torch.equal(head.scale.detach(), before[0].scale.detach())
        state = opt.state[head.weight]
        for name in ("exp_avg", "exp_avg_sq"):  # per row: cut to the block
            assert torch.equal(state[name], _old_state(files, name)[2 * start : 2 * stop]), name
        assert float(state["step"]) == 1.0 and float(opt.state[head.scale]["step"]) == 1.0
        assert torch.equal(opt.state[head.scale]["exp_avg"], _old_scale_state(files))  # replicated: as saved


def _old_state(files: list[Path], name: str) -> torch.Tensor:
    loaded = [torch.load(f, weights_only=True) for f in files]
    order = sorted(range(len(loaded)), key=lambda i: loaded[i]["head"]["class_range"].tolist())
    return torch.cat([loaded[i]["optimizer"]["state"][0][name] for i in order])


def _old_scale_state(files: list[Path]) -> torch.Tensor:
    return torch.load(files[0], weights_only=True)["optimizer"]["state"][1]["exp_avg"]


def test_a_dense_head_takes_every_block_and_a_sharded_one_a_dense_checkpoint(tmp_path) -> None:
    blocks = shards(3)
    dense = mll.CosFace(D, C, 2, trainable_scale=True, dtype=torch.float64)
    mll.nn.load_resharded(dense, saved(tmp_path, blocks), head_key="head")
    assert torch.equal(dense.weight.detach(), torch.cat([b.weight for b in blocks]).detach())
    torch.save(dense.state_dict(), tmp_path / "dense.pt")
    shard = mll.ShardedCosFace(D, C, 2, trainable_scale=True, class_range=(4, 9), dtype=torch.float64)
    mll.nn.load_resharded(shard, [tmp_path / "dense.pt"])
    assert torch.equal(shard.weight.detach(), dense.weight.detach()[8:18])


def _fresh(class_range=(0, C), **kwargs) -> mll.ShardedCosFace:
    return mll.ShardedCosFace(D, C, 2, trainable_scale=True, class_range=class_range, dtype=torch.float64, **kwargs)


@pytest.mark.parametrize(
    ("damage", "pattern"),
    [
        (lambda files: files[:1] + files[2:], r"classes \[4, 8\) are in no checkpoint \(a rank's file missing\?\)"),
        (lambda files: files + files[1:2], r"classes \[4, 8\) are in two checkpoints"),
        (lambda files: files[:2], r"classes \[8, 11\) are in no checkpoint|the checkpoints hold classes \[0, 8\)"),
    ],
    ids=["missing-rank", "a-rank-twice", "missing-last-rank"],
)
def test_a_missing_or_repeated_rank_file_is_refused_and_nothing_changes(tmp_path, damage, pattern) -> None:
    files = saved(tmp_path, shards(3))
    head = _fresh()
    before = head.weight.detach().clone()
    with pytest.raises(ValueError, match=pattern):
        mll.nn.load_resharded(head, damage(files), head_key="head")
    assert torch.equal(head.weight.detach(), before)


def test_another_num_classes_in_features_or_sub_centers_is_named(tmp_path) -> None:
    files = saved(tmp_path, shards(2))
    with pytest.raises(ValueError, match=r"hold classes \[0, 11\), but this head has 12 classes"):
        mll.nn.load_resharded(mll.ShardedCosFace(D, 12, 2, trainable_scale=True, dtype=torch.float64), files,
                              head_key="head")  # fmt: skip
    with pytest.raises(ValueError, match=r"another in_features or number of sub-centers"):
        mll.nn.load_resharded(mll.ShardedCosFace(D + 1, C, 2, trainable_scale=True), files, head_key="head")
    with pytest.raises(ValueError, match=r"another in_features or number of sub-centers"):
        mll.nn.load_resharded(mll.ShardedCosFace(D, C, 3, trainable_scale=True), files, head_key="head")


def test_ranks_that_disagree_on_a_replicated_entry_are_refused(tmp_path) -> None:
    blocks = shards(2)
    with torch.no_grad():
        blocks[1].scale.add_(1.0)
    with pytest.raises(ValueError, match=r"must hold the same scale .* checkpoint 0 and checkpoint 1 differ"):
        mll.nn.load_resharded(_fresh(), saved(tmp_path, blocks), head_key="head")


def test_checkpoints_of_different_steps_are_refused(tmp_path) -> None:
    blocks = shards(2, sample_rate=0.5, sampling="class", generator=torch.Generator().manual_seed(1))
    blocks[1].sampling_step = 3
    with pytest.raises(ValueError, match=r"must hold the same sampling_counter"):
        mll.nn.load_resharded(_fresh(sample_rate=0.5, sampling="class"), saved(tmp_path, blocks), head_key="head")


def test_a_mismatched_optimizer_or_key_is_named(tmp_path) -> None:
    blocks = shards(2)
    files = saved(tmp_path, blocks, stepped(blocks))
    head = _fresh()
    with pytest.raises(ValueError, match=r"optimizer has 2 parameters, this one 3: build the optimizer over the same"):
        mll.nn.load_resharded(head, files, torch.optim.Adam([*head.parameters(), torch.nn.Parameter(torch.ones(1))]),
                              head_key="head", optimizer_key="optimizer")  # fmt: skip
    with pytest.raises(ValueError, match=r"optimizer_key must say where"):
        mll.nn.load_resharded(head, files, torch.optim.Adam(head.parameters()), head_key="head")
    with pytest.raises(ValueError, match=r"a checkpoint has no 'model'"):
        mll.nn.load_resharded(head, files, head_key="model")
    with pytest.raises(ValueError, match=r"no optimizer state_dict"):
        mll.nn.load_resharded(head, saved(tmp_path, blocks), torch.optim.Adam(head.parameters()), head_key="head",
                              optimizer_key="optimizer")  # fmt: skip


def test_strict_refuses_what_the_head_does_not_have_and_lenient_keeps_what_it_lacks(tmp_path) -> None:
    state = {"weight": torch.randn(2 * C, D, dtype=torch.float64), "extra": torch.ones(1)}
    head = _fresh()
    with pytest.raises(ValueError, match=r"holds 'extra', which this head does not have"):
        mll.nn.load_resharded(head, [state])
    scale = head.scale.detach().clone()
    mll.nn.load_resharded(head, [state], strict=False)  # no scale in the checkpoint: the head keeps its own
    assert torch.equal(head.weight.detach(), state["weight"]) and torch.equal(head.scale.detach(), scale)
    with pytest.raises(ValueError, match=r"lacks \['scale'\]"):
        mll.nn.load_resharded(head, [{"weight": state["weight"]}])


def test_a_checkpoint_that_does_not_say_its_classes_needs_blocks() -> None:
    part = {"weight": torch.randn(8, D, dtype=torch.float64), "scale": torch.tensor(3.0, dtype=torch.float64)}
    with pytest.raises(ValueError, match=r"does not say which classes it holds .* pass blocks="):
        mll.nn.load_resharded(_fresh(), [part, part])
    with pytest.raises(ValueError, match=r"blocks must give one \(start, stop\) per checkpoint: 2, but got 1"):
        mll.nn.load_resharded(_fresh(), [part, part], blocks=[(0, 4)])


def test_the_sharded_pages_checkpoint_code_runs_and_keeps_every_option(tmp_path) -> None:
    """docs/sharded.md, "Checkpoints": its blocks as written, in one process (one old rank); the heads they build
    keep the sampling options they were given (the page's earlier snippet silently reset sample_rate to 1)."""
    page = (Path(__file__).parents[2] / "docs" / "sharded.md").read_text()
    section = page.split("## Checkpoints")[1].split("\n## ")[0]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(code) == 2
    torch.manual_seed(0)
    saved = mll.ShardedArcFace(512, 100, margin=0.5, sample_rate=0.1, sampling="class")
    ns = {"torch": torch, "mll": mll, "folder": str(tmp_path), "rank": 0, "old_world": 1, "num_classes": 100,
          "head": saved, "optimizer": torch.optim.SGD(saved.parameters(), lr=0.1, momentum=0.9)}  # fmt: skip
    exec(compile(code[0], "docs/sharded.md", "exec"), ns)
    head = ns["head"]
    assert head is not saved and torch.equal(head.weight, saved.weight)
    assert (head.sample_rate, head.sampling, head.sampling_seed) == (0.1, "class", saved.sampling_seed)
    dense = mll.ArcFace(512, 100, margin=0.5)
    cut = {**ns, "dense": dense}
    exec(compile(code[1], "docs/sharded.md", "exec"), cut)
    head = cut["head"]
    assert (head.sample_rate, head.sampling, head.class_start, head.class_stop) == (0.1, "class", 0, 13)
    assert torch.equal(head.weight, dense.weight[:13])
