"""Device placement: the model's device, a device given by name, where the fp32 sums live, tensors moved between
devices (batches onto the model's, projections to the host)."""

from __future__ import annotations

import copy
import logging
from collections import UserDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .config import GoraConfig
from .errors import GoraConfigError
from .targets import TargetLayer

logger = logging.getLogger(__name__)


def model_device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA where torch sees it, else the CPU; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def check_device(name: str) -> torch.device:
    """The device ``name`` resolves to; refuses a name torch does not know, and CUDA where torch sees none."""
    try:
        device = resolve_device(name)
    except (RuntimeError, TypeError, ValueError) as err:
        raise GoraConfigError(f"--device {name!r} is not a device ({name!r} is not a torch device: {err}); pass auto, "
                              "cpu, cuda or cuda:N.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GoraConfigError(f"--device {name} asks for CUDA but torch sees no CUDA GPU here; "
                              "pass --device auto or cpu.")
    return device


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors inside dicts, lists and tuples moved to ``device`` (other values kept).

    Containers keep their type: a namedtuple stays that namedtuple, a ``BatchEncoding`` (or other dict/``UserDict``
    subclass) a copy of itself with the moved values, so ``batch.input_ids`` still works in a ``loss_fn``. The
    user's batch is never changed in place. Only a mapping type that cannot be rebuilt becomes a plain dict.
    """
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return _rebuild_mapping(batch, {k: move_to_device(v, device) for k, v in batch.items()})
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a namedtuple takes its fields as arguments
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        items = [move_to_device(v, device) for v in batch]
        try:
            return type(batch)(items)
        except Exception:  # a subclass whose constructor takes something else: the plain container
            return tuple(items) if isinstance(batch, tuple) else items
    return batch


def _rebuild_mapping(batch: Mapping, items: dict) -> Mapping:
    """``batch``'s own type holding ``items``: a shallow copy with the values replaced for dict and ``UserDict``
    subclasses (keeps a ``BatchEncoding``'s tokenizer encodings, a ``defaultdict``'s factory), else the type built
    from a dict, else a plain dict."""
    if type(batch) is dict:
        return items
    if isinstance(batch, (dict, UserDict)):
        try:
            rebuilt = copy.copy(batch)  # dict storage is copied, never shared with the user's batch
            for key, value in items.items():
                rebuilt[key] = value
            return rebuilt
        except Exception:  # an unusual subclass: try its constructor below
            pass
    try:
        return type(batch)(items)  # type: ignore[call-arg]  # a Mapping subclass built from a dict
    except Exception:  # a mapping type that cannot be built from a dict
        return items


def accumulation_device(targets: list[TargetLayer], device: torch.device, config: GoraConfig) -> torch.device:
    """Where the fp32 sums live: the model's device when they fit there, else the CPU (``offload``).

    The sketch path's sums are O(r_max·(in+out)) per layer and always fit. The full path needs 4 B per target
    parameter; on CUDA it stays on the device if that is at most half of the memory still usable there (free
    memory plus what the caching allocator holds unused), leaving the rest for activations.
    """
    if config.offload is True or device.type == "cpu":
        return torch.device("cpu")
    if config.offload is False or config.estimator == "sketch":
        return device
    needed = 4 * sum(t.in_features * t.out_features for t in targets)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        usable = free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        if needed <= 0.5 * usable:
            return device
        logger.info("fp32 sums need %.2f GiB, more than half of the %.2f GiB usable on %s: offloading them to "
                    "the CPU (pinned, non-blocking copies)", needed / 2**30, usable / 2**30, device)
        return torch.device("cpu")
    return device


def to_host(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The tensors on the CPU, copied in one device→host transfer (one sync) instead of one per tensor.

    The device tensors are concatenated first: the small projections are briefly held twice on the device.
    """
    on_device = [name for name, tensor in tensors.items() if tensor.device.type != "cpu"]
    if not on_device:
        return tensors
    flat = torch.cat([tensors[name].reshape(-1) for name in on_device]).cpu()
    chunks = flat.split([tensors[name].numel() for name in on_device])
    return {**tensors, **{name: chunk.view(tensors[name].shape) for name, chunk in zip(on_device, chunks)}}
