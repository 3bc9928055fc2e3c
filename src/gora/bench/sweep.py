"""Rank sweep: LoRA, GoRA and full fine-tuning at reference ranks r = 2, 8, 32, 64 (``lora_alpha = 2r``).

A thin preset over :func:`gora.bench.grid.run_grid`; its results belong in their own folder (e.g.
``benchmarks/results/cpu/rank-sweep/``) so that grid averages are never mixed with sweep settings.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from gora.bench.grid import run_grid
from gora.bench.records import Record

SWEEP_METHODS = ("lora", "gora", "full")
SWEEP_RANKS = (2, 8, 32, 64)


def run_rank_sweep(
    task: str = "rotten_tomatoes",
    seeds: Sequence[int] = (0,),
    *,
    out_dir: str | os.PathLike,
    methods: Sequence[str] = SWEEP_METHODS,
    ranks: Sequence[int] = SWEEP_RANKS,
    **grid_options: Any,
) -> list[Record]:
    """Run the sweep on one task; ``grid_options`` go to :func:`run_grid` (train/method/data configs, lr_grid)."""
    return run_grid(methods, [task], seeds, out_dir=out_dir, ranks=ranks, **grid_options)
