"""``estimate_gora`` and ``get_gora_model``: GoRA's algorithm, step by step (the maths, the plumbing live elsewhere)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from peft import LoraConfig, PeftModel
from torch import Tensor, nn

from . import distributed
from .accumulate import LayerSums
from .allocation import allocate_ranks
from .batches import check_length, held_out_batches
from .config import GoraConfig, check_gora_config, check_lora_config
from .devices import accumulation_device, model_device, to_host
from .diagnostics import init_stats, warn_if_negligible
from .errors import GoraDataError, GoraTypeError
from .estimation import layer_score
from .gamma_search import held_out_losses, search_gamma
from .gradient_sums import accumulate_gradients
from .head_warmup import head_warmup, warmup_batches
from .importance import layer_importances
from .initialization import solve_c
from .losses import LossFn
from .peft_bridge import apply_gora, check_not_wrapped
from .plotting import rank_spread
from .state import GoraState
from .targets import TargetLayer, resolve_targets, unwrap_model
from .versions import package_versions

logger = logging.getLogger(__name__)


def estimate_gora(
    model: nn.Module,
    lora_config: LoraConfig,
    batches: Iterable,
    gora_config: GoraConfig | None = None,
    loss_fn: LossFn | None = None,
    *,
    eval_batches: Iterable | None = None,
) -> GoraState:
    """Estimate GoRA's ranks and initialisation from the first ``gora_config.num_steps`` batches.

    Args:
        model: a transformers (or any torch) model; its weights are never written. A model wrapped in
            ``DistributedDataParallel`` (as after ``accelerator.prepare``) is estimated through the module inside
            it, ``model.module``: GoRA all-reduces its sums once after the loop, so DDP's per-step gradient
            reducer is bypassed. FSDP/ZeRO-3: estimate before sharding (or once, then ``GoraState.load``).
        lora_config: LoRA's settings: reference rank ``r``, ``lora_alpha``, ``target_modules``.
        batches: any iterable of batches (dicts for ``model(**batch)``); under torch.distributed each
            process passes its own shard and ``num_steps`` counts steps per process.
        gora_config: GoRA's settings; ``None`` means ``GoraConfig()``. With ``adaptive_steps``, ``num_steps`` is
            only the cap: batches that run out after ``min_steps`` end estimation there (noted in the state).
        loss_fn: ``loss_fn(model, batch) -> scalar``; default ``model(**batch).loss``. It receives the module
            inside a ``DistributedDataParallel`` wrapper, not the wrapper; batches keep their container types
            (dict, ``BatchEncoding``, namedtuple, ...) with their tensors on the model's device.
        eval_batches: held-out batches for adaptive γ (default: the ``gamma_batches`` after the estimation
            batches) and for ``state.init_stats``' held-out losses at W₀ and after initialisation (without
            adaptive γ: two passes over them; none given, those losses are None).

    Returns:
        A ``GoraState`` (ranks, importances, A and C per layer). Afterwards the model is exactly as
        before: weights bit-identical, ``requires_grad`` flags, train/eval modes and ``.grad`` restored.
    """
    config = check_gora_config(gora_config)
    check_lora_config(lora_config)
    _check_inputs(batches, loss_fn, config, eval_batches)
    min_rank, max_rank = config.rank_bounds(lora_config.r)
    model = distributed.local_module(model)  # never through DDP's reducer: the sums are all-reduced after the loop
    base = unwrap_model(model)
    targets, skipped = resolve_targets(base, lora_config)
    acc_device = _sums_device(targets, base, config)
    iterator, warm_batches = warmup_batches(base, lora_config, batches, config)
    with head_warmup(model, lora_config, warm_batches, config, loss_fn) as head:
        run, a_max = accumulate_gradients(model, targets, iterator, config, loss_fn, acc_device, max_rank)
        importance, projected = _score_and_project(targets, run.sums, a_max, config)
        skipped.update({t.name: "no gradient" for t in targets if t.name not in importance})
        shapes = {t.name: t.shape for t in targets}
        allocation = allocate_ranks(importance, {n: shapes[n] for n in importance}, lora_config.r, min_rank,
                                    max_rank, config.features)
        # rank 0 decides for all: processes whose sums differ by rounding still save one identical state
        ranks, importance, actual_params = distributed.broadcast_object(
            (allocation.ranks, importance, allocation.actual_params))
        a, c = _initial_factors(ranks, a_max, projected)
        state = GoraState(
            ranks={**{n: 0 for n in skipped if n in shapes}, **ranks}, importance=importance, shapes=shapes,
            A=a, C=c, skipped=skipped, reference_rank=lora_config.r, lora_alpha=float(lora_config.lora_alpha),
            gamma=config.gamma, seed=config.seed, config=config.to_dict(), num_steps=run.steps,
            num_samples=run.samples, budget=allocation.budget, actual_params=actual_params,
            estimation_seconds=run.seconds, peak_memory_bytes=run.peak_memory_bytes,
            versions=package_versions(), model_class=type(base).__name__, notes=run.notes,
        )
        held_out, losses = held_out_batches(eval_batches, iterator, config, run.steps), None
        if config.adaptive_gamma:
            state.gamma, state.notes["adaptive_gamma"], losses = search_gamma(
                model, targets, a, c, shapes, config.resolved_gamma_grid(), held_out, loss_fn,
                method=config.gamma_search, start=config.gamma)
        elif held_out:  # held-out batches given without adaptive gamma: the loss change of the initial step alone
            losses = held_out_losses(model, targets, a, c, shapes, state.gamma, held_out, loss_fn)
        state.init_stats = init_stats(targets, a, c, state.gamma, losses)
        warn_if_negligible(state.init_stats, config)
        if head is not None:
            state.head, state.notes["head_warmup"] = head["tensors"], head["notes"]
    logger.info("GoRA: %s, %d steps in %.1fs", rank_spread(state.ranks.values()), state.num_steps,
                state.estimation_seconds)
    return state


def get_gora_model(
    model: nn.Module,
    lora_config: LoraConfig,
    batches: Iterable,
    gora_config: GoraConfig | None = None,
    loss_fn: LossFn | None = None,
) -> PeftModel:
    """``estimate_gora`` then ``apply_gora``: a plain ``peft.PeftModel`` ready for any training loop.

    Wrap the result for distributed training afterwards (DDP, ``accelerator.prepare``): a wrapped ``model`` is
    refused before any estimation work, since ``apply_gora`` changes which parameters train.
    """
    check_not_wrapped(model)
    state = estimate_gora(model, lora_config, batches, gora_config=gora_config, loss_fn=loss_fn)
    return apply_gora(model, lora_config, state)


# -- steps of estimate_gora ------------------------------------------------------------------------
def _check_inputs(batches: Iterable, loss_fn: LossFn | None, config: GoraConfig, eval_batches: Iterable | None
                  ) -> None:
    """Refuse what is not an iterable of batches, a ``loss_fn`` that is no function, too few batches."""
    if isinstance(batches, (str, bytes)) or not isinstance(batches, Iterable):
        raise GoraDataError(f"batches must be an iterable of batches (a DataLoader, list, generator), "
                            f"got {type(batches).__name__}.")
    if isinstance(batches, Mapping):
        raise GoraDataError("batches is a single batch (a dict); pass an iterable of batches, e.g. a list of "
                            f"{config.num_steps} dicts or a DataLoader.")
    if loss_fn is not None and not callable(loss_fn):
        raise GoraTypeError(f"loss_fn must be a function loss_fn(model, batch) -> scalar loss (or None for "
                            f"model(**batch).loss), got {type(loss_fn).__name__}.")
    check_length(batches, config, held_out=config.adaptive_gamma and eval_batches is None)


def _sums_device(targets: list[TargetLayer], base: nn.Module, config: GoraConfig) -> torch.device:
    """Where the fp32 sums live (see :func:`~gora.devices.accumulation_device`); says so when fp16 scales the loss."""
    if any(t.weight.dtype == torch.float16 for t in targets):
        logger.warning("fp16 model: estimation scales the loss by %g (halved on overflow) and sums in fp32.",
                       config.fp16_loss_scale)
    return accumulation_device(targets, model_device(base), config)


def _score_and_project(targets: list[TargetLayer], sums: dict[str, LayerSums], a_max: dict[str, Tensor],
                       config: GoraConfig) -> tuple[dict[str, float], dict[str, Tensor]]:
    """Per layer with a gradient: importance and P = Ḡ A_maxᵀ (out × r_max, on the CPU); frees Ḡ layer by layer.

    The device work of all layers is queued first; the scores and the projections then reach the host in one
    transfer each, so the number of host syncs does not grow with the number of layers.
    """
    layers = [(t, sums[t.name]) for t in targets if sums[t.name].count > 0]
    # A_max onto the sums' device up front, while the stream is idle (a pageable host→device copy waits for it)
    a_dev = {t.name: a_max[t.name].to(layer.grad.device) for t, layer in layers if layer.grad is not None}
    scores, projected = [], {}
    for target, layer in layers:
        if layer.grad is not None:
            g_bar = layer.grad.div_(layer.count)
            projected[target.name] = g_bar @ a_dev.pop(target.name).t()
            # Ḡ is not needed after this: the score may overwrite it with W ⊙ Ḡ (no out × in temporary)
            scores.append(layer_score(target, layer, config.importance, g_bar))
            layer.grad = None  # free Ḡ now: peak stays at the accumulators
        else:
            scores.append(layer_score(target, layer, config.importance, None))
            assert layer.proj is not None, f"{target.name}: neither a mean gradient nor a sketch"
            projected[target.name] = layer.proj / layer.count
    return layer_importances(scores), to_host(projected)


def _initial_factors(ranks: dict[str, int], a_max: dict[str, Tensor], projected: dict[str, Tensor]
                     ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """A_i = first r_i rows of A_max; C_i = (Ḡ A_iᵀ)(A_i A_iᵀ)⁻¹; C broadcast from rank 0 (bit-identical)."""
    a, c = {}, {}
    for name in sorted(ranks):
        rank = ranks[name]
        if rank == 0:
            continue
        a[name] = a_max[name][:rank].contiguous()
        c[name] = distributed.broadcast_tensor_(solve_c(projected[name][:, :rank], a[name] @ a[name].t()))
    return a, c


__all__ = ["estimate_gora", "get_gora_model"]
