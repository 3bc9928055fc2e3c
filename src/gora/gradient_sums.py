"""GoRA's gradient sums over N steps of every process, with A_max drawn on CPU threads beside the loop.

The estimation loop (:func:`~gora.estimation.run_estimation`) fills each layer's fp32 sums on this process. Around
it: A_max (and the sketch's Ω) are drawn on CPU threads, seeded per layer, the sketch's before the loop (its sums
need them from the first step), the full estimator's while the loop runs on an accelerator; after it, one SUM
all-reduce per accumulator joins the processes under torch.distributed.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch
from torch import Tensor, nn

from . import distributed
from .config import GoraConfig
from .devices import model_device
from .estimation import EstimationRun, run_estimation
from .initialization import draw_a, draw_omega, draw_pool
from .losses import LossFn
from .sketch import SketchOperators
from .targets import TargetLayer, unwrap_model


def accumulate_gradients(model: nn.Module, targets: list[TargetLayer], iterator: Iterator, config: GoraConfig,
                         loss_fn: LossFn | None, acc_device: torch.device, max_rank: int
                         ) -> tuple[EstimationRun, dict[str, Tensor]]:
    """(the loop's run, with its sums summed over processes; A_max per layer, ``min(max_rank, in, out)`` × in)."""
    with draw_pool(len(targets)) as pool:
        a_draws = {t.name: pool.submit(draw_a, config.seed, t.name, min(max_rank, t.in_features, t.out_features),
                                       t.in_features) for t in targets}
        sketch = _sketch_operators(pool, targets, a_draws, config, acc_device) if config.estimator == "sketch" else None
        if model_device(unwrap_model(model)).type == "cpu":
            wait(a_draws.values())  # the loop needs every core
        # on an accelerator the full estimator's A_max is drawn on the CPU while the loop runs (needed only after it)
        run = run_estimation(model, targets, iterator, config, loss_fn, sketch, acc_device)
        a_max = {name: draw.result() for name, draw in a_draws.items()}
    _reduce_over_processes(targets, run, a_max, config, acc_device)
    return run, a_max


def _sketch_operators(pool: ThreadPoolExecutor, targets: list[TargetLayer], a_draws: dict[str, Future],
                      config: GoraConfig, device: torch.device) -> dict[str, SketchOperators]:
    """A_maxᵀ and Ω of every layer on the sums' device (the sketch needs them from the first step)."""
    omega = {t.name: pool.submit(draw_omega, config.seed, t.name, t.in_features, config.sketch_dim) for t in targets}
    return {t.name: SketchOperators(a_draws[t.name].result().t().contiguous().to(device),
                                    omega[t.name].result().to(device)) for t in targets}


def _reduce_over_processes(targets: list[TargetLayer], run: EstimationRun, a_max: dict[str, Tensor],
                           config: GoraConfig, device: torch.device) -> None:
    """One SUM all-reduce per accumulator after the loop (no-op in one process)."""
    if not distributed.is_distributed():
        return
    counts = distributed.all_reduce_counts([run.sums[t.name].count for t in targets])
    for target, count in zip(targets, counts):
        sums = run.sums[target.name]
        if config.estimator == "full":
            widths = {"grad": target.in_features}
        else:
            widths = {"proj": a_max[target.name].shape[0], "frob": config.sketch_dim}
        for field, width in widths.items():  # a process that saw no gradient still joins with zeros
            if getattr(sums, field) is None:
                setattr(sums, field, torch.zeros(target.out_features, width, dtype=torch.float32, device=device))
            distributed.all_reduce_sum_(getattr(sums, field))
        sums.count = count
    run.steps, run.samples = distributed.all_reduce_counts([run.steps, run.samples])
