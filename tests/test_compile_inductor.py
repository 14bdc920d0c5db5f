"""The compile claims of the docs, under the backend users get: ``torch.compile(fn)`` — Inductor — not the
``aot_eager``/``eager`` backends the other compile tests use to stay fast (those check the graph; Inductor also
generates and compiles the code, where it has failed on our graphs: a scatter into a one-class chunk).

One compilation per path, each against the eager step (values and gradients): the dense logits of every margin
family in one graph; the chunked loss of families of each kind (target only, non-target part, parameters with a
gradient) with a one-class last chunk; three heads — dense ``forward`` and ``loss()``, running state included — and
Proxy-Anchor's ``loss()`` when a chunk holds one class. Small shapes; slow tier (Inductor's C++ toolchain).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import mll
from mll import functional as MF

pytestmark = pytest.mark.slow

N, D, C = 6, 8, 7
TOL = {"rtol": 1e-4, "atol": 1e-5}


def data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, D, generator=g), torch.randn(C, D, generator=g), torch.randint(0, C, (N,), generator=g)


def margins(x: torch.Tensor, w: torch.Tensor) -> dict[str, MF.Margin]:
    """Every margin family of ``mll.functional``, bound as its head binds it (statistics from the features)."""
    norms = x.norm(dim=-1, keepdim=True)
    per_class = torch.linspace(0.1, 0.4, C)
    return {
        "NO_MARGIN": MF.NO_MARGIN(),
        "COS": MF.COS(per_class),
        "ARC": MF.ARC(0.5),
        "ARC_EASY": MF.ARC_EASY(0.5),
        "COMBINED": MF.COMBINED(1.2, 0.2, 0.1),
        "SPHERE": MF.SPHERE(2.0, torch.tensor(1.5)),
        "CURRICULAR": MF.CURRICULAR(0.5, torch.tensor(0.3)),
        "ADA": MF.ADA(0.4, torch.tanh(norms - 2.0)),
        "MAG": MF.MAG(norms, 1.0, 4.0, 0.45, 0.8),
        "MAG_EASY": MF.MAG_EASY(norms, 1.0, 4.0, 0.45, 0.8),
        "ADAPTIVE": MF.ADAPTIVE(per_class),
        "ARC_NEG": MF.ARC_NEG(0.5, 1.2, 2.0),
        "NPC": MF.NPC(0.5, 0.4 + 0.1 * torch.sigmoid(norms), 1.1, 0.2),
        "MV_ARC": MF.MV_ARC(0.5, 0.2),
        "MV_ARC_FIXED": MF.MV_ARC_FIXED(0.5, 0.2),
        "MV_COS": MF.MV_COS(0.35, 0.2),
        "MV_COS_FIXED": MF.MV_COS_FIXED(0.35, 0.2),
        "CIRCLE": MF.CIRCLE(0.25),
        "CIRCLE_EXACT": MF.CIRCLE_EXACT(0.25),
        "LARGE_MARGIN": MF.LARGE_MARGIN(norms, w.norm(dim=-1), 2.0, torch.tensor(0.0)),
    }


def compare(fn: Any, *inputs: torch.Tensor) -> None:
    """``fn`` compiled by Inductor against eager: the value and the inputs' gradients."""
    results = []
    for f in (torch.compile(fn), fn):
        leaves = [t.clone().requires_grad_() for t in inputs]
        value = f(*leaves)
        results.append((value.detach(), torch.autograd.grad(value, leaves)))
    torch.testing.assert_close(results[0], results[1], **TOL)


def test_the_dense_logits_of_every_family_compile() -> None:
    x, w, y = data()
    assert set(margins(x, w)) == {n for n, v in vars(MF).items() if isinstance(v, MF.MarginFamily)}

    def dense(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        cos = MF.cosine_logits(x, w)
        total = x.new_zeros(())
        for name, margin in margins(x, w).items():
            # L-Softmax's family shapes dot products x·w, the others cosines
            z = F.linear(x, w) if name == "LARGE_MARGIN" else cos
            total = total + F.cross_entropy(MF.margin_logits(z, y, margin, scale=8.0), y)
        return total

    torch._dynamo.reset()
    compare(dense, x, w)


def test_the_chunked_loss_compiles_with_a_one_class_chunk() -> None:
    """``margin_cross_entropy`` (the chunk loop unrolls) of a target-only family, one with a non-target part and one
    whose parameter has a gradient (MagFace's magnitude), in chunks of 3 of 7 classes: the last holds one class."""
    x, w, y = data(1)

    def chunked(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        bound = margins(x, w)
        return sum(
            MF.margin_cross_entropy(x, w, y, scale=8.0, margin=bound[name], chunk_size=3)
            for name in ("ARC", "CURRICULAR", "MAG")
        )

    torch._dynamo.reset()
    compare(chunked, x, w)


HEADS = {  # one of each kind: a per-class margin and a trainable scale, running state and negatives, class means
    "ArcFace": lambda: mll.ArcFace(D, C, 2, trainable_scale=True, margin=torch.linspace(0.3, 0.5, C)),
    "CurricularFace": lambda: mll.CurricularFace(D, C),
    "DeepNCM": lambda: mll.DeepNCM(D, C),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_heads_compile_their_dense_step_and_loss(name) -> None:
    """``F.cross_entropy(head(x, y), y) + head.loss(x, y, chunk_size=3)`` compiled, against the eager step on a copy:
    values, gradients and the running state after two steps."""
    torch.manual_seed(0)
    head = HEADS[name]()
    twin = copy.deepcopy(head)

    def step(h: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(h(x, y), y) + h.loss(x, y, chunk_size=3)

    torch._dynamo.reset()
    compiled = torch.compile(step)
    for seed in range(2):
        x, _, y = data(seed)
        results = []
        for fn, h in ((compiled, head), (step, twin)):
            xs = x.clone().requires_grad_()
            loss = fn(h, xs, y)
            grads = torch.autograd.grad(loss, [xs, *(p for p in h.parameters() if p.requires_grad)])
            results.append((loss.detach(), grads, [b.clone() for b in h.buffers()]))
        torch.testing.assert_close(results[0], results[1], **TOL)


def test_proxy_anchor_loss_compiles_when_a_chunk_holds_one_class() -> None:
    """``ProxyAnchor.loss`` compiled, C = 1025 with a batch of 256: the default chunk is 1024 classes, so the last
    holds one (Inductor failed to generate the code of its per-class sums). Value and gradients, as eager."""
    torch.manual_seed(0)
    head = mll.ProxyAnchor(D, 1025)
    assert mll.functional.chunked.default_chunk_size(256, 1025, 1) == 1024
    x, y = torch.randn(256, D), torch.randint(0, 1025, (256,))
    torch._dynamo.reset()
    results = []
    for fn in (torch.compile(head.loss), head.loss):
        xs = x.clone().requires_grad_()
        loss = fn(xs, y)
        results.append((loss.detach(), torch.autograd.grad(loss, [xs, head.weight])))
    torch.testing.assert_close(results[0], results[1], **TOL)
    assert math.isfinite(float(results[0][0]))
