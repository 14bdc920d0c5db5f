"""``mll.MVSoftmax`` against the authors' forward passes on the same weights (FaceX-Zoo and the paper authors'
SV-X-Softmax code: logits, loss, gradients), the one documented difference where it applies, its defaults and errors.
The shared batteries run it too (``tests/nn/test_heads.py``, ``tests/nn/test_loss.py``,
``tests/distributed/sharded_heads.py``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mll
from tests import reference_facex_zoo as zref
from tests.nn.against_authors import C, D, N, aligned, compare


@pytest.mark.parametrize("is_am", [True, False])
def test_mv_softmax_equals_facex_zoo_where_the_target_is_easy(is_am) -> None:
    """FaceX-Zoo's MV_Softmax (adaptive, mv_weight = 1 + t) on the same weights, for targets whose cosine is above
    the margin (AM) or positive (Arc), where its conditional margin applies."""
    margin = 0.35 if is_am else 0.5
    head = mll.MVSoftmax(D, C, scale=32.0, margin=margin, t=0.12, margin_type="cos" if is_am else "arc",
                         dtype=torch.float64)  # fmt: skip
    y = torch.arange(N) % C
    x = aligned(head.weight, y, 0.25)
    assert (F.normalize(x) @ F.normalize(head.weight).t()).gather(1, y[:, None]).min() > (margin if is_am else 0)
    theirs = zref.mv_softmax_facex(x, head.weight, y, is_am=is_am, margin=margin, mv_weight=1.12, scale=32.0)
    ours = head(x, y)
    assert (theirs != 32.0 * (F.normalize(x) @ F.normalize(head.weight).t())).sum() > N, "some logits are raised"
    compare(ours, theirs, x, head.weight, y)


@pytest.mark.parametrize("fc_type", ["MV-AM", "MV-Arc"])
@pytest.mark.parametrize("easy_margin", [False, True])
def test_mv_softmax_equals_the_paper_authors_code(fc_type, easy_margin) -> None:
    """xiaoboCASIA/SV-X-Softmax ``fc_layers.py``: with ``easy_margin=False`` everywhere the arc has no wrap-around
    (θ_y < π − m); with their default ``easy_margin=True`` where the target cosine is positive."""
    head = mll.MVSoftmax(D, C, scale=32.0, margin=0.35, t=0.2, margin_type="cos" if fc_type == "MV-AM" else "arc",
                         dtype=torch.float64)  # fmt: skip
    y = torch.arange(N) % C
    x = aligned(head.weight, y, 0.4 if easy_margin else 1.5, seed=103)
    cos_y = (F.normalize(x) @ F.normalize(head.weight).t()).gather(1, y[:, None])
    assert cos_y.min() > (0 if easy_margin else -math.cos(0.35))
    theirs = zref.mv_softmax_svx(x, head.weight, y, fc_type=fc_type, margin=0.35, t=0.2, scale=32.0,
                                 easy_margin=easy_margin)  # fmt: skip
    compare(head(x, y), theirs, x, head.weight, y)


def test_mv_softmax_differs_from_facex_zoo_only_by_its_conditional_margins() -> None:
    """The documented differences: FaceX-Zoo keeps the plain target cosine where cos θ_y <= m (AM) or <= 0 (Arc);
    mll applies the paper's ψ everywhere (ArcFace's with the fix past π − m). Nothing else differs."""
    for is_am, margin in ((True, 0.35), (False, 0.5)):
        head = mll.MVSoftmax(D, C, scale=1.0, margin=margin, margin_type="cos" if is_am else "arc", t=0.12,
                             dtype=torch.float64)  # fmt: skip
        g = torch.Generator().manual_seed(5)
        x = torch.randn(200, D, generator=g, dtype=torch.float64)
        y = torch.randint(0, C, (200,), generator=g)
        cos = F.normalize(x) @ F.normalize(head.weight.detach()).t()
        cos_y = cos.gather(1, y[:, None])
        theirs = zref.mv_softmax_facex(x, head.weight.detach(), y, is_am=is_am, margin=margin, mv_weight=1.12,
                                       scale=1.0)  # fmt: skip
        ours = head(x, y).detach()
        differ = (ours - theirs).abs() > 1e-12
        conditional = cos_y <= (margin if is_am else 0.0)
        target = torch.arange(C) == y[:, None]
        assert differ.any() and torch.equal(differ, conditional & target)


def test_mv_softmax_module_defaults_and_errors() -> None:
    assert mll.MVSoftmax(D, C).margin == 0.35 and mll.MVSoftmax(D, C, margin_type="arc").margin == 0.5
    text = repr(mll.MVSoftmax(D, C, t=0.3, adaptive=False))
    assert "t=0.3, margin_type='cos', adaptive=False" in text
    with pytest.raises(ValueError, match=r"MV-Softmax margin must be in \[0, 1\), but got 1.2"):
        mll.MVSoftmax(D, C, margin=1.2)
    with pytest.raises(ValueError, match=r"MV-Softmax t must be in \[0, inf\), but got -1.0"):
        mll.MVSoftmax(D, C, t=-1.0)
    with pytest.raises(ValueError, match=r"margin_type must be 'cos' \(AM-Softmax\) or 'arc'"):
        mll.MVSoftmax(D, C, margin_type="sphere")
    with pytest.raises(ValueError, match="MVSoftmax needs class indices"):
        mll.MVSoftmax(D, C)(torch.randn(2, D), torch.rand(2, C))
    per_class = mll.MVSoftmax(D, C, t=torch.linspace(0, 1, C), margin=torch.full((C,), 0.2))
    assert set(dict(per_class.named_buffers())) >= {"t", "margin"}
