import torch
import torch.nn.functional as F

import mll
from mll import functional as MF


def test_logits_use_the_means_before_the_update() -> None:
    head = mll.DeepNCM(4, 6, alpha=0.8)
    with torch.no_grad():
        head.means.copy_(torch.randn(6, 4))
    old = head.means.clone()
    x, y = torch.randn(10, 4, requires_grad=True), torch.randint(0, 6, (10,))
    out = head(x, y)
    torch.testing.assert_close(out, MF.ncm_logits(x, old, head.scale))
    torch.testing.assert_close(head.means, MF.ncm_update(old, x, y, 0.8))
    F.cross_entropy(out, y).backward()  # the in-place update must not break autograd
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_unseen_classes_have_finite_logits() -> None:
    head = mll.DeepNCM(4, 6)
    out = head(torch.randn(3, 4), torch.tensor([0, 0, 1]))
    assert (out == 0).all()  # every mean was zero before this first update
    out = head.eval()(torch.randn(3, 4))
    assert torch.isfinite(out).all() and (out[:, 2:] == 0).all()


def test_soft_targets_update_weighted_means() -> None:
    head = mll.DeepNCM(3, 4, alpha=0.5)
    x = torch.randn(5, 3)
    soft = torch.softmax(torch.randn(5, 4), -1)
    head(x, soft)
    torch.testing.assert_close(head.means, MF.ncm_update(torch.zeros(4, 3), x, soft, 0.5))


def test_eval_freezes_means_and_scale_is_configurable() -> None:
    head = mll.DeepNCM(3, 4, scale=7.0).eval()
    head(torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0]))
    assert (head.means == 0).all() and head.scale == 7.0
    head.train()(torch.randn(5, 3), torch.tensor([0, 1, 2, 3, 0]))
    head.reset_running_stats()
    assert (head.means == 0).all()


def test_many_classes_update_is_vectorised() -> None:
    head = mll.DeepNCM(16, 100_000)
    y = torch.randint(0, 100_000, (64,))
    head(torch.randn(64, 16), y)
    assert (head.means.abs().sum(-1) > 0).sum() == y.unique().numel()
