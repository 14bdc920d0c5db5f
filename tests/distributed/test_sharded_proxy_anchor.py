"""``sharded_proxy_anchor_loss`` on 2 and 3 gloo processes equals the dense Proxy-Anchor loss on the global batch
with all the proxies: float64, 1e-10, for the loss (on every rank, to the bit), every rank's feature gradient and
every block's proxy gradient — uneven and empty per-rank batches, permuted and empty blocks, sub-centers, several
chunks per block. The ranks run in the shared spawn of ``tests/distributed/test_sharded.py``
(``sharded_proxy_anchor.run``)."""

from __future__ import annotations

import pytest
import torch

from mll import functional as MF
from tests.distributed import sharded_proxy_anchor
from tests.distributed.sharded_proxy_anchor import rows

TOL = {"rtol": 1e-10, "atol": 1e-10}
WORLDS = (2, 3)


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", sharded_proxy_anchor.CASES, ids=[case.name for case in sharded_proxy_anchor.CASES])
def test_sharded_proxy_anchor_equals_the_dense_loss(spawned, world, case) -> None:
    got = [r["sharded_proxy_anchor"][case.name] for r in spawned(world)]
    d = sharded_proxy_anchor.data(case, world)
    x = d["x"].clone().requires_grad_(True)
    w = d["w"].clone().requires_grad_(True)
    opts = sharded_proxy_anchor.options(case)
    cos = MF.cosine_logits(x, w, case.k, pooling=opts["pooling"], pooling_temperature=opts["pooling_temperature"])
    dense = MF.proxy_anchor_loss(cos, d["y"], alpha=case.alpha, delta=case.delta)
    grad_x, grad_w = torch.autograd.grad(dense, [x, w])
    scale = world if case.feature_grad_scale is None else case.feature_grad_scale
    for rank, result in enumerate(got):
        start, stop = sharded_proxy_anchor.ranges_of(case, world)[rank]
        torch.testing.assert_close(result["loss"], dense.detach(), **TOL)
        torch.testing.assert_close(result["grad_x"], scale * grad_x[rows(case, world, rank)], **TOL)
        torch.testing.assert_close(result["grad_w"], grad_w[start * case.k : stop * case.k], **TOL)
    assert all(torch.equal(r["loss"], got[0]["loss"]) for r in got)
    if case.name == "empty-global-batch":
        assert float(dense.detach()) == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("world", WORLDS)
def test_a_bad_rank_raises_on_every_rank(spawned, world) -> None:
    errors = [r["sharded_proxy_anchor"]["errors"] for r in spawned(world)]
    for e in errors:
        assert e["bad-label"].startswith("ValueError: invalid input on rank 1: target must hold class indices in"), e
        assert "the margin's float parameters must be the same on every rank" in e["alpha-differs"], e
        assert "invalid input on rank 1: Proxy-Anchor needs class indices" in e["soft-on-one"], e
        assert e["after"] == errors[0]["after"] != "no error"
