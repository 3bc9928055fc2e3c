"""How many batches estimation reads: ``num_steps`` for the gradients, then adaptive γ's ``gamma_batches`` held out
after them; the errors for too few."""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypeVar

from .config import GoraConfig
from .errors import GoraDataError

T = TypeVar("T")


def batches_needed(config: GoraConfig, held_out: bool | None = None) -> int:
    """Batches to build for ``config``: ``num_steps``, plus ``gamma_batches`` when held-out batches are wanted
    (``held_out``; ``None`` means when ``config.adaptive_gamma`` is on)."""
    wanted = config.adaptive_gamma if held_out is None else held_out
    return config.num_steps + (config.gamma_batches if wanted else 0)


def split_estimation_batches(batches: Sequence[T], config: GoraConfig) -> tuple[list[T], list[T]]:
    """(estimation, held_out): the first ``num_steps`` batches, then the ``gamma_batches`` after them (fewer, or
    none, where ``batches`` ends sooner)."""
    estimation = list(batches[: config.num_steps])
    return estimation, list(batches[config.num_steps : config.num_steps + config.gamma_batches])


def take_held_out(iterator: Iterator[Any], config: GoraConfig) -> list[Any]:
    """The held-out batches from an iterator the estimation loop has walked: its next ``gamma_batches`` items."""
    return list(itertools.islice(iterator, config.gamma_batches))


def held_out_batches(eval_batches: Iterable | None, iterator: Iterator[Any], config: GoraConfig, steps: int
                     ) -> list[Any]:
    """The held-out batches after ``steps`` estimation steps: ``eval_batches`` where given, else, for adaptive γ,
    the next ``gamma_batches`` of ``iterator`` (none there: refused); else none."""
    held_out = list(eval_batches) if eval_batches is not None else []
    if config.adaptive_gamma and eval_batches is None:
        held_out = take_held_out(iterator, config)
    if config.adaptive_gamma and not held_out:
        raise no_held_out(steps, config)
    return held_out


def check_length(batches: Iterable, config: GoraConfig, held_out: bool = False) -> None:
    """Refuse a sized iterable that is too short before any work is done (``held_out``: adaptive γ takes its
    ``gamma_batches`` from the same iterable, after the estimation batches)."""
    try:
        length = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return
    if held_out and not config.adaptive_steps and length <= config.num_steps:
        raise no_held_out(config.num_steps, config, f"the batches hold {length} items, but ")
    if length < config.least_steps:
        raise too_few_batches(length, config, f"hold {length} items")


def too_few_batches(count: int, config: GoraConfig, gave: str, per: str = "") -> GoraDataError:
    """The error for ``count`` batches when ``config`` needs :attr:`GoraConfig.least_steps` (up front, or after the
    loop: ``gave`` says which, e.g. "hold 3 items")."""
    if count == 0:
        return GoraDataError("the batches are empty: estimate_gora needs at least one batch (num_steps of them).")
    if config.adaptive_steps:  # num_steps is only the cap of adaptive steps
        return GoraDataError(f"the batches {gave} but adaptive steps need at least min_steps={config.min_steps} "
                             f"(num_steps={config.num_steps} is the cap); pass at least {config.least_steps} "
                             f"batches{per}, or set GoraConfig(min_steps={count}).")
    return GoraDataError(f"the batches {gave} but num_steps={config.num_steps}; pass at least {config.num_steps} "
                         f"batches{per}, or set GoraConfig(num_steps={count}).")


def no_held_out(steps: int, config: GoraConfig, prefix: str = "") -> GoraDataError:
    """Adaptive γ found no held-out batches after the ``steps`` estimation batches (up front, or after the loop)."""
    return GoraDataError(f"{prefix}adaptive_gamma needs held-out batches after the {steps} estimation batches; pass "
                         f"eval_batches=..., or {config.gamma_batches} more batches (gamma_batches).")
