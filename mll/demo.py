"""Train each head on scikit-learn's bundled handwritten digits and compare them, closed-set and open-set.

    python -m mll.demo                       # every head, 3 seeds: under a minute on 2 CPU cores
    python -m mll.demo --heads ArcFace CosFace --epochs 10 --seeds 1 --out demo-output --seed 1

Open-set protocol (as in retrieval benchmarks): the network trains on digits 0–5 only; digits 6–9 are never seen
in training and are used for retrieval with the learned embedding: Recall@1 and MAP@R (Musgrave, Belongie & Lim,
"A Metric Learning Reality Check", ECCV 2020), by cosine similarity between embeddings, as mll.metrics computes
them (pytorch-metric-learning's definitions). Closed-set accuracy is the
head's own prediction on held-out samples of digits 0–5. The metrics use a 32-dimensional embedding and are the
mean (± standard deviation) over several seeds; a second, 3-dimensional model per head is drawn on the unit sphere,
as in the ArcFace paper's toy figure.

Writes to the output folder: ``results.md`` (the table), ``sphere.png`` (test embeddings on the sphere per head),
``angles.png`` (angles to the target class weight vs the other classes) and ``curves.png`` (training loss and
closed-set accuracy per epoch). Needs the ``demo`` extra: scikit-learn, matplotlib, tqdm.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import mll

TRAIN_CLASSES = 6  # digits 0..5 train; 6..9 are the open set

HEADS: dict[str, Callable[[int, int], nn.Module]] = {
    "Linear (softmax)": lambda d, c: nn.Linear(d, c),
    "ScaledNormalizedLinear": lambda d, c: mll.ScaledNormalizedLinear(d, c),
    "CosFace": lambda d, c: mll.CosFace(d, c, margin=0.35),
    "ArcFace": lambda d, c: mll.ArcFace(d, c, margin=0.5),
    "AdaCos": lambda d, c: mll.AdaCos(d, c),
    "DeepNCM": lambda d, c: mll.DeepNCM(d, c),
}
#: the zoo's heads (issue 14), trained by name or with ``--heads all`` (the default set and these)
ZOO_HEADS: dict[str, Callable[[int, int], nn.Module]] = {
    "ProxyNCAPlusPlus": lambda d, c: mll.ProxyNCAPlusPlus(d, c),
    "ProxyAnchor": lambda d, c: mll.ProxyAnchor(d, c),
    "MVSoftmax": lambda d, c: mll.MVSoftmax(d, c),
    "NPCFace": lambda d, c: mll.NPCFace(d, c),
    "ArcNegFace": lambda d, c: mll.ArcNegFace(d, c),
    "CircleLoss": lambda d, c: mll.CircleLoss(d, c),
    "AdaMSoftmax": lambda d, c: mll.AdaMSoftmax(d, c),
    "SoftTriple": lambda d, c: mll.SoftTriple(d, c),
    "LargeMarginSoftmax": lambda d, c: mll.LargeMarginSoftmax(d, c),
}
ALL_HEADS = {**HEADS, **ZOO_HEADS}


@dataclass
class Split:
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor  # held-out samples of the training classes
    y_test: Tensor
    x_open: Tensor  # every sample of the classes never trained on
    y_open: Tensor


@dataclass
class Run:
    name: str
    accuracy: float = 0.0
    recall_at_1: float = 0.0
    map_at_r: float = 0.0
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    accuracies: list[float] = field(default_factory=list)
    test_embedding: Tensor | None = None
    open_embedding: Tensor | None = None
    target_angles: Tensor | None = None
    other_angles: Tensor | None = None


def load_digits_split(seed: int) -> Split:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x = torch.tensor(images, dtype=torch.float32) / 16.0
    y = torch.tensor(labels)
    seen = y < TRAIN_CLASSES
    x_seen, y_seen = x[seen], y[seen]
    # int(): Generator.manual_seed refuses NumPy integers
    perm = torch.randperm(len(y_seen), generator=torch.Generator().manual_seed(int(seed)))
    cut = int(0.8 * len(perm))
    return Split(x_seen[perm[:cut]], y_seen[perm[:cut]], x_seen[perm[cut:]], y_seen[perm[cut:]], x[~seen], y[~seen])


def class_weights(head: nn.Module) -> Tensor:
    rows = head.means if isinstance(head, mll.DeepNCM) else head.weight
    assert isinstance(rows, Tensor)
    return rows.detach()


def angles(features: Tensor, weights: Tensor, labels: Tensor, num_sub_centers: int = 1) -> tuple[Tensor, Tensor]:
    """Angles (degrees) between features and their class weight, and between features and the other classes; with
    K sub-centers per class (rows ``c*K + k``), the angle to a class is the one to its nearest sub-center."""
    cos = mll.functional.normalize(features) @ mll.functional.normalize(weights).T
    cos = cos.unflatten(-1, (-1, num_sub_centers)).amax(-1).clamp(-1, 1)
    theta = torch.rad2deg(torch.arccos(cos))
    target = torch.arange(cos.shape[1]) == labels[:, None]
    return theta[target], theta[~target]


def train_one(name: str, split: Split, epochs: int, seed: int, dim: int, progress: bool) -> Run:
    from tqdm import tqdm

    seed = int(seed)  # Generator.manual_seed refuses NumPy integers
    torch.manual_seed(seed)
    backbone = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, dim))
    head = ALL_HEADS[name](dim, TRAIN_CLASSES)
    optimizer = torch.optim.Adam([*backbone.parameters(), *head.parameters()], lr=3e-3)
    order = torch.Generator().manual_seed(seed)
    run = Run(name)
    start = time.perf_counter()
    for _ in tqdm(range(epochs), desc=f"{name:<24} d={dim:<3} seed {seed}", disable=not progress, leave=False):
        backbone.train(), head.train()
        total, count = 0.0, 0
        for batch in torch.randperm(len(split.y_train), generator=order).split(64):
            features = backbone(split.x_train[batch])
            labels = split.y_train[batch]
            if name in ZOO_HEADS:  # the paper's objective: loss() adds the head's regulariser, if it has one
                loss = head.loss(features, labels)  # type: ignore[operator]
            else:
                logits = head(features) if isinstance(head, nn.Linear) else head(features, labels)
                loss = F.cross_entropy(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, count = total + loss.item() * len(batch), count + len(batch)
        run.losses.append(total / count)
        backbone.eval(), head.eval()
        with torch.no_grad():
            run.accuracies.append((head(backbone(split.x_test)).argmax(1) == split.y_test).float().mean().item())
    run.seconds = time.perf_counter() - start
    with torch.no_grad():
        run.test_embedding = backbone(split.x_test)
        run.open_embedding = backbone(split.x_open)
        run.accuracy = run.accuracies[-1]
        retrieval = mll.metrics.retrieval_metrics(run.open_embedding, split.y_open, recall_at_k=(1,), progress=False)
        run.recall_at_1 = retrieval["recall_at_1"]
        run.map_at_r = retrieval["mean_average_precision_at_r"]
        run.target_angles, run.other_angles = angles(
            run.test_embedding, class_weights(head), split.y_test, getattr(head, "num_sub_centers", 1)
        )
    return run


def table(results: dict[str, list[Run]]) -> str:
    """Mean ± standard deviation over the seeds of each head."""

    def stat(values: list[float]) -> str:
        t = torch.tensor(values)
        return f"{t.mean():.3f} ± {t.std():.3f}" if len(values) > 1 else f"{t.mean():.3f}"

    lines = [
        "| head | closed-set accuracy | open-set Recall@1 | open-set MAP@R | training s |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, runs in results.items():
        lines.append(
            f"| {name} | {stat([r.accuracy for r in runs])} | {stat([r.recall_at_1 for r in runs])} | "
            f"{stat([r.map_at_r for r in runs])} | {sum(r.seconds for r in runs) / len(runs):.1f} |"
        )
    return "\n".join(lines)


def plot(runs: list[Run], spheres: list[Run], split: Split, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = plt.get_cmap("tab10")
    cols = min(3, len(runs))
    rows = math.ceil(len(runs) / cols)

    fig = plt.figure(figsize=(4.2 * cols, 4.2 * rows))
    for i, run in enumerate(spheres):
        ax = fig.add_subplot(rows, cols, i + 1, projection="3d")
        u, v = torch.meshgrid(torch.linspace(0, 2 * math.pi, 30), torch.linspace(0, math.pi, 15), indexing="ij")
        ax.plot_wireframe(u.cos() * v.sin(), u.sin() * v.sin(), v.cos(), color="0.85", linewidth=0.4)
        parts = ((run.open_embedding, split.y_open, "^", 3, 0.25), (run.test_embedding, split.y_test, "o", 9, 1.0))
        for emb, labels, marker, size, alpha in parts:
            assert emb is not None
            points = mll.functional.normalize(emb)
            ax.scatter(
                *points.T, c=[colors(int(k)) for k in labels], s=size, marker=marker, alpha=alpha, depthshade=False
            )
        ax.view_init(elev=20, azim=35)
        ax.set_box_aspect((1, 1, 1))
        ax.set_title(run.name, fontsize=10)
        ax.set_axis_off()
    fig.suptitle("3-D embeddings of held-out digits on the unit sphere (circles: 0–5, trained; faint triangles: 6–9)")
    fig.tight_layout()
    fig.savefig(out / "sphere.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    bins = torch.linspace(0, 180, 61).tolist()
    for ax, run in zip(axes.flat, runs):
        assert run.target_angles is not None and run.other_angles is not None
        ax.hist(run.other_angles.tolist(), bins=bins, density=True, alpha=0.6, label="non-target classes")
        ax.hist(run.target_angles.tolist(), bins=bins, density=True, alpha=0.6, label="target class")
        ax.set_title(run.name, fontsize=10)
        ax.set_xlabel("angle to class weight (degrees)")
    for ax in list(axes.flat)[len(runs) :]:
        ax.set_axis_off()
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "angles.png", dpi=110)
    plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for i, run in enumerate(runs):
        epochs = range(1, len(run.losses) + 1)
        left.plot(epochs, run.losses, label=run.name, color=colors(i))
        right.plot(epochs, run.accuracies, label=run.name, color=colors(i))
    left.set(xlabel="epoch", ylabel="training loss", yscale="log", title="Training loss (each head its own scale)")
    right.set(xlabel="epoch", ylabel="accuracy", title="Closed-set accuracy (held-out digits 0–5)")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


# the files the demo writes into --out
RESULTS = "results.md"
PLOTS = ("sphere.png", "angles.png", "curves.png")
# torch.manual_seed takes seeds in [-2**63, 2**64)
SEED_RANGE = (-(2**63), 2**64 - 1)


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse bad flags before any training: ``parser.error`` prints a one-line message and exits with status 2."""
    for flag, value in (("--epochs", args.epochs), ("--seeds", args.seeds), ("--dim", args.dim)):
        if value < 1:
            parser.error(f"{flag} must be >= 1, but got {value}")
    repeated = sorted({name for name in args.heads if args.heads.count(name) > 1})
    if repeated:
        parser.error(f"--heads names {', '.join(repeated)} more than once")
    last = args.seed + args.seeds - 1
    if args.seed < SEED_RANGE[0] or last > SEED_RANGE[1]:
        parser.error(
            f"--seed must be in [{SEED_RANGE[0]}, {SEED_RANGE[1] - args.seeds + 1}] with --seeds {args.seeds} "
            f"(torch takes seeds in [{SEED_RANGE[0]}, {SEED_RANGE[1]}]), but got {args.seed}"
        )
    out: Path = args.out
    if out.exists() and not out.is_dir():
        parser.error(f"--out {out} is a file, not a folder")
    try:  # create the folder and write a probe file now, not after minutes of training
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".mll-demo-probe-") as probe:
            probe.write(b"probe")
            probe.flush()
    except OSError as error:
        parser.error(f"--out {out} is not a writable folder: {error.strerror or error}")
    for name in (RESULTS,) if args.no_plots else (RESULTS, *PLOTS):
        if (out / name).is_dir():
            parser.error(f"--out {out} holds a folder named {name}, where the demo writes a file")


def main(argv: list[str] | None = None) -> list[Run]:
    parser = argparse.ArgumentParser(
        prog="python -m mll.demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--heads", nargs="+", default=list(HEADS), choices=[*ALL_HEADS, "all"], metavar="HEAD",
        help="heads to train (default: a small set); 'all' adds every head of the zoo",
    )  # fmt: skip
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3, help="seeds per head for the metrics (seed, seed+1, ...)")
    parser.add_argument("--dim", type=int, default=32, help="embedding size for the metrics")
    parser.add_argument("--out", type=Path, default=Path("mll-demo-output"), help="folder for the table and plots")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plots", action="store_true", help="skip the pictures and the 3-D models")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if "all" in args.heads:
        args.heads = [h for name in args.heads for h in (ALL_HEADS if name == "all" else [name])]
    check_args(parser, args)

    split = load_digits_split(args.seed)
    print(
        f"digits: {len(split.y_train)} training / {len(split.y_test)} held-out samples of digits 0–5, "
        f"{len(split.y_open)} open-set samples of digits 6–9; {args.epochs} epochs, "
        f"{args.dim}-d embedding, seeds {args.seed}..{args.seed + args.seeds - 1}"
    )
    deterministic = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        results = {
            name: [
                train_one(name, split, args.epochs, args.seed + i, args.dim, progress=not args.quiet)
                for i in range(args.seeds)
            ]
            for name in args.heads
        }
        spheres = (
            []
            if args.no_plots
            else [train_one(name, split, args.epochs, args.seed, 3, progress=not args.quiet) for name in args.heads]
        )
    finally:
        torch.use_deterministic_algorithms(deterministic)
    runs = [seeds[0] for seeds in results.values()]
    text = table(results)
    print("\n" + text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / RESULTS).write_text(text + "\n")
    plotted = not args.no_plots
    if plotted:
        try:
            plot(runs, spheres, split, args.out)
        except Exception as error:  # the table is the result; a missing or broken matplotlib must not lose it
            plotted = False
            reason = " ".join(str(error).split())
            print(
                f"warning: plotting failed, so {RESULTS} is written but the plots may be missing "
                f"({type(error).__name__}: {reason})",
                file=sys.stderr,
            )
    print(f"\nwrote {args.out}/{RESULTS}" + (", " + ", ".join(PLOTS) if plotted else ""))
    return runs


if __name__ == "__main__":
    main()
