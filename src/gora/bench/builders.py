"""Builders of the fine-tuning methods at a matched trainable-parameter budget (registry: ``gora.bench.methods``).

Every builder takes a freshly loaded classifier, a :class:`MethodConfig` and a few training batches (for the
data-driven initialisations: GoRA, LoRA-GA, EVA) and returns a :class:`BuiltMethod`: the model to train, its
optimizer (AdamW for all; LoRA+ builds its own parameter groups) and an optional per-step callback (AdaLoRA's
budget allocator). All adapter methods use the same targets, reference rank ``r``, ``lora_alpha``, dropout and
the same trainable classifier head (``modules_to_save``); the schedule and epochs live in the training loop.

Budget matching: LoRA, rsLoRA, LoRA+, PiSSA, OLoRA and LoRA-GA have exactly LoRA's parameters; DoRA adds one
magnitude vector per layer; EVA and GoRA redistribute LoRA's budget across layers; AdaLoRA starts at ``init_r = r``
(LoRA's count plus the singular values) and prunes towards ``target_r = r // 2`` on average.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from gora.config import field_default
from gora.errors import GoraConfigError

Batch = dict[str, torch.Tensor]


GAMMA_BATCHES = field_default("gamma_batches")
"""Training batches after the first N that adaptive gamma scores on (``GoraConfig.gamma_batches``)."""


@dataclass
class MethodConfig:
    """Settings shared by all methods; each builder reads what it needs."""

    r: int = 8
    """Reference LoRA rank (AdaLoRA's ``init_r``; GoRA's budget rank)."""
    lora_alpha: float = 16
    """LoRA scaling numerator (alpha / r, or alpha / sqrt(r) for rsLoRA and GoRA)."""
    target_modules: tuple[str, ...] = ("query", "key", "value", "dense")
    """PEFT target modules (dotted suffixes); MiniLM's attention and feed-forward linears."""
    modules_to_save: tuple[str, ...] = ("classifier",)
    """Trained in full by every adapter method: the classification head (empty for causal-LM tasks: no new head)."""
    task_type: str = "SEQ_CLS"
    """PEFT task type: ``"SEQ_CLS"`` (a classifier with a new head) or ``"CAUSAL_LM"`` (the pretrained LM head)."""
    lora_dropout: float = 0.0
    lr: float = 5e-4
    weight_decay: float = 0.0
    total_steps: int = 100
    """Optimizer steps of the run; AdaLoRA's ``total_step``."""
    loraplus_ratio: float = 16.0
    """LoRA+ learning-rate ratio lr_B / lr_A (``loraplus`` and ``gora_loraplus``)."""
    init_steps: int = field_default("num_steps")
    """Batches used by the gradient-based initialisations (GoRA's N, LoRA-GA)."""
    eva_steps: int = 32
    """Distinct batches EVA cycles through (forward passes only) until its SVDs converge; a handful of repeated
    batches may never converge."""
    gora_gamma: float = field_default("gamma")
    gora_min_rank: int | None = None
    gora_max_rank: int | None = None
    gora_importance: str = field_default("importance")
    gora_estimator: str = field_default("estimator")
    """``"full"`` (exact mean gradient) or ``"sketch"`` (memory-light; needs ``gora_importance="frobenius"``)."""
    show_progress: bool = True
    """GoRA's estimation bar (the grid sets it from ``TrainConfig.progress``; not a setting that changes results)."""
    gora_adaptive_gamma: bool = False
    """Choose gamma per run on ``GoraConfig.gamma_batches`` held-out training batches (spec 4.2; never test data)."""
    seed: int = 0
    """Seed of GoRA's per-layer A draws."""
    head_lr: float | None = None
    """Learning rate of the new head (``modules_to_save``) in its own AdamW group; None: the head shares ``lr``
    (protocol 1). Protocol 2 fixes it for every arm so that the tuned adapter lr never sets the head's speed."""
    gora_eval_batches: bool = False
    """Pass GoRA the ``GAMMA_BATCHES`` batches after its estimation batches as ``eval_batches`` (protocol 2: the
    core then measures the held-out loss at W0 and right after initialisation)."""
    gora_head_warmup_steps: int = 0
    """``GoraConfig.head_warmup_steps``: steps that train the new head alone before GoRA's estimation (0: none)."""

    def __post_init__(self) -> None:
        if self.r < 1:
            raise GoraConfigError(f"r must be >= 1 (--ranks), got {self.r}.")
        if self.total_steps < 1:
            raise GoraConfigError(f"total_steps must be >= 1, got {self.total_steps}.")
        if self.init_steps < 1 or self.eva_steps < 1:
            raise GoraConfigError(f"init_steps and eva_steps must be >= 1 (--gora-steps, --eva-steps), "
                                  f"got {self.init_steps}, {self.eva_steps}.")
        if self.head_lr is not None and not self.head_lr > 0:
            raise GoraConfigError(f"head_lr must be > 0 or None (--head-lr), got {self.head_lr}.")
        if self.task_type not in ("SEQ_CLS", "CAUSAL_LM"):
            raise GoraConfigError(f"task_type must be 'SEQ_CLS' or 'CAUSAL_LM', got {self.task_type!r}.")
        if self.gora_head_warmup_steps < 0:
            raise GoraConfigError(f"gora_head_warmup_steps must be >= 0, got {self.gora_head_warmup_steps}.")


@dataclass
class BuiltMethod:
    """What the training loop needs from a method."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    step_callback: Callable[[int], None] | None = None
    """Called with the global step after ``optimizer.step()`` and before ``zero_grad()``."""
    info: dict[str, Any] = field(default_factory=dict)
    """Record fields: ``trainable_params``, and where they apply ``init_seconds``, ``ranks``, GoRA's settings."""


Builder = Callable[[nn.Module, MethodConfig, Sequence[Batch]], BuiltMethod]


def count_trainable(model: nn.Module) -> int:
    """Parameters that receive gradients (head included)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def head_parameters(model: nn.Module, cfg: MethodConfig) -> list[nn.Parameter]:
    """Trainable parameters of the new head: those under a module named in ``cfg.modules_to_save`` (PEFT's trained
    copy, ``classifier.modules_to_save.default``, or the plain ``classifier`` in full fine-tuning)."""
    heads = set(cfg.modules_to_save)
    return [p for name, p in model.named_parameters() if p.requires_grad and heads & set(name.split("."))]


def with_head_group(optimizer: torch.optim.Optimizer, model: nn.Module, cfg: MethodConfig) -> torch.optim.Optimizer:
    """Move the head's parameters into their own group at ``cfg.head_lr`` (no change when ``head_lr`` is None).

    Runs before the first step and before the scheduler is made, so every group follows the same schedule.
    """
    if cfg.head_lr is None:
        return optimizer
    head = head_parameters(model, cfg)
    ids = {id(p) for p in head}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in ids]
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    if head:
        optimizer.add_param_group({"params": head, "lr": cfg.head_lr, "weight_decay": cfg.weight_decay})
    return optimizer


def adamw(model: nn.Module, cfg: MethodConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    return with_head_group(torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay), model, cfg)


def loraplus_adamw(model: nn.Module, cfg: MethodConfig) -> torch.optim.Optimizer:
    from peft.optimizers import create_loraplus_optimizer

    optimizer = create_loraplus_optimizer(
        model=model, optimizer_cls=torch.optim.AdamW, lr=cfg.lr,  # type: ignore[arg-type]  # any PEFT model
        loraplus_lr_ratio=cfg.loraplus_ratio, weight_decay=cfg.weight_decay,
    )
    return with_head_group(optimizer, model, cfg)


def lora_config(cfg: MethodConfig, **overrides: Any):
    """The shared ``LoraConfig`` (``cfg.task_type``; a new head, if any, in ``modules_to_save``)."""
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # PEFT annotates int; a float scales the same
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules), modules_to_save=list(cfg.modules_to_save) or None,
        task_type=cfg.task_type, **overrides,
    )


def adapter_ranks(model: nn.Module) -> dict[str, int]:
    """Rank of every LoRA layer, keyed by module name relative to the base model."""
    from peft.tuners.lora import LoraLayer

    prefix = "base_model.model."
    return {
        name.removeprefix(prefix): int(next(iter(module.r.values())))
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and module.r
    }


def finish(model: nn.Module, optimizer: torch.optim.Optimizer, **info: Any) -> BuiltMethod:
    callback = info.pop("step_callback", None)
    return BuiltMethod(model, optimizer, callback, {"trainable_params": count_trainable(model), **info})


# ---------------------------------------------------------------- builders


def build_full(model: nn.Module, cfg: MethodConfig, batches: Sequence[Batch]) -> BuiltMethod:
    """Full fine-tuning: every parameter trains."""
    for p in model.parameters():
        p.requires_grad_(True)
    return finish(model, adamw(model, cfg), r=None, lora_alpha=None)


def plain_lora_builder(loraplus: bool = False, **overrides: Any) -> Builder:
    """A builder for a LoRA variant that needs only ``LoraConfig`` options (rsLoRA, DoRA, PiSSA, OLoRA)."""

    def build(model: nn.Module, cfg: MethodConfig, batches: Sequence[Batch]) -> BuiltMethod:
        from peft import get_peft_model

        start = time.perf_counter()
        peft_model = get_peft_model(model, lora_config(cfg, **overrides))
        init_seconds = time.perf_counter() - start
        optimizer = loraplus_adamw(peft_model, cfg) if loraplus else adamw(peft_model, cfg)
        return finish(peft_model, optimizer, init_seconds=init_seconds)

    return build


def build_loraga(model: nn.Module, cfg: MethodConfig, batches: Sequence[Batch]) -> BuiltMethod:
    """LoRA-GA (peft): gradient SVD at W0 over ``init_steps`` batches, then ``get_peft_model``."""
    from peft import LoraGAConfig, get_peft_model
    from peft.tuners.lora import preprocess_loraga

    config = lora_config(cfg, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())
    used = list(batches[: cfg.init_steps])

    def train_step() -> None:  # gradients accumulate across the batches; peft averages them
        for batch in used:
            (model(**batch).loss / len(used)).backward()

    start = time.perf_counter()
    preprocess_loraga(model, config, train_step)
    peft_model = get_peft_model(model, config)
    return finish(peft_model, adamw(peft_model, cfg), init_seconds=time.perf_counter() - start,
                  init_batches=len(used))


def eva_layer_inputs(layer_input: Any, token_index: torch.Tensor, layer_name: str) -> torch.Tensor:
    """EVA's SVD input for one layer: non-padding tokens of (B, T, H) inputs; (B, H) inputs (pooler) as they are.

    peft's default indexes every input with the (B, T) token mask, which breaks on the pooler's (B, H) input.
    """
    x = layer_input[0] if isinstance(layer_input, (tuple, list)) else layer_input
    if x.ndim == 3:
        return x[token_index.T.unbind()]  # token_index: (n, 2) positions of real tokens
    return x.reshape(-1, x.shape[-1]).contiguous()  # the pooler sees a strided slice; peft hashes a view


EVA_RHO = 2.0
EVA_MAX_PASSES = 20
"""EVA cycles its batches until every layer's SVD converges; give up after this many passes over them."""


def capped_forward(max_calls: int) -> Callable[[nn.Module, Batch], Any]:
    """``model(**batch)`` that raises after ``max_calls`` calls: peft's EVA loops forever on a layer that never
    converges (e.g. the pooler when a batch holds fewer sequences than ``r * rho``)."""
    calls = 0

    def forward(model: nn.Module, batch: Batch) -> Any:
        nonlocal calls
        calls += 1
        if calls > max_calls:
            raise RuntimeError(
                f"EVA did not converge within {max_calls} forward passes; use larger batches "
                f"(>= r * rho = {EVA_RHO:g} * r sequences) or more distinct batches (eva_steps)."
            )
        return model(**batch)

    return forward


def build_eva(model: nn.Module, cfg: MethodConfig, batches: Sequence[Batch]) -> BuiltMethod:
    """EVA (peft): SVD of layer inputs, rank redistribution at LoRA's total rank (rho 2)."""
    from peft import EvaConfig, get_peft_model, initialize_lora_eva_weights

    # Labels are per sequence here, not per token, so the language-modelling label mask must be off.
    config = lora_config(cfg, init_lora_weights="eva", eva_config=EvaConfig(rho=EVA_RHO, use_label_mask=False))
    used = list(batches[: cfg.eva_steps])
    start = time.perf_counter()
    peft_model = get_peft_model(model, config)
    initialize_lora_eva_weights(
        peft_model, dataloader=used, forward_fn=capped_forward(EVA_MAX_PASSES * len(used) + 1),
        prepare_layer_inputs_fn=eva_layer_inputs, show_progress_bar=False,
    )
    return finish(peft_model, adamw(peft_model, cfg), init_seconds=time.perf_counter() - start,
                  ranks=adapter_ranks(peft_model), init_batches=len(used))


def build_adalora(model: nn.Module, cfg: MethodConfig, batches: Sequence[Batch]) -> BuiltMethod:
    """AdaLoRA (peft): ``init_r = r`` pruned towards ``target_r = r // 2``; allocation every step."""
    from peft import AdaLoraConfig, get_peft_model

    total = cfg.total_steps
    config = AdaLoraConfig(
        init_r=cfg.r, target_r=max(1, cfg.r // 2), lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]
        lora_dropout=cfg.lora_dropout,
        target_modules=list(cfg.target_modules), modules_to_save=list(cfg.modules_to_save) or None,
        task_type=cfg.task_type,
        total_step=total, tinit=total // 10, tfinal=total // 5, deltaT=max(1, total // 100),
    )
    peft_model = get_peft_model(model, config)

    def update(global_step: int) -> None:
        peft_model.base_model.update_and_allocate(global_step)  # type: ignore[operator]  # AdaLoraModel's method

    return finish(peft_model, adamw(peft_model, cfg), step_callback=update, target_r=config.target_r)
