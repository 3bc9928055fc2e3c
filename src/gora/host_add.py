"""``host_add_``: an fp32 sum of a low-precision gradient on the CPU, converted in cache-sized row blocks.

torch's CPU ``add_`` with a bf16/fp16 operand and an fp32 result casts element by element; converting a block into
a reused fp32 buffer first and adding from there is 5x faster and gives the same values. The accumulator uses it for
sums in CPU memory, and the offload worker for every gradient it adds.
"""

from __future__ import annotations

import torch
from torch import Tensor

HOST_ADD_CHUNK = 1 << 20
"""Entries converted to fp32 at a time by :func:`host_add_` (4 MiB: stays in cache between convert and add)."""


def host_add_(total: Tensor, grad: Tensor, alpha: float, workspace: Tensor) -> None:
    """``total += alpha * grad`` on the CPU, for an fp32 ``total`` and a gradient of any float dtype.

    torch's CPU ``add_`` with a bf16/fp16 operand and an fp32 result is not vectorised: it casts element by
    element (5x slower than a bf16 → fp32 ``copy_`` followed by an fp32 ``add_``, measured by
    ``benchmarks/estimation_cost/host_add.py``). So a low-precision gradient is converted in row blocks of at most
    ``workspace.numel()`` entries into the reused fp32 ``workspace`` (exact) and added from there; the block
    stays in cache between the two passes. Same values as ``total.add_(grad, alpha=alpha)``.
    """
    if grad.dtype == torch.float32:
        total.add_(grad, alpha=alpha)
        return
    if grad.dim() != 2:
        raise ValueError(f"host_add_ expects a 2-D gradient, got shape {tuple(grad.shape)}")
    rows, cols = grad.shape
    block = max(1, workspace.numel() // max(cols, 1))
    if block * cols > workspace.numel():  # one row is longer than the workspace: plain (slow) add
        total.add_(grad, alpha=alpha)
        return
    for start in range(0, rows, block):
        part = slice(start, start + block)
        converted = workspace[: min(block, rows - start) * cols].view(-1, cols).copy_(grad[part])
        total[part].add_(converted, alpha=alpha)

