"""The held-out-batch rule: adaptive γ scores on the ``gamma_batches`` batches after the estimation batches."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

from .config import GoraConfig

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
