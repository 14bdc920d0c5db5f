"""The code of the "Coming from pytorch-metric-learning" page runs, in order, as one script, and says what it shows."""

import re
from pathlib import Path

import pytest
import torch

import mll

pytest.importorskip("pytorch_metric_learning")  # the page runs pml beside mll (the dev extra installs it)
PAGE = Path(__file__).parents[2] / "docs" / "from-pml.md"


def test_the_from_pml_guide_runs_and_its_numbers_agree(capsys: pytest.CaptureFixture[str]) -> None:
    blocks = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(blocks) == 4
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(PAGE), "exec"), namespace)  # the page's code, as written
    # the one-line migration: pml's loss and mll.compat.pml's on the same weights, miner, regularizer, reducer
    torch.testing.assert_close(namespace["mll_loss"], namespace["pml_loss"], rtol=1e-5, atol=1e-6)
    # the miner's weights on the native head
    torch.testing.assert_close(namespace["native"], namespace["compat"], rtol=1e-5, atol=1e-6)
    assert isinstance(namespace["head"], mll.ArcFace) and namespace["head"].num_sub_centers == 3
    assert set(namespace["native_state"]) == {"weight", "scale"} and set(namespace["back"]) == {"W"}
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("pml ") and "mll.compat.pml" in printed[0]
