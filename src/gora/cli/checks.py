"""The refusals that come before anything heavy loads: the command's numbers and paths, and what the model
directory's config.json says about the model."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import GoraConfigError, GoraDataError, GoraStateError


def check_positive(**values: int) -> None:
    """Refuse a value below 1, named as its option (``max_length`` → ``--max-length``)."""
    for name, value in values.items():
        if value < 1:
            raise GoraConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}.")


def parse_targets(text: str) -> list[str] | str:
    """``--targets``: comma-separated module names, or ``"all-linear"``."""
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise GoraConfigError("--targets is empty; pass module names like query,value or 'all-linear'.")
    return "all-linear" if names == ["all-linear"] else names


def model_directory(path: str) -> Path:
    """``path`` as a model directory: one with a config.json (gora never downloads)."""
    directory = Path(path)
    if not (directory / "config.json").is_file():
        raise GoraDataError(f"{directory} is not a model directory (no config.json); pass a local directory "
                            "written by save_pretrained. gora never downloads models.")
    return directory


def check_not_an_input(output: str, model_dir: Path, source: Path | None = None) -> None:
    """Refuse an output that is the base model's directory or the source being exported."""
    resolved = Path(output).resolve()
    for role, path in (("the base model's", model_dir), ("the source", source)):
        if path is not None and resolved == path.resolve():
            raise GoraStateError(f"-o {output} is {role} directory; write to another directory.")


def check_max_length(model_dir: Path, max_length: int) -> None:
    """Refuse --max-length beyond a learned position table (BERT, GPT-2): else a tensor-size error deep inside."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise GoraDataError(f"{model_dir / 'config.json'} cannot be read ({error}).") from error
    if any(key.startswith("rope") for key in config):
        return  # rotary positions: no table to run past
    positions = config.get("max_position_embeddings", config.get("n_positions"))
    if isinstance(positions, int) and max_length > positions:
        raise GoraConfigError(f"--max-length {max_length} exceeds the {positions} positions of the model in "
                              f"{model_dir}; pass --max-length {positions} or less.")


def check_causal_lm(model_dir: Path, data: str, chosen: bool) -> None:
    """Refuse causal-LM estimation on a checkpoint that is no causal LM (MiniLM, a BERT classifier): transformers
    would add a newly initialised LM head, and the gradients through it say nothing about the task."""
    try:
        architectures = json.loads((model_dir / "config.json").read_text()).get("architectures")
    except (OSError, ValueError, AttributeError):
        return  # check_max_length reports an unreadable config
    if not isinstance(architectures, list) or not architectures:
        return  # nothing recorded: transformers decides
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if any(name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for name in architectures):
        return
    why = f"{data} has no 'label' column, so it is read as causal-LM text" if chosen else "--task causal-lm was given"
    raise GoraDataError(
        f"{why}, but {model_dir} holds a {'/'.join(map(str, architectures))}, not a causal language model: its LM head "
        "would be newly initialised and the gradients through it meaningless. For classification, add a 'label' "
        "column to the data file (the classification path reads the class from it); for a causal LM, pass a model "
        "saved as a ...ForCausalLM.")


__all__ = ["check_positive", "parse_targets", "model_directory", "check_not_an_input", "check_max_length",
           "check_causal_lm"]
