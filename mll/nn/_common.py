"""Small helpers the modules share: parameter creation, 0.1.6 checkpoint upgrades, cross-rank statistics.

Plain functions, not a base class: each module stays a flat ``nn.Module`` that reads top to bottom.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mll.functional._checks import (
    check_in_features,
    check_margin_param,
    check_num_classes,
    check_num_sub_centers,
    check_scale,
)
from mll.functional.chunked import chunked_margin_loss, margin_cross_entropy
from mll.functional.cosine import check_pooling, cosine_logits
from mll.functional.margins import ValueAndSlope, _cos_fn


def check_head_args(in_features: int, out_features: int, num_sub_centers: int) -> None:
    check_in_features(in_features)
    check_num_classes(out_features)
    check_num_sub_centers(num_sub_centers)


def class_weight(in_features: int, out_features: int, num_sub_centers: int, factory: dict[str, Any]) -> nn.Parameter:
    """Weight of shape ``(out_features * num_sub_centers, in_features)``: row ``c*K + k`` is sub-center k of c."""
    return nn.Parameter(torch.empty((out_features * num_sub_centers, in_features), **factory))


def reset_class_weight(weight: Tensor) -> None:
    # Gaussian rows point in uniformly random directions on the sphere (a uniform box, as in nn.Linear's
    # init, favours its diagonals); the norm is irrelevant after normalisation.
    nn.init.normal_(weight)


def register_scale(module: nn.Module, value: float, trainable: bool, factory: dict[str, Any]) -> None:
    """``module.scale``: a 0-dim Parameter when trainable, else a buffer (saved, moved, never optimised)."""
    check_scale(value)
    if not isinstance(trainable, bool):
        raise TypeError(f"trainable_scale must be a bool, but got {type(trainable).__name__}")
    dtype = factory.get("dtype") or torch.get_default_dtype()
    tensor = torch.tensor(float(value), dtype=dtype, device=factory.get("device"))
    if trainable:
        module.scale = nn.Parameter(tensor)
    else:
        module.register_buffer("scale", tensor)
    module._register_load_state_dict_pre_hook(_upgrade_legacy_scale, with_module=True)


def _upgrade_legacy_scale(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    # 0.1.6 stored the scale as a Parameter of shape (1,); ours is 0-dim.
    key = prefix + "scale"
    value = state_dict.get(key)
    if isinstance(value, Tensor) and value.shape == (1,):
        state_dict[key] = value.reshape(())


def init_head(
    module: nn.Module,
    in_features: int,
    out_features: int,
    num_sub_centers: int,
    *,
    scale: Optional[float] = None,
    default_scale: Optional[Callable[[], float]] = None,
    trainable_scale: bool = False,
    pooling: str = "max",
    pooling_temperature: float = 0.1,
    device: Any = None,
    dtype: Any = None,
) -> None:
    """Validate and store the shared hyper-parameters, create ``weight``, and ``scale`` when the head has one.

    ``default_scale`` is called (after the checks, so its errors never mask them) when ``scale`` is None; a head
    without either has no scale.
    """
    check_head_args(in_features, out_features, num_sub_centers)
    check_pooling(pooling, pooling_temperature)
    factory = {"device": device, "dtype": dtype}
    sizes = int(in_features), int(out_features), int(num_sub_centers)
    module.in_features, module.out_features, module.num_sub_centers = sizes  # type: ignore[assignment]
    module.pooling, module.pooling_temperature = pooling, float(pooling_temperature)  # type: ignore[assignment]
    module.weight = class_weight(*sizes, factory)
    if scale is None and default_scale is not None:
        scale = default_scale()
    if scale is not None:
        register_scale(module, scale, trainable_scale, factory)


def statistics_dtype(dtype: Optional[torch.dtype]) -> torch.dtype:
    """Running statistics are kept in float64 for float64 heads, else float32 (an EMA stalls in half precision)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def head_cosine(module: nn.Module, input: Tensor) -> Tensor:
    """The head's pooled cosines: :func:`mll.functional.cosine_logits` with its weight and sub-center options."""
    return cosine_logits(
        input, module.weight, module.num_sub_centers,  # type: ignore[arg-type]
        pooling=getattr(module, "pooling", "max"), temperature=getattr(module, "pooling_temperature", 0.1),
    )  # fmt: skip


def register_margin(
    module: nn.Module,
    name: str,
    value: object,
    low: float,
    high: float,
    kind: str,
    num_classes: int,
    device: Any = None,
    dtype: Any = None,
) -> None:
    """Store a margin hyper-parameter: a float as a plain attribute, a per-class tensor ``(C,)`` as a buffer (saved in
    the state dict, moved by ``.to()``) on the head's device, float64 for float64 heads and float32 otherwise."""
    check_margin_param(value, low, high, kind, None, name=name)
    if isinstance(value, Tensor):
        if tuple(value.shape) != (num_classes,):
            raise ValueError(
                f"{kind} {name} must be a float or a tensor of shape ({num_classes},), one per class, "
                f"but got shape {tuple(value.shape)}"
            )
        stored = value.detach().to(device=device, dtype=statistics_dtype(dtype) if dtype is not None else None)
        module.register_buffer(name, stored.clone())
    else:
        setattr(module, name, float(value))  # type: ignore[arg-type]


def margin_repr(value: object) -> str:
    if isinstance(value, Tensor):
        return f"per-class[{value.numel()}] in [{float(value.min()):.4g}, {float(value.max()):.4g}]"
    return f"{value}"


def typical_margin(value: object) -> float:
    """A float for the heuristic scale: the margin, or the mean of per-class margins."""
    return float(value.detach().float().mean()) if isinstance(value, Tensor) else float(value)  # type: ignore[arg-type]


def chunked_loss(
    module: nn.Module,
    input: Tensor,
    labels: Tensor,
    reduction: str,
    chunk_size: Optional[int],
    margin_type: str,
    margin: float | Tensor = 0.0,
    easy_margin: bool = False,
) -> Tensor:
    """The body of a head's ``loss()``: its margin in training mode, none in eval mode, like its ``forward``."""
    return margin_cross_entropy(
        input, module.weight, labels, scale=module.scale, margin=margin,  # type: ignore[arg-type]
        margin_type=margin_type if module.training else "none", easy_margin=easy_margin,  # type: ignore[arg-type]
        num_sub_centers=module.num_sub_centers, chunk_size=chunk_size, reduction=reduction,  # type: ignore[arg-type]
        pooling=getattr(module, "pooling", "max"), temperature=getattr(module, "pooling_temperature", 0.1),
    )  # fmt: skip


def chunked_loss_with(
    module: nn.Module,
    input: Tensor,
    labels: Tensor,
    reduction: str,
    chunk_size: Optional[int],
    fn: ValueAndSlope,
    params: tuple[Any, ...],
) -> Tensor:
    """``loss()`` of a head whose target-only margin is ``fn(cos, w, *params)``: that margin in training mode,
    none in eval mode, like its ``forward``."""
    if not module.training:
        fn, params = _cos_fn, (0.0,)
    return chunked_margin_loss(
        input, module.weight, labels, module.scale, fn, params,  # type: ignore[arg-type]
        num_sub_centers=module.num_sub_centers, pooling=getattr(module, "pooling", "max"),  # type: ignore[arg-type]
        temperature=getattr(module, "pooling_temperature", 0.1), chunk_size=chunk_size,
        reduction=reduction,  # type: ignore[arg-type]
    )  # fmt: skip


def head_repr(module: nn.Module, *extra: str, show_trainable: bool = True) -> str:
    """``extra_repr`` of a head: sizes, scale (and whether it is trained), then the head's own options."""
    parts = [
        f"in_features={module.in_features}",
        f"out_features={module.out_features}",
        f"num_sub_centers={module.num_sub_centers}",
    ]
    scale = getattr(module, "scale", None)
    if isinstance(scale, Tensor):
        parts.append(f"scale={float(scale.detach()):.4g}")
        if show_trainable:
            parts.append(f"trainable_scale={scale.requires_grad}")
    if getattr(module, "pooling", "max") != "max":
        parts.append(f"pooling={module.pooling!r}, pooling_temperature={module.pooling_temperature}")
    return ", ".join([*parts, *extra])


def distributed_world_size() -> int:
    """World size of the default process group when statistics should be shared, else 1."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size()


def all_gather_samples(tensor: Tensor) -> Tensor:
    """Concatenate a per-sample tensor from every rank.

    In eager mode the first dimension may differ between ranks (sizes are exchanged first). Under
    ``torch.compile`` the sizes cannot be read without a graph break, so every rank must contribute the same
    number of samples (as with ``DistributedSampler``); a mismatch is an error from the collective.
    """
    world = dist.get_world_size()
    if torch.compiler.is_compiling():
        out = tensor.new_empty((world * tensor.shape[0], *tensor.shape[1:]))
        dist.all_gather_into_tensor(out, tensor.contiguous())
        return out
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(int(s) for s in sizes))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(gathered, padded)
    return torch.cat([g[: int(s)] for g, s in zip(gathered, sizes)])


def all_reduce_sum(*tensors: Tensor) -> None:
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
