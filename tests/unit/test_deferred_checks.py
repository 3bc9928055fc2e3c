"""bf16/fp32 NaN/Inf checks read on a schedule (every 8 steps on an accelerator) still stop with the first bad step."""

import math

import pytest
import torch
from peft import LoraConfig

from gora import GoraConfig, estimate_gora, estimation
from gora.errors import GoraNumericalError

from conftest import make_bert_batches

LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value"])


class CountingLoss:
    def __init__(self, bad_step: int, bad: float) -> None:
        self.calls, self.bad_step, self.bad = 0, bad_step, bad

    def __call__(self, model, batch):
        loss = model(**batch).loss
        loss = loss * self.bad if self.calls == self.bad_step else loss
        self.calls += 1
        return loss


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_a_deferred_bad_loss_names_its_step_and_stops_at_the_next_read(tiny_bert, monkeypatch, bad):
    monkeypatch.setattr(estimation, "_check_every", lambda device: 3)
    loss = CountingLoss(bad_step=1, bad=bad)
    with pytest.raises(GoraNumericalError, match=f"the loss at estimation step 2 is {bad}"):
        estimate_gora(tiny_bert, LoraConfig(**LORA), make_bert_batches(8),
                      GoraConfig(num_steps=8, show_progress=False), loss_fn=loss)
    assert loss.calls == 3  # the flags of steps 0-2 were read together after step 2


def test_a_bad_step_after_the_last_read_is_caught_before_the_sums_are_used(tiny_bert, monkeypatch):
    monkeypatch.setattr(estimation, "_check_every", lambda device: 100)
    loss = CountingLoss(bad_step=4, bad=math.nan)
    with pytest.raises(GoraNumericalError, match="estimation step 5"):
        estimate_gora(tiny_bert, LoraConfig(**LORA), make_bert_batches(5),
                      GoraConfig(num_steps=5, show_progress=False), loss_fn=loss)


def test_the_schedule_reads_every_step_on_cpu_only():
    assert estimation._check_every(torch.device("cpu")) == 1
    assert estimation._check_every(torch.device("meta")) == estimation.DEFERRED_CHECK_STEPS == 8
