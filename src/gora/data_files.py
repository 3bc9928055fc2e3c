"""Estimation data from a file: CSV / JSONL with ``text`` [``text_pair``] [``label``], or plain text.

Used by ``gora init`` and the examples. Reading needs only the standard library; tokenisation
takes any Hugging Face tokenizer. A file with a ``label`` column is a classification task
(``"seq-cls"``); plain text (one document per line) or records without labels are causal
language modelling (``"causal-lm"``).
"""

from __future__ import annotations

import csv
import json
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .errors import GoraDataError

logger = logging.getLogger(__name__)

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
    """Rows of a ``.csv``/``.tsv``, ``.jsonl``/``.json`` or plain-text file (one ``{"text": line}`` per line).

    Every row must have a ``text``. The file must be UTF-8 (a byte-order mark is accepted).
    """
    return [record for _, record in _numbered_records(Path(path))]


def _numbered_records(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` per example, each checked for a ``text``; line numbers are the file's."""
    if not path.is_file():
        raise GoraDataError(f"data file {path} does not exist; pass a CSV or JSONL file with a 'text' column "
                            "(and 'label' for classification), or a plain text file for a causal LM.")
    try:
        numbered = _parse(path)
    except UnicodeDecodeError as error:
        raise GoraDataError(f"data file {path} is not UTF-8 text ({error.encoding}: {error.reason}); "
                            "save it as UTF-8 (in a spreadsheet: 'CSV UTF-8') and retry.") from None
    if not numbered:
        raise GoraDataError(f"data file {path} holds no examples{_what_it_held(path)}; it must hold "
                            f"{_EXPECTED.get(path.suffix.lower(), _EXPECTED['.txt'])}.")
    first = numbered[0][1]
    if "text" not in first:
        raise GoraDataError(f"data file {path} has columns {_columns(first)} but no 'text'; "
                            "name the input column 'text' (and 'text_pair', 'label' where they exist).")
    for number, record in numbered:
        _check_present(record, "text", path, number)
    return numbered


_EXPECTED = {
    ".csv": "a header line naming a 'text' column (and 'label' for classification) and at least one row below it",
    ".jsonl": "one JSON object per line with a 'text' key (and 'label' for classification)",
    ".txt": "at least one non-blank line (one document per line, for a causal LM)",
}
_EXPECTED[".tsv"], _EXPECTED[".json"] = _EXPECTED[".csv"].replace("a header line", "a tab-separated header line"), \
    _EXPECTED[".jsonl"]


def _what_it_held(path: Path) -> str:
    """`` (only a header line)`` or `` (it is empty)`` for a data file without examples."""
    text = path.read_text(encoding="utf-8-sig")
    if not text.strip():
        return " (it is empty)"
    if path.suffix.lower() in (".csv", ".tsv"):
        return " (only a header line)"
    return ""


def _parse(path: Path) -> list[tuple[int, dict[str, Any]]]:
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8-sig", newline="") as handle:
        if suffix in (".csv", ".tsv"):
            reader = csv.DictReader(handle, delimiter="\t" if suffix == ".tsv" else ",")
            return [(reader.line_num, dict(row)) for row in reader]  # line_num: the line the row ends on
        if suffix in (".jsonl", ".json"):
            return [(number, _json_line(line, path, number)) for number, line in enumerate(handle, 1) if line.strip()]
        return [(number, {"text": line.rstrip("\n")}) for number, line in enumerate(handle, 1) if line.strip()]


def _columns(record: dict[str, Any]) -> list[str]:
    """Column names for a message (a CSV row longer than its header has an extra ``None`` key)."""
    return sorted(str(key) for key in record)


def _check_present(record: dict[str, Any], key: str, path: Path, number: int) -> None:
    """Refuse a row whose ``key`` is absent, null, or (``label``) a blank cell, naming the file and line."""
    value = record.get(key)
    if key not in record:
        problem = f"has no {key!r} (it has {_columns(record)})"
    elif value is None:
        problem = f"has no {key!r} value"
    elif key == "label" and isinstance(value, str) and not value.strip():
        problem = f"has an empty {key!r}"
    else:
        return
    raise GoraDataError(f"{path} line {number} {problem}; fill in its {key!r} or drop the row.")


def _json_line(line: str, path: Path, number: int) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise GoraDataError(f"{path} line {number} is not valid JSON ({error}); "
                            "JSONL needs one object per line.") from None
    if not isinstance(record, dict):
        raise GoraDataError(f"{path} line {number} is a {type(record).__name__}; each line must be a JSON object.")
    return record


def load_text_data(path: str | Path, task: str = "auto") -> TextData:
    """Read ``path`` and decide the task: ``seq-cls`` when a ``label`` column exists, else ``causal-lm``.

    The task ``auto`` picks is logged with its reason; a ``labels`` column (the Hugging Face name) without
    ``label`` is warned about, since it makes the file causal-lm text. Classification needs a label on every row.
    """
    path = Path(path)
    numbered = _numbered_records(path)
    records = [record for _, record in numbered]
    if task == "auto":
        task = _auto_task(records, path)
    if task not in TASKS:
        raise GoraDataError(f"task {task!r} is not known; choose auto, {', '.join(TASKS)}.")
    if task == "causal-lm":
        return TextData(records, task, [])
    if not any("label" in record for record in records):
        hint = " (rename its 'labels' column to 'label')" if any("labels" in r for r in records) else ""
        raise GoraDataError(f"task seq-cls needs a 'label' column in {path}{hint}; it has {_columns(records[0])}.")
    for number, record in numbered:
        _check_present(record, "label", path, number)
    return TextData(records, task, label_names(records))


def _auto_task(records: list[dict[str, Any]], path: Path) -> str:
    """``seq-cls`` when any record has a ``label``, else ``causal-lm``; the choice and its reason are logged."""
    if any("label" in record for record in records):
        logger.info("data file %s has a 'label' column: task seq-cls (sequence classification)", path)
        return "seq-cls"
    if any("labels" in record for record in records):
        logger.warning("data file %s has a 'labels' column but no 'label': it is read as causal-lm text and the "
                       "'labels' are ignored; rename the column to 'label' for classification, or pass the task "
                       "explicitly (gora init --task causal-lm) to keep causal-lm.", path)
    else:
        logger.info("data file %s has no 'label' column: task causal-lm (next-token loss)", path)
    return "causal-lm"


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
