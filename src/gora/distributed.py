"""torch.distributed helpers; every one is a no-op in a single process.

GoRA under DDP: each process accumulates on its own batches, then one SUM all-reduce per
accumulator after the loop (chunked), rank 0's ranks and B are broadcast so that every
process ends bit-identical. A is drawn from the shared per-layer seed, so it never travels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

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
    flat = tensor.view(-1)
    for chunk in flat.split(CHUNK_ELEMENTS):
        staged = chunk.to(device) if device != chunk.device else chunk
        dist.all_reduce(staged, op=dist.ReduceOp.SUM)
        if staged is not chunk:
            chunk.copy_(staged)
    return tensor


def all_reduce_counts(counts: list[int]) -> list[int]:
    if not is_distributed():
        return counts
    return [int(v) for v in all_reduce_sum_(torch.tensor(counts, dtype=torch.int64)).tolist()]


def any_process(flag: bool) -> bool:
    """True if ``flag`` is True on any process (MAX all-reduce), e.g. "not converged yet"."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([1 if flag else 0], dtype=torch.int64)
    tensor = tensor.to(_collective_device(tensor))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def mean_over_processes(value: float) -> float:
    if not is_distributed():
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    tensor = tensor.to(_collective_device(tensor))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return float(tensor.item()) / world_size()


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
