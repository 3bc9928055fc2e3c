"""GoRA as a benchmark method, built through the public core API (``estimate_gora`` + ``apply_gora``).

GoRA estimates gradients at W0 on ``init_steps`` training batches, allocates per-layer ranks within LoRA's
parameter budget and initialises the adapters; training is plain rsLoRA afterwards (no callback).
``gora_loraplus`` is the paper's LLM recipe: the same model with a LoRA+ optimizer (ratio 16).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

from torch import nn

from gora import GoraConfig, apply_gora, estimate_gora
from gora.batches import split_estimation_batches
from gora.bench.builders import (
    GAMMA_BATCHES,
    Batch,
    BuiltMethod,
    MethodConfig,
    adamw,
    finish,
    lora_config,
    loraplus_adamw,
)
from gora.errors import GoraConfigError


def has_gora_field(name: str) -> bool:
    """Whether the installed core's :class:`GoraConfig` has the field ``name``."""
    return name in {f.name for f in dataclasses.fields(GoraConfig)}


def gora_config_for(cfg: MethodConfig) -> GoraConfig:
    """The :class:`GoraConfig` a GoRA method runs with (raises ``GoraConfigError`` on invalid GoRA settings)."""
    extra: dict[str, Any] = {}
    if cfg.gora_head_warmup_steps:
        if not has_gora_field("head_warmup_steps"):
            raise GoraConfigError("This version of gora has no GoraConfig.head_warmup_steps; drop the head-warm-up "
                                  "arms (gora_head_warmup, gora_warmup_adaptive) or upgrade gora.")
        extra["head_warmup_steps"] = cfg.gora_head_warmup_steps
    return GoraConfig(
        num_steps=cfg.init_steps, min_rank=cfg.gora_min_rank, max_rank=cfg.gora_max_rank,
        gamma=cfg.gora_gamma, importance=cfg.gora_importance, estimator=cfg.gora_estimator,  # type: ignore[arg-type]
        seed=cfg.seed, adaptive_gamma=cfg.gora_adaptive_gamma, gamma_batches=GAMMA_BATCHES,
        show_progress=cfg.show_progress, **extra,
    )


INIT_STATS_FIELDS = {"init_relative_delta": "relative_delta", "init_loss_w0": "loss_w0",
                     "init_loss_after": "loss_after"}
"""Record field -> key of ``GoraState.init_stats`` (filled by the core when it gets ``eval_batches``)."""


def gora_peft_model(model: nn.Module, cfg: MethodConfig, batches: Sequence[Batch]) -> tuple[nn.Module, dict]:
    """(peft_model, record fields): ranks, gamma, N, rank range, estimation and total init time."""
    gora_config = gora_config_for(cfg)
    used, held_out = split_estimation_batches(batches, gora_config)
    config = lora_config(cfg)
    start = time.perf_counter()
    extra: dict[str, Any] = {"eval_batches": held_out} if cfg.gora_adaptive_gamma or cfg.gora_eval_batches else {}
    state = estimate_gora(model, config, used, gora_config=gora_config, **extra)
    peft_model = apply_gora(model, config, state)
    init_seconds = time.perf_counter() - start
    min_rank, max_rank = gora_config.rank_bounds(cfg.r)
    info = {
        "init_seconds": init_seconds,
        "estimation_seconds": state.estimation_seconds,
        "ranks": {name: int(rank) for name, rank in state.ranks.items()},
        "gamma": state.gamma,
        "adaptive_gamma": cfg.gora_adaptive_gamma,
        "num_steps": len(used),
        "min_rank": min_rank,
        "max_rank": max_rank,
        "importance": cfg.gora_importance,
        "estimator": cfg.gora_estimator,
        "budget": state.budget,
        "actual_params": state.actual_params,
    }
    if cfg.gora_eval_batches:
        stats = getattr(state, "init_stats", None) or {}
        info.update({field: _number(stats.get(key)) for field, key in INIT_STATS_FIELDS.items()})
    if cfg.gora_head_warmup_steps:
        info["head_warmup_steps"] = cfg.gora_head_warmup_steps
    return peft_model, info


def _number(value) -> float | None:
    return None if value is None else float(value)


def build_gora(model: nn.Module, cfg: MethodConfig, batches: Sequence[Batch]) -> BuiltMethod:
    peft_model, info = gora_peft_model(model, cfg, batches)
    return finish(peft_model, adamw(peft_model, cfg), **info)


def build_gora_loraplus(model: nn.Module, cfg: MethodConfig, batches: Sequence[Batch]) -> BuiltMethod:
    peft_model, info = gora_peft_model(model, cfg, batches)
    return finish(peft_model, loraplus_adamw(peft_model, cfg), loraplus_ratio=cfg.loraplus_ratio, **info)
