"""metric_learning_layers: the 0.1.6 names, its README example verbatim, and its checkpoints."""

import math
import runpy
from pathlib import Path

import pytest
import torch

import metric_learning_layers
import mll

ROOT = Path(__file__).resolve().parents[1]
NAMES = [
    "NormalizedLinear",
    "ScaledNormalizedLinear",
    "ScaledNormalizedLinearSqrt",
    "CosFace",
    "ArcFace",
    "FixedAdaCos",
    "AdaCos",
    "DeepNCM",
]


@pytest.mark.parametrize("name", NAMES)
def test_compat_names_are_the_same_objects(name) -> None:
    from metric_learning_layers import mml as legacy_module

    assert getattr(metric_learning_layers, name) is getattr(mll, name) is getattr(legacy_module, name)


def test_legacy_utils() -> None:
    from metric_learning_layers.utils import heuristic_scale, one_hot

    labels = torch.tensor([2, 0])
    assert torch.equal(one_hot(labels, 3), torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]]))
    soft = torch.rand(2, 3)
    assert one_hot(soft, 3) is soft  # 0.1.6 passed 2-D (soft) labels through
    assert heuristic_scale(10) == pytest.approx(math.sqrt(2) * math.log(9))


def test_seed_readme_example_runs_verbatim() -> None:
    example = ROOT / "examples" / "seed_readme.py"
    seed = ROOT.parent / "shared" / "SEED-README.md"
    if seed.exists():  # the copy we ship is the README's code block, byte for byte
        block = seed.read_text().split("```py\n", 1)[1].split("```", 1)[0]
        assert example.read_text() == block
    env = runpy.run_path(str(example))
    assert env["af_out"].shape == (32, 10) and env["ac_out"].shape == (32, 10)
    assert torch.isfinite(env["af_out"]).all() and torch.isfinite(env["ac_out"]).all()


def legacy_state(name, d, c, k, scale, generator):
    """A state_dict in the 0.1.6 format: weight (C*K, d), scale a Parameter of shape (1,)."""
    if name == "DeepNCM":
        return {
            "means": torch.randn(c, d, generator=generator),
            "running_means": torch.randn(c, d, generator=generator),
        }
    state = {"weight": torch.randn(c * k, d, generator=generator)}
    if name != "NormalizedLinear":
        state["scale"] = torch.nn.Parameter(torch.tensor([scale]).float(), requires_grad=False)
    return state


def legacy_eval_output(name, state, x, k):
    """What 0.1.6 returned in eval mode, re-derived from its source: clamped cosines times the scale."""
    if name == "DeepNCM":
        cos = torch.nn.functional.normalize(x, dim=-1) @ torch.nn.functional.normalize(state["means"], dim=-1).T
        return cos * math.sqrt(2) * math.log(state["means"].shape[0] - 1)
    cos = torch.nn.functional.linear(
        torch.nn.functional.normalize(x, dim=-1), torch.nn.functional.normalize(state["weight"], dim=-1)
    ).clamp(-1 + 1e-7, 1 - 1e-7)
    if k > 1:
        cos = cos.view(cos.shape[0], -1, k).max(-1).values
    if name == "NormalizedLinear":
        return cos
    factor = math.sqrt(x.shape[-1]) if name == "ScaledNormalizedLinearSqrt" else 1.0
    return cos * state["scale"] * factor


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("k", [1, 3])
def test_0_1_6_checkpoints_load_and_give_the_same_eval_outputs(name, k) -> None:
    if name == "DeepNCM" and k > 1:
        pytest.skip("DeepNCM has no sub-centers")
    d, c = 16, 10
    g = torch.Generator().manual_seed(7)
    state = legacy_state(name, d, c, k, 12.5, g)
    cls = getattr(metric_learning_layers, name)
    head = cls(d, c) if name == "DeepNCM" else cls(d, c, k)
    head.load_state_dict(state)  # strict: every key accounted for
    x = torch.randn(8, d, generator=g)
    torch.testing.assert_close(head.eval()(x), legacy_eval_output(name, state, x, k), rtol=1e-5, atol=1e-5)
    if "scale" in state:
        assert head.scale.shape == () and head.scale.item() == 12.5


@pytest.mark.parametrize(
    ("labels", "num_classes", "error", "message"),
    [
        # 0.1.6 raised here (F.one_hot); an all-zero row would train silently on a wrong target
        (
            torch.tensor([0, 5]),
            5,
            ValueError,
            "labels must be class indices in [0, 5), but got out-of-range values 5 (1 of 2 labels)",
        ),
        (torch.tensor([0, -1, 7, 7]), 5, ValueError, "but got out-of-range values -1, 7 (3 of 4 labels)"),
        (torch.arange(20), 3, ValueError, "but got out-of-range values 3, 4, 5, 6, 7, 8, 9, 10, ... (17 of 20 labels)"),
        (
            torch.tensor([0, 1], dtype=torch.uint8),
            1,
            ValueError,
            "labels must be class indices in [0, 1), but got out-of-range values 1 (1 of 2 labels)",
        ),
        (
            torch.tensor([0.0, 1.0]),
            3,
            TypeError,
            "labels must be class indices of an integer dtype (or soft labels of "
            "shape (N, C)), but got dtype torch.float32 and shape (2,)",
        ),
        (torch.tensor([True, False]), 3, TypeError, "labels must be class indices of an integer dtype"),
        ([0, 1], 3, TypeError, "labels must be a torch.Tensor of class indices, but got list"),
        (torch.tensor([0, 1]), 0, ValueError, "num_classes must be an integer >= 1, but got 0"),
        (torch.tensor([0, 1]), 3.0, ValueError, "num_classes must be an integer >= 1, but got 3.0"),
    ],
)
def test_legacy_one_hot_names_bad_labels(labels, num_classes, error, message) -> None:
    from metric_learning_layers.utils import one_hot

    with pytest.raises(error) as info:
        one_hot(labels, num_classes)
    assert type(info.value) is error and message in str(info.value)


def test_legacy_one_hot_stays_vmap_and_compile_friendly() -> None:
    from metric_learning_layers.utils import one_hot

    labels = torch.tensor([[0, 1], [2, 0]])
    expected = torch.stack([one_hot(row, 3) for row in labels])
    torch.testing.assert_close(torch.func.vmap(lambda row: one_hot(row, 3))(labels), expected)
    # values cannot be read inside a transform: an out-of-range label gives a zero row there, as documented
    assert torch.func.vmap(lambda row: one_hot(row, 3))(torch.tensor([[0, 3]]))[0, 1].sum() == 0
    compiled = torch.compile(lambda row: one_hot(row, 3), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(labels[0]), expected[0])
    torch.testing.assert_close(one_hot(torch.tensor([1, 2], dtype=torch.int8), 4), torch.eye(4)[[1, 2]])
