"""Adaptive γ: pick the initial step size on held-out batches, against the loss at W₀.

ΔW₀ is linear in γ: ΔW₀(γ) x = −γ √(in/r) · C A x. Forward hooks add that term to each target's
output, so the base weights are never written and no PEFT model is built per candidate. Losses
are taken in eval mode under ``no_grad`` (the official baseline ran with dropout and an adapter
at ξ = 1, which biased it).

The held-out loss along γ is a smooth function of one variable. ``golden`` brackets its minimum in log γ
from the configured γ (steps growing by the golden ratio) and narrows the bracket by parabolic steps
(a parabola in γ is the loss's second-order Taylor model) safeguarded by golden sections: 4-8 loss
evaluations on MiniLM. ``scan`` scores every candidate of the grid (≈52), the reference.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from . import distributed
from .config import field_default
from .devices import model_device, move_to_device
from .losses import LossFn, compute_loss_no_grad
from .targets import TargetLayer

logger = logging.getLogger(__name__)

GOLDEN = (3 - math.sqrt(5)) / 2  # 0.382: the golden-section fraction
BRACKET_FACTOR = 4.0
"""First bracketing step in γ (×4 or ÷4); later steps grow by the golden ratio in log γ."""
LOG_TOLERANCE = math.log(1.25) / 2
"""The search stops once its bracket is this narrow in log γ: half the scan's spacing (factor 0.8)."""
RELATIVE_FLATNESS = 1e-4
"""...or once the bracket's ends are within this fraction of the loss of its best point (the curve is flat)."""
MAX_EVALUATIONS = 24


@contextlib.contextmanager
def initial_delta_hooks(targets: list[TargetLayer], a: dict[str, Tensor], c: dict[str, Tensor],
                        coefficient: dict[str, float]) -> Iterator[dict[str, float]]:
    """Add ΔW₀ x = −γ √(in/r) (x Aᵀ) Cᵀ to each target's output; yields a dict whose ``"gamma"`` is read live
    (γ = 0: the hooks leave the output untouched, W₀ exactly)."""
    live = {"gamma": 0.0}
    handles = []

    def make_hook(name: str):
        def hook(module, inputs, output):
            if live["gamma"] == 0.0:
                return None
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


def batch_losses(model: nn.Module, batches: list, loss_fn: LossFn | None) -> list[float]:
    """This process's loss on each batch (no graph kept)."""
    device = model_device(model)
    return [compute_loss_no_grad(model, move_to_device(b, device), loss_fn) for b in batches]


def mean_loss(model: nn.Module, batches: list, loss_fn: LossFn | None) -> float:
    """The mean loss over ``batches``, averaged over processes under torch.distributed."""
    losses = batch_losses(model, batches, loss_fn)
    return distributed.mean_over_processes(math.fsum(losses) / len(losses))


@dataclass
class HeldOutLosses:
    """Per-batch held-out losses (this process's batches) at W₀ and at the chosen γ."""

    gamma: float
    w0: list[float]
    after: list[float]


@contextlib.contextmanager
def held_out_probe(model: nn.Module, targets: list[TargetLayer], a: dict[str, Tensor], c: dict[str, Tensor],
                   shapes: dict[str, tuple[int, int]], batches: list, loss_fn: LossFn | None
                   ) -> Iterator[Callable[[float], list[float]]]:
    """A function γ → per-batch held-out losses at W₀ + ΔW₀(γ), in eval mode under ``no_grad``.

    γ = 0 is W₀ with the adapter disabled. Leaving the block removes the hooks and restores every module's mode,
    also after an exception or a KeyboardInterrupt.
    """
    modes = [(m, m.training) for m in model.modules()]
    device = model_device(model)
    a_dev = {n: t.to(device) for n, t in a.items()}
    c_dev = {n: t.to(device) for n, t in c.items()}
    coefficient = {n: math.sqrt(shapes[n][1] / a[n].shape[0]) for n in a}
    try:
        model.eval()
        with torch.no_grad(), initial_delta_hooks(targets, a_dev, c_dev, coefficient) as live:
            def losses_at(gamma: float) -> list[float]:
                live["gamma"] = gamma
                return batch_losses(model, batches, loss_fn)

            yield losses_at
    finally:
        for module, mode in modes:
            module.training = mode


def held_out_losses(model: nn.Module, targets: list[TargetLayer], a: dict[str, Tensor], c: dict[str, Tensor],
                    shapes: dict[str, tuple[int, int]], gamma: float, batches: list,
                    loss_fn: LossFn | None) -> HeldOutLosses:
    """Held-out losses at W₀ and at ``gamma`` (two passes over ``batches``), for the initialisation diagnostics."""
    with held_out_probe(model, targets, a, c, shapes, batches, loss_fn) as losses_at:
        w0 = losses_at(0.0)
        after = w0 if gamma == 0.0 else losses_at(gamma)
    return HeldOutLosses(gamma, w0, after)


def golden_section_log(loss: Callable[[float], float], low: float, high: float, start: float,
                       max_evaluations: int = MAX_EVALUATIONS) -> float:
    """The γ in [low, high] with the least ``loss(γ)`` found by bracketing and golden-section search in log γ.

    From ``start`` (clamped into the range), steps of ×4 (then growing by the golden ratio in log γ) go the way
    the loss falls until it rises again or a bound is reached; the bracket (left, best, right) is then narrowed,
    each probe at the vertex of the parabola in γ through the bracket where that is safely inside it, else by a
    golden section (after a parabolic probe that did not improve, always), until the bracket is narrower than half
    the scan's spacing, its ends are within a relative ``RELATIVE_FLATNESS`` of its best loss, the parabola through
    a narrow bracket (a factor ``BRACKET_FACTOR``) promises less than that next to the best point, or
    ``max_evaluations`` losses were taken. A non-finite loss counts as +inf. Each γ is evaluated once (cached):
    ``loss`` may be expensive.
    """
    if not 0 < low <= high:
        raise ValueError(f"golden_section_log needs 0 < low <= high, got {low}, {high}")
    cache: dict[float, float] = {}

    def f(t: float) -> float:
        if t not in cache:
            value = loss(_readable(t))
            cache[t] = value if math.isfinite(value) else math.inf
        return cache[t]

    lo, hi = math.log(low), math.log(high)
    best = min(max(math.log(start), lo), hi) if start > 0 else (lo + hi) / 2
    if lo == hi:
        f(best)
        return _readable(best)
    step = math.log(BRACKET_FACTOR)
    up = min(best + step, hi)
    direction = 1.0 if up > best and f(up) < f(best) else -1.0
    if direction > 0:
        behind, best = best, up
    else:
        behind = up if up > best else best
    while True:  # walk downhill; stop at a rise (a bracket) or at a bound (the minimum is there)
        step *= (1 + math.sqrt(5)) / 2
        ahead = min(max(best + direction * step, lo), hi)
        if ahead == best or len(cache) >= max_evaluations:
            return _readable(best)
        if f(ahead) >= f(best):
            break
        behind, best = best, ahead
    left, right = sorted((behind, ahead))
    parabolic_failed = improved_last = False
    while right - left > 2 * LOG_TOLERANCE and len(cache) < max_evaluations:
        floor = RELATIVE_FLATNESS * abs(f(best))
        if max(f(left), f(right)) - f(best) <= floor:
            break
        probe = None
        vertex = None if parabolic_failed else _parabola_vertex_log(left, f(left), best, f(best), right, f(right))
        if vertex is not None:
            x, predicted = vertex
            local = right - left <= math.log(BRACKET_FACTOR) and abs(x - best) <= 2 * LOG_TOLERANCE
            if improved_last and local and f(best) - predicted <= floor:
                break  # in a narrow bracket the Taylor model puts the minimum at the best point: nothing to gain
            margin = LOG_TOLERANCE / 2
            if left + margin < x < right - margin and abs(x - best) >= margin:
                probe = x
        parabolic = probe is not None
        if probe is None:
            probe = best - GOLDEN * (best - left) if best - left > right - best else best + GOLDEN * (right - best)
        improved = improved_last = f(probe) < f(best)
        parabolic_failed = parabolic and not improved  # a parabolic step that did not pay: a golden one next
        if improved:
            left, right = (left, best) if probe < best else (best, right)
            best = probe
        elif probe < best:
            left = probe
        else:
            right = probe
    return _readable(best)


def _parabola_vertex(a: float, fa: float, b: float, fb: float, c: float, fc: float) -> tuple[float, float] | None:
    """(vertex, value there) of the parabola through (a, fa), (b, fb), (c, fc), a < b < c; None unless finite and
    convex."""
    if not a < b < c or not all(math.isfinite(v) for v in (fa, fb, fc)):
        return None
    slope = (fb - fa) / (b - a)
    curvature = ((fc - fb) / (c - b) - slope) / (c - a)
    if curvature <= 0:
        return None
    x = (a + b) / 2 - slope / (2 * curvature)
    return x, fa + slope * (x - a) + curvature * (x - a) * (x - b)


def _parabola_vertex_log(a: float, fa: float, b: float, fb: float, c: float, fc: float
                         ) -> tuple[float, float] | None:
    """:func:`_parabola_vertex` of points given in log γ, fitted in γ itself: the loss is smooth in γ (ΔW₀ is linear
    in it), so a parabola in γ is its second-order Taylor model; returns (log of the vertex, value there)."""
    vertex = _parabola_vertex(math.exp(a), fa, math.exp(b), fb, math.exp(c), fc)
    if vertex is None or vertex[0] <= 0:
        return None
    return math.log(vertex[0]), vertex[1]


def _readable(log_gamma: float) -> float:
    """exp(log γ) to 6 significant digits: 0.05, not 0.05000000000000001, in the notes and the state."""
    return float(f"{math.exp(log_gamma):.6g}")


def search_gamma(model: nn.Module, targets: list[TargetLayer], a: dict[str, Tensor], c: dict[str, Tensor],
                 shapes: dict[str, tuple[int, int]], grid: list[float], batches: list,
                 loss_fn: LossFn | None, method: str = "golden", start: float = field_default("gamma")
                 ) -> tuple[float, dict, HeldOutLosses]:
    """Best γ on ``batches`` (eval mode), or 0 when no candidate beats the loss at W₀.

    ``method="scan"`` scores every γ of ``grid``; ``"golden"`` searches [min positive, max] of ``grid`` in log γ
    from ``start`` (:func:`golden_section_log`). Losses are averaged over processes, so every process takes the
    same path and chooses the same γ. Returns (γ, notes for the state, held-out losses at W₀ and at γ).
    """
    scored: dict[float, float] = {}
    per_batch: dict[float, list[float]] = {}

    with held_out_probe(model, targets, a, c, shapes, batches, loss_fn) as losses_at:
        def score(gamma: float) -> float:
            per_batch[gamma] = losses_at(gamma)
            scored[gamma] = distributed.mean_over_processes(math.fsum(per_batch[gamma]) / len(batches))
            return scored[gamma]

        baseline = score(0.0)
        del scored[0.0]
        if method == "scan":
            for gamma in grid:
                if gamma not in scored:
                    score(gamma)
        else:
            positive = [g for g in grid if g > 0]
            if positive:
                golden_section_log(score, min(positive), max(positive), start)
    finite = {g: v for g, v in scored.items() if math.isfinite(v)}
    best = min(finite, key=lambda g: finite[g]) if finite else 0.0
    chosen = best if finite and finite[best] < baseline else 0.0
    logger.info("adaptive gamma (%s, %d losses): W0 loss %.5g, best %.5g at gamma=%g -> gamma=%g", method,
                len(scored) + 1, baseline, finite.get(best, float("nan")), best, chosen)
    notes = {"method": method, "baseline_loss": baseline, "scan": {str(g): v for g, v in scored.items()},
             "chosen": chosen}
    if chosen > 0 and chosen >= max(grid):
        notes["at_largest_candidate"] = True
        if distributed.rank() == 0:
            logger.warning("adaptive gamma chose its largest candidate, gamma=%g: the held-out loss may fall further "
                           "with larger steps; pass a gamma_grid reaching higher (e.g. up to %g) to search there.",
                           chosen, 10 * chosen)
    return chosen, notes, HeldOutLosses(chosen, per_batch[0.0], per_batch[chosen])
