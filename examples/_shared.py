"""Pieces the distributed examples share: a model and a dataset that run anywhere, and an adapter checksum.

Without ``--model``, a tiny random BERT and random token ids (seconds on CPU). With ``--model DIR
--data FILE``, a local checkpoint and a CSV/JSONL/text file read by ``gora.data_files``.
"""

from __future__ import annotations

import argparse
import hashlib

import torch
from torch import nn


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="local model directory (default: a tiny random BERT)")
    parser.add_argument("--data", default=None, help="CSV/JSONL/text file for --model (see `gora init --help`)")
    parser.add_argument("--num-steps", type=int, default=4, help="estimation batches per process (default 4)")
    parser.add_argument("--batch-size", type=int, default=4, help="examples per batch per process (default 4)")
    parser.add_argument("--max-length", type=int, default=64, help="token limit for --data (default 64)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the data order and A (default 0)")


def model_and_dataset(args: argparse.Namespace) -> tuple[nn.Module, list[dict], object, str]:
    """(model, examples, collator, PEFT task type); identical on every process for the same seed."""
    from transformers import default_data_collator, set_seed

    set_seed(args.seed)
    if args.model is None:
        return _tiny_bert(), _random_examples(256, args.seed), default_data_collator, "SEQ_CLS"
    if args.data is None:
        raise SystemExit("--model needs --data (a CSV/JSONL file with text[,label], or a text file).")
    import transformers
    from transformers import AutoTokenizer

    from gora.data_files import PEFT_TASK_TYPES, collator_for, load_text_data, tokenize

    data = load_text_data(args.data)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if data.task == "seq-cls":
        model = transformers.AutoModelForSequenceClassification.from_pretrained(args.model,
                                                                               num_labels=len(data.label_names))
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
    examples = tokenize(data, tokenizer, args.max_length)
    return model.eval(), examples, collator_for(data.task, tokenizer), PEFT_TASK_TYPES[data.task]


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, num_labels=2, max_position_embeddings=64)
    return BertForSequenceClassification(config).eval()


def _random_examples(count: int, seed: int, length: int = 12) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 100, (count, length), generator=generator)
    labels = torch.randint(0, 2, (count,), generator=generator)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(length, dtype=torch.long), "labels": labels[i]}
            for i in range(count)]


def adapter_checksum(model: nn.Module) -> str:
    """SHA-256 over the LoRA weights (full tensors under FSDP2), for comparing processes."""
    digest = hashlib.sha256()
    for name, param in sorted(model.named_parameters()):
        if "lora_" in name:
            tensor = param.full_tensor() if hasattr(param, "full_tensor") else param
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
