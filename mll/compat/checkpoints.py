"""Peers' checkpoints into mll's heads on any number of ranks: InsightFace's per-rank files, pytorch-metric-learning's
losses. Both are :func:`mll.nn.load_resharded` with the peer's layout: each rank maps the files and reads only the
rows of its own block of classes (and of the optimizer's per-row state), never the whole C×d matrix.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor, nn

from mll import functional as MF
from mll.nn import load_resharded

__all__ = ["insightface_checkpoint_files", "load_insightface_checkpoints", "load_pml_checkpoint"]

PathLike = Union[str, "os.PathLike[str]"]
_INSIGHTFACE_FILE = re.compile(r"checkpoint_gpu_(\d+)\.pt$")


def insightface_checkpoint_files(folder: PathLike) -> list[Path]:
    """InsightFace's per-rank checkpoints in ``folder`` (``checkpoint_gpu_{rank}.pt``, as ``train_v2.py`` writes
    them), in rank order (``checkpoint_gpu_10.pt`` after ``checkpoint_gpu_9.pt``). Refuses a gap in the ranks."""
    found = {
        int(m.group(1)): Path(folder) / name for name in os.listdir(folder) if (m := _INSIGHTFACE_FILE.match(name))
    }
    if not found:
        raise ValueError(f"{folder} holds no checkpoint_gpu_{{rank}}.pt (InsightFace's per-rank checkpoints)")
    missing = sorted(set(range(max(found) + 1)) - set(found))
    if missing:
        raise ValueError(
            f"{folder} lacks the checkpoints of ranks {missing} (it holds ranks {sorted(found)}): every rank's file "
            "is needed, each holds its block of classes"
        )
    return [found[rank] for rank in range(len(found))]


def _num_classes(head: nn.Module) -> int:
    for name in ("out_features", "num_classes"):
        value = getattr(head, name, None)
        if isinstance(value, int):
            return value
    raise TypeError(f"the head must be an mll head or a PartialFC_V2, but got {type(head).__name__}")


def load_insightface_checkpoints(
    head: nn.Module,
    checkpoints: Union[PathLike, Sequence[PathLike]],
    optimizer: Optional[torch.optim.Optimizer] = None,
    *,
    head_key: str = "state_dict_softmax_fc",
    optimizer_key: str = "state_optimizer",
) -> None:
    """Load InsightFace's per-rank checkpoints (``train_v2.py``'s ``checkpoint_gpu_{rank}.pt``) into this rank's head,
    on any number of ranks.

    Rank r of InsightFace's A ranks saved the weights of its block of classes — the first ``C mod A`` ranks one class
    more (:func:`mll.functional.shard_bounds`) — under ``state_dict_softmax_fc``, and its optimizer (the backbone's
    parameters, then the weights) under ``state_optimizer``. The head — :class:`mll.compat.insightface.PartialFC_V2`,
    or any mll head with one weight row per class (``mll.ShardedArcFace(..., scale=64, margin=0.5)`` for
    ``CombinedMarginLoss(64, 1, 0.5, 0)``; its scale is its own, InsightFace's files do not hold it) — takes the
    rows of its block; the optimizer, built as InsightFace's (the backbone's parameters, then the head's), takes the
    momentum re-sharded and the rest as saved. The backbone's weights, the epoch and the scheduler are in the same
    files: ``torch.load(files[0], mmap=True)`` reads them.

    Args:
        head (nn.Module): this rank's head.
        checkpoints (path or sequence of paths): InsightFace's output folder, or its files in rank order.
        optimizer (torch.optim.Optimizer, optional): this rank's optimizer, loaded with the re-sharded state.
        head_key (str): where a checkpoint holds the ``PartialFC_V2`` state.
        optimizer_key (str): where a checkpoint holds the optimizer state.
    """
    if isinstance(checkpoints, (str, os.PathLike)):
        files: list[Any] = insightface_checkpoint_files(checkpoints)
    else:
        files = list(checkpoints)
    num_classes = _num_classes(head)
    if len(files) > num_classes:
        raise ValueError(f"{len(files)} checkpoints for {num_classes} classes: InsightFace gives every rank a class")
    blocks = MF.shard_bounds(num_classes, len(files))
    for rank, (file, (start, stop)) in enumerate(zip(files, blocks)):
        saved = (
            file if isinstance(file, Mapping) else torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        )
        weight = saved.get(head_key, {}).get("weight") if isinstance(saved.get(head_key), Mapping) else None
        if not isinstance(weight, Tensor) or weight.shape[0] != stop - start:
            rows = None if not isinstance(weight, Tensor) else weight.shape[0]
            raise ValueError(
                f"checkpoint {rank} holds {rows} rows of {head_key}['weight'], but rank {rank} of {len(files)} holds "
                f"{stop - start} of num_classes={num_classes}: are the files in rank order, and num_classes the run's?"
            )
    load_resharded(head, files, optimizer, head_key=head_key, optimizer_key=optimizer_key if optimizer else None,
                   blocks=blocks, strict=False)  # fmt: skip


#: pytorch-metric-learning's class-weight parameters: (D, C·K) ones and (C·K, D) ones
_PML_COLUMNS, _PML_ROWS = ("W", "fc"), ("proxies",)


def load_pml_checkpoint(
    head: nn.Module,
    checkpoint: Union[PathLike, Mapping[str, Any]],
    optimizer: Optional[torch.optim.Optimizer] = None,
    *,
    loss_key: Optional[str] = None,
    optimizer_key: Optional[str] = None,
) -> None:
    """Load a pytorch-metric-learning loss's checkpoint into this rank's block of an mll head (any number of ranks).

    pml's classification losses keep their class weights as ``W`` of shape ``(D, C·K)`` (ArcFaceLoss, CosFaceLoss,
    SubCenterArcFaceLoss — column ``c·K + k``, sub-center k of class c, as mll's row —, SphereFaceLoss,
    LargeMarginSoftmaxLoss, NormalizedSoftmaxLoss), ``fc`` of shape ``(D, C·K)`` (SoftTripleLoss) or ``proxies`` of
    shape ``(C, D)`` (ProxyAnchorLoss, ProxyNCALoss). Under DDP every rank holds all of them; one rank's file is the
    checkpoint. The head takes the columns (rows) of its block, read from the mapped file without the rest; with
    ``optimizer`` — built over the head's weights where pml's optimizer had the loss's — the per-row state of the
    weights (momentum, Adam's moments, in the same layout as the weights) is cut to the block too. The head's scale
    and margins are its constructor's (pml keeps them as arguments, not in the state_dict).

    Args:
        head (nn.Module): this rank's mll head (sharded or not) with the loss's hyper-parameters.
        checkpoint (path or dict): the loss's ``state_dict``, or a checkpoint that holds it at ``loss_key``.
        optimizer (torch.optim.Optimizer, optional): loaded with the re-sharded state (``optimizer_key``).
        loss_key (str, optional): where the checkpoint holds the loss's ``state_dict`` (None: it is the checkpoint).
        optimizer_key (str, optional): where it holds the optimizer's ``state_dict``.
    """

    def transform(state: Mapping[str, Any], optimizer_state: Optional[Mapping[str, Any]]) -> tuple[Any, Any]:
        key = next((k for k in (*_PML_COLUMNS, *_PML_ROWS) if k in state), None)
        if key is None:
            raise ValueError(
                f"the checkpoint holds {sorted(state)[:8]}, none of pml's class weights (W, fc, proxies): loss_key?"
            )
        weight = state[key]
        if key in _PML_COLUMNS:
            weight = weight.t()  # a view of the mapped (D, C·K) tensor: a block of columns is read, not the rest
        if optimizer_state is not None and key in _PML_COLUMNS:
            state = {i: {n: _t(v, weight.shape) for n, v in e.items()} for i, e in optimizer_state["state"].items()}
            optimizer_state = {**optimizer_state, "state": state}
        return {"weight": weight}, optimizer_state

    load_resharded(head, [checkpoint], optimizer, head_key=loss_key, optimizer_key=optimizer_key,
                   blocks=[(0, _num_classes(head))], strict=False, transform=transform)  # fmt: skip


def _t(value: Any, rows_shape: tuple[int, ...]) -> Any:
    """An optimizer entry laid out as pml's (D, C·K) weights, as rows (C·K, D); any other entry as it is."""
    if isinstance(value, Tensor) and value.dim() == 2 and tuple(value.shape) == (rows_shape[1], rows_shape[0]):
        return value.t()
    return value
