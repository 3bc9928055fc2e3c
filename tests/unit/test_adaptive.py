"""Adaptive N (stop once importance settles) and adaptive γ (held-out loss against W₀), on a small MLP."""

from __future__ import annotations

import logging

import pytest
import torch
from peft import LoraConfig
from torch import nn

from gora import GoraConfig, apply_gora, estimate_gora

IN, HIDDEN, OUT = 8, 32, 4
TEACHER = torch.randn(IN, OUT, generator=torch.Generator().manual_seed(7))


def _mlp(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Dropout(dropout), nn.Linear(HIDDEN, OUT))


def _loss(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def _regression_batches(count: int, seed: int, size: int = 64) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        x = torch.randn(size, IN, generator=generator)
        batches.append({"x": x, "y": x @ TEACHER + 0.05 * torch.randn(size, OUT, generator=generator)})
    return batches


def _mirrored(model: nn.Module, batches: list[dict]) -> list[dict]:
    """Targets reflected through the model's output: y' = 2 f(x) - y. The held-out gradient at W0 is then minus the
    estimation gradient, so every descent step for the estimation loss raises the held-out loss."""
    with torch.no_grad():
        return [{"x": b["x"], "y": 2 * model(b["x"]) - b["y"]} for b in batches]


LORA = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "3"])


def _config(**changes) -> GoraConfig:
    return GoraConfig(**{"num_steps": 8, "min_rank": 1, "max_rank": 4, "show_progress": False, **changes})


# -- adaptive N ----------------------------------------------------------------------------------------
def test_adaptive_steps_stop_at_min_steps_when_every_batch_is_the_same():
    batch = _regression_batches(1, seed=1)
    state = estimate_gora(_mlp(), LORA, batch * 8, gora_config=_config(adaptive_steps=True, min_steps=4),
                          loss_fn=_loss)
    assert state.notes["adaptive_steps_stopped_at"] == 4
    assert state.num_steps == 4 and state.num_samples == 4 * 64


def test_adaptive_steps_never_stop_before_min_steps_and_log_the_stop(caplog):
    config = _config(num_steps=30, adaptive_steps=True, min_steps=5, convergence_threshold=0.2)
    with caplog.at_level(logging.INFO, logger="gora.estimation"):
        state = estimate_gora(_mlp(), LORA, _regression_batches(30, seed=2), gora_config=config, loss_fn=_loss)
    stopped = state.notes["adaptive_steps_stopped_at"]
    assert 5 <= stopped < 30 and state.num_steps == stopped
    stops = [r for r in caplog.records if r.getMessage().startswith("adaptive steps: importance converged")]
    assert [(r.name, r.levelno, r.getMessage()) for r in stops] == [
        ("gora.estimation", logging.INFO,
         f"adaptive steps: importance converged after {stopped} steps ({stopped * 64} samples)")]


def test_adaptive_steps_run_to_num_steps_when_importance_keeps_moving():
    config = _config(num_steps=6, adaptive_steps=True, min_steps=2, convergence_threshold=0.0)
    state = estimate_gora(_mlp(), LORA, _regression_batches(6, seed=3), gora_config=config, loss_fn=_loss)
    assert "adaptive_steps_stopped_at" not in state.notes and state.num_steps == 6


def test_adaptive_steps_equal_a_fixed_run_of_the_same_length():
    batches = _regression_batches(30, seed=2)
    adaptive = estimate_gora(_mlp(), LORA, batches, loss_fn=_loss,
                             gora_config=_config(num_steps=30, adaptive_steps=True, min_steps=5,
                                                 convergence_threshold=0.2))
    fixed = estimate_gora(_mlp(), LORA, batches, loss_fn=_loss, gora_config=_config(num_steps=adaptive.num_steps))
    assert adaptive.ranks == fixed.ranks
    for name in fixed.C:
        torch.testing.assert_close(adaptive.C[name], fixed.C[name])


# -- adaptive γ ----------------------------------------------------------------------------------------
def _held_out_loss(model: nn.Module, batches: list[dict]) -> float:
    with torch.no_grad():
        return sum(float(_loss(model, b)) for b in batches) / len(batches)


def test_adaptive_gamma_picks_a_positive_gamma_that_lowers_the_held_out_loss():
    model, held_out = _mlp(), _regression_batches(4, seed=20)
    state = estimate_gora(model, LORA, _regression_batches(8, seed=4), gora_config=_config(adaptive_gamma=True),
                          loss_fn=_loss, eval_batches=held_out)
    notes = state.notes["adaptive_gamma"]
    assert state.gamma > 0 and notes["chosen"] == state.gamma
    assert min(notes["scan"].values()) == notes["scan"][str(state.gamma)] < notes["baseline_loss"]
    baseline = _held_out_loss(model, held_out)
    assert baseline == pytest.approx(notes["baseline_loss"], rel=1e-6)
    adapted = apply_gora(model, LORA, state)
    assert _held_out_loss(adapted, held_out) == pytest.approx(notes["scan"][str(state.gamma)], rel=1e-5)


def test_adaptive_gamma_is_zero_when_every_step_raises_the_held_out_loss():
    model, estimation = _mlp(), _regression_batches(8, seed=4)
    reference = estimate_gora(model, LORA, estimation, gora_config=_config(), loss_fn=_loss)
    state = estimate_gora(model, LORA, estimation, gora_config=_config(adaptive_gamma=True), loss_fn=_loss,
                          eval_batches=_mirrored(model, estimation))
    notes = state.notes["adaptive_gamma"]
    assert state.gamma == 0.0 and notes["chosen"] == 0.0
    assert all(loss > notes["baseline_loss"] for loss in notes["scan"].values())
    assert state.ranks == reference.ranks  # ranks kept, only B is zero
    adapted = apply_gora(model, LORA, state)
    lora_b = [m.lora_B["default"].weight for m in adapted.modules() if hasattr(m, "lora_B") and "default" in m.lora_B]
    assert lora_b and all(torch.count_nonzero(b) == 0 for b in lora_b)


def test_adaptive_gamma_takes_the_batches_after_the_estimation_batches_by_default():
    model = _mlp()
    estimation = _regression_batches(8, seed=4)
    tail = _mirrored(model, estimation[:2])
    state = estimate_gora(model, LORA, estimation + tail, loss_fn=_loss,
                          gora_config=_config(adaptive_gamma=True, gamma_batches=2))
    assert state.gamma == 0.0  # only the mirrored tail was scored


def test_adaptive_gamma_without_room_for_held_out_batches_is_refused_before_any_work():
    from gora.errors import GoraDataError

    calls = []

    def counting(model, batch):
        calls.append(1)
        return _loss(model, batch)

    with pytest.raises(GoraDataError, match="adaptive_gamma needs held-out batches after the 8 estimation batches"):
        estimate_gora(_mlp(), LORA, _regression_batches(8, seed=4), loss_fn=counting,
                      gora_config=_config(adaptive_gamma=True, gamma_batches=2))
    assert calls == []  # refused up front, not after the estimation passes


def test_adaptive_gamma_scores_in_eval_mode_and_restores_the_model():
    model = _mlp(dropout=0.5).train()  # dropout would make every held-out loss random
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    held_out = _regression_batches(2, seed=21)
    config = _config(adaptive_gamma=True, gamma_search="scan", gamma_grid=[0.5, 0.1, 0.01])
    state = estimate_gora(model, LORA, _regression_batches(8, seed=4), gora_config=config, loss_fn=_loss,
                          eval_batches=held_out)
    assert all(m.training for m in model.modules())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(not m._forward_hooks for m in model.modules()) and all(p.grad is None for p in model.parameters())

    notes = state.notes["adaptive_gamma"]
    assert notes["baseline_loss"] == pytest.approx(_held_out_loss(model.eval(), held_out), rel=1e-6)
    for gamma in (0.5, 0.1, 0.01):  # each candidate scored as the eval-mode adapter with that gamma
        adapted = apply_gora(model, LORA, state, gamma=gamma).eval()
        assert notes["scan"][str(gamma)] == pytest.approx(_held_out_loss(adapted, held_out), rel=1e-5)
        model = adapted.unload()
