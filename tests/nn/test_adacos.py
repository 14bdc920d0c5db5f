import math

import pytest
import torch
import torch.nn.functional as F

import mll
from mll import functional as MF


def test_training_updates_the_scale_buffer_before_scaling() -> None:
    head = mll.AdaCos(8, 20)
    x, y = torch.randn(16, 8), torch.randint(0, 20, (16,))
    cos = MF.cosine_logits(x, head.weight)
    expected_scale = MF.adacos_scale(cos, y, scale=math.sqrt(2) * math.log(19))
    out = head(x, y)
    torch.testing.assert_close(head.scale, expected_scale)
    torch.testing.assert_close(out, cos * expected_scale)
    # a second step starts from the updated scale
    x2 = torch.randn(16, 8)
    expected2 = MF.adacos_scale(MF.cosine_logits(x2, head.weight), scale=expected_scale)
    head(x2)
    torch.testing.assert_close(head.scale, expected2)


def test_scale_is_a_buffer_without_gradient_and_frozen_in_eval() -> None:
    head = mll.AdaCos(8, 20)
    assert "scale" in dict(head.named_buffers()) and all(p is not head.scale for p in head.parameters())
    x, y = torch.randn(16, 8, requires_grad=True), torch.randint(0, 20, (16,))
    F.cross_entropy(head(x, y), y).backward()
    assert not head.scale.requires_grad and x.grad is not None
    head.eval()
    before = head.scale.clone()
    head(torch.randn(16, 8), y)
    assert torch.equal(head.scale, before)


def test_soft_targets_and_reset() -> None:
    head = mll.AdaCos(8, 5, scale=3.0)
    x = torch.randn(6, 8)
    soft = torch.softmax(torch.randn(6, 5), -1)
    expected = MF.adacos_scale(MF.cosine_logits(x, head.weight), soft, scale=3.0)
    head(x, soft)
    torch.testing.assert_close(head.scale, expected)
    head.reset_running_stats()
    assert head.scale.item() == 3.0


def test_scale_stays_positive_when_training_two_classes() -> None:
    head = mll.AdaCos(4, 2)
    opt = torch.optim.SGD(head.parameters(), lr=0.5)
    x = torch.randn(64, 4)
    y = (x[:, 0] > 0).long()
    for _ in range(30):
        opt.zero_grad()
        F.cross_entropy(head(x, y), y).backward()
        opt.step()
        assert torch.isfinite(head.scale) and head.scale >= 0.5


def test_fixed_adacos_accepts_a_scale() -> None:
    # 0.1.6 raised "got multiple values for keyword argument 'scale'"
    head = mll.FixedAdaCos(8, 10, scale=16.0)
    assert head.scale.item() == 16.0
    assert mll.FixedAdaCos(8, 10).scale.item() == pytest.approx(MF.heuristic_scale(10), rel=1e-7)
