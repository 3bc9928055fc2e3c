"""The method registry: ``METHODS[id]`` builds a method (see :mod:`gora.bench.builders` for the budget rules)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from gora.batches import batches_needed
from gora.bench.builders import (
    GAMMA_BATCHES,
    Batch,
    Builder,
    BuiltMethod,
    MethodConfig,
    build_adalora,
    build_eva,
    build_full,
    build_loraga,
    plain_lora_builder,
)
from gora.bench.gora_method import build_gora, build_gora_loraplus
from gora.config import GoraConfig
from gora.errors import GoraConfigError

METHODS: dict[str, Builder] = {
    "full": build_full,
    "lora": plain_lora_builder(),
    "rslora": plain_lora_builder(use_rslora=True),
    "dora": plain_lora_builder(use_dora=True),
    "loraplus": plain_lora_builder(loraplus=True),
    "rslora_loraplus": plain_lora_builder(loraplus=True, use_rslora=True),
    "pissa": plain_lora_builder(init_lora_weights="pissa"),
    "olora": plain_lora_builder(init_lora_weights="olora"),
    "loraga": build_loraga,
    "eva": build_eva,
    "adalora": build_adalora,
    "gora": build_gora,
    "gora_loraplus": build_gora_loraplus,
}
ADAPTER_METHODS = tuple(m for m in METHODS if m != "full")
NEEDS_INIT_BATCHES = ("loraga", "eva", "gora", "gora_loraplus")
"""Methods whose initialisation reads training batches."""


def init_batch_count(method: str, cfg: MethodConfig) -> int:
    """How many training batches ``method`` initialises from (0 for data-free methods)."""
    if method not in NEEDS_INIT_BATCHES:
        return 0
    if method == "eva":
        return cfg.eva_steps
    held_out = method.startswith("gora") and (cfg.gora_adaptive_gamma or cfg.gora_eval_batches)
    return batches_needed(GoraConfig(num_steps=cfg.init_steps, gamma_batches=GAMMA_BATCHES), held_out=held_out)


def build_method(method: str, model: nn.Module, cfg: MethodConfig, batches: Sequence[Batch] = ()) -> BuiltMethod:
    """Build ``method`` on a freshly loaded ``model``.

    Args:
        batches: training batches (dicts for ``model(**batch)``, labels included); the first ``cfg.init_steps``
            feed GoRA, LoRA-GA and EVA.
    """
    if method not in METHODS:
        raise GoraConfigError(f"Unknown method {method!r}; choose from {sorted(METHODS)}.")
    if method in NEEDS_INIT_BATCHES and not batches:
        raise ValueError(f"Method {method!r} initialises from data: pass training batches.")
    return METHODS[method](model, cfg, batches)
