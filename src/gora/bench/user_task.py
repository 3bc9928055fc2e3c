"""A user's own classification task from CSV or JSONL files.

Files hold a ``text`` column, an optional ``text_pair`` column and a ``label`` column (class names or integers).
The user supplies train and test files; validation is carved from train with ``split_seed`` (never from test).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from gora.bench.tasks import TaskData, encode_labels, split_random, subsample
from gora.errors import GoraConfigError, GoraDataError

_READERS = {
    ".csv": lambda p: pd.read_csv(p, dtype=str, keep_default_na=False),  # labels like "true" stay strings
    ".jsonl": lambda p: pd.read_json(p, lines=True),
}


def _suffix(path: Path) -> str:
    suffixes = [s for s in path.suffixes if s not in (".gz", ".bz2", ".xz")]
    return suffixes[-1].lower() if suffixes else ""


def supported_table(path: str | os.PathLike) -> bool:
    """Whether :func:`read_table` reads files of this type (``.csv`` / ``.jsonl``, optionally compressed)."""
    return _suffix(Path(path)) in _READERS


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read a ``.csv`` or ``.jsonl`` file (optionally compressed) and check its columns."""
    path = Path(path)
    reader = _READERS.get(_suffix(path))
    if reader is None:
        raise GoraConfigError(f"{path}: unsupported file type; use .csv or .jsonl (optionally .gz) files.")
    df = reader(path)
    missing = {"text", "label"} - set(df.columns)
    if missing:
        raise GoraDataError(f"{path} lacks column(s) {sorted(missing)}; it has {list(df.columns)}. "
                         "Name the columns text, label and optionally text_pair.")
    keep = [c for c in ("text", "text_pair", "label") if c in df.columns]
    return df[keep].astype(str)


def _is_integer(labels: pd.Series) -> bool:
    return bool(labels.str.fullmatch(r"\d+").all())


def label_names_for(train: pd.DataFrame, test: pd.DataFrame) -> tuple[str, ...]:
    """Class names: ``"0".."max"`` when every label is a non-negative integer, else the sorted names seen in train.

    Raises:
        GoraDataError: test labels never seen in train (string labels only).
    """
    labels = pd.concat([train["label"], test["label"]])
    if _is_integer(labels):
        return tuple(str(i) for i in range(labels.astype(int).max() + 1))
    names = tuple(sorted(train["label"].unique()))
    unseen = sorted(set(test["label"]) - set(names))
    if unseen:
        raise GoraDataError(f"Test labels {unseen} never occur in the training file; the classifier cannot learn them.")
    return names


def canonical_labels(df: pd.DataFrame, names: tuple[str, ...]) -> pd.DataFrame:
    """Integer labels written as "007" become "7", matching ``names``; class names are left alone."""
    if names and names[0] == "0" and _is_integer(df["label"]):
        return df.assign(label=df["label"].astype(int).astype(str))
    return df


def load_user_task(
    train_path: str | os.PathLike,
    test_path: str | os.PathLike,
    *,
    name: str = "user",
    split_seed: int = 0,
    val_fraction: float = 0.1,
    max_train: int | None = None,
    max_val: int | None = None,
    max_test: int | None = None,
) -> TaskData:
    """Load a user task: its own train and test files, validation carved from train."""
    train, test = read_table(train_path), read_table(test_path)
    if ("text_pair" in train.columns) != ("text_pair" in test.columns):
        raise GoraDataError("Either both files have a text_pair column or neither does.")
    names = label_names_for(train, test)
    train, test = canonical_labels(train, names), canonical_labels(test, names)
    train, val = split_random(train, val_fraction, np.random.default_rng(split_seed))
    frames = [
        subsample(train, max_train, split_seed),
        subsample(val, max_val, split_seed + 1),
        subsample(test, max_test, split_seed + 2),
    ]
    train, val, test = encode_labels(frames, names)
    return TaskData(name, train, val, test, names, split_seed)
