"""The one module that touches PEFT internals, so a PEFT upgrade changes one file."""

from __future__ import annotations

import copy
from typing import cast

from peft import LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers, check_target_module_exists
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn

from .errors import GoraTargetError


def pattern_keys(names: list[str]) -> dict[str, str]:
    """rank_pattern key per exact name. PEFT matches keys as ``(.*\\.)?key$``, so a name that is a
    dotted suffix of another target would also match it: anchor such a key with ``^``."""
    keys = {}
    for name in names:
        shadows = any(other != name and other.endswith("." + name) for other in names)
        keys[name] = f"^{name}" if shadows else name
    return keys


def inner_model(peft_model: nn.Module) -> nn.Module:
    """The user's model inside a ``PeftModel`` (``peft_model.base_model.model``)."""
    return cast(nn.Module, cast(nn.Module, peft_model.base_model).model)


def expanded_lora_config(model: nn.Module, lora_config: LoraConfig) -> LoraConfig:
    """A copy of ``lora_config`` with ``all-linear`` and a missing ``target_modules`` resolved as PEFT does."""
    config = copy.deepcopy(lora_config)
    if config.target_modules is None and getattr(config, "target_parameters", None) is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        defaults = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type) if model_type else None
        if defaults is None:
            raise GoraTargetError(
                f"LoraConfig.target_modules is None and PEFT has no default targets for model_type={model_type!r}; "
                "pass target_modules (exact names, dotted suffixes, a regex, or 'all-linear')."
            )
        config.target_modules = set(defaults)  # type: ignore[assignment]  # a set, as LoraConfig itself stores it
    return cast(LoraConfig, _maybe_include_all_linear_layers(config, model))


def is_target(config: LoraConfig, name: str) -> bool:
    """PEFT's own matching rule: exact name or dotted suffix, regex string, exclude_modules, layers_to_transform."""
    # PEFT returns a match, True, or a falsy value (None, False, an _ExcludedModule sentinel)
    return bool(check_target_module_exists(config, name))


def refuse_adapter_layers(model: nn.Module) -> None:
    """Refuse a model that already holds PEFT adapter layers (LoRA and the like).

    ``get_peft_model`` (and so ``apply_gora``) inserts them into the base model in place, so a model wrapped once
    cannot be estimated or wrapped again: its targets are now adapter layers, not linear ones.
    """
    injected = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if injected:
        name, module = injected[0]
        raise GoraTargetError(
            f"the model already holds {len(injected)} PEFT adapter layers (e.g. {name!r}, a "
            f"{type(module).__module__}.{type(module).__name__}): get_peft_model and apply_gora insert them into the "
            "base model in place. Pass a freshly loaded base model, or take them out first with "
            "base = peft_model.unload() (merge_and_unload() keeps their effect in the weights)."
        )
