"""Estimation data from a file: CSV / JSONL with ``text`` [``text_pair``] [``label``], or plain text.

Used by ``gora init`` and the examples. Reading needs only the standard library; tokenisation
takes any Hugging Face tokenizer. A file with a ``label`` column is a classification task
(``"seq-cls"``); plain text (one document per line) or records without labels are causal
language modelling (``"causal-lm"``).
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import GoraDataError

TASKS = ("seq-cls", "causal-lm")
PEFT_TASK_TYPES = {"seq-cls": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}
TEXT_SUFFIXES = (".txt", ".text", ".md")


@dataclass
class TextData:
    """Records read from a file, with the task they imply and the class names (classification)."""

    records: list[dict[str, Any]]
    task: str
    label_names: list[str]

    @property
    def is_pair(self) -> bool:
        return bool(self.records) and "text_pair" in self.records[0]


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``.csv``/``.tsv``, ``.jsonl``/``.json`` or plain-text file (one ``{"text": line}`` per line)."""
    path = Path(path)
    if not path.is_file():
        raise GoraDataError(f"data file {path} does not exist; pass a CSV or JSONL file with a 'text' column "
                            "(and 'label' for classification), or a plain text file for a causal LM.")
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8", newline="") as handle:
        if suffix in (".csv", ".tsv"):
            records = [dict(row) for row in csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")]
        elif suffix in (".jsonl", ".json"):
            records = [_json_line(line, path, number) for number, line in enumerate(handle, 1) if line.strip()]
        else:
            records = [{"text": line.rstrip("\n")} for line in handle if line.strip()]
    if not records:
        raise GoraDataError(f"data file {path} holds no examples.")
    if "text" not in records[0]:
        raise GoraDataError(f"data file {path} has columns {sorted(records[0])} but no 'text'; "
                            "name the input column 'text' (and 'text_pair', 'label' where they exist).")
    return records


def _json_line(line: str, path: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise GoraDataError(f"{path} line {number} is not valid JSON ({error}); JSONL needs one object per line.")
    if not isinstance(record, dict):
        raise GoraDataError(f"{path} line {number} is a {type(record).__name__}; each line must be a JSON object.")
    return record


def load_text_data(path: str | Path, task: str = "auto") -> TextData:
    """Read ``path`` and decide the task: ``seq-cls`` when a ``label`` column exists, else ``causal-lm``."""
    records = read_records(path)
    if task == "auto":
        task = "seq-cls" if "label" in records[0] else "causal-lm"
    if task not in TASKS:
        raise GoraDataError(f"task {task!r} is not known; choose auto, {', '.join(TASKS)}.")
    if task == "causal-lm":
        return TextData(records, task, [])
    if "label" not in records[0]:
        raise GoraDataError(f"task seq-cls needs a 'label' column in {path}; it has {sorted(records[0])}.")
    return TextData(records, task, label_names(records))


def label_names(records: list[dict[str, Any]]) -> list[str]:
    """Class names in id order: integer labels 0..K-1 keep their ids; other labels are sorted names."""
    values = [str(r["label"]).strip() for r in records]
    if all(v.lstrip("-").isdigit() for v in values):
        ids = sorted({int(v) for v in values})
        if ids[0] < 0:
            raise GoraDataError(f"labels must be >= 0 or class names, got {ids[0]}.")
        return [str(i) for i in range(ids[-1] + 1)]
    return sorted(set(values))


def subsample(data: TextData, count: int, seed: int) -> TextData:
    """At most ``count`` records, drawn with a seeded shuffle, so only what estimation uses is tokenised.

    Class names stay those of the whole file, so label ids do not depend on the sample.
    """
    if len(data.records) <= count:
        return data
    chosen = sorted(random.Random(seed).sample(range(len(data.records)), count))
    return replace(data, records=[data.records[i] for i in chosen])


def tokenize(data: TextData, tokenizer: Any, max_length: int) -> list[dict[str, Any]]:
    """One feature dict per record (``input_ids``, ``attention_mask`` [, ``labels``]); padding is the collator's job."""
    texts = [str(r["text"]) for r in data.records]
    pairs = [str(r.get("text_pair", "")) for r in data.records] if data.is_pair else None
    encoded = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    features = [{k: encoded[k][i] for k in keys} for i in range(len(texts))]
    if data.task == "seq-cls":
        index = {name: i for i, name in enumerate(data.label_names)}
        for feature, record in zip(features, data.records):
            feature["labels"] = index[str(record["label"]).strip()]
    return features


def collator_for(task: str, tokenizer: Any):
    """Dynamic padding; causal LM labels = input ids with padding masked (-100)."""
    from transformers import DataCollatorForLanguageModeling, DataCollatorWithPadding

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise GoraDataError("the tokenizer has neither a pad nor an eos token; set tokenizer.pad_token.")
        tokenizer.pad_token = tokenizer.eos_token
    if task == "causal-lm":
        return DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return DataCollatorWithPadding(tokenizer)


__all__ = ["TextData", "read_records", "load_text_data", "label_names", "subsample", "tokenize", "collator_for",
           "TASKS"]
