"""Top-k accuracy over class chunks against the dense logits of every exported head, ties by class index."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import mll
from mll import metrics as M
from tests.conftest import exported_heads
from tests.metrics.reference import exact_embeddings

D, C = 6, 23
TOP_K = (1, 3, 7)


def accuracy_reference(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...]) -> dict[str, float]:
    """From the dense logits: a sample's rank is the position of its class in a stable descending sort."""
    rows = logits.reshape(-1, logits.shape[-1]).tolist()
    wanted = labels.reshape(-1).tolist()
    ranks = [sorted(range(len(row)), key=lambda c: (-row[c], c)).index(y) for row, y in zip(rows, wanted)]
    return {f"accuracy_at_{k}": sum(r < k for r in ranks) / len(ranks) for k in ks}


def trained_looking(head: nn.Module) -> nn.Module:
    """DeepNCM's means start at zero (every logit 0): give them directions, as training would."""
    if isinstance(head, mll.DeepNCM):
        with torch.no_grad():
            head.means.copy_(torch.randn_like(head.means))
    return head.eval()


@pytest.mark.parametrize("name", exported_heads(sharded=False))
def test_every_head_equals_its_dense_eval_logits(name: str) -> None:
    torch.manual_seed(0)
    head = trained_looking(getattr(mll, name)(D, C, dtype=torch.float64))
    x, y = torch.randn(3, 11, D, dtype=torch.float64), torch.randint(0, C, (3, 11))
    with torch.no_grad():
        want = accuracy_reference(head(x), y, TOP_K)
    got = M.head_accuracy(head, x, y, top_k=TOP_K, chunk_size=5, query_block=4)
    assert got == want
    assert M.head_accuracy(head, x, y, top_k=TOP_K) == want  # one chunk, one block
    assert head.training is False


@pytest.mark.parametrize(
    "make",
    [
        lambda: mll.ArcFace(D, C, num_sub_centers=3, dtype=torch.float64),
        lambda: mll.SoftTriple(D, C, dtype=torch.float64),  # soft pooling over 10 centres
        lambda: mll.NormalizedLinear(D, C, 2, pooling="soft", pooling_temperature=0.3, dtype=torch.float64),
        lambda: nn.Linear(D, C, dtype=torch.float64),
        lambda: nn.Linear(D, C, bias=False, dtype=torch.float64),
    ],
    ids=["sub-centers-max", "soft-triple", "soft-pooling", "linear", "linear-no-bias"],
)
def test_sub_centers_pooling_and_linear_classifiers(make) -> None:
    torch.manual_seed(1)
    head = make().eval()
    x, y = torch.randn(40, D, dtype=torch.float64), torch.randint(0, C, (40,))
    with torch.no_grad():
        want = accuracy_reference(head(x), y, TOP_K)
    assert M.head_accuracy(head, x, y, top_k=TOP_K, chunk_size=4) == want


def test_ties_go_to_the_lower_class() -> None:
    head = mll.DeepNCM(D, C).eval()  # every mean zero: every logit 0, a tie of all classes
    y = torch.tensor([0, 1, 2, 6, 7, 22])
    got = M.head_accuracy(head, torch.randn(6, D), y, top_k=(1, 7), chunk_size=3)
    assert got == {"accuracy_at_1": 1 / 6, "accuracy_at_7": 4 / 6}


@given(
    st.integers(0, 2**31 - 1),
    st.integers(1, 12),
    st.sampled_from([1, 2, 3]),
    st.integers(1, 30),
    st.integers(1, 13),
    st.integers(1, 30),
)
def test_functional_form_with_exact_ties(seed: int, classes: int, sub: int, n: int, chunk: int, block: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x, w = exact_embeddings(n, 16, g), exact_embeddings(classes * sub, 16, g)
    y = torch.randint(classes, (n,), generator=g)
    ks = tuple(sorted({1, classes, 1 + seed % classes}))
    pooled = (nn.functional.normalize(x, dim=1) @ nn.functional.normalize(w, dim=1).T).unflatten(1, (classes, sub))
    want = accuracy_reference(pooled.amax(2), y, ks)
    got = M.classification_accuracy(x, y, w, num_sub_centers=sub, top_k=ks, chunk_size=chunk, query_block=block)
    assert got == want


def test_a_million_classes_in_chunks() -> None:
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(1_000_000, 4, generator=g), torch.randn(5, 4, generator=g)
    logits = nn.functional.normalize(x, dim=1) @ nn.functional.normalize(w, dim=1).T
    y = torch.cat([logits[:3].argmax(1), torch.tensor([17, 999_999])])
    got = M.classification_accuracy(x, y, w, top_k=(1, 1000))
    ranks = (logits > logits.gather(1, y[:, None])).sum(1)
    assert got == {"accuracy_at_1": 0.6, "accuracy_at_1000": int((ranks < 1000).sum()) / 5}


@pytest.mark.parametrize(
    ("call", "error", "message"),
    [
        (lambda: M.classification_accuracy(torch.randn(3, 4), torch.tensor([0, 1, 5]), torch.randn(5, 4)),
         ValueError, r"labels must be classes in \[0, 5\), but got values in \[0, 5\]"),
        (lambda: M.classification_accuracy(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.randn(5, 4),
                                           top_k=(6,)), ValueError, "top_k holds k = 6, but there are only 5 classes"),
        (lambda: M.classification_accuracy(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.randn(5, 3)),
         ValueError, r"weight must have shape \(C \* 1, 4\)"),
        (lambda: M.classification_accuracy(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.randn(5, 4),
                                           num_sub_centers=2), ValueError, r"weight must have shape \(C \* 2, 4\)"),
        (lambda: M.classification_accuracy(torch.randn(3, 4), torch.tensor([0, 1]), torch.randn(5, 4)),
         ValueError, r"labels must have shape \(3\), one label per row of input"),
        (lambda: M.classification_accuracy(torch.randn(3, 4), torch.tensor([0, 1, 2]), torch.randn(5, 4),
                                           top_k=(0,)), ValueError, "top_k must hold integers >= 1"),
        (lambda: M.head_accuracy(nn.ReLU(), torch.randn(3, 4), torch.tensor([0, 1, 2])), TypeError,
         "head_accuracy takes an mll head or an nn.Linear, but got ReLU"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_with_a_clear_error(call, error, message) -> None:
    with pytest.raises(error, match=message):
        call()


def test_a_head_holding_a_block_of_its_classes_is_refused() -> None:
    head = mll.ArcFace(4, 10, num_sub_centers=2)
    head.weight = nn.Parameter(head.weight[:8].detach())  # as a class-sharded head's block
    with pytest.raises(ValueError, match=r"ArcFace holds 8 weight rows for 20 .* evaluate its dense form"):
        M.head_accuracy(head, torch.randn(3, 4), torch.tensor([0, 1, 2]))
