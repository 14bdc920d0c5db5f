import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from mll import functional as MF
from tests import reference_papers as ref


def target_probability(scale: float, num_classes: int, target_logit: float) -> float:
    """Softmax probability of a target with cosine logit ``target_logit`` against C − 1 orthogonal classes."""
    logits = torch.zeros(num_classes, dtype=torch.float64)
    logits[0] = scale * target_logit
    return torch.softmax(logits, 0)[0].item()


@given(st.integers(3, 10**7))
def test_heuristic_without_margin_is_the_adacos_value(c) -> None:
    assert MF.heuristic_scale(c) == pytest.approx(math.sqrt(2) * math.log(c - 1), rel=1e-12)


@pytest.mark.parametrize(("margin_type", "margin"), [("cos", 0.0), ("cos", 0.35), ("cos", 0.5), ("arc", 0.5)])
@pytest.mark.parametrize("c", [3, 10, 1000, 100_000])
def test_heuristic_gives_probability_one_half_at_pi_over_4(margin_type, margin, c) -> None:
    s = MF.heuristic_scale(c, margin, margin_type=margin_type)
    psi = math.cos(math.pi / 4) - margin if margin_type == "cos" else math.cos(math.pi / 4 + margin)
    assert target_probability(s, c, psi) == pytest.approx(0.5, rel=1e-9)


def test_heuristic_fixes_the_cosface_example_of_0_1_6() -> None:
    # 0.1.6 used √2·ln(C − 1) for CosFace too: a perfect embedding could not pass probability 0.12
    old = math.sqrt(2) * math.log(999)
    assert target_probability(old, 1000, 1 - 0.5) == pytest.approx(0.1166, abs=1e-3)
    assert target_probability(MF.heuristic_scale(1000, 0.5), 1000, 1 - 0.5) > 0.999


def test_heuristic_for_two_classes_is_the_three_class_value() -> None:
    assert MF.heuristic_scale(2) == MF.heuristic_scale(3) == pytest.approx(math.sqrt(2) * math.log(2))
    assert MF.heuristic_scale(2, 0.3, margin_type="arc") == MF.heuristic_scale(3, 0.3, margin_type="arc")


@given(st.integers(2, 10**9), st.floats(0, 0.999999), st.floats(0, math.pi / 2 - 1e-6))
def test_heuristic_is_positive_and_finite_everywhere(c, cos_m, arc_m) -> None:
    for s in (MF.heuristic_scale(c, cos_m, margin_type="cos"), MF.heuristic_scale(c, arc_m, margin_type="arc")):
        assert math.isfinite(s) and s > 0


@given(st.floats(0, 0.99), st.floats(0, 0.99))
def test_heuristic_grows_with_the_margin(m1, m2) -> None:
    m1, m2 = sorted((m1, m2))
    assert MF.heuristic_scale(100, m1) <= MF.heuristic_scale(100, m2)


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ((1,), {}, r"num_classes must be an integer >= 2.*got 1"),
        ((10, 1.0), {}, r"CosFace margin must be in \[0, 1\)"),
        ((10, 1.6), {"margin_type": "arc"}, r"ArcFace margin"),
        (
            (10,),
            {"margin_type": "tan"},
            r"margin_type must be one of \['arc', 'arc_easy', 'combined', 'cos', 'none', 'sphere'\]",
        ),
    ],
)
def test_heuristic_bad_arguments(args, kwargs, match) -> None:
    with pytest.raises(ValueError, match=match):
        MF.heuristic_scale(*args, **kwargs)


@st.composite
def cosines(draw):
    n = draw(st.integers(1, 7))
    c = draw(st.integers(2, 6))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    cos = torch.rand(n, c, generator=g, dtype=torch.float64) * 2 - 1
    labels = torch.randint(0, c, (n,), generator=g)
    soft = torch.rand(n, c, generator=g, dtype=torch.float64)
    return cos, labels, soft / soft.sum(-1, keepdim=True)


@given(cosines(), st.floats(0.1, 40.0))
def test_adacos_matches_the_paper(batch, s) -> None:
    cos, labels, soft = batch
    c = cos.shape[-1]
    for target, t in ((labels, ref.onehot(labels.numpy(), c)), (soft, soft.numpy())):
        new = MF.adacos_scale(cos, target, scale=s)
        assert new.shape == () and not new.requires_grad
        assert new.item() == pytest.approx(ref.adacos_scale(cos.numpy(), t, s), rel=1e-9)


@given(cosines(), st.floats(0.1, 40.0))
def test_adacos_without_labels_uses_the_predicted_class(batch, s) -> None:
    cos, _, _ = batch
    predicted = cos.argmax(-1)
    assert MF.adacos_scale(cos, scale=s) == MF.adacos_scale(cos, predicted, scale=s)


@given(cosines(), st.floats(0.1, 40.0))
def test_adacos_hard_labels_equal_one_hot_soft_labels(batch, s) -> None:
    cos, labels, _ = batch
    onehot = (torch.arange(cos.shape[-1]) == labels[:, None]).double()
    torch.testing.assert_close(MF.adacos_scale(cos, labels, scale=s), MF.adacos_scale(cos, onehot, scale=s))


@given(cosines(), st.floats(1e-4, 1e4), st.sampled_from([-1.0, 1.0, 0.0, None]))
def test_adacos_scale_stays_finite_and_positive(batch, s, fill) -> None:
    cos, labels, soft = batch
    if fill is not None:
        cos = torch.full_like(cos, fill)
    for target in (labels, soft, None):
        new = MF.adacos_scale(
            cos.float(), target if target is None or target.dtype == torch.long else target.float(), scale=s
        )
        assert torch.isfinite(new) and new > 0


def test_adacos_floor_for_two_classes() -> None:
    # with one non-target AdaCos's fixed point is s = 0: the floor keeps the scale usable
    cos = torch.tensor([[0.9, -0.9], [-0.8, 0.8]])
    assert MF.adacos_scale(cos, torch.tensor([0, 1]), scale=5.0).item() == 0.5
    assert MF.adacos_scale(cos, torch.tensor([0, 1]), scale=5.0, min_scale=2.0).item() == 2.0


def test_adacos_accepts_leading_dimensions_and_tensor_scale() -> None:
    cos = torch.rand(2, 3, 4) * 2 - 1
    labels = torch.randint(0, 4, (2, 3))
    flat = MF.adacos_scale(cos.reshape(6, 4), labels.reshape(6), scale=torch.tensor(3.0))
    torch.testing.assert_close(MF.adacos_scale(cos, labels, scale=3.0), flat)


def test_adacos_takes_no_gradient_and_keeps_input() -> None:
    cos = (torch.rand(4, 3) * 2 - 1).requires_grad_(True)
    before = cos.detach().clone()
    new = MF.adacos_scale(cos, torch.tensor([0, 1, 2, 0]), scale=torch.tensor(3.0, requires_grad=True))
    assert not new.requires_grad and torch.equal(cos.detach(), before)


def test_adacos_empty_batch_keeps_the_scale() -> None:
    assert MF.adacos_scale(torch.zeros(0, 5), scale=3.0).item() == 3.0
    assert MF.adacos_scale(torch.zeros(0, 5), torch.zeros(0, dtype=torch.long), scale=torch.tensor(2.5)).item() == 2.5


def test_adacos_bad_input() -> None:
    with pytest.raises(ValueError, match=r"class indices in \[0, 3\)"):
        MF.adacos_scale(torch.rand(2, 3), torch.tensor([0, 3]), scale=2.0)
    with pytest.raises(ValueError, match="scale must be positive"):
        MF.adacos_scale(torch.rand(2, 3), scale=-2.0)
    with pytest.raises(TypeError, match="cosine must have a floating-point dtype"):
        MF.adacos_scale(torch.ones(2, 3, dtype=torch.long), scale=2.0)


def test_the_default_scale_solves_for_the_target_margin() -> None:
    assert MF.heuristic_scale(1000, MF.MV_COS(0.35, 0.2)) == pytest.approx(MF.heuristic_scale(1000, MF.COS(0.35)))
    assert MF.heuristic_scale(1000, MF.MV_ARC(0.5, 0.2)) == pytest.approx(MF.heuristic_scale(1000, MF.ARC(0.5)))
    assert math.isfinite(MF.heuristic_scale(10, MF.MV_ARC_FIXED(0.5, 1.0)))
    assert MF.heuristic_scale(1000, MF.NPC(0.5, 0.4, 1.1, 0.2)) == pytest.approx(MF.heuristic_scale(1000, MF.ARC(0.4)))
