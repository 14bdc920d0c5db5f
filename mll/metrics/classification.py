r"""Top-k accuracy of a trained head on labelled features, over chunks of classes.

The classes are walked in chunks with a running top-k, as ``loss()`` walks them: a million classes cost one chunk
of ``N×chunk`` scores at a time, never the ``N×C`` logits. A sample counts at k when its class is among the k best
scores, equal scores taken by class index (lower first, the order of a stable descending sort of its logits).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import torch
from torch import Tensor, nn

from mll import functional as MF
from mll.metrics import _checks as C
from mll.metrics import _search as S

__all__ = ["classification_accuracy", "head_accuracy"]

Pooling = Literal["max", "soft"]


def classification_accuracy(
    input: Tensor,
    labels: Tensor,
    weight: Tensor,
    *,
    num_sub_centers: int = 1,
    pooling: Pooling = "max",
    pooling_temperature: float = 0.1,
    normalized: bool = True,
    bias: Optional[Tensor] = None,
    scale: Union[float, Tensor] = 1.0,
    top_k: Sequence[int] = (1, 5),
    chunk_size: Optional[int] = None,
    query_block: Optional[int] = None,
    progress: Optional[bool] = None,
) -> dict[str, float]:
    r"""The fraction of samples whose class is among the k best-scoring classes, for each k.

    .. math:: \mathrm{acc@}k = \frac{1}{N} \sum_i \big[\,\lvert\{c : s_{ic} > s_{iy_i}\}\rvert
              + \lvert\{c < y_i : s_{ic} = s_{iy_i}\}\rvert < k\,\big]

    with scores ``s = scale · cosine_logits(x, W, K)`` (pooled cosines, :func:`mll.functional.cosine_logits`), or
    ``s = scale · (x Wᵀ + b)`` when ``normalized=False``. Scores are computed in float64 for float64 inputs, else in
    float32.

    Args:
        input (Tensor[*, d]): features.
        labels (Tensor[*]): integer classes in ``[0, C)``.
        weight (Tensor[C*K, d]): class weights; row ``c*K + k`` is sub-center k of class c.
        num_sub_centers (int): K.
        pooling (str): how sub-centers pool, ``"max"`` or ``"soft"`` (see :func:`mll.functional.cosine_logits`).
        pooling_temperature (float): γ of soft pooling.
        normalized (bool): cosines (True) or plain dot products (False: K must be 1).
        bias (Tensor[C], optional): added to dot products (``normalized=False``, as ``nn.Linear``).
        scale (float or 0-dim Tensor): the logits' factor (its sign matters, its size does not).
        top_k (sequence of int): the k of the ``accuracy_at_{k}`` keys, each at most C.
        chunk_size (int, optional): classes per chunk (default: from the memory budget).
        query_block (int, optional): samples per block.
        progress (bool, optional): as in :func:`mll.metrics.retrieval_metrics`.

    Returns:
        dict of floats: ``accuracy_at_{k}`` for each k.
    """
    x = C.check_embeddings(input, "input")
    y = C.check_labels(labels, "labels", input.shape[:-1], "input")
    if not isinstance(weight, Tensor) or not weight.is_floating_point() or weight.dim() != 2:
        got = f"shape {C.shape_str(weight.shape)}, {weight.dtype}" if isinstance(weight, Tensor) else type(weight)
        raise ValueError(f"weight must be a floating-point tensor of shape (C * num_sub_centers, d), but got {got}")
    C.check_positive_int(num_sub_centers, "num_sub_centers")
    k_sub = int(num_sub_centers)
    if weight.shape[1] != x.shape[1] or weight.shape[0] % k_sub or weight.shape[0] == 0:
        raise ValueError(
            f"weight must have shape (C * {k_sub}, {x.shape[1]}) for num_sub_centers = {k_sub} and features of size "
            f"{x.shape[1]}, but got shape {C.shape_str(weight.shape)}"
        )
    classes = weight.shape[0] // k_sub
    if not normalized and k_sub != 1:
        raise ValueError(f"normalized=False takes one weight row per class (dot products), but got {k_sub}")
    if bias is not None and (normalized or not isinstance(bias, Tensor) or tuple(bias.shape) != (classes,)):
        raise ValueError(f"bias must be a tensor of shape ({classes},) and comes with normalized=False")
    C.check_same_device(("input", x), ("labels", y), ("weight", weight), ("bias", bias))
    ks = C.check_ks(top_k, "top_k")
    if ks[-1] > classes:
        raise ValueError(f"top_k holds k = {ks[-1]}, but there are only {classes} classes")
    for name, value in (("chunk_size", chunk_size), ("query_block", query_block)):
        C.check_positive_int(value, name, allow_none=True)
    low, high = int(y.min()), int(y.max())
    if low < 0 or high >= classes:
        raise ValueError(f"labels must be classes in [0, {classes}), but got values in [{low}, {high}]")
    dtype = S.similarity_dtype(x, weight)
    x = x.to(dtype)
    factor = scale.detach().to(dtype) if isinstance(scale, Tensor) else float(scale)

    def scores(q0: int, q1: int, c0: int, c1: int, out: Optional[Tensor]) -> Tensor:
        rows = weight[c0 * k_sub : c1 * k_sub].detach().to(dtype)
        if normalized:
            chunk = MF.cosine_logits(x[q0:q1], rows, k_sub, pooling=pooling, pooling_temperature=pooling_temperature)
        else:
            chunk = torch.mm(x[q0:q1], rows.T, out=out)
            if bias is not None:
                chunk += bias[c0:c1].detach().to(dtype)
        return chunk * factor if not isinstance(factor, float) or factor != 1.0 else chunk

    n, kmax = x.shape[0], ks[-1]
    bq, bc = S.plan_blocks(n, classes, kmax, x.element_size() * k_sub, S.block_budget(x.device), query_block,
                           chunk_size)  # fmt: skip
    hits = torch.zeros(len(ks), dtype=torch.int64, device=x.device)
    bar = S.Progress(n, progress, "accuracy")
    try:
        with torch.no_grad():
            for q0, q1, _, indices in S.search(
                scores, n, classes, kmax, query_block=bq, reference_block=bc, dtype=dtype, device=x.device,
                progress=bar, buffered=not normalized,  # cosine_logits allocates its own block
            ):  # fmt: skip
                found = (indices == y[q0:q1, None]).cumsum(1)
                hits += torch.stack([found[:, k - 1].sum() for k in ks])
    finally:
        bar.close()
    return {f"accuracy_at_{k}": count / n for k, count in zip(ks, hits.tolist())}


def head_accuracy(
    head: nn.Module,
    input: Tensor,
    labels: Tensor,
    *,
    top_k: Sequence[int] = (1, 5),
    chunk_size: Optional[int] = None,
    query_block: Optional[int] = None,
    progress: Optional[bool] = None,
) -> dict[str, float]:
    """:func:`classification_accuracy` of a head's eval-mode logits: its class weights (DeepNCM: its class means),
    sub-centers, pooling and logit scale; for ``LargeMarginSoftmax`` and ``nn.Linear``, dot products (plus bias).

    Equals the top-k accuracy of ``head.eval()(input)`` (ties by class index) without the ``N×C`` logits. A
    class-sharded head holds only its block of classes: gather it into its dense head first.

    Args:
        head (nn.Module): an ``mll`` head, or an ``nn.Linear`` classifier.
        input (Tensor[*, d]): features.
        labels (Tensor[*]): integer classes.
        top_k (sequence of int): as in :func:`classification_accuracy`.
        chunk_size (int, optional): classes per chunk.
        query_block (int, optional): samples per block.
        progress (bool, optional): a tqdm bar (see :func:`mll.metrics.retrieval_metrics`).

    Returns:
        dict of floats: ``accuracy_at_{k}`` for each k.
    """
    from mll import nn as heads

    options: dict[str, Any]
    if isinstance(head, nn.Linear):
        options = {"weight": head.weight, "normalized": False, "bias": head.bias}
    elif isinstance(head, heads.DeepNCM):
        options = {"weight": head.means, "scale": head.scale}
    elif isinstance(head, heads.LargeMarginSoftmax):
        options = {"weight": head.weight, "normalized": False, "scale": head.logit_scale()}
    elif all(hasattr(head, name) for name in ("weight", "num_sub_centers", "pooling", "logit_scale")):
        logit_scale: Any = head.logit_scale  # a method of the cosine heads (nn.Module's typing says Tensor)
        options = {"weight": head.weight, "num_sub_centers": head.num_sub_centers, "pooling": head.pooling,
                   "pooling_temperature": head.pooling_temperature, "scale": logit_scale()}  # fmt: skip
    else:
        raise TypeError(f"head_accuracy takes an mll head or an nn.Linear, but got {type(head).__name__}")
    rows = options["weight"].shape[0]
    expected = getattr(head, "out_features", rows) * options.get("num_sub_centers", 1)
    if rows != expected:
        raise ValueError(
            f"{type(head).__name__} holds {rows} weight rows for {expected} (a class-sharded head holds its block "
            "only): evaluate its dense form"
        )
    return classification_accuracy(input, labels, top_k=top_k, chunk_size=chunk_size, query_block=query_block,
                                   progress=progress, **options)  # fmt: skip
