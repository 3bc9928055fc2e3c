"""The deferred NaN/Inf check is decided jointly under torch.distributed (one tiny all-reduce per check), and costs
no collective in one process. The real 2-process case is in tests/integration/test_distributed.py; here the other
process is simulated by replacing the all-reduce of failure flags."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig

from gora import GoraConfig, distributed, estimate_gora
from gora.errors import GoraNumericalError

from conftest import make_bert_batches

LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value"])


class SimulatedWorld:
    """Two processes, where the other one (``failing``) reports a failure from its ``at_check``-th check on."""

    def __init__(self, failing: list[int], at_check: int) -> None:
        self.failing, self.at_check = failing, at_check
        self.flags: list[bool] = []

    def __call__(self, flag: bool) -> list[int]:
        self.flags.append(flag)
        others = self.failing if len(self.flags) >= self.at_check else []
        return sorted(set(others) | ({0} if flag else set()))


def _snapshot(model) -> dict:
    return {"weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "flags": {n: p.requires_grad for n, p in model.named_parameters()},
            "grads": {n: p.grad for n, p in model.named_parameters()},
            "modes": {n: m.training for n, m in model.named_modules()}}


def _assert_restored(model, before: dict) -> None:
    after = _snapshot(model)
    assert all(torch.equal(after["weights"][n], w) for n, w in before["weights"].items())
    assert (after["flags"], after["grads"], after["modes"]) == (before["flags"], before["grads"], before["modes"])


def _two_processes(monkeypatch, world: SimulatedWorld) -> None:
    monkeypatch.setattr(distributed, "is_distributed", lambda: True)
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 0)
    monkeypatch.setattr(distributed, "any_process", lambda flag: flag)  # the other process has batches too
    monkeypatch.setattr(distributed, "processes_where", world)


@pytest.mark.parametrize("failing, named", [([1], "rank 1"), ([1, 2], "ranks 1, 2")])
def test_a_failure_on_another_process_stops_this_one_at_the_same_check(tiny_bert, monkeypatch, failing, named):
    world = SimulatedWorld(failing, at_check=2)
    _two_processes(monkeypatch, world)
    before = _snapshot(tiny_bert)
    with pytest.raises(GoraNumericalError, match=f"estimation stopped on all 2 processes because {named} found a NaN "
                                                 f"or Inf loss or gradient; see the GoraNumericalError raised on "
                                                 f"{named}"):
        estimate_gora(tiny_bert, LoraConfig(**LORA), make_bert_batches(4),
                      GoraConfig(num_steps=4, show_progress=False))
    assert world.flags == [False, False]  # one flag per check (every step on the CPU); this process was fine
    _assert_restored(tiny_bert, before)


def test_the_failing_process_raises_its_own_error_after_telling_the_others(tiny_bert, monkeypatch):
    world = SimulatedWorld([], at_check=1)
    _two_processes(monkeypatch, world)
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = model(**batch).loss
        return loss * float("nan") if len(calls) == 2 else loss

    with pytest.raises(GoraNumericalError, match="the loss at estimation step 2 is nan"):
        estimate_gora(tiny_bert, LoraConfig(**LORA), make_bert_batches(4),
                      GoraConfig(num_steps=4, show_progress=False), loss_fn=loss_fn)
    assert world.flags == [False, True]


def test_one_process_pays_no_collective_for_the_check(tiny_bert, monkeypatch):
    def no_collective(flag):
        raise AssertionError("processes_where called in a single process")

    monkeypatch.setattr(distributed, "processes_where", no_collective)
    state = estimate_gora(tiny_bert, LoraConfig(**LORA), make_bert_batches(3), GoraConfig(num_steps=3,
                                                                                          show_progress=False))
    assert state.num_steps == 3
