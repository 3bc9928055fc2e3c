"""What each benchmark configuration runs: the floor, LoRA, GoRA (full, sketch), LoRA-GA and an official-style estimator.

Each ``run_*`` takes the model, its target names and the batches (already on the model's device) and performs one
measured run; ``cleanup`` drops whatever the run left behind so the next repetition starts from the same memory.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable

import torch
from peft import LoraConfig, get_peft_model
from torch import nn

from gora import GoraConfig, estimate_gora, get_gora_model
from gora.targets import resolve_targets

RANK, ALPHA = 8, 16


def lora_config(targets: list[str], **extra) -> LoraConfig:
    return LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets), lora_dropout=0.0, **extra)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def only_targets_require_grad(model: nn.Module, targets: list[str]) -> None:
    """The strict floor's setting: the same parameters receive gradients as in every estimator."""
    for param in model.parameters():
        param.requires_grad_(False)
    for target in resolve_targets(model, lora_config(targets))[0]:
        target.weight.requires_grad_(True)


def run_floor(model: nn.Module, batches: list[dict]) -> None:
    """N plain forward + backward passes (the floor); gradients dropped after each step."""
    for batch in batches:
        model(**batch).loss.backward()
        model.zero_grad(set_to_none=True)


def run_floor_dropping(model: nn.Module, targets: list[str], batches: list[dict]) -> None:
    """The floor of any streaming estimator: forward + backward, each gradient dropped by a hook once complete.

    Plain backward keeps every target gradient until the step ends (4 B per target parameter of fresh memory
    per step on the CPU); this floor frees each as it is produced, as the estimators' hooks do.
    """
    def drop(param: torch.Tensor) -> None:
        param.grad = None

    handles = [t.weight.register_post_accumulate_grad_hook(drop) for t in resolve_targets(model, lora_config(targets))[0]]
    try:
        for batch in batches:
            model(**batch).loss.backward()
    finally:
        for handle in handles:
            handle.remove()


def run_gora(model: nn.Module, targets: list[str], batches: list[dict], **config) -> object:
    """``estimate_gora`` end to end (loop, scoring, allocation, C): what a user pays before training."""
    return estimate_gora(model, lora_config(targets), batches,
                         GoraConfig(num_steps=len(batches), show_progress=False, **config))


def run_loraga(model: nn.Module, targets: list[str], batches: list[dict]) -> list[nn.Module]:
    """PEFT's LoRA-GA gradient estimation (``preprocess_loraga``); the gradients stay on the modules, as in PEFT."""
    from peft import LoraGAConfig
    from peft.tuners.lora import preprocess_loraga

    config = lora_config(targets, init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig())

    def train_step() -> None:  # PEFT sums .grad over the calls and divides by the number of backward passes
        for batch in batches:
            model(**batch).loss.backward()

    preprocess_loraga(model, config, train_step)
    return [m for m in model.modules() if hasattr(m, "_peft_loraga_grad")]


class OfficialStyleEstimator:
    """BASELINE, NOT THIS LIBRARY: gradient capture in the style of the official GoRA code (hhnqqq/MyTransformers).

    One hook per target weight copies every gradient to the CPU in the parameter dtype and keeps all of them
    (host memory grows as N × 2-4 B per target parameter); after the loop they are summed in the parameter
    dtype and divided by N. Post-accumulate hooks are used so the last layer is caught (the official code's
    pre-accumulation hooks lose it).
    """

    def __init__(self, model: nn.Module, targets: list[str]) -> None:
        self.model = model
        self.layers = resolve_targets(model, lora_config(targets))[0]
        self.stored: dict[str, list[torch.Tensor]] = {t.name: [] for t in self.layers}

    def run(self, batches: list[dict]) -> dict[str, torch.Tensor]:
        saved = [(p, p.requires_grad) for p in self.model.parameters()]
        handles = []
        try:
            only_targets_require_grad(self.model, [t.name for t in self.layers])
            for layer in self.layers:
                handles.append(layer.weight.register_post_accumulate_grad_hook(self._hook(layer.name)))
            for batch in batches:
                self.model(**batch).loss.backward()
            return {name: sum(grads[1:], grads[0].clone()) / len(grads) for name, grads in self.stored.items() if grads}
        finally:
            for handle in handles:
                handle.remove()
            for param, flag in saved:
                param.requires_grad_(flag)

    def _hook(self, name: str) -> Callable:
        def hook(param: torch.Tensor) -> None:
            self.stored[name].append(param.grad.detach().to("cpu", copy=True))  # parameter dtype, kept
            param.grad = None

        return hook


def run_official(model: nn.Module, targets: list[str], batches: list[dict]) -> object:
    estimator = OfficialStyleEstimator(model, targets)
    return estimator.run(batches), estimator


class LoraTrainer:
    """A PEFT LoRA model (r=8, same targets) and AdamW: ``step`` is one training step."""

    def __init__(self, model: nn.Module, targets: list[str], lora: LoraConfig | None = None) -> None:
        self.model = get_peft_model(model, lora or lora_config(targets)).train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step(self, batch: dict) -> None:
        self.model(**batch).loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def gora_trainer(model: nn.Module, targets: list[str], batches: list[dict], **config) -> LoraTrainer:
    """A GoRA PeftModel (ranks and B from ``batches``) with the same optimiser as ``LoraTrainer``."""
    peft_model = get_gora_model(model, lora_config(targets), batches,
                                GoraConfig(num_steps=len(batches), show_progress=False, **config))
    trainer = LoraTrainer.__new__(LoraTrainer)
    trainer.model = peft_model.train()
    trainer.optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
    return trainer


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def deep_copy(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


# method id -> (runner(model, targets, batches) -> anything, needs strict floor setting for the run)
GORA_VARIANTS: dict[str, dict] = {
    "gora": {},
    "gora_sketch": {"estimator": "sketch", "importance": "frobenius"},
    "gora_ckpt": {"gradient_checkpointing": True},
    "gora_offload": {"offload": True},
    "gora_ondevice": {"offload": False},
}
