"""``gora export``: a PEFT adapter (portable, uniform-rank or native) or a merged model written from a base model and
a GoraState or trained adapter."""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

from ..atomic import ADAPTER_CONFIG, ADAPTER_WEIGHTS, META_FILE, SIDECAR_FILE, atomic_directory, check_output_directory
from ..errors import GoraConfigError, GoraDataError, GoraStateError
from .checks import check_not_an_input, model_directory
from .loading import TOKENIZER_FILES, load_tokenizer
from .sources import model_from_adapter, model_from_state

logger = logging.getLogger("gora.cli")  # the command's logger, as its warnings have always been signed
SHARD_NAME = re.compile(r"model-\d+-of-\d+\.safetensors")


def run(args: argparse.Namespace) -> int:
    """Refuse a busy or clashing output before loading, then write the adapter or merged model."""
    if args.pad_to_max_rank and args.form != "portable":
        raise GoraConfigError(f"--pad-to-max-rank pads the portable adapter; it does not apply to --{args.form}. "
                              "Drop one of the two.")
    source = Path(args.source)
    model_dir = model_directory(args.model)
    check_not_an_input(args.output, model_dir, source)
    check_output_directory(args.output, export_names(args.form, model_dir, Path(args.output)))  # before loading
    if (source / META_FILE).is_file():
        peft_model, state, task = model_from_state(model_dir, source, args)
    elif (source / ADAPTER_CONFIG).is_file():
        peft_model, state, task = model_from_adapter(model_dir, source, args)
    else:
        raise GoraStateError(f"{source} holds neither {META_FILE} (a state from gora init) nor {ADAPTER_CONFIG} "
                             "(a PEFT adapter); pass one of those directories.")
    if args.form == "merged":
        merged = peft_model.merge_and_unload()
        with atomic_directory(args.output) as tmp:  # a previous merged export is replaced; other content refused
            merged.save_pretrained(str(tmp))
            _save_tokenizer(model_dir, str(tmp))
        print(f"wrote merged {task} model to {args.output}")
        return 0
    from ..export import export_adapter, lora_layers
    from ..serving import serving_hint

    export_adapter(peft_model, args.output, portable=args.form == "portable", pad_to_max_rank=args.pad_to_max_rank,
                   state=state)

    form = "uniform-rank portable" if args.pad_to_max_rank else args.form
    print(f"wrote {form} adapter to {args.output}; {serving_hint(max(r for r, _ in lora_layers(peft_model).values()))}")
    return 0


def export_names(form: str, model_dir: Path, output: Path) -> set[str]:
    """What an export of this form may write, so that a directory holding anything else is refused before the model
    loads. Generous for a merged model (its weights' and tokenizer's file names depend on the model): the exact check
    runs again when the export is written."""
    if form != "merged":
        return {ADAPTER_CONFIG, ADAPTER_WEIGHTS, SIDECAR_FILE, "README.md"}
    names = {"config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
             "special_tokens_map.json", "added_tokens.json", "merges.txt", "chat_template.jinja", *TOKENIZER_FILES}
    names |= {entry.name for entry in model_dir.iterdir()}  # the tokenizer's files keep the base model's names
    if output.is_dir():  # shards of a previous merged export
        names |= {entry.name for entry in output.iterdir() if SHARD_NAME.fullmatch(entry.name)}
    return names


def _save_tokenizer(model_dir: Path, output: str) -> None:
    """Copy the base model's tokenizer next to a merged model (skipped, with a warning, if it has none)."""
    try:
        load_tokenizer(model_dir).save_pretrained(output)
    except GoraDataError as error:
        logger.warning("merged model written without a tokenizer: %s", error)


__all__ = ["run", "export_names"]
