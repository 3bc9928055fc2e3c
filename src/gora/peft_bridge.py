"""From a ``GoraState`` to a plain ``peft.PeftModel``.

Native model: the user's LoraConfig with ``use_rslora=True``, exact target names, and
``rank_pattern``/``alpha_pattern`` per layer; PEFT builds the layers, gora copies A and B in.
Saving the adapter (native, portable and uniform-rank forms) is :mod:`gora.export`'s.
"""

from __future__ import annotations

import copy
import logging
import math
import re

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import check_lora_config
from .errors import GoraStateError, GoraTargetError, GoraTypeError, GoraUnsupportedError
from .head_warmup import check_head_fits, copy_head_into
from .initialization import b_from_c
from .peft_compat import expanded_lora_config, inner_model, is_target, pattern_keys, refuse_adapter_layers
from .state import GoraState
from .targets import _describe, unwrap_model

logger = logging.getLogger(__name__)


# -- naming ----------------------------------------------------------------------------------
def target_modules_for(base: nn.Module, names: list[str]) -> list[str] | str:
    """Exact names; a full-match regex only when a name is a dotted suffix of a module we must not adapt."""
    chosen = set(names)
    collides = any(
        other not in chosen and any(other.endswith("." + name) for name in names)
        for other, _ in base.named_modules()
    )
    if not collides:
        return sorted(names)
    return "^(?:" + "|".join(re.escape(n) for n in sorted(names)) + ")$"


def native_lora_config(lora_config: LoraConfig, state: GoraState, base: nn.Module) -> LoraConfig:
    """The LoraConfig PEFT builds GoRA's model from (only rank > 0 modules targeted)."""
    config = copy.deepcopy(lora_config)
    names = state.adapted
    keys = pattern_keys(names)
    config.target_modules = target_modules_for(base, names)
    config.rank_pattern = {keys[n]: state.ranks[n] for n in names}
    config.alpha_pattern = {keys[n]: config.lora_alpha for n in names}
    config.use_rslora = True
    config.init_lora_weights = True
    config.layers_to_transform = None
    config.layers_pattern = None
    return config


# -- checks ------------------------------------------------------------------------------------
def check_not_wrapped(model: nn.Module) -> None:
    """Refuse what ``get_peft_model`` must not wrap: a PeftModel, or a model inside a DDP/FSDP wrapper."""
    if isinstance(model, PeftModel):
        raise GoraTargetError("model is already a PeftModel; pass a freshly loaded base model, or "
                              "peft_model.unload() (the base model without its adapters).")
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(model, (DistributedDataParallel, DataParallel, FullyShardedDataParallel)):
        raise GoraTargetError(
            f"model is wrapped in {type(model).__name__}; apply GoRA to the model itself (wrapper.module) and wrap "
            "the PeftModel afterwards (e.g. accelerator.prepare(peft_model)), since the trainable parameters change."
        )


def check_state_fits(base: nn.Module, state: GoraState) -> None:
    """Refuse a state written for another model: every adapted name must exist with the same shape."""
    state.validate()
    modules = dict(base.named_modules())
    problems = []
    for name in state.adapted:
        module = modules.get(name)
        if module is None:
            problems.append(f"{name!r} does not exist")
            continue
        try:
            shape = _describe(module, name).shape
        except GoraUnsupportedError:
            problems.append(f"{name!r} is a {type(module).__name__}, not a linear layer")
            continue
        if shape != tuple(state.shapes[name]):
            problems.append(f"{name!r} is {shape[0]}x{shape[1]}, the state has {state.shapes[name]}")
    if problems:
        raise GoraStateError(
            f"this GoraState does not fit the model ({len(problems)} problems: {'; '.join(problems[:4])}). "
            f"It was estimated on a {state.model_class or 'different model'}; estimate again on this model."
        )


# -- apply -------------------------------------------------------------------------------------
def apply_gora(
    model: nn.Module, lora_config: LoraConfig, state: GoraState, *, gamma: float | None = None,
    adapter_name: str = "default",
) -> PeftModel:
    """Wrap ``model`` in a ``PeftModel`` whose adapters start at GoRA's initialisation.

    Each adapted layer gets rank ``state.ranks[name]``, scaling α/√r_i, A_i from the state and
    B_i = −(γ√in/α)·C_i, so ΔW₀ = −γ√(in/r_i)·Ḡ_i P_{A_i}. Base weights are never modified.
    ``gamma`` overrides the state's γ (B is linear in γ: no re-estimation needed).

    The returned model carries the state as ``peft_model.gora_state`` (a plain attribute, read by
    :func:`export_adapter` and usable with ``add_gora_logging``). It is not saved by ``save_pretrained``: after
    ``PeftModel.from_pretrained``, pass ``state=GoraState.load(...)`` where it is needed; an exported adapter's
    ``gora_config.json`` keeps the state's ranks, importances and budget for ``gora inspect``.

    Raises:
        GoraStateError: the state does not fit the model (checked before the model is touched).
    """
    check_lora_config(lora_config)
    if not isinstance(state, GoraState):
        raise GoraTypeError(f"state must be a GoraState, got {type(state).__name__}; "
                            "load a saved one with GoraState.load(directory).")
    check_not_wrapped(model)
    if not state.adapted:
        raise GoraStateError("the state adapts no layer (every rank is 0); lower min_rank or check the targets.")
    if lora_config.use_dora:
        raise GoraUnsupportedError("GoRA initialises plain LoRA adapters; set use_dora=False.")
    base = unwrap_model(model)
    refuse_adapter_layers(base)  # e.g. the base model of an earlier apply_gora: LoRA is inside it already
    check_state_fits(base, state)
    check_head_fits(base, lora_config, state.head)
    gamma = state.gamma if gamma is None else float(gamma)
    if not math.isfinite(gamma) or gamma < 0:
        raise GoraStateError(f"gamma must be a finite number >= 0, got {gamma}.")
    if lora_config.r != state.reference_rank:
        logger.warning("LoraConfig.r=%d differs from the state's reference rank %d; the state's ranks are used.",
                       lora_config.r, state.reference_rank)
    _warn_other_targets(base, lora_config, state)
    alpha = float(lora_config.lora_alpha)
    weights = {n: (state.A[n], b_from_c(state.C[n], gamma, state.shapes[n][1], alpha)) for n in state.adapted}
    config = native_lora_config(lora_config, state, base)
    restore = _snapshot(model)
    try:
        peft_model = get_peft_model(model, config, adapter_name=adapter_name)
        _copy_adapter_weights(peft_model, weights, adapter_name)
        copy_head_into(peft_model, lora_config, state.head, adapter_name)  # the warmed head, into PEFT's copy
    except BaseException:
        restore()  # put the user's model back as it was (PEFT's unload keeps modules_to_save copies)
        raise
    peft_model.gora_state = state  # type: ignore[assignment]  # documented attribute (mypy: Module attrs are tensors)
    return peft_model


def _warn_other_targets(base: nn.Module, lora_config: LoraConfig, state: GoraState) -> None:
    """The state's layers are adapted whatever ``target_modules`` says: say so when the two disagree.

    Matched with PEFT's rule directly, not ``resolve_targets``: that refuses quantised layers, and QGoRA applies a
    state to a quantised model."""
    config = expanded_lora_config(base, lora_config)
    unmatched = [name for name in state.adapted if not is_target(config, name)]
    unknown = [name for name, module in base.named_modules()
               if name and isinstance(module, (nn.Linear, Conv1D)) and is_target(config, name)
               and name not in state.ranks and name not in state.skipped]
    if unmatched or unknown:
        example = (unmatched or unknown)[0]
        logger.warning("LoraConfig.target_modules=%r differs from the state's targets (%d adapted layers it does not "
                       "match, %d matched layers the state never estimated; e.g. %r): the state's %d layers are "
                       "adapted, as estimated. Estimate again to adapt other layers.", lora_config.target_modules,
                       len(unmatched), len(unknown), example, len(state.adapted))


def _snapshot(model: nn.Module):
    """A function that undoes get_peft_model's in-place surgery: child modules, attributes it adds
    (``peft_config``), requires_grad flags and train/eval modes."""
    children = [(module, dict(module._modules), set(vars(module))) for module in model.modules()]
    flags = [(param, param.requires_grad) for param in model.parameters()]
    modes = [(module, module.training) for module in model.modules()]

    def restore() -> None:
        for module, saved, attributes in children:
            module._modules.clear()
            module._modules.update(saved)
            for added in set(vars(module)) - attributes:
                delattr(module, added)
        for param, flag in flags:
            param.requires_grad_(flag)
        for module, mode in modes:
            module.training = mode

    return restore


def _copy_adapter_weights(peft_model: PeftModel, weights: dict, adapter_name: str) -> None:
    modules = dict(inner_model(peft_model).named_modules())
    for name, (a, b) in weights.items():
        layer = modules[name]
        lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
        if lora_a.shape != a.shape or lora_b.shape != b.shape:
            raise GoraStateError(f"PEFT built {name!r} with A {tuple(lora_a.shape)} B {tuple(lora_b.shape)}, "
                                 f"expected {tuple(a.shape)} and {tuple(b.shape)} (rank_pattern not applied).")
        with torch.no_grad():
            lora_a.copy_(a.to(device=lora_a.device, dtype=lora_a.dtype))
            lora_b.copy_(b.to(device=lora_b.device, dtype=lora_b.dtype))
