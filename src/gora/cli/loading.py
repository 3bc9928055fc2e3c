"""The tokenizer and the base model of a local model directory, as ``gora init`` and ``gora export`` load them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import GoraDataError

MODEL_CLASSES = {"seq-cls": "AutoModelForSequenceClassification", "causal-lm": "AutoModelForCausalLM"}
DTYPES = ("float32", "bfloat16", "float16")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "tokenizer.model",
                   "spiece.model")


def load_tokenizer(model_dir: Path) -> Any:
    """The tokenizer saved in ``model_dir``.

    Raises:
        GoraDataError: ``model_dir`` holds no tokenizer files, or transformers cannot read them.
    """
    from transformers import AutoTokenizer

    hint = f"save one next to the model with tokenizer.save_pretrained('{model_dir}')"
    if not any((model_dir / name).is_file() for name in TOKENIZER_FILES):  # transformers would build an empty one
        raise GoraDataError(f"{model_dir} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); {hint}.")
    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as error:
        raise GoraDataError(f"cannot load the tokenizer in {model_dir} ({error}); {hint}.") from error


def load_model(model_dir: Path, task: str, label_names: list[str], dtype: str, device: Any, seed: int) -> Any:
    """The base model for ``task`` on ``device`` (a torch device or its name, already checked); a new classification
    head is drawn from ``seed`` (the same in init and export)."""
    import torch
    import transformers

    model_class = getattr(transformers, MODEL_CLASSES[task])
    kwargs: dict[str, Any] = {"dtype": getattr(torch, dtype)}
    if task == "seq-cls":
        names = label_names if len(label_names) >= 2 else ["0", "1"]
        kwargs |= {"num_labels": len(names), "id2label": dict(enumerate(names)),
                   "label2id": {name: i for i, name in enumerate(names)},
                   "ignore_mismatched_sizes": True}  # a head for another label count is drawn anew
    transformers.set_seed(seed)
    model = model_class.from_pretrained(str(model_dir), **kwargs)
    if task == "causal-lm" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if task == "seq-cls" and model.config.pad_token_id is None:
        model.config.pad_token_id = 0  # decoders classify at the last non-pad token
    return model.to(device).eval()


__all__ = ["MODEL_CLASSES", "DTYPES", "TOKENIZER_FILES", "load_tokenizer", "load_model"]
