"""Adaptive N (stop once importance settles) and adaptive γ (held-out loss against W₀), on a small MLP."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from peft import LoraConfig
from torch import nn

from gora import GoraConfig, apply_gora, estimate_gora
from gora.config import default_gamma_grid

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


# -- golden-section search ------------------------------------------------------------------------------
def _counted(function):
    calls = []

    def loss(gamma):
        calls.append(gamma)
        return function(gamma)

    return loss, calls


@pytest.mark.parametrize("optimum", [2e-4, 0.03, 0.37, 0.9])
def test_golden_search_finds_the_minimum_of_a_valley_in_log_gamma(optimum):
    from gora.gamma_search import golden_section_log

    loss, calls = _counted(lambda g: 1.0 + 0.05 * (math.log(g) - math.log(optimum)) ** 2)
    found = golden_section_log(loss, 1e-5, 1.0, start=5e-2)
    assert abs(math.log(found) - math.log(optimum)) < math.log(1.25) / 2  # finer than the scan's spacing
    assert len(set(calls)) == len(calls) <= 16  # each gamma once, far fewer than the scan's 52


@pytest.mark.parametrize("high", [10.0, 100.0])
def test_golden_search_needs_few_losses_on_a_smooth_valley_in_gamma(high):
    """The held-out loss is smooth in γ (ΔW₀ is linear in it): a valley shaped like MiniLM's (a slow fall to
    γ ≈ 2, a steep rise after it) is found within 0.1 % of its minimum from at most 8 γ, where golden sections with
    parabolas in log γ took 10-11 on MiniLM's."""
    from gora.gamma_search import golden_section_log

    def valley(gamma):
        return 0.6928 - 0.04 * gamma + 0.006 * gamma ** 2 + 0.0012 * gamma ** 3

    loss, calls = _counted(valley)
    found = golden_section_log(loss, 1e-4, high, start=5e-2)
    best = min(valley(g) for g in torch.logspace(-4, math.log10(high), 20001).tolist())
    assert valley(found) <= best + 1e-3 * abs(best)
    assert len(set(calls)) == len(calls) <= 8


def test_golden_search_stops_at_a_bound_when_the_loss_keeps_falling():
    from gora.gamma_search import golden_section_log

    assert golden_section_log(lambda g: -g, 1e-5, 1.0, start=5e-2) == pytest.approx(1.0)
    assert golden_section_log(lambda g: g, 1e-5, 1.0, start=5e-2) == pytest.approx(1e-5)


def test_golden_search_treats_a_diverging_loss_as_infinitely_bad():
    from gora.gamma_search import golden_section_log

    def loss(gamma):  # a valley at 0.1, NaN beyond 0.3 (the step blew the model up)
        return math.nan if gamma > 0.3 else (math.log(gamma) - math.log(0.1)) ** 2

    assert golden_section_log(loss, 1e-5, 1.0, start=5e-2) == pytest.approx(0.1, rel=0.12)


@pytest.mark.parametrize("case", ["mlp", pytest.param("bert", marks=pytest.mark.slow)])  # bert: a scan of ~40 γ
def test_golden_search_reaches_the_scans_best_held_out_loss_within_0_1_percent(case):
    """On the held-out batches, the γ the golden search picks has a loss within 0.1 % of the scan's best point,
    from a fraction of the scan's loss evaluations."""
    if case == "mlp":
        model, estimation, held_out = _mlp(), _regression_batches(8, seed=4), _regression_batches(4, seed=20)
        lora, loss_fn, scale = LORA, _loss, 10  # the best γ is about 1.4: widen the grid to hold it inside
    else:
        from transformers import BertConfig, BertForSequenceClassification

        from conftest import make_bert_batches

        torch.manual_seed(0)
        model = BertForSequenceClassification(BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            num_labels=2, max_position_embeddings=64)).eval()
        estimation = make_bert_batches(8, seed=0)
        held_out = estimation  # on other random batches of a random model no γ beats W0
        lora, loss_fn, scale = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"]), None, 100
    grid = [scale * gamma for gamma in default_gamma_grid()]
    scan = estimate_gora(model, lora, estimation, loss_fn=loss_fn, eval_batches=held_out,
                         gora_config=_config(adaptive_gamma=True, gamma_search="scan", gamma_grid=grid))
    golden = estimate_gora(model, lora, estimation, loss_fn=loss_fn, eval_batches=held_out,
                           gora_config=_config(adaptive_gamma=True, gamma_grid=grid))
    scanned, searched = scan.notes["adaptive_gamma"], golden.notes["adaptive_gamma"]
    assert scanned["method"] == "scan" and searched["method"] == "golden"
    best = min(scanned["scan"].values())
    assert best < scanned["baseline_loss"] and min(grid) < golden.gamma < max(grid)  # an inner minimum
    assert searched["scan"][str(golden.gamma)] <= best + 1e-3 * abs(best)
    assert golden.init_stats["loss_after"] == searched["scan"][str(golden.gamma)]
    assert len(searched["scan"]) <= 16 < len(scanned["scan"])


def test_golden_search_scores_each_gamma_as_the_applied_adapter_would():
    model, held_out = _mlp(), _regression_batches(2, seed=21)
    state = estimate_gora(model, LORA, _regression_batches(8, seed=4), loss_fn=_loss, eval_batches=held_out,
                          gora_config=_config(adaptive_gamma=True))
    scored = state.notes["adaptive_gamma"]["scan"]
    assert len(scored) >= 3
    for gamma in list(scored)[:3]:
        adapted = apply_gora(model, LORA, state, gamma=float(gamma)).eval()
        assert scored[gamma] == pytest.approx(_held_out_loss(adapted, held_out), rel=1e-5)
        model = adapted.unload()


def test_golden_search_is_zero_when_every_step_raises_the_held_out_loss():
    model, estimation = _mlp(), _regression_batches(8, seed=4)
    state = estimate_gora(model, LORA, estimation, gora_config=_config(adaptive_gamma=True), loss_fn=_loss,
                          eval_batches=_mirrored(model, estimation))
    notes = state.notes["adaptive_gamma"]
    assert state.gamma == 0.0 and notes["method"] == "golden"
    assert all(loss > notes["baseline_loss"] for loss in notes["scan"].values())
    assert state.init_stats["relative_delta"] == 0.0 and state.init_stats["loss_after"] == state.init_stats["loss_w0"]


def test_an_unknown_gamma_search_is_refused_with_the_choices():
    from gora.errors import GoraConfigError

    with pytest.raises(GoraConfigError, match="gamma_search='brent' is not known; choose one of golden, scan"):
        GoraConfig(gamma_search="brent")
    assert GoraConfig().gamma_search == "golden"
