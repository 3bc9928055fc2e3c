"""Head warm-up: a short linear probe of the newly initialised modules PEFT keeps trainable, before estimation.

A freshly initialised classification head makes the gradient that reaches the encoder pass through a random
projection. With ``GoraConfig(head_warmup_steps=K)`` only the head (``modules_to_save``, with the ``classifier`` /
``score`` module PEFT adds for ``task_type="SEQ_CLS"``) is trained for K AdamW steps on the estimation batches
(cycled); estimation then runs through the warmed head. The user's model is put back bit-identical afterwards
(also after an exception or a KeyboardInterrupt); the warmed tensors go into the state and ``apply_gora`` copies
them into the trainable copy PEFT makes of the head. Under torch.distributed, rank 0's initial head is broadcast
and the head's gradients are averaged over processes every step, so every process warms the same head.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn

from . import distributed
from .config import GoraConfig
from .devices import model_device, move_to_device
from .errors import GoraConfigError, GoraStateError
from .losses import LossFn, compute_loss

logger = logging.getLogger(__name__)

SEQ_CLS_HEADS = ("classifier", "score")
"""The head names PEFT adds to ``modules_to_save`` for task_type SEQ_CLS (``PeftModelForSequenceClassification``)."""


def head_keys(lora_config: Any) -> list[str]:
    """The names PEFT keeps trainable: ``modules_to_save``, plus classifier/score for task_type SEQ_CLS."""
    keys = list(getattr(lora_config, "modules_to_save", None) or [])
    task = getattr(lora_config, "task_type", None)
    if getattr(task, "value", task) == "SEQ_CLS":
        keys += [k for k in SEQ_CLS_HEADS if k not in keys]
    return keys


def head_modules(base: nn.Module, lora_config: Any) -> dict[str, nn.Module]:
    """{name: module} of the modules PEFT wraps in ``ModulesToSaveWrapper``: every module whose name ends with one
    of :func:`head_keys` (PEFT's own rule in ``_set_trainable``, a plain string suffix), outermost only."""
    keys = head_keys(lora_config)
    found: dict[str, nn.Module] = {}
    for name, module in base.named_modules():
        if name and any(name.endswith(key) for key in keys) and not any(name.startswith(f"{n}.") for n in found):
            found[name] = module
    return found


def head_parameters(base: nn.Module, lora_config: Any) -> dict[str, nn.Parameter]:
    """{full parameter name: parameter} of the head modules; refuses a head there is nothing to warm in, and one
    that shares a weight with the rest of the model (a causal LM's head tied to its embeddings)."""
    modules = head_modules(base, lora_config)
    params = {f"{m}.{p}": param for m, module in modules.items() for p, param in module.named_parameters()}
    if not params:
        task = getattr(lora_config, "task_type", None)
        raise GoraConfigError(
            f"head_warmup_steps needs a newly initialised head that PEFT keeps trainable, but LoraConfig "
            f"(task_type={task!s}, modules_to_save={getattr(lora_config, 'modules_to_save', None)}) names none in "
            f"this {type(base).__name__}. Pass task_type='SEQ_CLS' for a classification head (classifier/score) or "
            "modules_to_save=[...] naming the new head; a causal LM's head is pretrained (and usually tied to the "
            "embeddings): set head_warmup_steps=0."
        )
    inside = {id(p) for p in params.values()}
    tied = sorted(name for name, p in base.named_parameters(remove_duplicate=False)
                  if id(p) in inside and not any(name == f"{m}.{q}" for m in modules
                                                  for q, _ in modules[m].named_parameters(remove_duplicate=False)))
    if tied:
        raise GoraConfigError(
            f"the head to warm shares its weights with {tied[:3]} (tied weights, as a causal LM's lm_head with its "
            "embeddings): warming it would train those too. Set head_warmup_steps=0, or untie the head."
        )
    return params


def warmup_batches(base: nn.Module, lora_config: Any, batches: Iterable, config: GoraConfig) -> tuple[Iterator, list]:
    """(every batch, as one iterator; its first ``min(head_warmup_steps, num_steps)``, which the warm-up trains on and
    estimation reads again). A model with no head to warm is refused before any batch is read."""
    if config.head_warmup_steps:
        head_parameters(base, lora_config)  # refuse a model with no head to warm before any work
    iterator = iter(batches)  # before the draw threads start: a DataLoader forks its workers here
    warm = list(itertools.islice(iterator, min(config.head_warmup_steps, config.num_steps)))
    return itertools.chain(warm, iterator), warm


def head_warmup(model: nn.Module, lora_config: Any, batches: list, config: GoraConfig, loss_fn: LossFn | None
                ) -> contextlib.AbstractContextManager[dict[str, Any] | None]:
    """:func:`warmed_head` where ``config.head_warmup_steps`` asks for a warm-up, else a block that yields None."""
    if not config.head_warmup_steps:
        return contextlib.nullcontext(None)
    return warmed_head(model, lora_config, batches, config, loss_fn)


@contextlib.contextmanager
def warmed_head(model: nn.Module, lora_config: Any, batches: list, config: GoraConfig,
                loss_fn: LossFn | None) -> Iterator[dict[str, Any]]:
    """Train the head for ``config.head_warmup_steps`` AdamW steps on ``batches`` (cycled), keep it warmed inside
    the block, and put the model back exactly as it was on leaving (weights, flags, ``.grad``, modes).

    Yields {"tensors": {parameter name: warmed tensor (a CPU copy)}, "notes": {...}}.
    """
    base = _base(model)
    params = head_parameters(base, lora_config)
    all_params = list(model.parameters())
    saved = {name: p.detach().clone() for name, p in params.items()}
    flags = [(p, p.requires_grad) for p in all_params]
    grads = {name: p.grad for name, p in params.items()}
    modes = [(m, m.training) for m in model.modules()]
    try:
        notes = _train(model, params, all_params, batches, config, loss_fn)
        for p, flag in flags:  # estimation runs on the model as the user left it, but for the warmed head
            p.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode
        tensors = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in params.items()}
        yield {"tensors": tensors, "notes": notes}
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])
                p.grad = grads[name]
        for p, flag in flags:
            p.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode


def _train(model: nn.Module, params: dict[str, nn.Parameter], all_params: list[nn.Parameter], batches: list,
           config: GoraConfig, loss_fn: LossFn | None) -> dict[str, Any]:
    """The warm-up loop: only the head requires grad; its gradients come from ``torch.autograd.grad`` (no ``.grad``
    is written), AdamW steps fp32 copies of the head and the head takes their values."""
    if not batches:
        raise GoraConfigError("head_warmup_steps needs estimation batches to warm the head on; none were given.")
    for p in all_params:
        p.requires_grad_(False)
    head = list(params.values())
    for p in head:
        p.requires_grad_(True)
    if config.train_mode:
        model.train()
    with torch.no_grad():  # every process starts from rank 0's head
        for p in head:
            distributed.broadcast_tensor_(p.data)
    # AdamW steps fp32 copies (a bf16/fp16 head would lose its small updates); the head gets their values back
    masters = [p.detach().float().clone().requires_grad_(True) for p in head]
    optimizer = torch.optim.AdamW(masters, lr=config.head_warmup_lr)
    device = model_device(model)
    losses = []
    with torch.enable_grad():
        for _, batch in zip(range(config.head_warmup_steps), itertools.cycle(batches)):
            loss = compute_loss(model, move_to_device(batch, device), loss_fn)
            raw = torch.autograd.grad(loss, head, allow_unused=True)
            grads = [torch.zeros_like(m) if g is None else g.float() for m, g in zip(masters, raw)]
            _average_over_processes(grads)
            for master, grad in zip(masters, grads):
                master.grad = grad
            optimizer.step()
            with torch.no_grad():
                for p, master in zip(head, masters):
                    p.copy_(master)
            losses.append(float(loss.detach()))
    with torch.no_grad():  # bit-identical on every process, whatever rounding the optimisers met
        for p in head:
            distributed.broadcast_tensor_(p.data)
    logger.info("head warm-up: %d steps on %s, loss %.4g -> %.4g", len(losses), sorted(params), losses[0],
                losses[-1])
    return {"steps": len(losses), "lr": config.head_warmup_lr, "parameters": sorted(params),
            "first_loss": losses[0], "last_loss": losses[-1]}


def _average_over_processes(grads: list[Tensor]) -> None:
    """Each gradient averaged over processes in place: one all-reduce of their concatenation."""
    if not distributed.is_distributed():
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    distributed.all_reduce_sum_(flat)
    flat /= distributed.world_size()
    for g, chunk in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(chunk.view_as(g))


def _base(model: nn.Module) -> nn.Module:
    from .targets import unwrap_model

    return unwrap_model(model)


# -- apply -------------------------------------------------------------------------------------------
def check_head_fits(base: nn.Module, lora_config: Any, head: dict[str, Tensor]) -> None:
    """Refuse a state's warmed head that this model or LoraConfig cannot take: a missing parameter, another shape,
    or a head PEFT would not keep trainable."""
    if not head:
        return
    params = dict(base.named_parameters())
    problems = [f"{n!r} does not exist" for n in head if n not in params]
    problems += [f"{n!r} is {tuple(params[n].shape)}, the state's head has {tuple(t.shape)}"
                 for n, t in head.items() if n in params and tuple(params[n].shape) != tuple(t.shape)]
    if problems:
        raise GoraStateError(f"the state's warmed head does not fit the model ({'; '.join(problems[:4])}); "
                             "estimate again on this model.")
    kept = {f"{m}.{p}" for m, module in head_modules(base, lora_config).items() for p, _ in module.named_parameters()}
    missing = sorted(set(head) - kept)
    if missing:
        raise GoraStateError(
            f"the state carries a warmed head ({missing[:3]}) that this LoraConfig does not keep trainable "
            f"(task_type={getattr(lora_config, 'task_type', None)!s}, modules_to_save="
            f"{getattr(lora_config, 'modules_to_save', None)}); pass the LoraConfig used for estimation "
            "(e.g. task_type='SEQ_CLS')."
        )


def copy_head_into(peft_model: nn.Module, lora_config: Any, head: dict[str, Tensor], adapter_name: str) -> None:
    """Write the warmed head into the trainable copies PEFT made of the head modules (``modules_to_save``); the
    original modules, the user's, are left as they are."""
    if not head:
        return
    inner = cast(nn.Module, cast(nn.Module, peft_model.base_model).model)
    for module_name in head_modules_of_state(head, inner):
        wrapper = inner.get_submodule(module_name)
        copies = getattr(wrapper, "modules_to_save", None)
        if copies is None or adapter_name not in copies:
            raise GoraStateError(f"PEFT made no trainable copy of {module_name!r} (modules_to_save); the warmed head "
                                 "cannot be placed. Pass the LoraConfig used for estimation.")
        trainable = copies[adapter_name]
        with torch.no_grad():
            for name, tensor in head.items():
                if name.startswith(f"{module_name}."):
                    target = trainable.get_parameter(name[len(module_name) + 1:])
                    target.copy_(tensor.to(device=target.device, dtype=target.dtype))


def head_modules_of_state(head: dict[str, Tensor], inner: nn.Module) -> list[str]:
    """The names of the wrapped head modules (``ModulesToSaveWrapper``) that hold the state's head parameters."""
    names = set()
    for param in head:
        parts = param.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut])
            try:
                module = inner.get_submodule(prefix)
            except AttributeError:
                continue
            if hasattr(module, "modules_to_save"):
                names.add(prefix)
                break
        else:
            raise GoraStateError(f"no trainable copy (modules_to_save) holds {param!r}; pass the LoraConfig used "
                                 "for estimation.")
    return sorted(names)
