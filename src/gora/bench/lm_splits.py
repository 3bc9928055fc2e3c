"""A causal-LM task's splits, encoded for the model once per grid, with what validation and test measure on them.

:class:`GsmTask` (``gsm_symbolic``) reports the answer loss, and on test runs the exact match of greedy answers;
:class:`LabelWordClassification` (the ``*_lm`` classification tasks) reports the accuracy of the most likely label
word and the answer loss of the true ones. Both hold ``train`` (labelled examples for the training loop), ``info``
(the record's data fields), ``metric``, ``name`` and ``split_seed``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from gora.bench.exact_match import generate_answers, score_outputs
from gora.bench.gsm_symbolic import GSM_TASK, gsm_dataset, split_items
from gora.bench.lm_format import encode_example, fitted_prompt, labelled, text_ids
from gora.bench.lm_scoring import answer_loss, label_log_likelihoods
from gora.bench.lm_tasks import LABEL_WORD_TASKS, LMConfig
from gora.bench.records import Record
from gora.bench.train import top_class_share
from gora.errors import GoraConfigError, GoraDataError


@dataclass
class Evaluation:
    """What a task's evaluation needs besides the model."""

    tokenizer: Any
    device: torch.device
    autocast: Callable[[], Any] | None
    lm_config: LMConfig
    show_progress: bool = False

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id


class GsmTask:
    """``gsm_symbolic``: answer loss on held-out templates, exact match of greedy answers as a secondary field."""

    metric = "answer_loss"

    def __init__(self, tokenizer, sizes: Mapping[str, int], seed: int, lm_config: LMConfig) -> None:
        def fits(item) -> bool:
            return len(encode_example(tokenizer, item)["input_ids"]) <= lm_config.max_length

        try:
            split = split_items(sizes["train"], sizes["validation"], sizes["test"], seed, keep_train=fits)
        except ValueError as err:
            raise GoraDataError(f"gsm_symbolic: {err} (--lm-max-length, --max-train/--max-val/--max-test)") from None
        self.name, self.split_seed = GSM_TASK, seed
        self.train = [encode_example(tokenizer, item) for item in split.train]
        self.validation = [encode_example(tokenizer, item) for item in split.validation]
        self.test = [encode_example(tokenizer, item) for item in split.test]
        self.exact_match_items = split.test[: lm_config.exact_match_size]
        self.scorer = gsm_dataset(seed, 1)
        self.info: Record = {
            "train_size": len(split.train), "validation_size": len(split.validation), "test_size": len(split.test),
            "train_skipped_long": split.skipped,
            "train_templates": sorted({i.template for i in split.train}),
            "held_out_templates": sorted({i.template for i in split.validation + split.test}),
            "split_rule": "train: templates 0-69; held-out templates 70-99: even item index test, odd validation",
        }

    def validate(self, model: torch.nn.Module, ev: Evaluation) -> dict[str, float | None]:
        return {"val_loss": answer_loss(model, self.validation, ev.pad_id, ev.device, ev.autocast),
                "val_metric": None}

    def test_fields(self, model: torch.nn.Module, ev: Evaluation) -> Record:
        fields: Record = {"value": answer_loss(model, self.test, ev.pad_id, ev.device, ev.autocast),
                          "exact_match_size": 0}
        if self.exact_match_items:
            start = time.perf_counter()
            outputs = generate_answers(model, ev.tokenizer, self.exact_match_items,
                                       max_new_tokens=ev.lm_config.max_new_tokens,
                                       batch_size=ev.lm_config.generate_batch_size, device=ev.device,
                                       show_progress=ev.show_progress)
            scores, _ = score_outputs(self.scorer, self.exact_match_items, outputs, ev.lm_config.max_new_tokens)
            fields.update(scores, exact_match_size=len(self.exact_match_items),
                          generate_seconds=time.perf_counter() - start)
        return fields


class LabelWordClassification:
    """A classification task cast as generation: label words scored by the pretrained LM head."""

    metric = "accuracy"

    def __init__(self, name: str, tokenizer, data, lm_config: LMConfig) -> None:
        spec = LABEL_WORD_TASKS[name]
        self.name, self.split_seed = name, data.split_seed
        missing = sorted(set(data.label_names) - set(spec.words))
        if missing:
            raise GoraDataError(f"{name}: classes {missing} of {spec.base_task} have no label word.")
        self.word_texts = [spec.words[c] for c in data.label_names]
        self.words = [text_ids(tokenizer, w) for w in self.word_texts]
        budget = lm_config.max_length - max(len(w) for w in self.words)
        self.truncated = 0
        splits = []
        for df in (data.train, data.validation, data.test):
            prompts = [self._prompt(tokenizer, spec.instruction, text, budget) for text in df["text"]]
            splits.append((prompts, [int(y) for y in df["label"]]))
        (train_prompts, train_labels), (self.val_prompts, self.val_labels), (self.test_prompts, self.test_labels) = \
            splits
        self.train = [labelled(p, self.words[y]) for p, y in zip(train_prompts, train_labels)]
        counts = [self.test_labels.count(k) for k in range(len(self.words))]
        self.info: Record = {
            "base_task": spec.base_task, "label_words": self.word_texts, "num_labels": len(self.words),
            "split_seed": data.split_seed, **{f"{k}_size": v for k, v in data.sizes().items()},
            "prompts_truncated": self.truncated, "majority_rate": max(counts) / len(self.test_labels),
        }

    def _prompt(self, tokenizer, instruction: str, text: str, budget: int) -> list[int]:
        """The chat prompt within ``budget`` tokens (:func:`gora.bench.lm_format.fitted_prompt`), counting cuts."""
        try:
            ids, cut = fitted_prompt(tokenizer, instruction, text, budget)
        except ValueError as err:
            raise GoraConfigError(f"{self.name}: {err}; raise --lm-max-length.") from None
        self.truncated += cut
        return ids

    def scores(self, model: torch.nn.Module, ev: Evaluation, prompts, labels) -> tuple[float, float, list[int]]:
        """(answer loss of the true words, accuracy, predicted classes)."""
        loglik, lengths = label_log_likelihoods(model, prompts, self.words, ev.pad_id, ev.device, ev.autocast)
        truth = torch.tensor(labels)
        true_nll = -loglik[torch.arange(len(labels)), truth]
        loss = float(true_nll.sum() / lengths[truth].sum())
        predicted = loglik.argmax(1)  # ties go to the first class
        return loss, float((predicted == truth).double().mean()), predicted.tolist()

    def validate(self, model: torch.nn.Module, ev: Evaluation) -> dict[str, float | None]:
        loss, accuracy, _ = self.scores(model, ev, self.val_prompts, self.val_labels)
        return {"val_loss": loss, "val_metric": accuracy}

    def test_fields(self, model: torch.nn.Module, ev: Evaluation) -> Record:
        loss, accuracy, predicted = self.scores(model, ev, self.test_prompts, self.test_labels)
        return {"value": accuracy, "answer_loss": loss, "test_top_class_share": top_class_share(predicted)}


LMTask = GsmTask | LabelWordClassification
