"""QGoRA: a GoRA state estimated on the full-precision model, applied to a 4-bit (NF4) base.

W₀ is never written and B depends only on Ḡ and A, so the adapters are those of the bf16/fp32
model; estimation peaks at full-precision memory, training at 4-bit memory::

    state = estimate_gora(bf16_model, lora_config, batches); state.save("state")   # once
    peft_model = load_4bit_and_apply("path/to/model", lora_config, GoraState.load("state"))
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
from peft import LoraConfig, PeftModel

from .errors import GoraUnsupportedError
from .peft_bridge import apply_gora
from .state import GoraState


def quantization_unavailable_reason() -> str | None:
    """Why 4-bit loading cannot run here (``None`` when CUDA and bitsandbytes are both present)."""
    missing = []
    if not torch.cuda.is_available():
        missing.append("no CUDA device is visible")
    if importlib.util.find_spec("bitsandbytes") is None:
        missing.append("the bitsandbytes package is not installed")
    return " and ".join(missing) if missing else None


def load_4bit_and_apply(
    model_path: str,
    lora_config: LoraConfig,
    state: GoraState,
    *,
    model_class: Any = None,
    compute_dtype: torch.dtype = torch.bfloat16,
    prepare_for_training: bool = True,
    **from_pretrained_kwargs: Any,
) -> PeftModel:
    """Load ``model_path`` in 4-bit NF4 (bitsandbytes, double quantisation) and apply ``state``.

    Args:
        model_path: local model directory (or anything ``from_pretrained`` accepts).
        lora_config: the ``LoraConfig`` the state was estimated with.
        state: a ``GoraState`` estimated on the full-precision model.
        model_class: a transformers auto class; default ``AutoModelForCausalLM``.
        compute_dtype: dtype of the 4-bit layers' matmuls.
        prepare_for_training: run ``peft.prepare_model_for_kbit_training`` (fp32 norms, input grads).
        from_pretrained_kwargs: passed on (``device_map`` defaults to ``{"": 0}``).

    Raises:
        GoraUnsupportedError: no CUDA device or no bitsandbytes (the message says what to do).
        GoraStateError: the state does not fit the model.
    """
    reason = quantization_unavailable_reason()
    if reason is not None:
        raise GoraUnsupportedError(
            f"QGoRA loads the base model in 4-bit NF4 with bitsandbytes on a CUDA GPU, but {reason}. "
            "Install bitsandbytes on a machine with a CUDA GPU, or train on the full-precision base with "
            "gora.apply_gora(model, lora_config, state): the adapters are the same."
        )
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype)
    from_pretrained_kwargs.setdefault("device_map", {"": torch.cuda.current_device()})
    from_pretrained_kwargs.setdefault("dtype", compute_dtype)
    model_class = AutoModelForCausalLM if model_class is None else model_class
    model = model_class.from_pretrained(model_path, quantization_config=quantization, **from_pretrained_kwargs)
    if prepare_for_training:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return apply_gora(model, lora_config, state)


__all__ = ["load_4bit_and_apply", "quantization_unavailable_reason"]
