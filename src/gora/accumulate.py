"""``GradientAccumulator``: streams each target weight's gradient into fp32 sums during backward.

One ``register_post_accumulate_grad_hook`` per target weight fires once ``.grad`` is complete, adds it into an
fp32 sum and drops it (``p.grad = None``). Backward produces gradients layer by layer, so about one full weight
gradient is alive at a time, and the last-computed layer is caught like the others (the official code's
pre-accumulation hooks lose it). No hook ever sweeps the other parameters.

Where the sums live:

- on the model's device (default when 4 B per target parameter fits): small gradients are held until
  ``BATCH_ADD_BYTES`` of them are pending (``CPU_BATCH_ADD_BYTES`` for CPU sums), or backward ends, and added with
  one ``torch._foreach_add_``: every op issued from a hook costs µs of host time inside backward, which is what a
  launch-bound step (a small model on a GPU) pays per layer. A gradient of the budget or more is added at once;
- CUDA model, CPU sums (``offload``): :class:`~gora.offload.PinnedOffload` adds on a worker thread;
- sums in CPU memory of a bf16/fp16 gradient: :func:`~gora.host_add.host_add_`;
- sketch path: two thin sums per layer instead of the gradient's, :func:`~gora.sketch.sketch_add_`.

NaN/Inf are found without a device sync per hook (:class:`~gora.finite_checks.FiniteChecks`). Inside the
``with`` block only target weights require grad; on exit every ``requires_grad`` flag, ``.grad``, module mode and
hook is restored, also after an exception or ``KeyboardInterrupt``. The weights themselves are never written.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .finite_checks import FiniteChecks
from .host_add import HOST_ADD_CHUNK, host_add_
from .offload import PinnedOffload
from .sketch import SketchOperators, sketch_add_
from .targets import TargetLayer

__all__ = ["BATCH_ADD_BYTES", "CPU_BATCH_ADD_BYTES", "GradientAccumulator", "LayerSums"]

BATCH_ADD_BYTES = 16 << 20
"""Gradients held for one batched add at most, for sums on an accelerator (16 MiB); 0 adds every gradient in its own
hook. There an add is host-bound (µs of Python and launch against a fraction of a µs of memory traffic)."""
CPU_BATCH_ADD_BYTES = 64 << 10
"""The same for sums in CPU memory (64 KiB): there a held gradient leaves the cache before its add, which costs more
than the host time saved, except for small gradients (tiny layers), which this budget still batches."""


@dataclass
class LayerSums:
    """What one layer accumulates. Full path: ``grad`` (out × in). Sketch path: ``proj`` and ``frob``."""

    count: int = 0  # steps whose backward reached the layer (once per step, however often its hook fires)
    last_step: int = -1
    grad: Tensor | None = None  # Σ_t G_t, (out, in), fp32
    proj: Tensor | None = None  # Σ_t G_t A_maxᵀ, (out, r_max), fp32 (sketch)
    frob: Tensor | None = None  # Σ_t (W ⊙ G_t) Ω, (out, k), fp32 (sketch)


class GradientAccumulator:
    """Context manager that hooks the target weights and accumulates their gradients.

    Args:
        model: the model (weights are never written).
        targets: layers to accumulate, from ``resolve_targets``.
        device: where the fp32 sums live (the model's device, or ``cpu`` to offload).
        sketch: per-layer operators for the sketch path; ``None`` for the full path.
        train_mode: put the model in train mode inside the block (restored on exit).
    """

    def __init__(
        self,
        model: nn.Module,
        targets: list[TargetLayer],
        device: torch.device,
        sketch: dict[str, SketchOperators] | None = None,
        train_mode: bool = False,
    ) -> None:
        self.model = model
        self.targets = targets
        self.device = torch.device(device)
        self.sketch = sketch
        self.train_mode = train_mode
        self.sums: dict[str, LayerSums] = {t.name: LayerSums() for t in targets}
        self.scale = 1.0  # loss scale (fp16); gradients are divided by it in fp32
        self.check_each_hook = False  # fp16: decide per hook whether a gradient is usable
        self._skip: set[str] = set()  # layers already added in the step being redone
        self._added: set[str] = set()
        self._checks = FiniteChecks()
        self._handles: list = []
        self._saved_flags: list[tuple[nn.Parameter, bool]] = []
        self._saved_grads: list[tuple[nn.Parameter, Tensor | None]] = []
        self._weights: list[nn.Parameter] = []  # the target weights, resolved once
        self._saved_modes: list[tuple[nn.Module, bool]] = []
        self._offload: PinnedOffload | None = None
        self.batch_add_bytes = CPU_BATCH_ADD_BYTES if self.device.type == "cpu" else BATCH_ADD_BYTES
        self._pending: tuple[list[Tensor], list[Tensor]] = ([], [])  # (sums, gradients) not yet added
        self._pending_ids: set[int] = set()  # id() of the pending sums: a sum appears once per multi-tensor add
        self._pending_bytes = 0
        self._step = 0  # index of the step under way (a redo keeps it)
        self._workspaces: dict[tuple[torch.device, int], Tensor] = {}  # sketch temporaries, reused

    # -- context management ---------------------------------------------------------------
    def __enter__(self) -> GradientAccumulator:
        try:
            self._saved_modes = [(m, m.training) for m in self.model.modules()]
            self._saved_flags = [(p, p.requires_grad) for p in self.model.parameters()]
            self._saved_grads = [(t.weight, t.weight.grad) for t in self.targets]
            self._weights = [t.weight for t in self.targets]
            for param in self.model.parameters():
                param.requires_grad_(False)
            for target in self.targets:
                target.weight.grad = None
                target.weight.requires_grad_(True)
                self._handles.append(target.weight.register_post_accumulate_grad_hook(self._make_hook(target)))
            if self.train_mode:
                self.model.train()
            if self.sketch is None and self.device.type == "cpu" and any(t.weight.is_cuda for t in self.targets):
                self._offload = PinnedOffload(max(t.in_features * t.out_features for t in self.targets))
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, exc_type, *exc_info) -> None:
        try:
            if exc_type is None:
                self.synchronize()  # the last host adds, and any error they raised
        finally:
            self._restore()

    def _restore(self) -> None:
        self._drop_pending()
        self._workspaces.clear()
        if self._offload is not None:
            self._offload.close()
            self._offload = None
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param, flag in self._saved_flags:
            param.requires_grad_(flag)
        for param, grad in self._saved_grads:
            param.grad = grad
        for module, mode in self._saved_modes:
            module.training = mode

    def synchronize(self) -> None:
        """Add the pending gradients and wait until every gradient handed to the offload worker is in its sum."""
        self._flush()
        if self._offload is not None:
            self._offload.drain()

    # -- steps ------------------------------------------------------------------------------
    def begin_step(self, scale: float = 1.0, redo: bool = False) -> None:
        """Start a step (``redo``: the same batch again after an fp16 overflow; added layers are skipped)."""
        self.scale = scale
        self._skip = set(self._added) if redo else set()
        if not redo:
            self._added = set()
            self._step += 1
        self._checks.begin_step()

    def end_step(self, extra_flags: list[Tensor] | None = None) -> tuple[list[str], list[bool]]:
        """(layers whose gradient was NaN/Inf in this step, the values of ``extra_flags``): one device sync at most."""
        self._flush()  # backward is over: the held gradients go into the sums before they are probed
        result = self._checks.end_step(list(extra_flags or []))
        self._clear_grads()
        return result

    def defer_step(self, step: int, extra_flags: list[Tensor], payload: Any = None) -> None:
        """End a step without a device sync: its finite flags stay on the device until :meth:`first_failure`.

        For bf16/fp32 estimation, where nothing is redone on overflow: a per-step host read stalls the device
        queue (about a fifth of a MiniLM step on an H100). A non-finite gradient poisons only sums that are
        never used, because :meth:`first_failure` runs before any sum is read.
        """
        self._flush()  # backward is over: the held gradients go into the sums before they are probed
        self._checks.defer_step(step, list(extra_flags), payload)
        self._clear_grads()

    def first_failure(self) -> tuple[int, list[str], list[bool], Any] | None:
        """See :meth:`FiniteChecks.first_failure`: the first deferred step with a NaN/Inf, read with one sync."""
        return self._checks.first_failure()

    def _clear_grads(self) -> None:
        """No ``.grad`` left behind by a step (hooks drop theirs; this catches any that did not run)."""
        for weight in self._weights:
            weight.grad = None

    # -- the hook ---------------------------------------------------------------------------
    def _make_hook(self, target: TargetLayer):
        name, sums = target.name, self.sums[target.name]  # looked up once, not on every call

        def hook(param: Tensor) -> None:
            grad = param.grad
            param.grad = None  # drop it at once: about one full gradient alive at a time (see BATCH_ADD_BYTES)
            if grad is None or name in self._skip:
                return
            if target.transposed:
                grad = grad.t()  # Conv1D stores (in, out); sums are (out, in)
            if self.check_each_hook:  # fp16: never add an overflowed gradient
                if not bool(torch.isfinite(grad).all()):
                    self._checks.nonfinite.append(name)
                    return
            probe = self._accumulate(sums, target, grad)
            if not self.check_each_hook:  # read in end_step / first_failure, with the step's other probes
                self._checks.add_probe(name, probe)
            self._added.add(name)

        return hook

    def _accumulate(self, sums: LayerSums, target: TargetLayer, grad: Tensor) -> Tensor:
        """Add one gradient into the layer's sums; returns what to probe for NaN/Inf: the running sum where it is on the
        device (no kernel here; :class:`FiniteChecks` checks all probes at once), the gradient's sum when offloaded."""
        if sums.last_step != self._step:  # a layer used twice in a step (shared block, two backward calls) adds
            sums.count, sums.last_step = sums.count + 1, self._step  # both gradients but counts one step
        if self.sketch is not None:
            return self._accumulate_sketch(sums, self.sketch[target.name], target, grad)
        inv_scale = 1.0 / self.scale
        if self._offload is not None:
            if sums.grad is None:
                sums.grad = torch.zeros(grad.shape, dtype=torch.float32)
            self._offload.add(sums.grad, grad, inv_scale)
            return grad.sum()  # the host sum is written by the worker: probe the gradient, on its device
        if grad.device != self.device:
            grad = grad.to(self.device)
        if sums.grad is None:  # first step: the sum is a fp32 copy (0 + x = x exactly)
            sums.grad = grad.to(torch.float32, copy=True)
            if inv_scale != 1.0:
                sums.grad.mul_(inv_scale)
        elif grad.dtype != torch.float32 and self.device.type == "cpu":  # CPU sums of bf16/fp16 gradients
            host_add_(sums.grad, grad, inv_scale, self._buffer(self.device, 2, HOST_ADD_CHUNK))
        elif inv_scale == 1.0 and not self.check_each_hook:
            self._add_batched(sums.grad, grad)
        else:
            sums.grad.add_(grad, alpha=inv_scale)  # computed in fp32, the accumulator's dtype
        return sums.grad

    def _add_batched(self, total: Tensor, grad: Tensor) -> None:
        """``total += grad``, held back with other small gradients until ``batch_add_bytes`` are pending."""
        if id(total) in self._pending_ids:  # the same sum twice in one multi-tensor add could race on a GPU
            self._flush()
        totals, grads = self._pending
        totals.append(total)
        grads.append(grad)
        self._pending_ids.add(id(total))
        self._pending_bytes += grad.numel() * grad.element_size()
        if self._pending_bytes >= self.batch_add_bytes:
            self._flush()

    def _flush(self) -> None:
        """Add the pending gradients into their sums: one multi-tensor add (computed in fp32, as ``add_``)."""
        totals, grads = self._pending
        if totals:
            torch._foreach_add_(totals, grads)
            self._drop_pending()

    def _drop_pending(self) -> None:
        self._pending, self._pending_bytes, self._pending_ids = ([], []), 0, set()

    def _buffer(self, device: torch.device, slot: int, entries: int) -> Tensor:
        """A reused fp32 buffer of ``entries`` entries per (device, slot), kept until the accumulator closes (slots 0
        and 1: the sketch's temporaries; slot 2: ``host_add_``'s blocks).

        Reuse matters on the CPU: a fresh 16 MiB temporary per hook fragments glibc's heap (its mmap threshold
        rises after the first free) and added ~0.5 GB of peak RSS on a 1.1B model.
        """
        key = (device, slot)
        buffer = self._workspaces.get(key)
        if buffer is None:
            buffer = self._workspaces[key] = torch.empty(entries, dtype=torch.float32, device=device)
        return buffer

    def _accumulate_sketch(self, sums: LayerSums, ops: SketchOperators, target: TargetLayer, grad: Tensor) -> Tensor:
        """S += G A_maxᵀ and F += (W ⊙ G) Ω (see :func:`~gora.sketch.sketch_add_`); returns S, the probe."""
        device = ops.a_max_t.device
        if sums.proj is None or sums.frob is None:
            sums.proj = torch.zeros(grad.shape[0], ops.a_max_t.shape[1], dtype=torch.float32, device=device)
            sums.frob = torch.zeros(grad.shape[0], ops.omega.shape[1], dtype=torch.float32, device=device)
        sketch_add_(sums.proj, sums.frob, ops, target.weight_out_in().detach(), grad, 1.0 / self.scale,
                    functools.partial(self._buffer, device))
        # NaN/Inf in G reaches this step's S (every entry of A_max is non-zero, and NaN·0 is NaN too): probe the small
        # running projection instead of reading the whole gradient a second time.
        return sums.proj
