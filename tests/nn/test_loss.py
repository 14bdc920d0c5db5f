"""Every head at every scale: ``head.loss()`` equals the cross-entropy of the head's logits, with every option.

For every head exported by ``mll`` (the dense ones), with class indices and soft targets, one or
three sub-centers (max and soft pooling) and per-class margins where the head has a margin: value, gradients of
the features and every parameter, and the running state after the step are those of
``F.cross_entropy(head(x, y), y)`` (plus MagFace's regulariser) in float64. The same battery prints the support
matrix of ``docs/support.md`` (``MLL_WRITE_SUPPORT=1 python -m pytest tests/nn/test_loss.py`` rewrites it);
a test keeps the file equal to what the code does.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mll

# every test runs with the kernel keeping its logits and with it recomputing them
pytestmark = pytest.mark.usefixtures("kernel_mode")

D, C = 6, 7
PER_CLASS = torch.linspace(0.1, 0.5, C, dtype=torch.float64)

# name -> (constructor taking (K, pooling, per_class) -> head or raises, whether it has a margin to make per class)
HEADS: dict[str, Callable[..., nn.Module]] = {
    "NormalizedLinear": lambda k, **kw: mll.NormalizedLinear(D, C, k, **kw),
    "ScaledNormalizedLinear": lambda k, **kw: mll.ScaledNormalizedLinear(D, C, k, scale=4.0, **kw),
    "ScaledNormalizedLinearSqrt": lambda k, **kw: mll.ScaledNormalizedLinearSqrt(D, C, k, **kw),
    "FixedAdaCos": lambda k, **kw: mll.FixedAdaCos(D, C, k, **kw),
    "AdaCos": lambda k, **kw: mll.AdaCos(D, C, k, **kw),
    "CosFace": lambda k, m=0.35, **kw: mll.CosFace(D, C, k, margin=m, **kw),
    "ArcFace": lambda k, m=0.5, **kw: mll.ArcFace(D, C, k, margin=m, **kw),
    "CombinedMargin": lambda k, m=0.2, **kw: mll.CombinedMargin(D, C, k, scale=6.0, m1=1.3, m2=0.2, m3=m, **kw),
    "SphereFace": lambda k, m=3.0, **kw: mll.SphereFace(
        D, C, k, margin=m if isinstance(m, float) else 1 + 5 * m, lambda_=2.0, **kw
    ),
    "CurricularFace": lambda k, m=0.4, **kw: mll.CurricularFace(D, C, k, scale=6.0, margin=m, **kw),
    "AdaFace": lambda k, m=0.4, **kw: mll.AdaFace(D, C, k, scale=6.0, margin=m, **kw),
    "MagFace": lambda k, m=0.45, **kw: mll.MagFace(D, C, k, scale=6.0, lower=1.0, upper=6.0, margin_low=m, **kw),
    "ElasticArcFace": lambda k, m=0.5, **kw: mll.ElasticArcFace(
        D, C, k, scale=6.0, margin=m, generator=torch.Generator().manual_seed(1), **kw
    ),
    "ElasticCosFace": lambda k, m=0.35, **kw: mll.ElasticCosFace(
        D, C, k, scale=6.0, margin=m, generator=torch.Generator().manual_seed(1), **kw
    ),
    "DeepNCM": lambda k, **kw: mll.DeepNCM(D, C, **kw) if k == 1 else _no_sub_centers(),
    "ProxyNCAPlusPlus": lambda k, **kw: mll.ProxyNCAPlusPlus(D, C, k, **kw),
    "ProxyAnchor": lambda k, **kw: mll.ProxyAnchor(D, C, k, alpha=8.0, delta=0.2, **kw),
    "MVSoftmax": lambda k, m=0.35, **kw: mll.MVSoftmax(D, C, k, scale=6.0, margin=m, t=0.3, **kw),
    "NPCFace": lambda k, m=0.5, **kw: mll.NPCFace(D, C, k, scale=6.0, margin=m, **kw),
    "ArcNegFace": lambda k, m=0.5, **kw: mll.ArcNegFace(D, C, k, scale=6.0, margin=m, **kw),
    "CircleLoss": lambda k, m=0.25, **kw: mll.CircleLoss(D, C, k, scale=16.0, margin=m, **kw),
    "AdaMSoftmax": lambda k, m=0.35, **kw: mll.AdaMSoftmax(D, C, k, scale=6.0, margin=m, lambda_=3.0, **kw),
    "SoftTriple": lambda k, m=0.05, **kw: mll.SoftTriple(D, C, k, scale=8.0, margin=m, tau=0.5, **kw),
    "LargeMarginSoftmax": lambda k, m=3.0, **kw: mll.LargeMarginSoftmax(
        D, C, k, margin=m if isinstance(m, float) else 1 + 5 * m, lambda_=1.0, **kw
    ),
}
#: heads whose training step takes class indices only
HARD_ONLY = {"CurricularFace", "ProxyAnchor", "MVSoftmax", "NPCFace", "ArcNegFace", "CircleLoss"}
#: heads whose loss() adds ``head.regularizer()`` (a per-class term) to the cross-entropy, in both modes
REGULARISED = {"AdaMSoftmax", "SoftTriple"}
MARGIN_FREE = {"NormalizedLinear", "ScaledNormalizedLinear", "ScaledNormalizedLinearSqrt", "FixedAdaCos", "AdaCos",
               "DeepNCM", "ProxyNCAPlusPlus", "ProxyAnchor"}  # fmt: skip


def _no_sub_centers() -> nn.Module:
    raise ValueError("DeepNCM has no sub-centers: a class mean is one vector")


def test_every_exported_head_is_in_the_battery() -> None:
    exported = {name for name in mll.__all__ if isinstance(getattr(mll, name), type)}
    dense = {name for name in exported if issubclass(getattr(mll, name), nn.Module) and "Sharded" not in name}
    assert dense == set(HEADS)


def make(name: str, k: int = 1, pooling: str = "max", per_class: bool = False) -> nn.Module:
    kwargs: dict[str, Any] = {"dtype": torch.float64}
    if pooling != "max":
        kwargs["pooling"], kwargs["pooling_temperature"] = pooling, 0.2
    if per_class:
        kwargs["m"] = PER_CLASS.clone()
    head = HEADS[name](k, **kwargs)
    if name == "DeepNCM":  # means that are not all zero
        with torch.no_grad():
            head.means.copy_(torch.randn(C, D, generator=torch.Generator().manual_seed(2), dtype=torch.float64))
    return head


def batch(target: str, seed: int = 0) -> tuple[torch.Tensor, Any, Any]:
    """Features ``(2, 4, d)``, the target as given to ``loss()``, and as a tensor for the dense path."""
    # not the stream the heads' weights come from (the tests seed the global generator with 0): a feature equal to
    # a weight row sits at cos = 1, where ArcFace's slope ~ 1/sin θ turns one ulp of the cosine into O(1) changes
    g = torch.Generator().manual_seed(1000 + seed)
    x = (3 * torch.randn(2, 4, D, generator=g, dtype=torch.float64)).requires_grad_(True)
    y = torch.randint(0, C, (2, 4), generator=g)
    if target == "indices":
        return x, y, y
    if target == "soft":
        soft = torch.softmax(torch.randn(2, 4, C, generator=g, dtype=torch.float64), -1)
        return x, soft, soft
    classes = torch.stack([y, torch.randint(0, C, (2, 4), generator=g)], -1)
    lam = torch.rand(2, 4, 1, generator=g, dtype=torch.float64)
    weights = torch.cat([lam, 1 - lam], -1)
    dense = torch.zeros(2, 4, C, dtype=torch.float64).scatter_add_(-1, classes, weights)
    return x, (classes, weights), dense


def dense_loss(head: nn.Module, name: str, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if name == "ProxyAnchor":  # not a cross-entropy: its loss from the dense cosines, in both modes
        return mll.functional.proxy_anchor_loss(head.cosine(x), target, alpha=head.alpha, delta=head.delta)
    logits = head(x, target)
    flat = target.reshape(-1, C) if target.is_floating_point() else target.reshape(-1)
    loss = F.cross_entropy(logits.reshape(-1, C), flat)
    if name == "MagFace":  # its documented extra term, in both modes
        loss = loss + head.lambda_g * head.regularizer(x)
    if name in REGULARISED:
        loss = loss + head.regularizer()
    return loss


def check_cell(name: str, target: str, k: int, pooling: str, per_class: bool, training: bool = True) -> str:
    """Run one cell: 'yes' when loss() equals the dense cross-entropy (value, gradients, state), else the error."""
    try:
        head = make(name, k, pooling, per_class).train(training)
    except ValueError as error:
        return f"n/a: {error}"
    twin = copy.deepcopy(head)
    if isinstance(getattr(head, "generator", None), torch.Generator):
        twin.generator = torch.Generator().manual_seed(1)
    x, given, dense_target = batch(target)
    try:
        chunked = head.loss(x, given, chunk_size=3)
    except (ValueError, TypeError) as error:
        return f"n/a: {error}"
    want = dense_loss(twin, name, x, dense_target)
    torch.testing.assert_close(chunked, want, rtol=1e-11, atol=1e-11)
    params = [p for p in head.parameters() if p.requires_grad]
    got = torch.autograd.grad(chunked, [x, *params], retain_graph=True)
    expected = torch.autograd.grad(want, [x, *(p for p in twin.parameters() if p.requires_grad)])
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    for (key, a), b in zip(head.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, msg=key)
    return "yes"


CELLS = [
    (target, k, pooling, per_class)
    for target in ("indices", "soft")
    for k, pooling in ((1, "max"), (3, "max"), (3, "soft"))
    for per_class in (False, True)
]


def _applies(name: str, per_class: bool) -> bool:
    return not (per_class and name in MARGIN_FREE)


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize(("target", "k", "pooling", "per_class"), CELLS)
def test_loss_equals_the_cross_entropy_of_the_logits(name, target, k, pooling, per_class) -> None:
    if not _applies(name, per_class):
        pytest.skip("no margin to give per class")
    outcome = check_cell(name, target, k, pooling, per_class)
    if name in HARD_ONLY and target != "indices":
        assert outcome.startswith(f"n/a: {name} needs class indices"), outcome
    elif name == "DeepNCM" and k > 1:
        assert outcome == "n/a: DeepNCM has no sub-centers: a class mean is one vector", outcome
    elif name == "LargeMarginSoftmax" and k > 1:
        assert outcome.startswith("n/a: LargeMarginSoftmax has one weight vector per class"), outcome
    else:
        assert outcome == "yes", outcome


@pytest.mark.parametrize("name", HEADS)
@pytest.mark.parametrize("target", ["indices", "soft"])
def test_loss_in_eval_mode_is_the_margin_free_cross_entropy(name, target) -> None:
    if name == "ProxyAnchor" and target == "soft":
        pytest.skip("class indices only")
    assert check_cell(name, target, 1, "max", False, training=False) == "yes"


# ---------------------------------------------------------------------------------------------- the docs' matrix

COLUMNS = [
    ("class indices", ("indices", 1, "max", False)),
    ("soft targets", ("soft", 1, "max", False)),
    ("K sub-centers (max)", ("indices", 3, "max", False)),
    ("K sub-centers (soft)", ("indices", 3, "soft", False)),
    ("per-class margins", ("indices", 1, "max", True)),
]
KINDS = {"hard": "indices", "soft": "soft", "pair": "pairs"}


def sharded_cell(name: str) -> str:
    """The sharded form and the targets with which ``test_sharded.py::test_every_head_shards_exactly`` runs it on 2
    and 3 processes."""
    from tests.distributed.sharded_heads import HEAD_CASES

    cases = [case for case in HEAD_CASES if case.head == name]
    if not hasattr(mll, f"Sharded{name}") or not cases:
        return "no"
    kinds = [kind for key, kind in KINDS.items() if any(case.target == key for case in cases)]
    heads = [case.build() for case in cases]
    if any(getattr(h, "num_sub_centers", 1) > 1 for h in heads):
        kinds.append("K")
    if any(getattr(h, "pooling", "max") == "soft" for h in heads):
        kinds.append("soft pooling")
    if any(
        isinstance(v, torch.Tensor) and v.shape == (h.out_features,)
        for h in heads
        for v in vars(h)["_buffers"].values()
    ):
        kinds.append("per-class")
    return f"`Sharded{name}`: {', '.join(kinds)}"


def support_matrix() -> str:
    lines = [
        "| head | dense `head(x, y)` | " + " | ".join(f"`loss()`: {title}" for title, _ in COLUMNS) + " | sharded |",
        "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " | --- |",
    ]
    notes: list[str] = []
    for name in HEADS:
        row = [f"`{name}`", "yes"]
        for _, cell in COLUMNS:
            if not _applies(name, cell[3]):
                row.append("—")
                continue
            outcome = check_cell(name, *cell)
            if outcome == "yes":
                row.append("yes")
            else:
                note = outcome[len("n/a: ") :]
                notes += [] if note in notes else [note]
                row.append(f"no [{notes.index(note) + 1}]")
        row.append(sharded_cell(name))
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"[{i}] {note}" for i, note in enumerate(notes, 1)]
    return "\n".join(lines)


SUPPORT = Path(__file__).parents[2] / "docs" / "support.md"
BEGIN, END = "<!-- support matrix: begin -->", "<!-- support matrix: end -->"


def test_the_docs_support_matrix_is_what_the_code_does() -> None:
    table = support_matrix()
    text = SUPPORT.read_text()
    head, rest = text.split(BEGIN)
    _, tail = rest.split(END)
    if os.environ.get("MLL_WRITE_SUPPORT"):
        SUPPORT.write_text(f"{head}{BEGIN}\n{table}\n{END}{tail}")
        text = SUPPORT.read_text()
    assert f"{BEGIN}\n{table}\n{END}" in text, "docs/support.md is stale: rerun with MLL_WRITE_SUPPORT=1"
