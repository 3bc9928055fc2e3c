"""The estimation loop: N forward/backward passes at frozen W₀, no optimizer step.

One module, not three: the fp16 loss scaling, the deferred NaN/Inf checks and adaptive N are parts of one step
schedule (they share the loss scale, the step count and the accumulator's flags), and none is used apart from it.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Iterator, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .accumulate import GradientAccumulator, LayerSums
from .batches import too_few_batches
from .checkpointing import GradientCheckpointing
from .config import GoraConfig
from .devices import model_device, move_to_device
from .errors import GoraNumericalError
from .importance import layer_importances, score_consuming_, sketch_norm
from .losses import LossFn, compute_loss
from .progress import progress
from .sketch import SketchOperators
from .targets import TargetLayer, unwrap_model

logger = logging.getLogger(__name__)


@dataclass
class EstimationRun:
    sums: dict[str, LayerSums]
    steps: int
    samples: int
    seconds: float
    peak_memory_bytes: int
    notes: dict[str, Any] = field(default_factory=dict)


def batch_size(batch: Any) -> int:
    """Leading dimension of the batch's first tensor (``input_ids`` first if present); 1 if none."""
    if isinstance(batch, Mapping):
        values = ([batch["input_ids"]] if "input_ids" in batch else []) + list(batch.values())
    elif isinstance(batch, (list, tuple)):
        values = list(batch)
    else:
        values = [batch]
    for value in values:
        if isinstance(value, Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return 1


def _loss_error(step: int, value: float) -> GoraNumericalError:
    """``step``: the 0-based index of the batch; messages count steps from 1 (the first batch is step 1)."""
    return GoraNumericalError(
        f"the loss at estimation step {step + 1} is {value}; check that batch (labels, masks) and the "
        "model's dtype (fp16 overflows easily: try bf16 or fp32)."
    )


DEFERRED_CHECK_STEPS = 8
"""On an accelerator, the NaN/Inf flags of bf16/fp32 steps are read every this many steps (and before the sums are
read): one host sync per 8 steps instead of one per step, and a failure still stops estimation within 8 steps."""


def _check_every(device: torch.device) -> int:
    """Steps between reads of the deferred NaN/Inf flags: every step on the CPU, where a read costs no sync."""
    return 1 if device.type == "cpu" else DEFERRED_CHECK_STEPS


def _gradient_error(layers: list[str], step: int) -> GoraNumericalError:
    return GoraNumericalError(
        f"the gradient of {layers[:3]} at estimation step {step + 1} contains NaN or Inf; "
        "check the batch and the model's dtype, or run estimation in fp32."
    )


def _raise_first_failure(accumulator: GradientAccumulator, pending: GoraNumericalError | None = None) -> None:
    """Raise for the first deferred step whose loss or gradients had a NaN/Inf (one device sync), or ``pending``
    (the error of an fp16 step, found at once).

    Under torch.distributed the decision is joint, like running out of batches: one tiny all-reduce of a failure
    flag per process, then every process raises together, a failing one its own error and the others one naming
    it. A process that raised alone would leave the others waiting in the next collective until its timeout.
    """
    error = pending
    if error is None:
        failure = accumulator.first_failure()
        if failure is not None:
            step, layers, (loss_ok,), loss = failure
            error = _loss_error(step, float(loss.float())) if not loss_ok else _gradient_error(layers, step)
    if not distributed.is_distributed():
        if error is not None:
            raise error
        return
    failed = distributed.processes_where(error is not None)
    if error is not None:
        raise error
    if failed:
        ranks = ("rank " if len(failed) == 1 else "ranks ") + ", ".join(map(str, failed))
        raise GoraNumericalError(
            f"estimation stopped on all {distributed.world_size()} processes because {ranks} found a NaN or Inf "
            f"loss or gradient; see the GoraNumericalError raised on {ranks} for the step and the layers."
        )


def _one_step(model, accumulator: GradientAccumulator, batch, loss_fn, step: int, scale: float, fp16: bool) -> float:
    """Forward and backward of one batch; fp16: halve the loss scale and redo the missing layers on overflow.

    The loss and every layer's gradient are checked for NaN/Inf after backward (a sync between forward and
    backward would stall the device queue). In fp16 the check reads the flags at once, to redo an overflowed
    step; otherwise it is deferred to :func:`_raise_first_failure` (no per-step sync), which runs before any sum
    is read. A non-finite loss is reported as such, before any gradient of its step.
    """
    if not fp16:
        accumulator.begin_step(scale)
        loss = compute_loss(model, batch, loss_fn)
        loss.backward()
        loss = loss.detach()
        accumulator.defer_step(step, [torch.isfinite(loss).reshape(())], payload=loss)
        return scale
    redo = False
    while True:
        accumulator.begin_step(scale, redo=redo)
        loss = compute_loss(model, batch, loss_fn)
        loss_finite = torch.isfinite(loss.detach()).reshape(())
        (loss.float() * scale if scale != 1.0 else loss).backward()
        bad, (loss_ok,) = accumulator.end_step([loss_finite])
        if not loss_ok:
            raise _loss_error(step, float(loss.detach().float()))
        if not bad:
            return scale
        if scale / 2 < 1.0:
            raise GoraNumericalError(
                f"fp16 gradients of {bad[:3]} overflow at estimation step {step + 1} even without loss scaling; "
                "estimate on a bf16 or fp32 copy of the model, save the GoraState, and apply it to the fp16 model."
            )
        logger.info("fp16 overflow in %s at step %d: loss scale %g -> %g, redoing the step", bad[:3], step + 1,
                    scale, scale / 2)
        scale, redo = scale / 2, True


def layer_score(target: TargetLayer, layer: LayerSums, importance: str, g_bar: Tensor | None
                ) -> tuple[str, Tensor, int | None]:
    """(name, 0-dim score, k) for ``layer_importances``: from the mean gradient ``g_bar``, which the score may
    overwrite (pass one not needed any more), or, where there is none, from the layer's sketch."""
    if g_bar is not None:
        weight = target.weight_out_in().detach().to(g_bar.device)
        return target.name, score_consuming_(importance, weight, g_bar), None
    assert layer.frob is not None, f"{target.name}: neither a mean gradient nor a sketch"
    return target.name, sketch_norm(layer.frob / layer.count), layer.frob.shape[1]


def _running_importance(targets: list[TargetLayer], sums: dict[str, LayerSums], config: GoraConfig) -> dict[str, float]:
    """Every layer's importance so far; the scores are read with one device sync, not one per layer."""
    scores = []
    for target in targets:
        layer = sums[target.name]
        if layer.count == 0 or (layer.grad is None and layer.frob is None):
            continue
        g_bar = None if layer.grad is None else layer.grad / layer.count  # a fresh Ḡ: the score may overwrite it
        scores.append(layer_score(target, layer, config.importance, g_bar))
    return layer_importances(scores)


def _converged(previous: dict[str, float], current: dict[str, float], threshold: float) -> bool:
    if not previous or set(previous) != set(current):
        return False
    return all(abs(current[n] - previous[n]) <= threshold * abs(previous[n]) for n in current)


def run_estimation(
    model: nn.Module,
    targets: list[TargetLayer],
    batch_iterator: Iterator,
    config: GoraConfig,
    loss_fn: LossFn | None,
    sketch: dict[str, SketchOperators] | None,
    acc_device: torch.device,
) -> EstimationRun:
    """Accumulate gradients over the first ``config.num_steps`` batches (fewer with adaptive steps)."""
    device = model_device(model)
    fp16 = any(t.weight.dtype == torch.float16 for t in targets)
    scale = config.fp16_loss_scale if fp16 else 1.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, steps, samples = time.perf_counter(), 0, 0
    # fp16 reads its flags every step anyway; under torch.distributed its errors are then decided jointly each step
    check_every = 1 if fp16 else _check_every(device)
    notes: dict[str, Any] = {"accumulation_device": acc_device.type}
    previous: dict[str, float] = {}
    bar = progress(total=config.num_steps, desc="GoRA gradient estimation", unit="step",
                   enabled=config.show_progress and distributed.rank() == 0)
    checkpointing = GradientCheckpointing(unwrap_model(model)) if config.gradient_checkpointing else nullcontext()
    with GradientAccumulator(model, targets, acc_device, sketch, config.train_mode) as accumulator, \
            checkpointing, torch.enable_grad(), bar:
        accumulator.check_each_hook = fp16
        for step in range(config.num_steps):
            batch = next(batch_iterator, _END)
            # under DDP, running out of batches is decided together: a rank that left the loop alone
            # would leave the others waiting in the next collective
            if distributed.any_process(batch is _END):
                break
            batch = move_to_device(batch, device)
            try:
                scale = _one_step(model, accumulator, batch, loss_fn, step, scale, fp16)
            except GoraNumericalError as error:  # fp16 finds it at once; the other processes at their next check
                _raise_first_failure(accumulator, pending=error)  # raises, on every process together
                raise
            steps, samples = steps + 1, samples + batch_size(batch)
            bar.update(1)
            reading = config.adaptive_steps and steps >= config.min_steps - 1  # the sums are about to be read
            if steps % check_every == 0 or reading:
                _raise_first_failure(accumulator)
            if reading:
                accumulator.synchronize()  # offloaded sums complete before they are read
                current = _running_importance(targets, accumulator.sums, config)
                done = steps >= config.min_steps and _converged(previous, current, config.convergence_threshold)
                previous = current
                if not distributed.any_process(not done):
                    notes["adaptive_steps_stopped_at"] = steps
                    logger.info("adaptive steps: importance converged after %d steps (%d samples)", steps, samples)
                    break
        _raise_first_failure(accumulator)
    ran_out = steps < config.num_steps and "adaptive_steps_stopped_at" not in notes
    where = " (on the process with the fewest batches)" if distributed.is_distributed() else ""
    if ran_out and config.adaptive_steps and steps >= config.least_steps:
        # num_steps is only the cap of adaptive steps: the batches running out after min_steps is a normal stop
        notes["adaptive_steps_ran_out_at"] = steps
        logger.warning("adaptive steps: the batches ran out after %d steps%s, before importance converged "
                       "(num_steps=%d is the cap); the estimate uses those %d steps", steps, where,
                       config.num_steps, steps)
    elif ran_out:
        raise too_few_batches(steps, config, f"gave {steps} items{where}", " per process")
    if fp16:
        notes["fp16_final_loss_scale"] = scale
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return EstimationRun(accumulator.sums, steps, samples, time.perf_counter() - start, int(peak), notes)


_END = object()

