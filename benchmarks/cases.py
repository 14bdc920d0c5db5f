"""What is timed: one training step of a head plus its cross-entropy, forward and backward.

Every implementation is a factory ``make(cfg) -> step`` that owns its own class weights; ``step()`` runs the loss
and its backward on shared features ``x`` (a leaf that requires grad, as a backbone's output would) and labels.
Gradients accumulate into buffers allocated once, so steady-state steps allocate only what the head needs.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import mll
from benchmarks.peers import load_legacy, load_pml

SCALE, ARC_MARGIN, COS_MARGIN = 30.0, 0.5, 0.35


@dataclass(frozen=True)
class Config:
    batch: int = 256
    features: int = 512
    classes: int = 1000
    sub_centers: int = 1
    soft: bool = False
    seed: int = 0


@dataclass
class Data:
    x: torch.Tensor
    y: torch.Tensor
    target: torch.Tensor  # y, or soft targets (a mixup of two labels) when cfg.soft
    #: what the cases of a suite share when they ask for it (:func:`shared_weight`, :func:`shared_head`)
    shared: dict[tuple[object, ...], Any] = field(default_factory=dict)


def make_data(cfg: Config) -> Data:
    g = torch.Generator().manual_seed(cfg.seed)
    x = torch.randn(cfg.batch, cfg.features, generator=g).requires_grad_(True)
    y = torch.randint(0, cfg.classes, (cfg.batch,), generator=g)
    target: torch.Tensor = y
    if cfg.soft:
        other = torch.randint(0, cfg.classes, (cfg.batch,), generator=g)
        lam = torch.rand(cfg.batch, 1, generator=g)
        classes = torch.arange(cfg.classes)
        target = lam * (classes == y[:, None]) + (1 - lam) * (classes == other[:, None])
    return Data(x, y, target)


Step = Callable[[], None]
Factory = Callable[[Config, Data], Step]


def _weight(cfg: Config, rows: int) -> torch.Tensor:
    return torch.randn(rows, cfg.features, generator=torch.Generator().manual_seed(cfg.seed + 1)).requires_grad_(True)


def floor(cfg: Config, data: Data) -> Step:
    """F.cross_entropy(s * F.linear(F.normalize(x), F.normalize(W)), y), pooled over sub-centers when K > 1."""
    w = _weight(cfg, cfg.classes * cfg.sub_centers)

    def step() -> None:
        cos = F.linear(F.normalize(data.x), F.normalize(w))
        if cfg.sub_centers > 1:
            cos = cos.view(cfg.batch, cfg.classes, cfg.sub_centers).amax(-1)
        F.cross_entropy(SCALE * cos, data.target).backward()

    return step


def _module_step(head: torch.nn.Module, data: Data, with_labels: bool = True) -> Step:
    head.train()

    def step() -> None:
        logits = head(data.x, data.target) if with_labels else head(data.x)
        F.cross_entropy(logits, data.target).backward()

    return step


def ours(name: str, **kwargs: object) -> Factory:
    def make(cfg: Config, data: Data) -> Step:
        cls = getattr(mll, name)
        args = (cfg.features, cfg.classes) if name == "DeepNCM" else (cfg.features, cfg.classes, cfg.sub_centers)
        head = cls(*args, **kwargs)
        if name == "DeepNCM":
            head.means.normal_()  # a trained state: every class seen
        return _module_step(head, data)

    return make


def legacy(name: str, **kwargs: object) -> Factory:
    def make(cfg: Config, data: Data) -> Step:
        module = load_legacy()
        assert module is not None
        cls = getattr(module, name)
        if name == "DeepNCM":
            head = cls(cfg.features, cfg.classes)
            head.means.data.normal_()
        else:
            head = cls(cfg.features, cfg.classes, cfg.sub_centers, **kwargs)
        return _module_step(head, data, with_labels=name != "AdaCos")

    return make


def pml(name: str, **kwargs: object) -> Factory:
    def make(cfg: Config, data: Data) -> Step:
        losses = load_pml()
        assert losses is not None
        cls = getattr(losses, name)
        if name == "NormalizedSoftmaxLoss":
            loss_fn = cls(num_classes=cfg.classes, embedding_size=cfg.features, temperature=1 / SCALE)
        elif name in ("ProxyNCALoss", "ProxyAnchorLoss"):  # their own scale arguments (softmax_scale, alpha)
            loss_fn = cls(num_classes=cfg.classes, embedding_size=cfg.features, **kwargs)
        elif name == "SoftTripleLoss":  # its scale is la; the suite's K centres per class
            loss_fn = cls(
                num_classes=cfg.classes, embedding_size=cfg.features, centers_per_class=cfg.sub_centers, **kwargs
            )
        elif name == "SubCenterArcFaceLoss":
            loss_fn = cls(
                num_classes=cfg.classes, embedding_size=cfg.features, scale=SCALE, sub_centers=cfg.sub_centers, **kwargs
            )
        else:
            loss_fn = cls(num_classes=cfg.classes, embedding_size=cfg.features, scale=SCALE, **kwargs)

        def step() -> None:
            loss_fn(data.x, data.y).backward()

        return step

    return make


def proxy_anchor(chunked: bool, zeroing: bool = False, **kwargs: object) -> Factory:
    """A ProxyAnchor step: its chunked ``loss()``, or (``chunked=False``) the dense loss of its N×C cosines,
    ``mll.functional.proxy_anchor_loss`` — it is not a cross-entropy of logits. ``zeroing``: gradients set to None
    first (else they accumulate)."""

    def make(cfg: Config, data: Data) -> Step:
        head = mll.ProxyAnchor(cfg.features, cfg.classes, cfg.sub_centers, **kwargs).train()

        def step() -> None:
            if zeroing:
                data.x.grad = head.weight.grad = None
            if chunked:
                head.loss(data.x, data.y).backward()
            else:
                loss = mll.functional.proxy_anchor_loss(head.cosine(data.x), data.y, alpha=head.alpha, delta=head.delta)
                loss.backward()

        return step

    return make


def per_class_arcface(cfg: Config, data: Data) -> Step:
    """ArcFace with dynamic per-class margins (0.05-0.5 from random class counts): a (C,) buffer gathered at the
    targets."""
    counts = torch.randint(1, 1000, (cfg.classes,), generator=torch.Generator().manual_seed(cfg.seed + 2))
    head = mll.ArcFace(
        cfg.features, cfg.classes, cfg.sub_centers, scale=SCALE, margin=mll.functional.dynamic_margins(counts)
    )
    return _module_step(head, data)


# The "limit" suite: one class-weight matrix and one head for every case (at C = 10^6 the weights are 2 GB, their
# gradient 2 GB more, and glibc reuses freed multi-GB blocks poorly once mmap is off: a copy per case does not fit
# next to the dense paths' N×C buffers in 24 GB), and gradients set to None before each step, as
# ``optimizer.zero_grad()`` does by default — except in the case that measures accumulation into an existing .grad.


def shared_weight(cfg: Config, data: Data) -> torch.nn.Parameter:
    """The suite's class weights (C·K × d), made on first use and kept on ``data``."""
    key = ("weight", cfg.classes * cfg.sub_centers)
    if key not in data.shared:
        data.shared[key] = torch.nn.Parameter(_weight(cfg, cfg.classes * cfg.sub_centers).detach())
    return data.shared[key]


def shared_head(name: str, cfg: Config, data: Data, **kwargs: object) -> torch.nn.Module:
    """The suite's ``mll.<name>(**kwargs)`` in training mode, holding :func:`shared_weight`; made on first use."""
    key = ("head", name, *sorted(kwargs.items()))
    if key not in data.shared:
        head = getattr(mll, name)(cfg.features, cfg.classes, cfg.sub_centers, **kwargs)
        head.weight = shared_weight(cfg, data)  # its own initial weights are freed here
        data.shared[key] = head.train()
    return data.shared[key]


def three_gemm_limit(cfg: Config, data: Data) -> Step:
    """The three GEMMs a cosine head cannot avoid — logits = x̂Ŵᵀ, dX = G·Ŵ, dW = Gᵀ·x̂ — on preallocated operands
    and outputs, and nothing else. Ŵ is the suite's weight matrix as it is (a GEMM's time does not depend on the
    rows' norms; a normalised copy would cost another C×d buffer); G is the logits' buffer, as in a fused head that
    overwrites the logits with softmax − target (its values are the logits', which changes no GEMM's time)."""
    return _gemm_step(cfg, shared_weight(cfg, data).detach(), cfg.batch)


#: the batch suite's three-GEMM limit runs over tiles of at most this many rows: at N = 4096, C = 10^6 one N×C
#: buffer (16 GB) does not fit beside the weights in 24 GB, and on our 2-core CPU tiles of 1024 rows ran the three
#: GEMMs as fast as one of all the rows (N = 4096, C = 10^5, d = 512: 0.97× its time; 512 rows 1.01×, 256 1.06×)
LIMIT_TILE_ROWS = 1024


def tiled_gemm_limit(cfg: Config, data: Data) -> Step:
    """:func:`three_gemm_limit` on row tiles of at most :data:`LIMIT_TILE_ROWS` rows, with the case's own weights,
    each tile's logits formed class-major (Ŵx̂ᵀ: on our CPU the faster GEMM at C = 10^6, 199 against 138 GFLOP/s for
    x̂Ŵᵀ at 1024 rows; the other two ran at 204–217 either way): a tile's buffer (reused by every tile) is its G, and
    dW is written by the first tile and added to by the others. The batch suite's reference where no floor fits in
    memory: no exact step does less arithmetic."""
    return _gemm_step(cfg, _weight(cfg, cfg.classes * cfg.sub_centers).detach(), LIMIT_TILE_ROWS, class_major=True)


def _gemm_step(cfg: Config, w_hat: torch.Tensor, tile: int, class_major: bool = False) -> GemmLimit:
    g = torch.Generator().manual_seed(cfg.seed + 3)
    x_hat = F.normalize(torch.randn(cfg.batch, cfg.features, generator=g))
    return GemmLimit(x_hat, w_hat, tile, class_major)


class GemmLimit:
    """The three GEMMs over tiles of ``tile`` rows on buffers allocated here (a step allocates nothing), the logits
    held rows × classes or (``class_major``) classes × rows; ``grad_x`` and ``grad_w`` hold the last step's
    products."""

    def __init__(self, x_hat: torch.Tensor, w_hat: torch.Tensor, tile: int, class_major: bool = False) -> None:
        n, rows = x_hat.shape[0], w_hat.shape[0]
        self.x_hat, self.w_hat, self.class_major = x_hat, w_hat, class_major
        self.logits = torch.zeros(min(tile, n) * rows)  # also G
        self.grad_x = torch.zeros_like(x_hat)
        self.grad_w = torch.zeros_like(w_hat)
        self.bounds = [(r0, min(n, r0 + tile)) for r0 in range(0, n, max(1, tile))]

    def __call__(self) -> None:
        classes = self.w_hat.shape[0]
        for r0, r1 in self.bounds:
            x_t, buf = self.x_hat[r0:r1], self.logits[: (r1 - r0) * classes]
            if self.class_major:  # z = (Ŵx̂ᵀ)ᵀ: a rows × classes view of a classes × rows buffer
                z = torch.mm(self.w_hat, x_t.t(), out=buf.view(classes, r1 - r0)).t()
            else:
                z = torch.mm(x_t, self.w_hat.t(), out=buf.view(r1 - r0, classes))
            torch.mm(z, self.w_hat, out=self.grad_x[r0:r1])
            if r0 == 0:
                torch.mm(z.t(), x_t, out=self.grad_w)
            else:
                self.grad_w.addmm_(z.t(), x_t)


def zeroing_floor(cfg: Config, data: Data) -> Step:
    """The floor on the suite's weights, gradients set to None first."""
    w = shared_weight(cfg, data)

    def step() -> None:
        data.x.grad = w.grad = None
        F.cross_entropy(SCALE * F.linear(F.normalize(data.x), F.normalize(w)), data.target).backward()

    return step


def zeroing_dense(name: str, **kwargs: object) -> Factory:
    """``F.cross_entropy(head(x, y), y)`` on the suite's weights, gradients set to None first."""

    def make(cfg: Config, data: Data) -> Step:
        head = shared_head(name, cfg, data, **kwargs)

        def step() -> None:
            data.x.grad = head.weight.grad = None
            F.cross_entropy(head(data.x, data.target), data.target).backward()

        return step

    return make


def _timed_first_step(step: Step, what: str, cfg: Config, data: Data, weight: torch.nn.Parameter) -> None:
    """Run ``step`` once (the step that compiles), print how long it took, and leave the gradients as the other cases
    leave them once built."""
    start = time.perf_counter()
    step()
    data.x.grad = weight.grad = None
    cache = os.environ.get("TORCHINDUCTOR_CACHE_DIR", "default")
    print(f"compile: the first step of {what} at C={cfg.classes} took {time.perf_counter() - start:.1f} s "
          f"(Inductor's cache: {cache})", flush=True)  # fmt: skip


def compiled_floor(cfg: Config, data: Data) -> Step:
    """The floor's step under ``torch.compile`` (Inductor fuses its elementwise passes; the GEMMs stay ATen's)."""
    w = shared_weight(cfg, data)
    loss = torch.compile(lambda x, w, y: F.cross_entropy(SCALE * F.linear(F.normalize(x), F.normalize(w)), y))

    def step() -> None:
        data.x.grad = w.grad = None
        loss(data.x, w, data.target).backward()

    _timed_first_step(step, "the compiled floor", cfg, data, w)
    return step


def compiled_dense(name: str, **kwargs: object) -> Factory:
    """``F.cross_entropy(head(x, y), y)`` under ``torch.compile(fullgraph=True)`` — the user's dense path when the
    training step is compiled — gradients set to None first; the first step (compilation) is timed and printed."""

    def make(cfg: Config, data: Data) -> Step:
        head = shared_head(name, cfg, data, **kwargs)
        loss = torch.compile(lambda x, y: F.cross_entropy(head(x, y), y), fullgraph=True)

        def step() -> None:
            data.x.grad = head.weight.grad = None
            loss(data.x, data.target).backward()

        _timed_first_step(step, f"{name} + F.cross_entropy under torch.compile", cfg, data, head.weight)
        return step

    return make


def with_chunk_kernel(kernel: str, step: Step) -> Step:
    """``step`` run with ``mll.functional.set_chunk_kernel(kernel)``, the process's choice restored after it."""

    def wrapped() -> None:
        before = mll.functional.chunk_kernel()
        mll.functional.set_chunk_kernel(kernel)
        try:
            step()
        finally:
            mll.functional.set_chunk_kernel(before)

    return wrapped


def compiled_loss(name: str, **kwargs: object) -> Factory:
    """``head.loss(x, y)`` with the compiled chunk kernel (``mll.functional.set_chunk_kernel("compiled")`` for the
    step only); the first step, which compiles the kernel's bodies, is timed once here and printed."""
    eager = chunked_loss(name, **kwargs)

    def make(cfg: Config, data: Data) -> Step:
        step = with_chunk_kernel("compiled", eager(cfg, data))
        _timed_first_step(step, f"{name}.loss() with the compiled kernel", cfg, data, shared_weight(cfg, data))
        return step

    return make


def chunked_loss(name: str, accumulate: bool = False, **kwargs: object) -> Factory:
    """``head.loss(x, y)`` (chunked) on the suite's weights: gradients set to None first, or, with ``accumulate``,
    added to the ``.grad`` already there (gradient accumulation: ``.grad`` is not None before backward)."""

    def make(cfg: Config, data: Data) -> Step:
        head = shared_head(name, cfg, data, **kwargs)
        weight = head.weight

        def step() -> None:
            if not accumulate:
                data.x.grad = weight.grad = None
            elif weight.grad is None:  # never in the suite's order (the plain loss() runs just before); a lone run
                weight.grad = torch.zeros_like(weight)
            head.loss(data.x, data.target).backward()

        return step

    return make


def linear_cross_entropy(chunked: bool) -> Factory:
    """PyTorch's ``F.linear_cross_entropy`` on normalised operands, ``s·x̂`` against ``Ŵ`` (the margin-free anchor:
    no margin, no sub-centers), with its reference path or (``chunked``) its chunked ``LinearCrossEntropyOptions()``,
    on the suite's weights, gradients set to None first."""

    def make(cfg: Config, data: Data) -> Step:
        w = shared_weight(cfg, data)
        options = torch.nn.LinearCrossEntropyOptions() if chunked else None

        def step() -> None:
            data.x.grad = w.grad = None
            x_hat = SCALE * F.normalize(data.x)
            F.linear_cross_entropy(x_hat, F.normalize(w), data.target, options=options).backward()

        return step

    return make


def _has_linear_cross_entropy() -> bool:
    return hasattr(F, "linear_cross_entropy") and hasattr(torch.nn, "LinearCrossEntropyOptions")


def zeroing_pml(name: str, **kwargs: object) -> Factory:
    """A pytorch-metric-learning loss on the suite's weights (its ``W`` is (d, C): our rows, transposed), gradients
    set to None first."""

    def make(cfg: Config, data: Data) -> Step:
        losses = load_pml()
        assert losses is not None
        loss_fn = getattr(losses, name)(num_classes=cfg.classes, embedding_size=cfg.features, **kwargs)
        params = dict(loss_fn.named_parameters())
        key = "proxies" if "proxies" in params else "W"
        weight = shared_weight(cfg, data)
        with torch.no_grad():
            params[key].copy_(weight.detach().t() if key == "W" else weight.detach())
        mine = params[key]

        def step() -> None:
            data.x.grad = mine.grad = None
            loss_fn(data.x, data.y).backward()

        return step

    return make


def small_head(name: str, k: int = 1, *, loss: bool = False, regularized: bool = False, **kwargs: object) -> Factory:
    """A head with ``k`` sub-centers (the small suite sets K per head, not per suite): its dense step
    ``F.cross_entropy(head(x, y), y)`` (plus ``head.regularizer()`` with ``regularized``: the paper's SoftTriple
    objective, which pml's SoftTripleLoss does not compute), or (``loss``) ``head.loss(x, y)``; gradients accumulate,
    as in pml's step."""

    def make(cfg: Config, data: Data) -> Step:
        head = getattr(mll, name)(cfg.features, cfg.classes, k, **kwargs).train()

        def step() -> None:
            if loss:
                head.loss(data.x, data.y).backward()
                return
            if name == "ProxyAnchor":  # not a cross-entropy of logits: its dense loss of the N×C cosines
                cosine = head.cosine(data.x)
                mll.functional.proxy_anchor_loss(cosine, data.y, alpha=head.alpha, delta=head.delta).backward()
                return
            value = F.cross_entropy(head(data.x, data.y), data.y)
            (value + head.regularizer() if regularized else value).backward()

        return step

    return make


def small_pml(name: str, **kwargs: object) -> Factory:
    """A pytorch-metric-learning loss with the arguments given (none taken from the suite but C and d)."""

    def make(cfg: Config, data: Data) -> Step:
        losses = load_pml()
        assert losses is not None
        loss_fn = getattr(losses, name)(num_classes=cfg.classes, embedding_size=cfg.features, **kwargs)

        def step() -> None:
            loss_fn(data.x, data.y).backward()

        return step

    return make


def _small_cases() -> list[Case]:
    """The small end (issue 22): every head pytorch-metric-learning has, dense and ``loss()``, beside pml's loss."""
    heads: list[tuple[str, str, dict[str, Any], Optional[str], dict[str, Any]]] = [
        ("ScaledNormalizedLinear", "ScaledNormalizedLinear", {"scale": SCALE}, "NormalizedSoftmaxLoss",
         {"temperature": 1 / SCALE}),
        ("CosFace", "CosFace", {"scale": SCALE, "margin": COS_MARGIN}, "CosFaceLoss",
         {"scale": SCALE, "margin": COS_MARGIN}),
        ("ArcFace", "ArcFace", {"scale": SCALE, "margin": ARC_MARGIN}, "ArcFaceLoss",
         {"scale": SCALE, "margin": ARC_DEG}),
        ("ArcFace, K = 3", "ArcFace", {"k": 3, "scale": SCALE, "margin": ARC_MARGIN}, "SubCenterArcFaceLoss",
         {"scale": SCALE, "margin": ARC_DEG, "sub_centers": 3}),
        ("LargeMarginSoftmax (m=4)", "LargeMarginSoftmax", {}, "LargeMarginSoftmaxLoss", {"margin": 4}),
        # pml's SoftTripleLoss has no centre regulariser: the same objective is τ = 0; the paper's (τ = 0.2, the
        # regulariser added to the dense step and inside loss()) has no pml counterpart
        ("SoftTriple (K = 10)", "SoftTriple", {"k": 10, "tau": 0.0}, "SoftTripleLoss", {}),
        ("SoftTriple (K = 10, τ = 0.2)", "SoftTriple", {"k": 10, "regularized": True}, None, {}),
        ("ProxyNCAPlusPlus (s = 18)", "ProxyNCAPlusPlus", {}, "ProxyNCALoss", {"softmax_scale": 9.0}),
        ("ProxyAnchor", "ProxyAnchor", {}, "ProxyAnchorLoss", {}),
    ]  # fmt: skip
    cases = [Case("floor", "floor", floor)]
    for title, name, ours_kwargs, theirs, theirs_kwargs in heads:
        loss_kwargs = {key: value for key, value in ours_kwargs.items() if key != "regularized"}
        cases += [
            Case(title, "mll dense", small_head(name, **ours_kwargs)),  # type: ignore[arg-type]
            Case(title, "mll loss()", small_head(name, loss=True, **loss_kwargs)),  # type: ignore[arg-type]
        ]
        if theirs is not None:
            cases.append(Case(title, "pml 2.9", small_pml(theirs, **theirs_kwargs), _has_pml))
    return cases


@dataclass(frozen=True)
class Case:
    head: str
    impl: str  # "floor", "limit", "mll…", "0.1.6", "pml 2.9"
    factory: Factory
    available: Callable[[], bool] = lambda: True
    #: the live tensors' peak of one step, in bytes, where it can reach the machine's memory (None: small)
    step_bytes: Callable[[Config], int] | None = None
    #: whether its step's memory is probed (not for a step that allocates nothing: the three-GEMM limit)
    probe: bool = True


def dense_step_bytes(cfg: Config) -> int:
    """A dense step's live peak: about four N×C and two C·K×d float32 buffers (a floor step measured 782 MB at
    N=256, d=512, C=10^5)."""
    rows = cfg.classes * cfg.sub_centers
    return 4 * rows * (4 * cfg.batch + 2 * cfg.features)


def mll_dense_step_bytes(cfg: Config) -> int:
    """mll's dense step's live peak: about two N×C buffers and the C·K×d weight gradient in float32 (it measured
    199 MB above the parameters and gradients at N=256, d=512, C=10^5, 1968 MB at 10^6: no normalised copy of W, and
    the normalisation's backward in place)."""
    rows = cfg.classes * cfg.sub_centers
    return 4 * rows * (2 * cfg.batch + cfg.features)


def _has_legacy() -> bool:
    return load_legacy() is not None


def _has_pml() -> bool:
    return load_pml() is not None


ARC_DEG = math.degrees(ARC_MARGIN)

#: the suites: name -> cases; the first case is the floor (the reference in DeepNCM), but for "limit", which
#: starts with the three-GEMM limit and then the floor
SUITES: dict[str, list[Case]] = {
    "int labels": [
        Case("floor", "floor", floor),
        Case("ScaledNormalizedLinear", "mll", ours("ScaledNormalizedLinear", scale=SCALE)),
        Case("CosFace", "mll", ours("CosFace", scale=SCALE, margin=COS_MARGIN)),
        Case("ArcFace", "mll", ours("ArcFace", scale=SCALE, margin=ARC_MARGIN)),
        Case("AdaCos", "mll", ours("AdaCos")),
        Case("ScaledNormalizedLinear", "0.1.6", legacy("ScaledNormalizedLinear", scale=SCALE), _has_legacy),
        Case("CosFace", "0.1.6", legacy("CosFace", scale=SCALE, margin=COS_MARGIN), _has_legacy),
        Case("ArcFace", "0.1.6", legacy("ArcFace", scale=SCALE, margin=ARC_MARGIN), _has_legacy),
        Case("AdaCos", "0.1.6", legacy("AdaCos"), _has_legacy),
        Case("ScaledNormalizedLinear", "pml 2.9", pml("NormalizedSoftmaxLoss"), _has_pml),
        Case("CosFace", "pml 2.9", pml("CosFaceLoss", margin=COS_MARGIN), _has_pml),
        Case("ArcFace", "pml 2.9", pml("ArcFaceLoss", margin=ARC_DEG), _has_pml),
    ],
    "sub-centers": [
        Case("floor (C·K rows + max-pool)", "floor", floor),
        Case("ArcFace", "mll", ours("ArcFace", scale=SCALE, margin=ARC_MARGIN)),
        Case("CosFace", "mll", ours("CosFace", scale=SCALE, margin=COS_MARGIN)),
        Case("ArcFace", "0.1.6", legacy("ArcFace", scale=SCALE, margin=ARC_MARGIN), _has_legacy),
        Case("ArcFace", "pml 2.9", pml("SubCenterArcFaceLoss", margin=ARC_DEG), _has_pml),
    ],
    "soft targets": [
        Case("floor (soft cross-entropy)", "floor", floor),
        Case("CosFace", "mll", ours("CosFace", scale=SCALE, margin=COS_MARGIN)),
        Case("ArcFace", "mll", ours("ArcFace", scale=SCALE, margin=ARC_MARGIN)),
        Case("ArcFace", "0.1.6", legacy("ArcFace", scale=SCALE, margin=ARC_MARGIN), _has_legacy),
    ],
    "margin families": [
        Case("floor", "floor", floor),
        Case("ArcFace (reference)", "mll", ours("ArcFace", scale=SCALE, margin=ARC_MARGIN)),
        Case("CombinedMargin (1, 0.3, 0.2)", "mll", ours("CombinedMargin", scale=SCALE)),
        Case("SphereFace (m=4)", "mll", ours("SphereFace", scale=SCALE)),
        Case("AdaFace", "mll", ours("AdaFace", scale=SCALE)),
        Case("MagFace", "mll", ours("MagFace", scale=SCALE)),
        Case("ElasticArcFace", "mll", ours("ElasticArcFace", scale=SCALE)),
        Case("ElasticCosFace", "mll", ours("ElasticCosFace", scale=SCALE)),
        Case("ArcFace, per-class margins", "mll", per_class_arcface),
        Case("CurricularFace (dense step)", "mll", ours("CurricularFace", scale=SCALE)),
        Case("SphereFace (m=4)", "pml 2.9", pml("SphereFaceLoss", margin=4), _has_pml),
    ],
    # the three-GEMM limit and the floor side by side (issue #13); the limit is first, the floor second
    "limit": [
        Case("three GEMMs (x̂Ŵᵀ, G·Ŵ, Gᵀ·x̂)", "limit", three_gemm_limit, probe=False),
        Case("floor", "floor", zeroing_floor, step_bytes=dense_step_bytes),
        Case(
            "ArcFace",
            "mll dense + F.cross_entropy",
            zeroing_dense("ArcFace", scale=SCALE, margin=ARC_MARGIN),
            step_bytes=mll_dense_step_bytes,
        ),
        Case(
            "ArcFace",
            "mll dense + F.cross_entropy, torch.compile",
            compiled_dense("ArcFace", scale=SCALE, margin=ARC_MARGIN),
            step_bytes=mll_dense_step_bytes,
        ),
        Case("floor", "floor, torch.compile", compiled_floor, step_bytes=dense_step_bytes),
        Case("ArcFace", "mll loss() (chunked)", chunked_loss("ArcFace", scale=SCALE, margin=ARC_MARGIN)),
        Case("ArcFace", "mll loss(), compiled kernel", compiled_loss("ArcFace", scale=SCALE, margin=ARC_MARGIN)),
        Case(
            "ArcFace",
            "mll loss(), .grad exists (accumulating)",
            chunked_loss("ArcFace", accumulate=True, scale=SCALE, margin=ARC_MARGIN),
        ),
    ],
    # the zoo of issue 14: each head beside its pytorch-metric-learning counterpart where one exists
    "zoo": [
        Case("floor", "floor", floor),
        Case("MVSoftmax (AM, adaptive)", "mll", ours("MVSoftmax", scale=SCALE)),
        Case("NPCFace", "mll", ours("NPCFace", scale=SCALE)),
        Case("ArcNegFace", "mll", ours("ArcNegFace", scale=SCALE)),
        Case("CircleLoss", "mll", ours("CircleLoss", scale=SCALE)),
        Case("AdaMSoftmax", "mll", ours("AdaMSoftmax", scale=SCALE)),
        Case("SoftTriple", "mll", ours("SoftTriple", scale=SCALE)),
        Case("SoftTriple", "pml 2.9", pml("SoftTripleLoss", la=SCALE), _has_pml),
        Case("LargeMarginSoftmax (m=4)", "mll", ours("LargeMarginSoftmax", scale=SCALE)),
        Case("LargeMarginSoftmax (m=4)", "pml 2.9", pml("LargeMarginSoftmaxLoss", margin=4), _has_pml),
        Case("ProxyNCAPlusPlus (s = 2/T = 18)", "mll", ours("ProxyNCAPlusPlus")),
        Case("ProxyNCAPlusPlus (s = 2/T = 18)", "pml 2.9", pml("ProxyNCALoss", softmax_scale=9.0), _has_pml),
        Case("ProxyAnchor", "mll dense", proxy_anchor(chunked=False)),
        Case("ProxyAnchor", "mll loss() (chunked)", proxy_anchor(chunked=True)),
        Case("ProxyAnchor", "pml 2.9", pml("ProxyAnchorLoss", margin=0.1, alpha=32), _has_pml),
    ],
    # the batch sizes users train with (issue 22): N from 256 to 8192, C from 10^4 to 10^6
    "batch": [
        Case("floor", "floor", zeroing_floor, step_bytes=dense_step_bytes),
        Case(f"three GEMMs, tiles of ≤ {LIMIT_TILE_ROWS} rows", "limit", tiled_gemm_limit, probe=False),
        Case(
            "(margin-free)",
            "F.linear_cross_entropy",
            linear_cross_entropy(False),
            _has_linear_cross_entropy,
            step_bytes=dense_step_bytes,
        ),
        Case("(margin-free)", "F.linear_cross_entropy, chunked", linear_cross_entropy(True), _has_linear_cross_entropy),
        Case(
            "ScaledNormalizedLinear",
            "mll dense + F.cross_entropy",
            zeroing_dense("ScaledNormalizedLinear", scale=SCALE),
            step_bytes=mll_dense_step_bytes,
        ),
        Case("ScaledNormalizedLinear", "mll loss()", chunked_loss("ScaledNormalizedLinear", scale=SCALE)),
        Case(
            "ScaledNormalizedLinear",
            "pml 2.9",
            zeroing_pml("NormalizedSoftmaxLoss", temperature=1 / SCALE),
            _has_pml,
            step_bytes=dense_step_bytes,
        ),
        Case(
            "ArcFace",
            "mll dense + F.cross_entropy",
            zeroing_dense("ArcFace", scale=SCALE, margin=ARC_MARGIN),
            step_bytes=mll_dense_step_bytes,
        ),
        Case("ArcFace", "mll loss()", chunked_loss("ArcFace", scale=SCALE, margin=ARC_MARGIN)),
        Case(
            "ArcFace",
            "pml 2.9",
            zeroing_pml("ArcFaceLoss", scale=SCALE, margin=ARC_DEG),
            _has_pml,
            step_bytes=dense_step_bytes,
        ),
        Case(
            "CurricularFace",
            "mll dense + F.cross_entropy",
            zeroing_dense("CurricularFace", scale=SCALE),
            step_bytes=mll_dense_step_bytes,
        ),
        Case("CurricularFace", "mll loss()", chunked_loss("CurricularFace", scale=SCALE)),
        Case("ProxyAnchor", "mll dense", proxy_anchor(chunked=False, zeroing=True), step_bytes=dense_step_bytes),
        Case("ProxyAnchor", "mll loss()", proxy_anchor(chunked=True, zeroing=True)),
        Case(
            "ProxyAnchor",
            "pml 2.9",
            zeroing_pml("ProxyAnchorLoss", margin=0.1, alpha=32),
            _has_pml,
            step_bytes=dense_step_bytes,
        ),
    ],
    # the small end (issue 22): N = 64, d = 32, C = 6, one thread — a first experiment on a laptop
    "small": _small_cases(),
    "DeepNCM": [
        Case("ScaledNormalizedLinear (reference)", "mll", ours("ScaledNormalizedLinear", scale=SCALE)),
        Case("DeepNCM (logits + update)", "mll", ours("DeepNCM", scale=SCALE)),
        Case("DeepNCM (logits + update)", "0.1.6", legacy("DeepNCM"), _has_legacy),
    ],
}
