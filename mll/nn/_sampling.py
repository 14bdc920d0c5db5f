"""A sharded head's random state — its class sample's stream or counter, ElasticFace's generator — and its place in the
``state_dict``, so that a resumed run draws what the uninterrupted one would have drawn.

Two rules choose the classes a training step keeps when ``sample_rate < 1`` (``sampling=``):

* ``"block"`` (Partial FC's, the default): each rank keeps a fixed share of its own block, drawn from a generator of
  its own (:func:`mll.functional.sample_classes`). The sample depends on how the classes are split: a resume on the
  same ranks continues exactly; on another number of ranks it draws anew.
* ``"class"``: each class is kept with probability ``sample_rate`` by a hash of (seed, step, class)
  (:func:`mll.functional.sample_classes_by_key`): the same classes on any number of ranks, so that a resume on
  another world size continues exactly. Its state is two integers, the same on every rank.

The ``state_dict`` entries (each only where the head has that state; a checkpoint without them loads, and the head
keeps its own):

* ``sampling_generator`` (uint8): the state of the rank's own sampling generator (``"block"``);
* ``sampling_counter`` (int64 ``[seed, step]``): the ``"class"`` rule's key;
* ``generator`` (uint8): ElasticFace's margin generator (the same state on every rank), when the head has one.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Optional

import torch
from torch import Tensor

from mll import functional as MF

__all__ = [
    "RANDOM_STATE_KEYS", "SAMPLING_RULES", "check_sampling", "follow_device", "init_sampling", "own_stream",
    "sampling_kwargs",
]  # fmt: skip

SAMPLING_RULES = ("block", "class")
#: the state_dict entries of a head's random state (never per class, never in a dense head's state_dict)
RANDOM_STATE_KEYS = ("sampling_generator", "sampling_counter", "generator")


def check_sampling(sampling: object) -> None:
    if sampling not in SAMPLING_RULES:
        raise ValueError(
            f"sampling must be 'block' (a fixed share of each rank's block, Partial FC's) or 'class' (each class "
            f"kept with probability sample_rate, the same on any number of ranks), but got {sampling!r}"
        )


def own_stream(generator: Optional[torch.Generator], device: torch.device, rank: int) -> torch.Generator:
    """A generator of this rank's own, seeded from one draw of ``generator`` (the default one when None), which
    every rank makes alike: the ranks' draws from ``generator`` stay in step."""
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=_device_of(generator)))
    device = torch.device("cpu") if device.type == "meta" else device
    return torch.Generator(device=device).manual_seed(seed + rank)


def _device_of(generator: Optional[torch.Generator]) -> Any:
    return "cpu" if generator is None else generator.device


def init_sampling(
    head: Any, sampling: str, generator: Optional[torch.Generator], draws: bool, device: torch.device, rank: int
) -> None:
    """Set the head's sampling state: ``sampling_generator`` (``"block"``: the user's generator, or, for a head that
    also draws margins from it or without one, a stream of the rank's own seeded from it), ``sampling_seed`` and
    ``sampling_step`` (``"class"``: one draw from ``generator`` — every rank must draw the same seed)."""
    head.sampling = sampling
    head.sampling_generator = generator
    head.owns_sampling_stream = False
    head.sampling_seed, head.sampling_step = 0, 0
    if head.sample_rate >= 1:
        return
    if sampling == "class":
        head.sampling_generator = None
        head.sampling_seed = int(torch.randint(0, 2**52, (), generator=generator, device=_device_of(generator)))
    elif draws or generator is None:  # a stream of the head's own, saved in its state_dict
        head.sampling_generator = own_stream(generator, device, rank)
        head.owns_sampling_stream = True


def follow_device(head: Any) -> None:
    """After ``head.to(device)``: the head's own sampling stream moves to the weights' device (it draws there), as a
    stream seeded from one draw of the old one. A user's generator stays where the user put it."""
    generator, device = head.sampling_generator, head.rows().device
    if not head.owns_sampling_stream or generator is None or device.type == "meta":
        return
    if torch.device(generator.device) != _normalized(device):
        seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device))
        head.sampling_generator = torch.Generator(device=device).manual_seed(seed)


def _normalized(device: torch.device) -> torch.device:
    """``cuda`` as ``cuda:<current>``: how a generator names its device."""
    if device.type != "cpu" and device.index is None:
        return torch.device(device.type, torch.get_device_module(device.type).current_device())
    return device


def samples_by_key(head: Any) -> bool:
    return head.sampling == "class" and head.sample_rate < 1


def sampling_kwargs(head: Any) -> dict[str, Any]:
    """The sampling arguments of :func:`mll.functional.sharded_margin_cross_entropy` for this step."""
    rate = head.sample_rate if head.training else 1.0
    out: dict[str, Any] = {"sample_rate": rate, "generator": head.sampling_generator}
    if rate < 1 and head.sampling == "class":
        seed, step, start = head.sampling_seed, head.sampling_step, head.class_start
        out["sampler"] = lambda positive: MF.sample_classes_by_key(
            positive, rate, class_start=start, seed=seed, step=step
        )
    return out


def agreed_sampling(head: Any) -> dict[str, int]:
    """What the ranks must share about the sampling (the same keys on every rank)."""
    name, by_key = type(head).__name__, samples_by_key(head)
    return {
        f"{name} sampling (0: 'block', 1: 'class')": SAMPLING_RULES.index(head.sampling),
        f"{name}'s class-sampling seed (drawn from generator: seed it alike on every rank)": (
            head.sampling_seed if by_key else 0
        ),
        f"{name}'s class-sampling step (load every rank's checkpoint of one step)": head.sampling_step if by_key else 0,
    }


def advance_sampling(head: Any) -> None:
    """After a training step that sampled by key: the next step's key."""
    if head.training and samples_by_key(head):
        head.sampling_step += 1


def save_random_state(module: Any, state_dict: dict[str, Any], prefix: str, local_metadata: Any) -> None:
    """``state_dict`` hook: the head's random state, as tensors on the CPU (see the module notes)."""
    if module.sample_rate < 1 and module.sampling == "block" and module.sampling_generator is not None:
        state_dict[prefix + "sampling_generator"] = module.sampling_generator.get_state()
    if samples_by_key(module):
        state_dict[prefix + "sampling_counter"] = torch.tensor([module.sampling_seed, module.sampling_step])
    generator = getattr(module, "generator", None)
    if isinstance(generator, torch.Generator):
        state_dict[prefix + "generator"] = generator.get_state()


def load_random_state(module: Any, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """``load_state_dict`` pre-hook: take the random state out of ``state_dict`` (a checkpoint without it is fine:
    the head keeps its own) and apply it."""
    saved = {key: state_dict.pop(prefix + key) for key in RANDOM_STATE_KEYS if prefix + key in state_dict}
    apply_random_state(module, saved)


def apply_random_state(module: Any, saved: Mapping[str, Tensor]) -> None:
    """Set the head's random state from ``saved`` (entries of :data:`RANDOM_STATE_KEYS`)."""
    name = type(module).__name__
    counter = saved.get("sampling_counter")
    stream = saved.get("sampling_generator")
    if module.sample_rate < 1:
        if (counter is not None and module.sampling != "class") or (stream is not None and module.sampling != "block"):
            held = "class" if counter is not None else "block"
            raise ValueError(
                f"the state_dict holds the random state of sampling={held!r}, but this {name} samples with "
                f"sampling={module.sampling!r}: build it with the sampling of the run it resumes"
            )
        if counter is not None:
            if not isinstance(counter, Tensor) or counter.shape != (2,) or counter.dtype != torch.int64:
                raise ValueError(
                    f"the state_dict's sampling_counter must be an int64 tensor [seed, step], but got {counter!r}"
                )
            module.sampling_seed, module.sampling_step = (int(v) for v in counter.tolist())
        if stream is not None and module.sampling_generator is not None:
            _set_state(module.sampling_generator, stream, name, "sampling_generator")
    generator = getattr(module, "generator", None)
    if saved.get("generator") is not None and isinstance(generator, torch.Generator):
        _set_state(generator, saved["generator"], name, "generator")


def _set_state(generator: torch.Generator, state: Tensor, name: str, key: str) -> None:
    try:
        generator.set_state(state.detach().to("cpu", torch.uint8))
    except (RuntimeError, TypeError) as error:  # a CPU generator's state for a CUDA generator, or the reverse
        warnings.warn(
            f"{name}: the state_dict's {key} does not fit this head's generator on {generator.device} ({error}); "
            "the head keeps its own, and its draws after this resume differ from an uninterrupted run's",
            stacklevel=4,
        )
