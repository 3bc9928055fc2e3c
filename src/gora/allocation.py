"""Rank allocation under LoRA's own parameter budget (pure integer arithmetic)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from .errors import GoraConfigError
from .importance import normalise


@dataclass(frozen=True)
class Allocation:
    ranks: dict[str, int]
    """Rank per layer (0: left un-adapted)."""
    budget: int
    """LoRA's parameter count at the reference rank: r · Σ (in_i + out_i)."""
    actual_params: int
    """Parameters GoRA's ranks cost: Σ r_i · (in_i + out_i)."""


def feature_cost(shape: tuple[int, int], features: str) -> float:
    """Cost of one rank unit of an (out, in) layer: in+out (identity) or √(in+out) (sqrt)."""
    out_features, in_features = shape
    size = in_features + out_features
    if features == "identity":
        return size
    if features == "sqrt":
        return math.sqrt(size)
    raise GoraConfigError(f"features={features!r} is not known; choose 'identity' or 'sqrt'.")


def allocate_ranks(
    importance: Mapping[str, float],
    shapes: Mapping[str, tuple[int, int]],
    reference_rank: int,
    min_rank: int,
    max_rank: int,
    features: str = "identity",
) -> Allocation:
    """The spec's rule, exactly:

        T   = r · Σ_i f_i
        r_i = clip(floor(round(T · p_i) / f_i), min_rank, max_rank)
        r_i = min(r_i, min(in_i, out_i))

    with p_i = I_i / Σ_j I_j and f_i = in_i + out_i (or its square root). Leftover budget is not
    redistributed.
    """
    if not 0 <= min_rank <= max_rank or max_rank < 1:
        raise GoraConfigError(f"need 0 <= min_rank <= max_rank and max_rank >= 1, got [{min_rank}, {max_rank}].")
    missing = sorted(set(importance) - set(shapes))
    if missing:
        raise GoraConfigError(f"no shape given for layers {missing[:5]}.")
    shares = normalise(importance)
    costs = {name: feature_cost(shapes[name], features) for name in shares}
    total = reference_rank * math.fsum(costs[name] for name in shares)
    ranks = {}
    for name, share in shares.items():
        rounded_share = round(total * share)  # Python round of the float64 product: an integer share
        rank = int(rounded_share // costs[name])
        rank = min(max(rank, min_rank), max_rank)
        ranks[name] = min(rank, min(shapes[name]))
    return Allocation(ranks=ranks, budget=lora_parameter_count(shapes, shares, reference_rank),
                      actual_params=lora_parameter_count(shapes, ranks))


def lora_parameter_count(shapes: Mapping[str, tuple[int, int]], names, rank: int | None = None) -> int:
    """Σ r_i (in_i + out_i) over ``names``; ``names`` a {name: rank} mapping, or any names with one ``rank``."""
    if rank is None:
        return sum(int(names[n]) * sum(shapes[n]) for n in names)
    return sum(rank * sum(shapes[n]) for n in names)
