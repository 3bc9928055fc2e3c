"""Diagnostics of GoRA's initial step: how far ΔW₀ moves the weights, and what it does to a held-out loss.

For an adapted layer ΔW₀ = s·B A with s = α/√r and B = −(γ√in/α)·C, so ΔW₀ = −γ√(in/r)·C A (α cancels) and

    ‖ΔW₀‖²_F = γ² (in/r) · tr(Cᵀ C · A Aᵀ),

two r×r products: no out×in matrix is formed. ``relative_delta`` = √(Σ‖ΔW₀,i‖²_F) / √(Σ‖W₀,i‖²_F) over the adapted
layers. A step that changes the weights by less than ``NEGLIGIBLE_RELATIVE_DELTA``, or the held-out loss by less than
the noise of the held-out batches, makes GoRA little more than LoRA with other ranks: one warning says so and names
the remedies.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from . import distributed
from .gamma_search import HeldOutLosses
from .targets import TargetLayer

logger = logging.getLogger(__name__)

NEGLIGIBLE_RELATIVE_DELTA = 1e-4
"""Below this ‖ΔW₀‖_F/‖W₀‖_F the initial step is negligible."""


def delta_norm_squared(a: Tensor, c: Tensor, gamma: float) -> float:
    """‖ΔW₀‖²_F = γ² (in/r) · Σ (CᵀC ⊙ AAᵀ) for A (r × in) and C (out × r), in float64."""
    rank, in_features = a.shape
    a64, c64 = a.double(), c.double()
    trace = float(((c64.t() @ c64) * (a64 @ a64.t())).sum())
    return gamma ** 2 * (in_features / rank) * max(trace, 0.0)


def weight_norm_squared(target: TargetLayer) -> float:
    """‖W₀‖²_F of a target layer, accumulated in fp32 (no copy of a bf16/fp16 weight)."""
    return float(torch.linalg.vector_norm(target.weight.detach(), dtype=torch.float32).double() ** 2)


def relative_changes(a: dict[str, Tensor], c: dict[str, Tensor], weight_norms_sq: dict[str, float], gamma: float
                     ) -> tuple[float, dict[str, float]]:
    """(‖ΔW₀‖/‖W₀‖ over all layers of ``a``, per layer) at ``gamma``; ``weight_norms_sq`` = {name: ‖W₀‖²_F}."""
    deltas = {name: delta_norm_squared(a[name], c[name], gamma) for name in sorted(a)}
    per_layer = {name: math.sqrt(deltas[name] / weight_norms_sq[name]) if weight_norms_sq[name] > 0 else math.inf
                 for name in deltas}
    total_weight = math.fsum(weight_norms_sq[name] for name in deltas)
    total = math.sqrt(math.fsum(deltas.values()) / total_weight) if total_weight > 0 else 0.0
    return total, per_layer


def loss_difference(losses: HeldOutLosses) -> tuple[float, float, float | None]:
    """(mean loss at W₀, mean loss after init, standard error of the per-batch differences), over processes.

    The standard error is None with fewer than two held-out batches in all. Under torch.distributed the sums of the
    losses, of the differences and of their squares are added over processes (one all-reduce).
    """
    differences = [after - w0 for w0, after in zip(losses.w0, losses.after)]
    local = [math.fsum(losses.w0), math.fsum(losses.after), math.fsum(differences),
             math.fsum(d * d for d in differences), float(len(differences))]
    w0_sum, after_sum, d_sum, d_sq, count = distributed.sum_over_processes(local)
    standard_error = None
    if count >= 2:
        variance = max(d_sq - d_sum * d_sum / count, 0.0) / (count - 1)
        standard_error = math.sqrt(variance / count)
    return w0_sum / count, after_sum / count, standard_error


def init_stats(targets: list[TargetLayer], a: dict[str, Tensor], c: dict[str, Tensor], gamma: float,
               losses: HeldOutLosses | None) -> dict[str, Any]:
    """The state's ``init_stats``: ``relative_delta``, ``per_layer``, ``loss_w0``, ``loss_after`` (None without
    held-out batches), ``loss_se`` (standard error of the per-batch loss change, or None) and ``gamma``."""
    norms = {t.name: weight_norm_squared(t) for t in targets if t.name in a}
    total, per_layer = relative_changes(a, c, norms, gamma)
    stats: dict[str, Any] = {"relative_delta": total, "per_layer": per_layer, "loss_w0": None, "loss_after": None,
                             "loss_se": None, "gamma": float(gamma)}
    if losses is not None and losses.w0:
        stats["loss_w0"], stats["loss_after"], stats["loss_se"] = (_finite_or_none(v)
                                                                  for v in loss_difference(losses))
    return stats


def negligible_reasons(stats: dict[str, Any]) -> list[str]:
    """Why the initial step described by ``stats`` is negligible; empty when it is not."""
    reasons = []
    if stats.get("relative_delta", 0.0) < NEGLIGIBLE_RELATIVE_DELTA:
        reasons.append(f"it changes the adapted weights by {stats.get('relative_delta', 0.0):.2g} of their norm "
                       f"(below {NEGLIGIBLE_RELATIVE_DELTA:g})")
    w0, after, noise = stats.get("loss_w0"), stats.get("loss_after"), stats.get("loss_se")
    if w0 is not None and after is not None and noise is not None and w0 - after <= noise:
        reasons.append(f"it changes the held-out loss by {after - w0:+.3g} ({w0:.5g} -> {after:.5g}), not below the "
                       f"noise of the held-out batches (standard error {noise:.2g})")
    return reasons


def warn_if_negligible(stats: dict[str, Any], config: Any) -> bool:
    """Log one warning (first process only) when the initial step is negligible; True if it was."""
    reasons = negligible_reasons(stats)
    if not reasons:
        return False
    remedies = []
    if getattr(config, "head_warmup_steps", 0) == 0:
        remedies.append("GoraConfig(head_warmup_steps=50) for a freshly initialised head (sequence classification)")
    if not getattr(config, "adaptive_gamma", False):
        remedies.append("GoraConfig(adaptive_gamma=True) to choose gamma on held-out batches")
        remedies.append(f"a larger gamma than {stats.get('gamma', 0.0):g} (apply_gora(..., gamma=...) needs no "
                        "re-estimation)")
    else:
        remedies.append("more held-out batches (eval_batches=...) to tell the loss change from noise, or a larger "
                        "gamma_grid if adaptive gamma chose its largest candidate")
    if distributed.rank() == 0:
        logger.warning("GoRA's initial step is negligible: %s, so GoRA starts almost like LoRA with other ranks. "
                       "Remedies: %s.", "; and ".join(reasons), "; ".join(remedies))
    return True


def _finite_or_none(value: float | None) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def describe(stats: dict[str, Any]) -> str:
    """One line for ``GoraState.summary`` and ``gora inspect``; empty for a state saved without diagnostics."""
    if not stats or stats.get("relative_delta") is None:
        return ""
    line = f"initial step: ||dW0||/||W0|| = {stats['relative_delta']:.3g} at gamma={stats.get('gamma', 0.0):g}"
    w0, after = stats.get("loss_w0"), stats.get("loss_after")
    if w0 is not None and after is not None:
        noise = stats.get("loss_se")
        line += f"; held-out loss {w0:.5g} -> {after:.5g} ({after - w0:+.3g}"
        line += f" +/- {noise:.2g})" if noise is not None else ")"
    per_layer = stats.get("per_layer") or {}
    if per_layer:
        values = sorted(per_layer.values())
        line += f"; per layer {values[0]:.3g}..{values[-1]:.3g}"
    return line
