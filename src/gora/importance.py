"""Layer importance scores (pure tensor functions), normalised across layers.

All take the weight W and the mean gradient Ḡ as (out, in) tensors and compute in fp32. The ``*_score``
functions return 0-dim tensors on the gradient's device (no host sync); ``layer_importances`` reads the
scores of all layers with one device→host transfer. The ``importance_*`` functions return floats.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

from .errors import GoraNumericalError


def _mean_abs(product: Tensor) -> Tensor:
    """mean |product|, the absolute value taken in place (CPU ``vector_norm(ord=1)`` is several times slower)."""
    return product.abs_().mean()


PRODUCT_REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {"mean_abs": _mean_abs,
                                                              "frobenius": torch.linalg.vector_norm}
"""Scores that depend on W ⊙ Ḡ alone: the reduction applied to that product."""


def mean_abs_score(weight: Tensor, grad: Tensor) -> Tensor:
    """I = mean |W ⊙ Ḡ| (size-normalised first-order sensitivity; the paper's score)."""
    return _mean_abs(weight.float() * grad.float())


def frobenius_score(weight: Tensor, grad: Tensor) -> Tensor:
    """I = ||W ⊙ Ḡ||_F (the official parser's default)."""
    return torch.linalg.vector_norm(weight.float() * grad.float())


def grad_nuclear_score(weight: Tensor, grad: Tensor) -> Tensor:
    """I = ||Ḡ||_* (sum of singular values of the mean gradient)."""
    return torch.linalg.matrix_norm(grad.float(), ord="nuc")


def score_consuming_(importance: str, weight: Tensor, grad: Tensor) -> Tensor:
    """``SCORE_FNS[importance](weight, grad)``, the same value, computed in ``grad``'s own memory when ``grad`` is fp32
    and the score needs only W ⊙ Ḡ: ``grad`` then holds the product (or its absolute value) afterwards, and no
    out × in temporary is made. Pass a Ḡ that is not needed any more.
    """
    reduce = PRODUCT_REDUCTIONS.get(importance)
    if reduce is None or grad.dtype != torch.float32:
        return SCORE_FNS[importance](weight, grad)
    return reduce(grad.mul_(weight))


SCORE_FNS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mean_abs": mean_abs_score,
    "frobenius": frobenius_score,
    "grad_nuclear": grad_nuclear_score,
}


def importance_mean_abs(weight: Tensor, grad: Tensor) -> float:
    """``mean_abs_score`` as a float (one host sync)."""
    return mean_abs_score(weight, grad).item()


def importance_frobenius(weight: Tensor, grad: Tensor) -> float:
    """``frobenius_score`` as a float (one host sync)."""
    return frobenius_score(weight, grad).item()


def importance_grad_nuclear(weight: Tensor, grad: Tensor) -> float:
    """``grad_nuclear_score`` as a float (one host sync)."""
    return grad_nuclear_score(weight, grad).item()


IMPORTANCE_FNS: dict[str, Callable[[Tensor, Tensor], float]] = {
    "mean_abs": importance_mean_abs,
    "frobenius": importance_frobenius,
    "grad_nuclear": importance_grad_nuclear,
}


def sketch_norm(sketch: Tensor) -> Tensor:
    """||Y||_F in float64, a 0-dim tensor on Y's device; ``frobenius_from_norm`` finishes the estimate."""
    return torch.linalg.vector_norm(sketch.double())


def frobenius_from_norm(norm: float, k: int) -> float:
    """Estimate ||M||_F from ||Y||_F, Y = M Ω with Ω (in × k) standard Gaussian: E||Y||²_F / k = ||M||²_F."""
    return math.sqrt(norm ** 2 / k)


def frobenius_from_sketch(sketch: Tensor) -> float:
    """Estimate ||M||_F from the sketch Y = M Ω (see ``frobenius_from_norm``)."""
    return frobenius_from_norm(sketch_norm(sketch).item(), sketch.shape[1])


def layer_importances(scores: Sequence[tuple[str, Tensor, int | None]]) -> dict[str, float]:
    """{name: importance} from (name, 0-dim score, k) per layer, with one device→host transfer for all of them.

    ``k`` is ``None`` for a ``*_score`` value and the sketch's column count for a ``sketch_norm``. The scores
    are stacked in float64, which holds every fp32 and fp64 value exactly: each float equals ``score.item()``.
    """
    if not scores:
        return {}
    device = scores[0][1].device
    values = torch.stack([score.to(device, torch.float64) for _, score, _ in scores]).tolist()
    return {name: value if k is None else frobenius_from_norm(value, k)
            for (name, _, k), value in zip(scores, values)}


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
