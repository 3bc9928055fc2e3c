"""gora.trainer helpers without a Trainer run: column selection in estimation_batches, add_gora_logging's checks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from gora import GoraDataError, GoraState, GoraTypeError
from gora.trainer import GoraLoggingCallback, add_gora_logging, estimation_batches


def _dataset(count: int = 8) -> list[dict]:
    return [{"input_ids": torch.arange(4) + i, "labels": i % 2, "text": f"row {i}"} for i in range(count)]


def _trainer() -> SimpleNamespace:
    """What add_gora_logging touches of a transformers.Trainer: its callback handler's list."""
    return SimpleNamespace(callback_handler=SimpleNamespace(callbacks=["reporter"]))


def test_estimation_batches_keeps_the_named_columns_and_refuses_unknown_ones():
    batches = estimation_batches(_dataset(), None, batch_size=2, num_steps=2, columns=["input_ids", "labels"])
    assert all(set(batch) == {"input_ids", "labels"} for batch in batches)
    with pytest.raises(GoraDataError, match=r"columns \['label', 'mask'\] are not in dataset\[\d+\], which has "
                                            r"\['input_ids', 'labels', 'text'\]; pass only names from those"):
        estimation_batches(_dataset(), None, batch_size=2, num_steps=2, columns=["input_ids", "mask", "label"])


def test_estimation_batches_refuses_a_column_some_examples_lack():
    dataset = _dataset()
    del dataset[5]["labels"]
    with pytest.raises(GoraDataError, match=r"columns \['labels'\] are not in dataset\[5\]"):
        estimation_batches(dataset, None, batch_size=4, num_steps=2, columns={"input_ids", "labels"})


def test_estimation_batches_refuses_a_single_string_as_columns():
    with pytest.raises(GoraTypeError, match=r"collection of column names, got the string 'input_ids'.*\['input_ids'\]"):
        estimation_batches(_dataset(), None, batch_size=2, num_steps=2, columns="input_ids")


def test_estimation_batches_refuses_columns_for_examples_that_are_not_dicts():
    dataset = [(torch.arange(4), 0) for _ in range(4)]
    with pytest.raises(GoraDataError, match=r"dataset\[\d+\] is a tuple; pass columns=None"):
        estimation_batches(dataset, None, batch_size=2, num_steps=1, columns=["input_ids"])


@pytest.mark.parametrize("state", [None, "gora_state/"], ids=["none", "path"])
def test_add_gora_logging_refuses_anything_but_a_gora_state_and_leaves_the_trainer_alone(state):
    trainer = _trainer()
    with pytest.raises(GoraTypeError, match=r"needs a GoraState, got (None|a str); pass the state returned by "
                                            r"estimate_gora, peft_model\.gora_state .*, "
                                            r"or GoraState\.load\(directory\)"):
        add_gora_logging(trainer, state)
    assert trainer.callback_handler.callbacks == ["reporter"]
    with pytest.raises(GoraTypeError, match="needs a GoraState"):
        GoraLoggingCallback(state)


def test_add_gora_logging_refuses_what_is_not_a_trainer():
    state = GoraState(ranks={"layer": 4}, importance={"layer": 1.0}, shapes={"layer": (8, 8)})
    with pytest.raises(GoraTypeError, match="needs a transformers.Trainer .* got dict"):
        add_gora_logging({}, state)
    trainer = _trainer()
    assert add_gora_logging(trainer, state) is trainer.callback_handler.callbacks[0]


def test_estimation_batches_warns_when_examples_must_be_reused(caplog):
    with caplog.at_level("WARNING", logger="gora.trainer"):
        estimation_batches(_dataset(8), None, batch_size=2, num_steps=4)  # 8 needed: each example once
    assert not caplog.records
    with caplog.at_level("WARNING", logger="gora.trainer"):
        batches = estimation_batches(_dataset(3), None, batch_size=2, num_steps=4)
    assert len(batches) == 4
    (record,) = caplog.records
    assert record.getMessage() == ("the dataset holds 3 examples, fewer than the 8 that 4 steps x batch 2 draw: "
                                   "examples are reused (reshuffled), so the gradient estimate sees only 3 distinct "
                                   "ones; pass fewer steps or a smaller batch to use each example at most once.")


@pytest.mark.parametrize("rank", [0, 1])
def test_estimation_batches_counts_every_process_before_warning_once(monkeypatch, caplog, rank):
    from gora import distributed

    monkeypatch.setattr(distributed, "rank", lambda: rank)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    with caplog.at_level("WARNING", logger="gora.trainer"):
        estimation_batches(_dataset(8), None, batch_size=2, num_steps=4)  # 2 processes x 8: 16 needed
    messages = [r.getMessage() for r in caplog.records]
    if rank == 0:  # one warning for the job, from the first process
        assert len(messages) == 1 and "fewer than the 16 that 4 steps x batch 2 x 2 processes draw" in messages[0]
    else:
        assert messages == []
    with caplog.at_level("WARNING", logger="gora.trainer"):
        estimation_batches(_dataset(8), None, batch_size=2, num_steps=4, shard=False)  # same batches everywhere
    assert len(caplog.records) == len(messages)  # shard=False needs only 8: nothing more
