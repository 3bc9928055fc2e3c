"""torch.distributed helpers; every one is a no-op in a single process.

GoRA under DDP: each process accumulates on its own batches, then one SUM all-reduce per
accumulator after the loop (chunked), rank 0's ranks and B are broadcast so that every
process ends bit-identical. A is drawn from the shared per-layer seed, so it never travels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

CHUNK_ELEMENTS = 1 << 24  # 64 MB of fp32 per collective call


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _collective_device(tensor: Tensor) -> torch.device:
    """NCCL only reduces CUDA tensors: stage CPU chunks through the current GPU then."""
    if dist.get_backend() == "nccl" and tensor.device.type == "cpu":
        return torch.device("cuda", torch.cuda.current_device())
    return tensor.device


def all_reduce_sum_(tensor: Tensor) -> Tensor:
    """In-place SUM over processes, in chunks (bounded extra memory for offloaded accumulators)."""
    if not is_distributed():
        return tensor
    device = _collective_device(tensor)
    flat = _flat_view(tensor)
    for chunk in flat.split(CHUNK_ELEMENTS):
        staged = chunk.to(device) if device != chunk.device else chunk
        dist.all_reduce(staged, op=dist.ReduceOp.SUM)
        if staged is not chunk:
            chunk.copy_(staged)
    return tensor


def _flat_view(tensor: Tensor) -> Tensor:
    """A 1-D view of every entry, in memory order. A Conv1D layer's sum is the transpose of its (in, out)
    gradient, dense but not contiguous; the SUM is elementwise, so any order that every process shares will do."""
    if tensor.is_contiguous():
        return tensor.view(-1)
    if tensor.dim() == 2 and tensor.t().is_contiguous():
        return tensor.t().view(-1)
    raise ValueError(f"all_reduce_sum_ needs a dense tensor, got shape {tuple(tensor.shape)} with strides "
                     f"{tensor.stride()}")


def all_reduce_counts(counts: list[int]) -> list[int]:
    if not is_distributed():
        return counts
    return [int(v) for v in all_reduce_sum_(torch.tensor(counts, dtype=torch.int64)).tolist()]


def any_process(flag: bool) -> bool:
    """True if ``flag`` is True on any process (MAX all-reduce of one flag), e.g. "not converged yet"; run every
    step, so it stays one integer rather than :func:`processes_where`'s one per process."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int64)
    tensor = tensor.to(_collective_device(tensor))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def processes_where(flag: bool) -> list[int]:
    """The ranks of the processes where ``flag`` is True: one MAX all-reduce of one integer per process."""
    if not is_distributed():
        return [0] if flag else []
    flags = torch.zeros(world_size(), dtype=torch.int64)
    flags[rank()] = 1 if flag else 0
    flags = flags.to(_collective_device(flags))
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [process for process, value in enumerate(flags.tolist()) if value]


def local_module(model: nn.Module) -> nn.Module:
    """The module inside a ``DistributedDataParallel`` wrapper, else ``model`` itself.

    Estimation runs its forward/backward passes on it: GoRA all-reduces its own sums once after the loop, and
    DDP's per-step gradient reducer would both cost an all-reduce per step and fail at the second step, since
    every non-target parameter is frozen during estimation.
    """
    while isinstance(model, DistributedDataParallel):
        model = model.module
    return model


def mean_over_processes(value: float) -> float:
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    tensor = tensor.to(_collective_device(tensor))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / world_size()


def sum_over_processes(values: list[float]) -> list[float]:
    """Each value summed over processes, in float64 (one all-reduce)."""
    if not is_distributed():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64)
    tensor = tensor.to(_collective_device(tensor))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return [float(v) for v in tensor.cpu().tolist()]


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s object on every process (ranks, importances: small)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def broadcast_tensor_(tensor: Tensor, src: int = 0) -> Tensor:
    if not is_distributed():
        return tensor
    device = _collective_device(tensor)
    staged = tensor.to(device) if device != tensor.device else tensor
    dist.broadcast(staged, src=src)
    if staged is not tensor:
        tensor.copy_(staged)
    return tensor
