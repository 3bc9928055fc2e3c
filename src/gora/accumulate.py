"""``GradientAccumulator``: streams each target weight's gradient into fp32 sums during backward.

One ``register_post_accumulate_grad_hook`` per target weight fires once ``.grad`` is complete,
adds it into an fp32 accumulator and drops it (``p.grad = None``). Backward produces gradients
layer by layer, so about one full weight gradient is alive at a time (small ones are batched, below), and the
last-computed layer is caught like the others (the official code's pre-accumulation hooks lose it). No hook ever
sweeps the other parameters.

Where the sums live:

- on the model's device (default when 4 B per target parameter fits): one fp32 add per hook, except that small
  gradients are held until ``BATCH_ADD_BYTES`` of them are pending (``CPU_BATCH_ADD_BYTES`` for CPU sums), or
  backward ends, and added with one ``torch._foreach_add_``: every op issued from a hook costs µs of host time
  inside backward, which is what a launch-bound step (a small model on a GPU) pays per layer. A gradient of
  the budget or more is added at once, as before;
- CUDA model, CPU sums (``offload``): the hook copies the gradient, in its own dtype, into a
  pinned staging buffer without blocking and a worker thread adds it into the CPU sum once the
  copy's event has fired, so backward keeps running while the host adds;
- sums in CPU memory of a bf16/fp16 gradient (offload, or a low-precision model on the CPU): ``host_add_``
  converts row blocks into a reused fp32 buffer and adds from there, 5x faster than torch's mixed-dtype ``add_``;
- sketch path: per hook ``S += G Aᵀ`` and ``F += (W ⊙ G) Ω`` in row blocks of at most
  ``SKETCH_BLOCK_ELEMENTS`` entries, in two reused fp32 buffers: the temporaries stay small next to the
  gradient, and no fresh large allocation per hook fragments the CPU heap.

Inside the ``with`` block only target weights require grad; on exit every ``requires_grad`` flag,
``.grad``, module mode and hook is restored, also after an exception or ``KeyboardInterrupt``.
The weights themselves are never written. ``GradientCheckpointing`` does the same for the
model's own gradient checkpointing.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from .errors import GoraUnsupportedError
from .targets import TargetLayer

logger = logging.getLogger(__name__)

SKETCH_BLOCK_ELEMENTS = 1 << 22
"""Largest fp32 temporary of the sketch hook (16 MiB): rows of G are projected in blocks of this many entries."""
STAGING_BUFFERS = 3
"""Pinned staging buffers of the CUDA → CPU offload (copies in flight while the host adds)."""
BATCH_ADD_BYTES = 16 << 20
"""Gradients held for one batched add at most, for sums on an accelerator (16 MiB); 0 adds every gradient in its own
hook. There an add is host-bound (µs of Python and launch against a fraction of a µs of memory traffic)."""
CPU_BATCH_ADD_BYTES = 64 << 10
"""The same for sums in CPU memory (64 KiB): there a held gradient leaves the cache before its add, which costs more
than the host time saved, except for small gradients (tiny layers), which this budget still batches."""
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


def probe_flags(probes: list[Tensor]) -> Tensor:
    """A bool per probe: has it no NaN/Inf? One multi-tensor L1 norm over all of them (a few kernels in all, not
    one per tensor); NaN and Inf reach the norm from any entry."""
    return torch.isfinite(torch.stack(torch._foreach_norm(probes, 1)))


@dataclass
class LayerSums:
    """What one layer accumulates. Full path: ``grad`` (out × in). Sketch path: ``proj`` and ``frob``."""

    count: int = 0  # steps whose backward reached the layer (once per step, however often its hook fires)
    last_step: int = -1
    grad: Tensor | None = None  # Σ_t G_t, (out, in), fp32
    proj: Tensor | None = None  # Σ_t G_t A_maxᵀ, (out, r_max), fp32 (sketch)
    frob: Tensor | None = None  # Σ_t (W ⊙ G_t) Ω, (out, k), fp32 (sketch)


@dataclass
class SketchOperators:
    """Per-layer fixed matrices of the sketch path, on the accumulation device, fp32."""

    a_max_t: Tensor  # A_maxᵀ, (in, r_max)
    omega: Tensor  # (in, k), standard Gaussian


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
        self._probes: list[tuple[str, Tensor]] = []  # (layer, a device tensor that has a NaN/Inf iff its gradient had)
        self._nonfinite: list[str] = []
        self._deferred: list[tuple[int, list[str], Tensor, Any]] = []  # (step, layers, flags, payload)
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
    def __enter__(self) -> "GradientAccumulator":
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
        self._probes = []
        self._nonfinite = []

    def _step_flags(self, extra_flags: list[Tensor]) -> Tensor:
        """One bool vector on the device: every probed layer's "finite?", then ``extra_flags``.

        See :func:`probe_flags`. The running sums are probed in place of the gradients: a sum holds a NaN/Inf from
        the first step whose gradient had one, so the first failing step and its layers are named as exactly.
        """
        self._flush()  # backward is over: the held gradients go into the sums before they are probed
        parts = [probe_flags([probe for _, probe in self._probes])] if self._probes else []
        if extra_flags:
            parts.append(torch.stack([flag.reshape(()) for flag in extra_flags]))
        return torch.cat(parts) if parts else torch.ones(0, dtype=torch.bool)

    def end_step(self, extra_flags: list[Tensor] | None = None) -> tuple[list[str], list[bool]]:
        """(layers whose gradient was NaN/Inf in this step, the values of ``extra_flags``): one device sync at most."""
        values = self._step_flags(list(extra_flags or [])).tolist()
        layer_values, extra_values = values[:len(self._probes)], values[len(self._probes):]
        self._nonfinite += [name for (name, _), ok in zip(self._probes, layer_values) if not ok]
        self._clear_grads()
        return sorted(set(self._nonfinite)), [bool(v) for v in extra_values]

    def defer_step(self, step: int, extra_flags: list[Tensor], payload: Any = None) -> None:
        """End a step without a device sync: its finite flags stay on the device until :meth:`first_failure`.

        For bf16/fp32 estimation, where nothing is redone on overflow: a per-step host read stalls the device
        queue (about a fifth of a MiniLM step on an H100). A non-finite gradient poisons only sums that are
        never used, because :meth:`first_failure` runs before any sum is read.
        """
        names = [name for name, _ in self._probes]
        self._deferred.append((step, names, self._step_flags(list(extra_flags)), payload))
        self._clear_grads()

    def _clear_grads(self) -> None:
        """No ``.grad`` left behind by a step (hooks drop theirs; this catches any that did not run)."""
        for weight in self._weights:
            weight.grad = None

    def first_failure(self) -> tuple[int, list[str], list[bool], Any] | None:
        """(step, non-finite layers, extra flag values, payload) of the first deferred step with a NaN/Inf, or
        None; all deferred flags are read with one device sync and then forgotten."""
        if not self._deferred:
            return None
        values = torch.cat([flags.reshape(-1) for _, _, flags, _ in self._deferred]).tolist()
        deferred, self._deferred, offset = self._deferred, [], 0
        for step, names, flags, payload in deferred:
            step_values = values[offset : offset + flags.numel()]
            offset += flags.numel()
            if not all(step_values):
                layer_values, extra_values = step_values[: len(names)], step_values[len(names) :]
                bad = sorted({name for name, ok in zip(names, layer_values) if not ok})
                return step, bad, [bool(v) for v in extra_values], payload
        return None

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
                    self._nonfinite.append(name)
                    return
            probe = self._accumulate(sums, target, grad)
            if not self.check_each_hook:  # read in end_step / first_failure, with the step's other probes
                self._probes.append((name, probe))
            self._added.add(name)

        return hook

    def _accumulate(self, sums: LayerSums, target: TargetLayer, grad: Tensor) -> Tensor:
        """Add one gradient into the layer's sums; returns what to probe for NaN/Inf: the running sum where it is on the
        device (no kernel here; :meth:`_step_flags` checks all probes at once), the gradient's sum when offloaded."""
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

    def _workspace(self, device: torch.device, slot: int, shape: tuple[int, int]) -> Tensor:
        """The slot's ``SKETCH_BLOCK_ELEMENTS``-entry buffer (see :meth:`_buffer`), viewed as ``shape``."""
        return self._buffer(device, slot, SKETCH_BLOCK_ELEMENTS)[: shape[0] * shape[1]].view(shape)

    def _accumulate_sketch(self, sums: LayerSums, ops: SketchOperators, target: TargetLayer, grad: Tensor) -> Tensor:
        """S += G A_maxᵀ and F += (W ⊙ G) Ω, in fp32, over row blocks of G (bounded temporaries)."""
        device = ops.a_max_t.device
        out_features, in_features = grad.shape
        if sums.proj is None:
            sums.proj = torch.zeros(out_features, ops.a_max_t.shape[1], dtype=torch.float32, device=device)
            sums.frob = torch.zeros(out_features, ops.omega.shape[1], dtype=torch.float32, device=device)
        weight = target.weight_out_in().detach()
        inv_scale = 1.0 / self.scale
        rows = max(1, SKETCH_BLOCK_ELEMENTS // max(in_features, 1))
        as_is = grad.dtype == torch.float32 and grad.device == device and inv_scale == 1.0
        for start in range(0, out_features, rows):
            block = slice(start, start + rows)
            shape = (min(rows, out_features - start), in_features)
            if as_is:
                g = grad[block]  # a view: no copy
            else:
                g = self._workspace(device, 0, shape).copy_(grad[block])  # fp32, exact for bf16/fp16
                if inv_scale != 1.0:
                    g.mul_(inv_scale)
            sums.proj[block].addmm_(g, ops.a_max_t)
            weighted = torch.mul(g, weight[block].to(device), out=self._workspace(device, 1, shape))  # W ⊙ G, fp32
            sums.frob[block].addmm_(weighted, ops.omega)
        # NaN/Inf in G reaches this step's S (every entry of A_max is non-zero, and NaN·0 is NaN too): probe the small
        # running projection instead of reading the whole gradient a second time.
        return sums.proj


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


_CHECKPOINT_ATTRS = ("gradient_checkpointing", "_gradient_checkpointing_func", "_require_grads_hooks",
                     "_require_grads_hook")
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
_HOOK_COMPANIONS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


class GradientCheckpointing:
    """Context manager: the model's own gradient checkpointing during estimation, restored exactly on exit.

    Calls ``model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})``
    (Hugging Face models). Hugging Face blocks checkpoint only while the *block* is in train mode
    (``GradientCheckpointingLayer.__call__`` tests ``self.training``), and models load in eval mode. Switching
    the block to train mode would also switch on the dropout some blocks apply themselves
    (``F.dropout(x, p=self.dropout, training=self.training)`` in BART and Whisper layers), so an eval-mode block
    is left in eval mode and its ``forward`` is checkpointed instead (non-reentrant ``torch.utils.checkpoint``,
    with the cache switched off as Hugging Face does): estimation stays deterministic and recomputation is
    exact. On exit the checkpointing attributes, the forward hooks ``enable_input_require_grads`` registers, the
    wrapped ``forward`` and the flags are put back as they were. Non-reentrant checkpointing needs no input that
    requires grad.

    Raises:
        GoraUnsupportedError: the model has no ``gradient_checkpointing_enable`` or does not support it.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._saved_attrs: list[tuple[nn.Module, dict]] = []
        self._saved_hooks: list[tuple[nn.Module, dict[str, set]]] = []
        self._saved_modes: list[tuple[nn.Module, bool]] = []
        self._wrapped: list[tuple[nn.Module, Any]] = []  # (block, its own instance ``forward`` before, or None)

    def __enter__(self) -> "GradientCheckpointing":
        enable = getattr(self.model, "gradient_checkpointing_enable", None)
        if not callable(enable):
            raise GoraUnsupportedError(
                f"gradient_checkpointing=True needs a model with gradient_checkpointing_enable() (a transformers "
                f"PreTrainedModel); {type(self.model).__name__} has none. Set GoraConfig(gradient_checkpointing="
                "False), or checkpoint inside loss_fn with torch.utils.checkpoint."
            )
        modules = list(self.model.modules())
        self._saved_attrs = [(m, {a: m.__dict__[a] for a in _CHECKPOINT_ATTRS if a in m.__dict__}) for m in modules]
        self._saved_hooks = [(m, {d: set(getattr(m, d)) for d in _HOOK_DICTS}) for m in modules]
        self._saved_modes = [(m, m.training) for m in modules]
        try:
            enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            switched = self._checkpoint_eval_blocks(modules)
        except BaseException as err:
            self._restore()
            if isinstance(err, ValueError):  # transformers: "... does not support gradient checkpointing"
                raise GoraUnsupportedError(f"{err} Set GoraConfig(gradient_checkpointing=False).") from err
            raise
        if not switched:
            logger.warning("gradient_checkpointing=True: %s has no checkpointing blocks that act in eval mode; "
                           "checkpointing only acts in train mode (GoraConfig(train_mode=True)).",
                           type(self.model).__name__)
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _checkpoint_eval_blocks(self, modules: list[nn.Module]) -> int:
        """Checkpoint the blocks Hugging Face would checkpoint in train mode; returns how many will checkpoint."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        blocks = [m for m in modules if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]
        for block in blocks:
            if not block.training:  # in train mode Hugging Face's own __call__ checkpoints it
                self._wrapped.append((block, block.__dict__.get("forward")))
                block.forward = _checkpointed(block.forward, block._gradient_checkpointing_func)
        return len(blocks)

    def _restore(self) -> None:
        for block, forward in reversed(self._wrapped):
            if forward is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = forward
        self._wrapped = []
        for module, hooks in self._saved_hooks:
            for dict_name, kept in hooks.items():
                for key in set(getattr(module, dict_name)) - kept:
                    getattr(module, dict_name).pop(key, None)
                    for companion in _HOOK_COMPANIONS:
                        getattr(module, companion, {}).pop(key, None)
        for module, attrs in self._saved_attrs:
            for name in _CHECKPOINT_ATTRS:
                if name in attrs:
                    module.__dict__[name] = attrs[name]
                elif name in module.__dict__:
                    del module.__dict__[name]
        for module, mode in self._saved_modes:
            module.training = mode
        self._saved_hooks, self._saved_attrs, self._saved_modes = [], [], []


_CACHE_KWARGS = ("past_key_values", "past_key_value", "layer_past")


def _checkpointed(forward, checkpoint):
    """``forward`` run through the block's own ``_gradient_checkpointing_func`` (set by
    ``gradient_checkpointing_enable``) without a cache, as ``GradientCheckpointingLayer.__call__`` does in train
    mode: a cache would be written twice, once more by the recomputation."""

    def checkpointed_forward(*args, **kwargs):
        if kwargs.get("use_cache"):
            kwargs["use_cache"] = False
        for name in _CACHE_KWARGS:
            if kwargs.get(name) is not None:
                kwargs[name] = None
        return checkpoint(functools.partial(forward, **kwargs), *args)

    return checkpointed_forward
