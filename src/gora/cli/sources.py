"""What ``gora export`` starts from: the base model with a GoraState applied, or with a trained adapter loaded, as a
PEFT model (with the state, if any, and the task of its head)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..atomic import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from ..errors import GoraStateError
from .loading import load_model

PEFT_TO_TASK = {"SEQ_CLS": "seq-cls", "CAUSAL_LM": "causal-lm"}


def model_from_state(model_dir: Path, source: Path, args: argparse.Namespace) -> tuple[Any, Any, str]:
    """The model in ``model_dir`` with the GoraState in ``source`` applied: (PEFT model, state, task)."""
    from peft import LoraConfig

    from .. import GoraState, apply_gora

    state = GoraState.load(source)
    info = dict(state.config.get("extra", {}).get("cli", {}))  # what gora init noted; nothing for an API state
    task = args.task if args.task != "auto" else info.get("task", "causal-lm")
    names = info.get("label_names") or [str(i) for i in range(args.num_labels or 2)]
    if args.num_labels and len(names) != args.num_labels:
        names = [str(i) for i in range(args.num_labels)]
    model = load_model(model_dir, task, names, args.dtype, "cpu", state.seed)
    saved = info.get("lora_config", {})
    lora_config = LoraConfig(r=state.reference_rank, lora_alpha=state.lora_alpha,  # type: ignore[arg-type]
                             target_modules=state.adapted,
                             task_type=saved.get("task_type", {"seq-cls": "SEQ_CLS"}.get(task, "CAUSAL_LM")))
    return apply_gora(model, lora_config, state, gamma=args.gamma), state, task


def model_from_adapter(model_dir: Path, source: Path, args: argparse.Namespace) -> tuple[Any, None, str]:
    """The model in ``model_dir`` with the PEFT adapter in ``source`` loaded: (PEFT model, ``None``, task)."""
    from peft import PeftModel

    adapter = _read_adapter_config(source)
    task = args.task if args.task != "auto" else PEFT_TO_TASK.get(str(adapter.get("task_type")), "causal-lm")
    labels = args.num_labels or (_saved_head_classes(source, adapter) if task == "seq-cls" else None) or 2
    model = load_model(model_dir, task, [str(i) for i in range(labels)], args.dtype, "cpu", 0)
    try:
        return PeftModel.from_pretrained(model, str(source)), None, task
    except RuntimeError as error:  # torch's load_state_dict: "size mismatch for ..."
        if "size mismatch" not in str(error):
            raise _damaged_adapter(source, error) from error
        raise GoraStateError(
            f"the adapter in {source} does not fit the model in {model_dir}: {str(error).strip().splitlines()[-1]} "
            f"Pass the base model it was trained on{' and --num-labels N for its head' if task == 'seq-cls' else ''}."
        ) from error
    except Exception as error:  # a damaged adapter fails deep inside PEFT or safetensors, with any exception type
        raise _damaged_adapter(source, error) from error


def _read_adapter_config(source: Path) -> dict[str, Any]:
    try:
        adapter = json.loads((source / ADAPTER_CONFIG).read_bytes())
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as error:
        raise _damaged_adapter(source, error) from None
    if not isinstance(adapter, dict):
        raise _damaged_adapter(source, ValueError(f"{ADAPTER_CONFIG} holds a {type(adapter).__name__}, not an object"))
    return adapter


def _damaged_adapter(source: Path, error: BaseException) -> GoraStateError:
    return GoraStateError(f"cannot load the adapter in {source} ({type(error).__name__}: {error}); its "
                          f"{ADAPTER_CONFIG} or {ADAPTER_WEIGHTS} is damaged, or it is not a LoRA adapter. Save or "
                          "export the adapter again (peft_model.save_pretrained, or gora export).")


def _saved_head_classes(source: Path, adapter: dict[str, Any]) -> int | None:
    """Classes of the classification head saved with the adapter (its ``modules_to_save``), or ``None``."""
    from safetensors import safe_open

    weights = source / ADAPTER_WEIGHTS
    heads = tuple(f"{name}{part}.weight" for name in adapter.get("modules_to_save") or () for part in ("", ".out_proj"))
    if not heads or not weights.is_file():
        return None
    try:
        with safe_open(str(weights), "pt") as handle:
            for key in handle.keys():
                shape = handle.get_slice(key).get_shape()
                if key.endswith(heads) and len(shape) == 2:
                    return int(shape[0])
    except Exception as error:  # safetensors' own error type for a truncated file
        raise _damaged_adapter(source, error) from error
    return None


__all__ = ["PEFT_TO_TASK", "model_from_state", "model_from_adapter"]
