"""Layer importance scores (pure tensor functions) and their normalisation.

All take the weight W and the mean gradient Ḡ as (out, in) tensors and compute in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .errors import GoraNumericalError


def importance_mean_abs(weight: Tensor, grad: Tensor) -> float:
    """I = mean |W ⊙ Ḡ| (size-normalised first-order sensitivity; the paper's score)."""
    return (weight.float() * grad.float()).abs().mean().item()


def importance_frobenius(weight: Tensor, grad: Tensor) -> float:
    """I = ||W ⊙ Ḡ||_F (the official parser's default)."""
    return torch.linalg.vector_norm(weight.float() * grad.float()).item()


def importance_grad_nuclear(weight: Tensor, grad: Tensor) -> float:
    """I = ||Ḡ||_* (sum of singular values of the mean gradient)."""
    return torch.linalg.matrix_norm(grad.float(), ord="nuc").item()


IMPORTANCE_FNS: dict[str, Callable[[Tensor, Tensor], float]] = {
    "mean_abs": importance_mean_abs,
    "frobenius": importance_frobenius,
    "grad_nuclear": importance_grad_nuclear,
}


def frobenius_from_sketch(sketch: Tensor) -> float:
    """Estimate ||M||_F from Y = M Ω with Ω (in × k) standard Gaussian: E||Y||²_F / k = ||M||²_F."""
    k = sketch.shape[1]
    return math.sqrt(torch.linalg.vector_norm(sketch.double()).item() ** 2 / k)


def normalise(importance: Mapping[str, float]) -> dict[str, float]:
    """p_i = I_i / Σ_j I_j, summed in float64 in sorted-name order (independent of dict order).

    Raises:
        GoraNumericalError: a score is NaN/Inf/negative, or all scores are zero.
    """
    names = sorted(importance)
    bad = [n for n in names if not math.isfinite(importance[n]) or importance[n] < 0]
    if bad:
        raise GoraNumericalError(
            f"importance of {bad[:5]} is not a finite non-negative number ({[importance[n] for n in bad[:5]]}); "
            "the gradients are damaged: check the loss and the model's dtype (fp16 overflow), or use fp32."
        )
    try:
        total = math.fsum(float(importance[n]) for n in names)
    except OverflowError:
        total = math.inf
    if not math.isfinite(total):
        raise GoraNumericalError(
            f"the importance scores sum beyond float64 (largest {max(importance.values()):.3g}); "
            "they cannot come from finite gradients: check the loss and the gradients, or rescale the scores."
        )
    if total <= 0.0:
        raise GoraNumericalError(
            "every layer's importance is zero (no gradient reached the targets); "
            "check that the loss depends on the target layers and that the batches carry labels."
        )
    return {n: float(importance[n]) / total for n in names}
