"""Adaptive N with fewer batches than the cap: ``num_steps`` is only the cap (spec §4.1), so batches that run out
after ``min_steps`` end estimation there, as a normal stop; fewer than ``min_steps`` is refused, up front when the
length is known, else after the loop, with the same advice."""

from __future__ import annotations

import logging

import pytest
import torch

from gora import GoraDataError, estimate_gora

from test_adaptive import LORA, _config, _loss, _mlp, _regression_batches


class CountingLoss:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, model, batch):
        self.calls += 1
        return _loss(model, batch)


NEVER_CONVERGES = dict(num_steps=32, adaptive_steps=True, min_steps=3, convergence_threshold=0.0)


@pytest.mark.parametrize("as_generator", [False, True], ids=["list", "generator"])
def test_batches_that_run_out_after_min_steps_end_adaptive_estimation_there(caplog, as_generator):
    batches = _regression_batches(4, seed=3)
    given = (b for b in batches) if as_generator else batches
    with caplog.at_level(logging.WARNING, logger="gora.estimation"):
        state = estimate_gora(_mlp(), LORA, given, gora_config=_config(**NEVER_CONVERGES), loss_fn=_loss)
    assert state.num_steps == 4 and state.num_samples == 4 * 64
    assert state.notes["adaptive_steps_ran_out_at"] == 4 and "adaptive_steps_stopped_at" not in state.notes
    assert "the batches ran out after 4 steps, before importance converged (num_steps=32 is the cap)" in caplog.text
    fixed = estimate_gora(_mlp(), LORA, batches, gora_config=_config(num_steps=4), loss_fn=_loss)
    assert state.ranks == fixed.ranks
    for name in fixed.C:
        torch.testing.assert_close(state.C[name], fixed.C[name])


def test_a_list_shorter_than_min_steps_is_refused_before_any_work():
    loss = CountingLoss()
    with pytest.raises(GoraDataError, match=r"the batches hold 2 items but adaptive steps need at least min_steps=3 "
                                            r"\(num_steps=32 is the cap\); pass at least 3 batches, or set "
                                            r"GoraConfig\(min_steps=2\)"):
        estimate_gora(_mlp(), LORA, _regression_batches(2, seed=3), gora_config=_config(**NEVER_CONVERGES),
                      loss_fn=loss)
    assert loss.calls == 0


def test_a_generator_shorter_than_min_steps_is_refused_with_the_same_advice():
    batches = (b for b in _regression_batches(2, seed=3))
    with pytest.raises(GoraDataError, match=r"the batches gave 2 items but adaptive steps need at least min_steps=3 "
                                            r"\(num_steps=32 is the cap\); pass at least 3 batches per process"):
        estimate_gora(_mlp(), LORA, batches, gora_config=_config(**NEVER_CONVERGES), loss_fn=_loss)


def test_min_steps_above_the_cap_needs_only_the_cap():
    config = _config(num_steps=2, adaptive_steps=True, min_steps=5)
    state = estimate_gora(_mlp(), LORA, _regression_batches(2, seed=3), gora_config=config, loss_fn=_loss)
    assert state.num_steps == 2 and "adaptive_steps_ran_out_at" not in state.notes


def test_without_adaptive_steps_num_steps_batches_are_still_required():
    with pytest.raises(GoraDataError, match=r"the batches hold 4 items but num_steps=32; pass at least 32 batches"):
        estimate_gora(_mlp(), LORA, _regression_batches(4, seed=3), gora_config=_config(num_steps=32), loss_fn=_loss)
    with pytest.raises(GoraDataError, match=r"the batches gave 4 items but num_steps=32"):
        estimate_gora(_mlp(), LORA, iter(_regression_batches(4, seed=3)), gora_config=_config(num_steps=32),
                      loss_fn=_loss)
