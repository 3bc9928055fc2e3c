"""Adaptive γ: pick the initial step size on held-out batches, against the loss at W₀.

ΔW₀ is linear in γ: ΔW₀(γ) x = −γ √(in/r) · C A x. Forward hooks add that term to each target's
output, so the base weights are never written and no PEFT model is built per candidate. Losses
are taken in eval mode under ``no_grad`` (the official baseline ran with dropout and an adapter
at ξ = 1, which biased it).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from . import distributed
from .estimation import LossFn, compute_loss_no_grad, move_to_device, model_device
from .targets import TargetLayer

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def initial_delta_hooks(targets: list[TargetLayer], a: dict[str, Tensor], c: dict[str, Tensor],
                        coefficient: dict[str, float]) -> Iterator[dict[str, float]]:
    """Add ΔW₀ x = −γ √(in/r) (x Aᵀ) Cᵀ to each target's output; yields a dict whose ``"gamma"`` is read live."""
    live = {"gamma": 0.0}
    handles = []

    def make_hook(name: str):
        def hook(module, inputs, output):
            x = inputs[0]
            delta = (x.to(a[name].dtype) @ a[name].t()) @ c[name].t()
            return output + (-live["gamma"] * coefficient[name] * delta).to(output.dtype)
        return hook

    try:
        for target in targets:
            if target.name in a:
                handles.append(target.module.register_forward_hook(make_hook(target.name)))
        yield live
    finally:
        for handle in handles:
            handle.remove()


def mean_loss(model: nn.Module, batches: list, loss_fn: LossFn | None) -> float:
    device = model_device(model)
    losses = [compute_loss_no_grad(model, move_to_device(b, device), loss_fn) for b in batches]
    return distributed.mean_over_processes(math.fsum(losses) / len(losses))


def search_gamma(model: nn.Module, targets: list[TargetLayer], a: dict[str, Tensor], c: dict[str, Tensor],
                 shapes: dict[str, tuple[int, int]], grid: list[float], batches: list,
                 loss_fn: LossFn | None) -> tuple[float, dict]:
    """Best γ on ``batches`` (eval mode), or 0 when no candidate beats the loss at W₀."""
    modes = [(m, m.training) for m in model.modules()]
    device = model_device(model)
    a_dev = {n: t.to(device) for n, t in a.items()}
    c_dev = {n: t.to(device) for n, t in c.items()}
    coefficient = {n: math.sqrt(shapes[n][1] / a[n].shape[0]) for n in a}
    try:
        model.eval()
        with torch.no_grad():
            baseline = mean_loss(model, batches, loss_fn)
            scan = {}
            with initial_delta_hooks(targets, a_dev, c_dev, coefficient) as live:
                for gamma in grid:
                    live["gamma"] = gamma
                    scan[gamma] = mean_loss(model, batches, loss_fn)
    finally:
        for module, mode in modes:
            module.training = mode
    finite = {g: v for g, v in scan.items() if math.isfinite(v)}
    best = min(finite, key=finite.get) if finite else 0.0
    chosen = best if finite and finite[best] < baseline else 0.0
    logger.info("adaptive gamma: W0 loss %.5g, best %.5g at gamma=%g -> gamma=%g", baseline,
                finite.get(best, float("nan")), best, chosen)
    return chosen, {"baseline_loss": baseline, "scan": {str(g): v for g, v in scan.items()}, "chosen": chosen}
