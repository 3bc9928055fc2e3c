"""``PinnedOffload``: CUDA gradients summed in CPU memory by a worker thread, behind pinned staging buffers.

The accumulator's hook hands each gradient over without blocking: a non-blocking copy into a pinned buffer, an
event, and a queue item; a worker thread waits for the event and adds the staged gradient into its fp32 CPU sum
with :func:`~gora.host_add.host_add_`, so backward keeps running while the host adds.
"""

from __future__ import annotations

import queue
import threading

import torch
from torch import Tensor

from .host_add import HOST_ADD_CHUNK, host_add_

STAGING_BUFFERS = 3
"""Pinned staging buffers of the CUDA → CPU offload (copies in flight while the host adds)."""


class PinnedOffload:
    """CUDA → CPU gradient sums: non-blocking copies into pinned buffers, fp32 adds on a worker thread.

    ``add`` returns as soon as the copy is queued on the gradient's stream; it only waits when all
    ``STAGING_BUFFERS`` buffers are still in flight (the host is the bottleneck then). The gradient's
    memory may be reused by later kernels once the hook drops it: they run on the same stream, after
    the copy. ``drain`` waits for every add and re-raises a worker error.
    """

    def __init__(self, capacity: int, buffers: int = STAGING_BUFFERS) -> None:
        self.capacity = capacity  # entries of the largest gradient
        self.buffers = buffers
        self._free: dict[torch.dtype, queue.Queue] = {}
        self._work: queue.Queue = queue.Queue()
        self._workspace = torch.empty(min(HOST_ADD_CHUNK, capacity), dtype=torch.float32)  # the worker's only
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="gora-offload", daemon=True)
        self._thread.start()

    def add(self, total: Tensor, grad: Tensor, alpha: float) -> None:
        if self._error is not None:
            self.drain()
        free = self._free.get(grad.dtype)
        if free is None:  # pinned buffers per gradient dtype, made once
            free = self._free[grad.dtype] = queue.Queue()
            for _ in range(self.buffers):
                free.put(torch.empty(self.capacity, dtype=grad.dtype, pin_memory=True))
        buffer = free.get()
        staging = buffer[: grad.numel()].view(grad.shape)
        staging.copy_(grad, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(grad.device))
        self._work.put((event, staging, total, alpha, buffer, free))

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                self._work.task_done()
                return
            event, staging, total, alpha, buffer, free = item
            try:
                event.synchronize()
                if self._error is None:
                    host_add_(total, staging, alpha, self._workspace)  # fp32 sum of a bf16/fp16/fp32 gradient
            except BaseException as err:  # noqa: BLE001 - handed to the caller in drain()
                self._error = err
            finally:
                free.put(buffer)
                self._work.task_done()

    def drain(self) -> None:
        self._work.join()
        if self._error is not None:
            error, self._error = self._error, None
            raise RuntimeError(f"adding an offloaded gradient on the host failed: {error}") from error

    def close(self) -> None:
        """Stop the worker (after the queued adds); safe to call twice."""
        if self._thread.is_alive():
            self._work.put(None)
            self._thread.join()
