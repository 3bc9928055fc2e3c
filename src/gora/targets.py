"""Which layers GoRA adapts, and how their weights are laid out.

Names are relative to the unwrapped base model (``model.layers.3.self_attn.q_proj``), the
keys PEFT itself uses. Matching follows PEFT's rules, never substrings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import GoraTargetError, GoraUnsupportedError
from .peft_compat import expanded_lora_config, is_target, refuse_adapter_layers

_QUANTISED_HINTS = ("4bit", "8bit", "Quant", "GPTQ", "AWQ", "HQQ", "FP8")


@dataclass(frozen=True)
class TargetLayer:
    """One adaptable layer. ``weight`` is (out, in) for Linear, (in, out) for GPT-2's Conv1D."""

    name: str
    module: nn.Module
    in_features: int
    out_features: int
    transposed: bool  # Conv1D stores its weight in × out

    @property
    def weight(self) -> nn.Parameter:
        return self.module.weight

    @property
    def shape(self) -> tuple[int, int]:
        """(out, in): the PEFT/PyTorch orientation used by every maths function."""
        return (self.out_features, self.in_features)

    def weight_out_in(self) -> torch.Tensor:
        """The weight as (out, in), a view (no copy)."""
        return self.weight.t() if self.transposed else self.weight


def unwrap_model(model: nn.Module) -> nn.Module:
    """The base model under a PeftModel / DDP / FSDP / Accelerate wrapper."""
    if hasattr(model, "get_base_model") and callable(model.get_base_model):
        return model.get_base_model()
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


def _describe(module: nn.Module, name: str) -> TargetLayer:
    if isinstance(module, Conv1D):
        in_features, out_features = module.weight.shape
        return TargetLayer(name, module, in_features, out_features, transposed=True)
    if isinstance(module, nn.Linear):
        return TargetLayer(name, module, module.in_features, module.out_features, transposed=False)
    raise GoraUnsupportedError(
        f"module {name!r} is a {type(module).__name__}; GoRA adapts nn.Linear and transformers' Conv1D only. "
        "Remove it from target_modules (or use exclude_modules)."
    )


def _is_quantised(module: nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    if weight is not None and not torch.is_floating_point(weight):
        return True
    return any(hint in type(module).__name__ for hint in _QUANTISED_HINTS) or type(weight).__name__.startswith("Params")


def tied_weight_ids(model: nn.Module) -> set[int]:
    """ids of parameters shared with the input embeddings (a tied LM head must never be adapted)."""
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if get_embeddings is None:
        return set()
    try:
        embeddings = get_embeddings()
    except (NotImplementedError, AttributeError):
        return set()
    weight = getattr(embeddings, "weight", None)
    return {id(weight)} if weight is not None else set()


def resolve_targets(model: nn.Module, lora_config: LoraConfig) -> tuple[list[TargetLayer], dict[str, str]]:
    """Target layers sorted by name, and ``{name: reason}`` for matched modules left out.

    Raises:
        GoraTargetError: nothing matched (the message lists the linear layers that exist), or the model already
            holds PEFT adapter layers.
        GoraUnsupportedError: a matched module is quantised or of an unknown type.
    """
    base = unwrap_model(model)
    refuse_adapter_layers(base)
    config = expanded_lora_config(base, lora_config)
    tied = tied_weight_ids(base)
    targets: list[TargetLayer] = []
    skipped: dict[str, str] = {}
    for name, module in base.named_modules():
        if not name or not is_target(config, name):
            continue
        if _is_quantised(module):
            raise GoraUnsupportedError(
                f"module {name!r} ({type(module).__name__}) is quantised; estimate on the full-precision model, "
                "save the GoraState, then apply_gora to the quantised model (QGoRA)."
            )
        if isinstance(module, nn.Embedding):
            skipped[name] = "embedding"
            continue
        if id(getattr(module, "weight", None)) in tied:
            skipped[name] = "tied to the input embeddings"
            continue
        if not isinstance(module, (nn.Linear, Conv1D)):
            if len(list(module.children())) > 0:
                continue  # a container whose name matched; PEFT would refuse it too, its children may match
            _describe(module, name)  # raises with a clear message
        targets.append(_describe(module, name))
    if not targets:
        raise GoraTargetError(_nothing_matched_message(base, lora_config, skipped))
    targets.sort(key=lambda t: t.name)
    return targets, skipped


def linear_layer_names(model: nn.Module) -> list[str]:
    return [n for n, m in unwrap_model(model).named_modules() if isinstance(m, (nn.Linear, Conv1D))]


def _nothing_matched_message(base: nn.Module, lora_config: LoraConfig, skipped: dict[str, str]) -> str:
    names = linear_layer_names(base)
    shown = ", ".join(repr(n) for n in names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
    extra = f" (left out: {skipped})" if skipped else ""
    return (
        f"target_modules={lora_config.target_modules!r} matched no adaptable layer{extra}. "
        f"Linear layers in this model include {shown or 'none'}; pass exact names or dotted suffixes "
        "(e.g. 'query'), a regex string, or 'all-linear'."
    )
