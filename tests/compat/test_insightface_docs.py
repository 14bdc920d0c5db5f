"""The code of "Coming from InsightFace" runs as it is written: its training loops and checkpoints on two gloo ranks,
its re-shards on three, its comparison of the numbers in one process (printing what the page shows).

The page's InsightFace loop runs with its two imports replaced by the page's one line — which is what the page
says a user does. ``backbone`` (in DDP), ``train_loader``, ``num_classes``, ``rank`` and ``output`` are the user's:
here a linear layer, two random batches per rank, 50 classes, the rank, one shared folder."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from tests.conftest import run_world

PAGE = Path(__file__).parents[2] / "docs" / "from-insightface.md"
NUM_CLASSES = 50
THEIR_IMPORTS = "from losses import CombinedMarginLoss  # InsightFace's recognition/arcface_torch\n" \
    "from partial_fc_v2 import PartialFC_V2\n"  # fmt: skip


def blocks() -> list[str]:
    found = re.findall(r"```python\n(.*?)```", PAGE.read_text(), flags=re.S)
    assert len(found) == 9, len(found)
    return found


def compat_loop() -> str:
    """The InsightFace loop with the import changed as the page says."""
    loop, line = blocks()[0], blocks()[1]
    assert THEIR_IMPORTS in loop
    return loop.replace(THEIR_IMPORTS, line)


def prelude(rank: int, world: int, folder: str, train: bool) -> dict[str, Any]:
    torch.manual_seed(0)  # the same backbone on every rank
    backbone = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(16, 512))
    g = torch.Generator().manual_seed(10 + rank)
    loader = [(torch.randn(4, 16, generator=g), torch.randint(0, NUM_CLASSES, (4,), generator=g)) for _ in range(2)]
    return {"backbone": backbone, "train_loader": loader if train else [], "num_classes": NUM_CLASSES, "rank": rank,
            "output": folder}  # fmt: skip


def run(code: str, namespace: dict[str, Any]) -> None:
    exec(compile(code, str(PAGE), "exec"), namespace)


def worker(rank: int, world: int, path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{path}/store", rank=rank, world_size=world)
    folder = str(Path(path).parent / "output")
    code = blocks()
    out: dict[str, Any] = {}
    try:
        train = world == 2
        theirs = prelude(rank, world, folder, train)  # the InsightFace program, its import changed
        run(compat_loop(), theirs)
        out["compat_loss"] = theirs.get("loss")
        if train:
            run(code[4], theirs)  # InsightFace's checkpoint of this rank
            saved = theirs["module_partial_fc"].weight.detach().clone()
            dist.barrier()
            run(code[5], theirs)  # resumed as train_v2.py does
            out["same_world_resume"] = torch.equal(theirs["module_partial_fc"].weight.detach(), saved)
        run(code[6], theirs)  # every rank's files, on this number of ranks
        module, native = theirs["module_partial_fc"], theirs["native"]
        out["compat_block"] = (module.class_start, module.num_local, module.weight.detach().clone())
        out["compat_momentum"] = theirs["opt"].state[module.weight]["momentum_buffer"].clone()
        out["native_block"] = (native.class_start, native.class_stop, native.weight.detach().clone())

        mine = prelude(rank, world, folder, train)  # the native program
        mine["torch"] = torch
        run(code[2], mine)
        out["native_loss"] = mine.get("loss")
        if train:
            run(code[7], mine)
            dist.barrier()
        run(code[8], mine)
        head = mine["head"]
        out["resharded"] = (head.class_start, head.class_stop, head.weight.detach().clone(),
                            mine["opt"].state[head.weight]["momentum_buffer"].clone(), head.sampling_step)  # fmt: skip
        torch.save(out, f"{path}/rank{rank}.pt")
        dist.barrier()  # no rank shuts its connections while another still works (gloo aborts on that)
    finally:
        dist.destroy_process_group()


def saved_rows(folder: Path, pattern: str, key: tuple[str, ...]) -> torch.Tensor:
    """Every saved rank's block of ``key`` in class order."""
    files = sorted(folder.glob(pattern), key=lambda f: int(re.findall(r"\d+", f.name)[-1]))
    parts = []
    for file in files:
        value: Any = torch.load(file, weights_only=True)
        for k in key:
            value = value[k]
        parts.append(value)
    return torch.cat(parts)


@pytest.mark.slow
def test_the_pages_loops_and_checkpoints_run_on_two_ranks_and_reshard_on_three(tmp_path) -> None:
    for name in ("w2", "w3", "output"):
        (tmp_path / name).mkdir()
    two = run_world(worker, 2, tmp_path / "w2")
    output = tmp_path / "output"
    weights = saved_rows(output, "checkpoint_gpu_*.pt", ("state_dict_softmax_fc", "weight"))
    optimizers = [torch.load(output / f"checkpoint_gpu_{r}.pt", weights_only=True)["state_optimizer"] for r in range(2)]
    momentum = torch.cat([state["state"][2]["momentum_buffer"] for state in optimizers])  # 0, 1: the backbone's
    head_rows = saved_rows(output, "mll-rank*.pt", ("head", "weight"))
    for got in two:
        assert torch.isfinite(got["compat_loss"]) and torch.isfinite(got["native_loss"])
        assert got["same_world_resume"]
    three = run_world(worker, 3, tmp_path / "w3")
    for world_results in (two, three):
        for got in world_results:
            start, num_local, w = got["compat_block"]
            assert torch.equal(w, weights[start : start + num_local])
            assert torch.equal(got["compat_momentum"], momentum[start : start + num_local])
            start, stop, w = got["native_block"]
            assert torch.equal(w, weights[start:stop])
            start, stop, w, m, step = got["resharded"]
            assert torch.equal(w, head_rows[start:stop]) and m.shape == w.shape and step == 2
    assert [got["resharded"][:2] for got in three] == [(0, 17), (17, 34), (34, 50)]


def test_the_comparison_prints_what_the_page_shows(capsys: pytest.CaptureFixture[str]) -> None:
    run(blocks()[3], {})
    page = PAGE.read_text()
    shown = page.split(blocks()[3])[1].split("```text\n")[1].split("```")[0]
    assert capsys.readouterr().out == shown


def test_the_mapping_names_every_argument() -> None:
    table = PAGE.read_text().split("## The mapping")[1].split("## ")[0]
    for name in ("`s`", "`m1`", "`m2`", "`m3`", "interclass_filtering_threshold", "sample_rate", "fp16",
                 "embedding_size", "num_classes", "state_dict", "checkpoint_gpu_"):  # fmt: skip
        assert name in table, name
