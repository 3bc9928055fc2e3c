"""gora.trainer: estimation batches from a Trainer's dataset and collator; logging to the Trainer's reporters."""

from __future__ import annotations

import pytest
import torch
from transformers import DataCollatorWithPadding, Trainer, TrainerCallback, TrainingArguments

from gora import GoraConfig, GoraDataError, apply_gora, estimate_gora
from gora.trainer import GoraLoggingCallback, add_gora_logging, estimation_batches


def _dataset(count: int = 20) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 100, (8,), generator=generator), "labels": i % 2, "text": f"row {i}"}
            for i in range(count)]


def _lora_config():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")


def test_estimation_batches_are_seeded_collated_batches_without_repeats_within_an_epoch():
    dataset = _dataset(20)
    batches = estimation_batches(dataset, None, batch_size=4, num_steps=5, seed=3)
    assert len(batches) == 5
    assert all(b["input_ids"].shape == (4, 8) and b["labels"].shape == (4,) for b in batches)
    rows = torch.cat([b["input_ids"] for b in batches])
    assert len({tuple(r.tolist()) for r in rows}) == 20  # one epoch: every example exactly once
    again = estimation_batches(dataset, None, batch_size=4, num_steps=5, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, again))
    other = estimation_batches(dataset, None, batch_size=4, num_steps=5, seed=4)
    assert not all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(batches, other))


def test_estimation_batches_reshuffle_a_dataset_smaller_than_the_request():
    batches = estimation_batches(_dataset(6), None, batch_size=4, num_steps=4, seed=0)
    assert len(batches) == 4 and all(b["input_ids"].shape[0] == 4 for b in batches)


def test_estimation_batches_use_the_trainer_collator_and_keep_only_requested_columns():
    seen = []

    def collator(examples):
        seen.append(sorted(examples[0]))
        return {"input_ids": torch.stack([e["input_ids"] for e in examples])}

    estimation_batches(_dataset(8), collator, batch_size=2, num_steps=2, seed=0, columns={"input_ids", "labels"})
    assert seen == [["input_ids", "labels"]] * 2


def test_estimation_batches_refuse_an_empty_dataset_and_bad_sizes():
    with pytest.raises(GoraDataError, match="empty"):
        estimation_batches([], None, batch_size=2, num_steps=1)
    with pytest.raises(ValueError, match="batch_size"):
        estimation_batches(_dataset(4), None, batch_size=0, num_steps=1)


def test_estimation_batches_pad_token_lists_through_a_padding_collator():
    from transformers import BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film"]
    tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)})
    dataset = [{**tokenizer(text), "labels": label} for text, label in (("good film", 1), ("bad", 0), ("film", 1))]
    batches = estimation_batches(dataset, DataCollatorWithPadding(tokenizer), batch_size=3, num_steps=1)
    assert batches[0]["input_ids"].shape == (3, 4) and batches[0]["attention_mask"].sum() == 4 + 3 + 3


class _Recorder(TrainerCallback):
    """Stands in for a reporter (TensorBoard, W&B): keeps what each on_log receives."""

    def __init__(self):
        self.logs = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs))


def _train(model, dataset, tmp_path, state=None) -> tuple[list[dict], dict]:
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                             save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True)
    recorder = _Recorder()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[recorder])
    callback = add_gora_logging(trainer, state) if state is not None else None
    trainer.train()
    assert callback is None or trainer.callback_handler.callbacks[0] is callback
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return recorder.logs, weights


def test_logging_callback_reports_gora_metrics_once_and_changes_nothing(tiny_bert, tmp_path):
    from transformers import BertForSequenceClassification

    dataset = [{k: v for k, v in row.items() if k != "text"} for row in _dataset(24)]
    state = estimate_gora(tiny_bert, _lora_config(), estimation_batches(dataset, None, 4, 3, seed=0),
                          gora_config=GoraConfig(num_steps=3, show_progress=False))
    logs, weights = _train(apply_gora(tiny_bert, _lora_config(), state), dataset, tmp_path / "a", state)

    gora_logs = [log for log in logs if any(k.startswith("gora/") for k in log)]
    assert len(gora_logs) == 1 and gora_logs[0] is logs[0]
    expected = GoraLoggingCallback(state).metrics()
    assert {k: v for k, v in logs[0].items() if k.startswith("gora/")} == expected
    assert expected["gora/budget"] == state.budget and expected["gora/rank_max"] == max(state.ranks.values())

    torch.manual_seed(0)
    same_base = BertForSequenceClassification(tiny_bert.config).eval()
    _, weights_without = _train(apply_gora(same_base, _lora_config(), state), dataset, tmp_path / "b")
    assert weights.keys() == weights_without.keys()
    assert all(torch.equal(weights[n], weights_without[n]) for n in weights)
