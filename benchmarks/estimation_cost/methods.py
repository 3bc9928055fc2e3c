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

    As the shared spec's traps 2 and 12 describe it: every target weight keeps a running sum on the CPU in the
    parameter dtype (bf16 sums for a bf16 model: ``stored += grad.cpu()``), and each hook sweeps all of the model's
    parameters for completed gradients (a Python loop over every parameter, per hook) after a
    ``torch.cuda.synchronize()`` on a GPU. Sums are divided by N at the end. Post-accumulate hooks are used, so the
    last layer is caught (the official pre-accumulation hooks lose it), and there is no per-step all-reduce (one
    process). Results made before d531716 kept all N gradient copies instead of one running sum and did not
    sweep or synchronise (more memory, less time than the official code): their READMEs say so. In
    ``../results/cpu/official-baseline-rerun/`` the means were still new tensors made while every sum was alive (a
    second copy at the end, more memory than the ``/=`` in place used since).
    """

    def __init__(self, model: nn.Module, targets: list[str]) -> None:
        self.model = model
        self.layers = resolve_targets(model, lora_config(targets))[0]
        self.stored: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {t.name: 0 for t in self.layers}
        self._names: dict[int, str] = {id(t.weight): t.name for t in self.layers}
        self._params: list[torch.Tensor] = []

    def run(self, batches: list[dict]) -> dict[str, torch.Tensor]:
        saved = [(p, p.requires_grad) for p in self.model.parameters()]
        handles = []
        try:
            only_targets_require_grad(self.model, [t.name for t in self.layers])
            self._params = list(self.model.parameters())
            for layer in self.layers:
                handles.append(layer.weight.register_post_accumulate_grad_hook(self._hook))
            for batch in batches:
                self.model(**batch).loss.backward()
            for name, total in self.stored.items():  # the mean in place: no second copy of every sum
                total.div_(self.counts[name])
            return self.stored
        finally:
            for handle in handles:
                handle.remove()
            for param, flag in saved:
                param.requires_grad_(flag)

    def _hook(self, param: torch.Tensor) -> None:
        if param.is_cuda:
            torch.cuda.synchronize()
        for p in self._params:  # the sweep over every parameter, in every hook
            if p.grad is None:
                continue
            name = self._names[id(p)]
            grad = p.grad.detach().to("cpu")  # parameter dtype
            if name in self.stored:
                self.stored[name].add_(grad)  # summed in the parameter dtype (bf16 for a bf16 model)
            else:
                self.stored[name] = grad.clone() if grad.data_ptr() == p.grad.data_ptr() else grad
            self.counts[name] += 1
            p.grad = None


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
