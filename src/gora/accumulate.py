"""``GradientAccumulator``: streams each target weight's gradient into fp32 sums during backward.

One ``register_post_accumulate_grad_hook`` per target weight fires once ``.grad`` is complete,
adds it into an fp32 accumulator and drops it (``p.grad = None``). Backward produces gradients
layer by layer, so about one full weight gradient is alive at a time, and the last-computed layer
is caught like the others (the official code's pre-accumulation hooks lose it).

Inside the ``with`` block only target weights require grad; on exit every ``requires_grad`` flag,
``.grad``, module mode and hook is restored, also after an exception or ``KeyboardInterrupt``.
The weights themselves are never written.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .targets import TargetLayer


@dataclass
class LayerSums:
    """What one layer accumulates. Full path: ``grad`` (out × in). Sketch path: ``proj`` and ``frob``."""

    count: int = 0
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
        self._finite_flags: list[tuple[str, Tensor]] = []
        self._nonfinite: list[str] = []
        self._handles: list = []
        self._saved_flags: list[tuple[nn.Parameter, bool]] = []
        self._saved_grads: list[tuple[nn.Parameter, Tensor | None]] = []
        self._saved_modes: list[tuple[nn.Module, bool]] = []

    # -- context management ---------------------------------------------------------------
    def __enter__(self) -> "GradientAccumulator":
        try:
            self._saved_modes = [(m, m.training) for m in self.model.modules()]
            self._saved_flags = [(p, p.requires_grad) for p in self.model.parameters()]
            self._saved_grads = [(t.weight, t.weight.grad) for t in self.targets]
            for param in self.model.parameters():
                param.requires_grad_(False)
            for target in self.targets:
                target.weight.grad = None
                target.weight.requires_grad_(True)
                self._handles.append(target.weight.register_post_accumulate_grad_hook(self._make_hook(target)))
            if self.train_mode:
                self.model.train()
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self._restore()

    def _restore(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for param, flag in self._saved_flags:
            param.requires_grad_(flag)
        for param, grad in self._saved_grads:
            param.grad = grad
        for module, mode in self._saved_modes:
            module.training = mode

    # -- steps ------------------------------------------------------------------------------
    def begin_step(self, scale: float = 1.0, redo: bool = False) -> None:
        """Start a step (``redo``: the same batch again after an fp16 overflow; added layers are skipped)."""
        self.scale = scale
        self._skip = set(self._added) if redo else set()
        if not redo:
            self._added = set()
        self._finite_flags = []
        self._nonfinite = []

    def end_step(self) -> list[str]:
        """Names of layers whose gradient was NaN/Inf in this step (one device sync at most)."""
        if self._finite_flags:
            flags = torch.stack([flag for _, flag in self._finite_flags])
            if not bool(flags.all()):
                self._nonfinite += [name for (name, _), ok in zip(self._finite_flags, flags.tolist()) if not ok]
        for target in self.targets:  # a hook that did not fire (unused layer) leaves no .grad behind
            target.weight.grad = None
        return sorted(set(self._nonfinite))

    # -- the hook ---------------------------------------------------------------------------
    def _make_hook(self, target: TargetLayer):
        name = target.name

        def hook(param: Tensor) -> None:
            grad = param.grad
            param.grad = None  # drop it at once: about one full gradient alive at a time
            if grad is None or name in self._skip:
                return
            if target.transposed:
                grad = grad.t()  # Conv1D stores (in, out); sums are (out, in)
            if self.check_each_hook:  # fp16: never add an overflowed gradient
                if not bool(torch.isfinite(grad).all()):
                    self._nonfinite.append(name)
                    return
            else:  # one fused reduction, checked once per step in end_step
                self._finite_flags.append((name, torch.isfinite(grad.sum())))
            self._accumulate(name, target, grad)
            self._added.add(name)

        return hook

    def _accumulate(self, name: str, target: TargetLayer, grad: Tensor) -> None:
        sums = self.sums[name]
        inv_scale = 1.0 / self.scale
        if self.sketch is None:
            if grad.device != self.device:
                grad = grad.to(self.device)  # offload: copy in the parameter dtype (half the bytes of fp32)
            if sums.grad is None:
                sums.grad = torch.zeros(grad.shape, dtype=torch.float32, device=self.device)
            sums.grad.add_(grad, alpha=inv_scale)  # computed in fp32, the accumulator's dtype
        else:
            ops = self.sketch[name]
            grad32 = grad.to(ops.a_max_t.device, torch.float32) * inv_scale
            proj = grad32 @ ops.a_max_t
            frob = (grad32.mul_(target.weight_out_in().to(grad32.device, torch.float32))) @ ops.omega
            sums.proj = proj if sums.proj is None else sums.proj.add_(proj)
            sums.frob = frob if sums.frob is None else sums.frob.add_(frob)
        sums.count += 1
