"""``gora init``: GoRA's estimation on a local model with batches from a data file, saved as a GoraState."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..atomic import META_FILE, TENSOR_FILE, check_output_directory
from .checks import (
    check_causal_lm,
    check_max_length,
    check_not_an_input,
    check_positive,
    model_directory,
    parse_targets,
)
from .config_options import gora_config_from
from .loading import load_model, load_tokenizer


def run(args: argparse.Namespace) -> int:
    """Refuse what can be refused cheaply, then load, estimate, save and print the state's summary."""
    from ..data_files import PEFT_TASK_TYPES, load_text_data

    check_positive(num_steps=args.num_steps, batch_size=args.batch_size, max_length=args.max_length, r=args.r)
    gora_config = gora_config_from(args)
    model_dir = model_directory(args.model)
    check_max_length(model_dir, args.max_length)
    from ..devices import check_device

    device = check_device(args.device)  # resolved once ("auto" → cuda or cpu), before anything loads
    check_not_an_input(args.output, model_dir)
    check_output_directory(args.output, (META_FILE, TENSOR_FILE))  # refused now, not after minutes of estimation
    data = load_text_data(args.data, args.task)  # cheap checks first: the heavy imports come after
    if data.task == "causal-lm":
        check_causal_lm(model_dir, args.data, chosen=args.task == "auto")
    lora = {"r": args.r, "lora_alpha": args.alpha, "target_modules": parse_targets(args.targets),
            "task_type": PEFT_TASK_TYPES[data.task]}
    gora_config.extra = {"cli": {"model": str(model_dir.resolve()), "data": str(Path(args.data).resolve()),
                                 "task": data.task, "label_names": data.label_names, "batch_size": args.batch_size,
                                 "max_length": args.max_length, "dtype": args.dtype, "lora_config": lora}}

    from peft import LoraConfig

    from .. import estimate_gora
    from ..batches import batches_needed
    from ..data_files import collator_for, subsample, tokenize
    from ..targets import resolve_targets
    from ..trainer import estimation_batches

    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir, data.task, data.label_names, args.dtype, device, args.seed)
    lora_config = LoraConfig(**lora)
    resolve_targets(model, lora_config)  # targets that match nothing are refused before the data is prepared
    steps = batches_needed(gora_config)
    features = tokenize(subsample(data, steps * args.batch_size, args.seed), tokenizer, args.max_length)
    batches = estimation_batches(features, collator_for(data.task, tokenizer), args.batch_size, steps, args.seed)
    state = estimate_gora(model, lora_config, batches, gora_config=gora_config)
    state.save(args.output)
    print(state.summary())
    print(f"saved GoRA state to {args.output} ({state.estimation_seconds:.1f}s of estimation)")
    return 0


__all__ = ["run"]
