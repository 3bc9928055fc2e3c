"""The layers GoRA adapts, found by PEFT's matching rules, each with its weight's orientation.

Names are relative to the unwrapped base model (``model.layers.3.self_attn.q_proj``), the
keys PEFT itself uses. Matching follows PEFT's rules, never substrings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import cast

import torch
from peft import LoraConfig
from torch import nn
from torch.nn.utils import parametrize
from transformers.pytorch_utils import Conv1D

from .errors import GoraTargetError, GoraUnsupportedError
from .peft_compat import expanded_lora_config, is_target, refuse_adapter_layers

logger = logging.getLogger(__name__)

_QUANTISED_HINTS = ("4bit", "8bit", "Quant", "GPTQ", "AWQ", "HQQ", "FP8")
_PLAIN_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


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
        return cast(nn.Parameter, self.module.weight)

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
    """A module whose weight is stored quantised (bitsandbytes, GPTQ, AWQ, HQQ, FP8, ...).

    A weight that is a plain ``nn.Parameter`` (or tensor) in fp32/bf16/fp16/fp64 is never quantised, whatever the
    module's class is called: torch's ``NonDynamicallyQuantizableLinear`` (the ``out_proj`` of every
    ``nn.MultiheadAttention``) is an ``nn.Linear``. bitsandbytes' ``Params4bit``/``Int8Params`` are Parameter
    subclasses, and GPTQ/AWQ layers hold no float ``weight``: those are recognised by dtype and by name.
    """
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        if type(weight) in (nn.Parameter, torch.Tensor) and weight.dtype in _PLAIN_DTYPES:
            return False
        if not torch.is_floating_point(weight) or weight.dtype not in _PLAIN_DTYPES:
            return True  # int8/uint8 storage, FP8
    names = (type(module).__name__, type(weight).__name__)
    return (any(hint in name for hint in _QUANTISED_HINTS for name in names) or names[1].startswith("Params")
            or ".quantized." in type(module).__module__)  # torch.ao.nn.quantized: weight() is a method


def _has_computed_weight(module: nn.Module) -> bool:
    """``module.weight`` is computed, not the module's own Parameter: ``torch.nn.utils.parametrize`` (reading the
    attribute runs the parametrization), or a linear layer under the old ``weight_norm``/``spectral_norm`` hooks.
    Gradient hooks need the leaf Parameter itself."""
    if parametrize.is_parametrized(module, "weight"):
        return True
    own = dict(module.named_parameters(recurse=False)).get("weight")
    return isinstance(module, (nn.Linear, Conv1D)) and not isinstance(own, nn.Parameter)


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
        GoraUnsupportedError: a matched module is quantised, has a parametrized weight, or is of an unknown type.

    Left out (in the dict): embeddings, a head tied to the input embeddings, the ``out_proj`` of an
    ``nn.MultiheadAttention`` (its forward never calls it, so an adapter there would not run), and a layer whose
    weight Parameter is shared with a target earlier by name (that one's gradient covers both uses).
    """
    base = unwrap_model(model)
    refuse_adapter_layers(base)
    config = expanded_lora_config(base, lora_config)
    tied = tied_weight_ids(base)
    # nn.MultiheadAttention applies out_proj through F.multi_head_attention_forward with out_proj.weight itself,
    # never by calling the module: an adapter that PEFT wraps around it would never run
    inside_attention = {id(m.out_proj) for m in base.modules() if isinstance(m, nn.MultiheadAttention)}
    targets: list[TargetLayer] = []
    skipped: dict[str, str] = {}
    for name, module in base.named_modules():
        if not name or not is_target(config, name):
            continue
        if _has_computed_weight(module):  # first: reading such a weight runs the parametrization
            raise GoraUnsupportedError(
                f"module {name!r} ({type(module).__name__}) has a parametrized weight (torch.nn.utils.parametrize, "
                "weight_norm or spectral_norm): it is recomputed in every forward, not a Parameter GoRA can collect "
                "the gradient of. Remove the parametrization before estimating (torch.nn.utils.parametrize."
                "remove_parametrizations(module, 'weight'), or torch.nn.utils.remove_weight_norm for the old "
                "weight_norm), or leave the layer out (exclude_modules)."
            )
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
        if id(module) in inside_attention:
            skipped[name] = "out_proj of an nn.MultiheadAttention, which never calls it: a LoRA adapter would not run"
            logger.warning("%r is the out_proj of an nn.MultiheadAttention, whose forward uses its weight directly "
                           "(F.multi_head_attention_forward), so a LoRA adapter on it would never run: left out.", name)
            continue
        if not isinstance(module, (nn.Linear, Conv1D)):
            if len(list(module.children())) > 0:
                continue  # a container whose name matched; PEFT would refuse it too, its children may match
            _describe(module, name)  # raises with a clear message
        targets.append(_describe(module, name))
    if not targets:
        raise GoraTargetError(_nothing_matched_message(base, lora_config, skipped))
    targets.sort(key=lambda t: t.name)
    return _without_shared_weights(targets, skipped), skipped


def _without_shared_weights(targets: list[TargetLayer], skipped: dict[str, str]) -> list[TargetLayer]:
    """Keep the first target (by name) of each weight Parameter; later ones that share it go into ``skipped``.

    The gradient of a shared Parameter is one tensor that sums every use: the first layer's Ḡ covers all of
    them, and a second hook on the same Parameter would see no gradient.
    """
    owners: dict[int, str] = {}
    kept = []
    for target in targets:
        owner = owners.setdefault(id(target.weight), target.name)
        if owner == target.name:
            kept.append(target)
            continue
        skipped[target.name] = f"shares its weight with {owner!r}"
        logger.warning("target %r shares its weight Parameter with %r: only %r is estimated and adapted, and its "
                       "gradient covers both uses of the weight.", target.name, owner, owner)
    return kept


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
