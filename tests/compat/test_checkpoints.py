"""Peers' checkpoints into mll's heads on any number of ranks (``mll.compat.checkpoints``): InsightFace's per-rank
files, written here as its ``train_v2.py`` writes them, and pytorch-metric-learning's losses with their optimizer."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import mll
from mll import functional as MF
from mll.compat.checkpoints import insightface_checkpoint_files, load_insightface_checkpoints, load_pml_checkpoint
from mll.compat.insightface import CombinedMarginLoss, PartialFC_V2

D, C = 6, 23


def their_block(rank: int, world: int) -> tuple[int, int]:
    """partial_fc_v2.py's split, from its two formulas."""
    num_local = C // world + int(rank < C % world)
    class_start = C // world * rank + min(rank, C % world)
    return class_start, class_start + num_local


def insightface_run(folder: Path, world: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """``world`` ranks' checkpoint_gpu_{rank}.pt after one SGD step (momentum), as train_v2.py saves them; returns
    every class's weight and momentum, and the backbone's momentum (the same on every rank, as under DDP)."""
    torch.manual_seed(0)
    weights, backbone = torch.randn(C, D), torch.nn.Linear(3, D)
    grads = torch.randn(C, D)
    backbone_grads = [torch.randn_like(p) for p in backbone.parameters()]
    momentum = []
    for rank in range(world):
        start, stop = their_block(rank, world)
        fc = torch.nn.Parameter(weights[start:stop].clone())
        opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": [fc]}], lr=0.1, momentum=0.9)
        for p, g in zip(backbone.parameters(), backbone_grads):
            p.grad = g.clone()
        fc.grad = grads[start:stop].clone()
        opt.step()
        with torch.no_grad():  # the backbone as it was: every rank steps from the same weights
            for p, g in zip(backbone.parameters(), backbone_grads):
                p.add_(0.1 * g)
        momentum.append(opt.state[fc]["momentum_buffer"])
        checkpoint = {"epoch": 1, "global_step": 10, "state_dict_backbone": backbone.state_dict(),
                      "state_dict_softmax_fc": {"weight": fc.detach()}, "state_optimizer": opt.state_dict(),
                      "state_lr_scheduler": {"last_epoch": 10}}  # fmt: skip
        torch.save(checkpoint, folder / f"checkpoint_gpu_{rank}.pt")
        fc_after = fc.detach()
        weights[start:stop] = fc_after
    return weights, torch.cat(momentum), backbone_grads


@pytest.mark.parametrize(("old", "new"), [(3, 1), (2, 3), (11, 4)])
def test_insightface_files_load_into_any_number_of_ranks(tmp_path, old, new) -> None:
    weights, momentum, backbone_grads = insightface_run(tmp_path, old)
    files = insightface_checkpoint_files(tmp_path)
    assert [f.name for f in files] == [f"checkpoint_gpu_{r}.pt" for r in range(old)]  # 10 after 9
    for _rank, (start, stop) in enumerate(MF.shard_bounds(C, new)):
        head = mll.ShardedArcFace(D, C, scale=64.0, margin=0.5, class_range=(start, stop))
        backbone = torch.nn.Linear(3, D)
        opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": head.parameters()}], lr=0.5, momentum=0.9)
        load_insightface_checkpoints(head, tmp_path, opt)
        assert torch.equal(head.weight.detach(), weights[start:stop])
        assert torch.equal(opt.state[head.weight]["momentum_buffer"], momentum[start:stop])
        for p, g in zip(backbone.parameters(), backbone_grads):  # the backbone's momentum, as saved (one step: g)
            assert torch.equal(opt.state[p]["momentum_buffer"], g)
        assert opt.param_groups[0]["lr"] == 0.1 and float(head.scale) == 64.0  # the saved lr; the head's own scale


def test_insightface_files_load_into_partial_fc_unchanged_or_resharded(tmp_path) -> None:
    weights, _, _ = insightface_run(tmp_path, 3)
    module = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, C)
    load_insightface_checkpoints(module, tmp_path)  # a world of one: every class
    assert torch.equal(module.weight.detach(), weights)
    # and, as in InsightFace, one rank's own file straight into the module of the same rank and world
    saved = torch.load(tmp_path / "checkpoint_gpu_0.pt", weights_only=True)["state_dict_softmax_fc"]
    block = PartialFC_V2(CombinedMarginLoss(64, 1.0, 0.5, 0.0), D, their_block(0, 3)[1])
    block.load_state_dict(saved)


def test_insightface_files_of_another_num_classes_or_out_of_order_are_refused(tmp_path) -> None:
    insightface_run(tmp_path, 3)
    files = insightface_checkpoint_files(tmp_path)
    with pytest.raises(ValueError, match=r"checkpoint 0 holds 8 rows .* rank 0 of 3 holds 9 of num_classes=25: are"):
        load_insightface_checkpoints(mll.ShardedArcFace(D, 25), files)
    with pytest.raises(ValueError, match=r"checkpoint 0 holds 7 rows"):
        load_insightface_checkpoints(mll.ShardedArcFace(D, C), files[::-1])
    (tmp_path / "checkpoint_gpu_1.pt").unlink()
    with pytest.raises(ValueError, match=r"lacks the checkpoints of ranks \[1\] \(it holds ranks \[0, 2\]\)"):
        load_insightface_checkpoints(mll.ShardedArcFace(D, C), tmp_path)
    with pytest.raises(ValueError, match=r"holds no checkpoint_gpu_\{rank\}.pt"):
        insightface_checkpoint_files(tmp_path / "..")


pml = pytest.importorskip("pytorch_metric_learning.losses")


@pytest.mark.parametrize(
    ("make_pml", "make_mll", "k"),
    [
        (lambda: pml.ArcFaceLoss(C, D), lambda r: mll.ShardedArcFace(D, C, class_range=r), 1),
        (
            lambda: pml.SubCenterArcFaceLoss(num_classes=C, embedding_size=D, sub_centers=3),
            lambda r: mll.ShardedArcFace(D, C, 3, class_range=r),
            3,
        ),
        (lambda: pml.ProxyAnchorLoss(C, D), lambda r: mll.ShardedProxyAnchor(D, C, class_range=r), 1),
        (
            lambda: pml.SoftTripleLoss(C, D, centers_per_class=2),
            lambda r: mll.ShardedSoftTriple(D, C, 2, class_range=r),
            2,
        ),
    ],
    ids=["ArcFaceLoss", "SubCenterArcFaceLoss", "ProxyAnchorLoss", "SoftTripleLoss"],
)
def test_a_pml_checkpoint_loads_into_the_blocks_of_any_world(tmp_path, make_pml, make_mll, k) -> None:
    torch.manual_seed(0)
    loss = make_pml()
    opt = torch.optim.SGD(loss.parameters(), lr=0.1, momentum=0.9)
    for p in loss.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    torch.save({"loss": loss.state_dict(), "optimizer": opt.state_dict()}, tmp_path / "pml.pt")
    (param,) = list(loss.parameters())
    rows = param.detach().t() if param.shape[0] == D else param.detach()  # (C·K, D), mll's layout
    moment = opt.state[param]["momentum_buffer"]
    moment = moment.t() if param.shape[0] == D else moment
    for start, stop in MF.shard_bounds(C, 3):
        head = make_mll((start, stop))
        mine = torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9)
        load_pml_checkpoint(head, tmp_path / "pml.pt", mine, loss_key="loss", optimizer_key="optimizer")
        assert torch.equal(head.weight.detach(), rows[start * k : stop * k])
        assert torch.equal(mine.state[head.weight]["momentum_buffer"], moment[start * k : stop * k])


def test_a_pml_state_dict_without_class_weights_is_named() -> None:
    with pytest.raises(ValueError, match=r"none of pml's class weights \(W, fc, proxies\): loss_key\?"):
        load_pml_checkpoint(mll.ArcFace(D, C), {"loss": {"W": torch.zeros(D, C)}})
