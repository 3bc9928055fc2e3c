"""Diagnostics of the initial step (``state.init_stats``): size of ΔW₀ against W₀, held-out losses, the warning."""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
from peft import LoraConfig
from torch import nn

from gora import GoraConfig, GoraState, apply_gora, estimate_gora
from gora.atomic import META_FILE
from gora.diagnostics import delta_norm_squared, negligible_reasons

IN, HIDDEN, OUT = 8, 32, 4
TEACHER = torch.randn(IN, OUT, generator=torch.Generator().manual_seed(7))
LORA = LoraConfig(r=2, lora_alpha=4, target_modules=["0", "3"])


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, OUT))


def _loss(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def _batches(count: int, seed: int, size: int = 64) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(size, IN, generator=generator)
        out.append({"x": x, "y": x @ TEACHER + 0.05 * torch.randn(size, OUT, generator=generator)})
    return out


def _config(**changes) -> GoraConfig:
    return GoraConfig(**{"num_steps": 8, "min_rank": 1, "max_rank": 4, "show_progress": False, **changes})


def _held_out_loss(model: nn.Module, batches: list[dict]) -> float:
    with torch.no_grad():
        return math.fsum(float(_loss(model, b)) for b in batches) / len(batches)


def test_delta_norm_equals_the_norm_of_the_product():
    generator = torch.Generator().manual_seed(3)
    a, c = torch.randn(3, 20, generator=generator), torch.randn(7, 3, generator=generator)
    explicit = float(torch.linalg.matrix_norm(-0.3 * math.sqrt(20 / 3) * (c.double() @ a.double())) ** 2)
    assert delta_norm_squared(a, c, 0.3) == pytest.approx(explicit, rel=1e-12)


@pytest.mark.parametrize("gamma", [5e-2, 0.7])
def test_relative_delta_equals_the_peft_models_own_delta_over_w0(gamma):
    """Independent check: build the PEFT model and take ||s B A||_F / ||W0||_F from its layers directly."""
    model = _mlp()
    state = estimate_gora(model, LORA, _batches(8, seed=4), gora_config=_config(gamma=gamma), loss_fn=_loss)
    stats = state.init_stats
    assert stats["gamma"] == gamma and set(stats["per_layer"]) == set(state.adapted) == {"0", "3"}
    weights = {name: dict(model.named_modules())[name].weight.detach().double() for name in state.adapted}
    peft_model = apply_gora(model, LORA, state)
    deltas = {}
    for name, module in peft_model.base_model.model.named_modules():
        if name in weights:
            a, b = module.lora_A["default"].weight.detach().double(), module.lora_B["default"].weight.detach().double()
            deltas[name] = module.scaling["default"] * (b @ a)
    for name in weights:
        expected = float(torch.linalg.matrix_norm(deltas[name]) / torch.linalg.matrix_norm(weights[name]))
        assert stats["per_layer"][name] == pytest.approx(expected, rel=1e-5), name
    total = math.sqrt(sum(float(torch.linalg.matrix_norm(d) ** 2) for d in deltas.values())
                      / sum(float(torch.linalg.matrix_norm(w) ** 2) for w in weights.values()))
    assert stats["relative_delta"] == pytest.approx(total, rel=1e-5) and total > 0


def test_without_held_out_batches_the_losses_are_none():
    state = estimate_gora(_mlp(), LORA, _batches(8, seed=4), gora_config=_config(), loss_fn=_loss)
    assert state.init_stats["loss_w0"] is None and state.init_stats["loss_after"] is None
    assert state.init_stats["relative_delta"] > 0


def test_held_out_batches_without_adaptive_gamma_give_the_losses_at_w0_and_after_init():
    model, held_out = _mlp(), _batches(4, seed=20)
    state = estimate_gora(model, LORA, _batches(8, seed=4), gora_config=_config(gamma=0.3), loss_fn=_loss,
                          eval_batches=held_out)
    stats = state.init_stats
    assert "adaptive_gamma" not in state.notes and state.gamma == 0.3
    assert stats["loss_w0"] == pytest.approx(_held_out_loss(model, held_out), rel=1e-6)
    assert stats["loss_after"] == pytest.approx(_held_out_loss(apply_gora(model, LORA, state), held_out), rel=1e-5)
    assert stats["loss_after"] != pytest.approx(stats["loss_w0"], rel=1e-6)
    differences = torch.tensor([_held_out_loss(apply_gora(_mlp(), LORA, state), [b]) - _held_out_loss(_mlp(), [b])
                                for b in held_out], dtype=torch.float64)
    assert stats["loss_se"] == pytest.approx(float(differences.std() / 2), rel=1e-3)  # sd / sqrt(4)


def test_adaptive_gamma_records_the_losses_at_the_chosen_gamma():
    model, held_out = _mlp(), _batches(4, seed=20)
    state = estimate_gora(model, LORA, _batches(8, seed=4), gora_config=_config(adaptive_gamma=True), loss_fn=_loss,
                          eval_batches=held_out)
    stats, notes = state.init_stats, state.notes["adaptive_gamma"]
    assert stats["gamma"] == state.gamma > 0
    assert stats["loss_w0"] == pytest.approx(notes["baseline_loss"], rel=1e-12)
    assert stats["loss_after"] == pytest.approx(notes["scan"][str(state.gamma)], rel=1e-12)
    assert stats["loss_after"] < stats["loss_w0"]


def test_init_stats_round_trip_and_show_in_the_summary(tmp_path):
    state = estimate_gora(_mlp(), LORA, _batches(8, seed=4), gora_config=_config(gamma=0.3), loss_fn=_loss,
                          eval_batches=_batches(2, seed=20))
    loaded = GoraState.load(state.save(tmp_path / "state"))
    assert loaded.init_stats == state.init_stats
    line = [row for row in loaded.summary().splitlines() if row.startswith("initial step")]
    assert len(line) == 1
    assert f"{state.init_stats['relative_delta']:.3g}" in line[0] and "held-out loss" in line[0]


def test_a_state_saved_without_init_stats_still_loads(tmp_path):
    from gora.state import _metadata_checksum

    state = estimate_gora(_mlp(), LORA, _batches(8, seed=4), gora_config=_config(), loss_fn=_loss)
    path = state.save(tmp_path / "old")
    meta = json.loads((path / META_FILE).read_text())
    del meta["init_stats"]  # as written before the diagnostics existed
    meta["meta_sha256"] = _metadata_checksum(meta)
    (path / META_FILE).write_text(json.dumps(meta))
    loaded = GoraState.load(path)
    assert loaded.init_stats == {} and loaded.ranks == state.ranks
    assert "initial step" not in loaded.summary()


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "gora.diagnostics" and r.levelno == logging.WARNING]


def test_a_negligible_step_warns_once_and_names_the_remedies(caplog):
    with caplog.at_level(logging.WARNING, logger="gora.diagnostics"):
        state = estimate_gora(_mlp(), LORA, _batches(8, seed=4), gora_config=_config(gamma=1e-6), loss_fn=_loss)
    assert state.init_stats["relative_delta"] < 1e-4
    messages = _warnings(caplog)
    assert len(messages) == 1
    assert all(remedy in messages[0] for remedy in ("head_warmup_steps", "adaptive_gamma", "larger gamma"))


def test_a_loss_change_inside_the_noise_counts_as_negligible():
    """A visible step (relative change above 1e-4) whose held-out loss change is smaller than its standard error."""
    stats = {"relative_delta": 0.01, "loss_w0": 1.0, "loss_after": 0.999, "loss_se": 0.01, "gamma": 0.05}
    assert len(negligible_reasons(stats)) == 1 and "noise" in negligible_reasons(stats)[0]
    assert negligible_reasons({**stats, "loss_after": 0.9}) == []
    assert negligible_reasons({**stats, "loss_w0": None, "loss_after": None, "loss_se": None}) == []


def test_a_sizeable_step_does_not_warn(caplog):
    with caplog.at_level(logging.WARNING, logger="gora.diagnostics"):
        state = estimate_gora(_mlp(), LORA, _batches(8, seed=4), gora_config=_config(gamma=0.5), loss_fn=_loss,
                              eval_batches=_batches(4, seed=20))
    assert state.init_stats["relative_delta"] > 1e-4
    assert state.init_stats["loss_w0"] - state.init_stats["loss_after"] > state.init_stats["loss_se"]
    assert _warnings(caplog) == []


def test_gora_inspect_shows_the_initial_step(tmp_path, capsys):
    from gora.cli import main

    state = estimate_gora(_mlp(), LORA, _batches(8, seed=4), gora_config=_config(gamma=0.3), loss_fn=_loss,
                          eval_batches=_batches(2, seed=20))
    path = state.save(tmp_path / "state")
    assert main(["inspect", str(path), "--no-plot"]) == 0
    shown = capsys.readouterr().out
    assert f"initial step: ||dW0||/||W0|| = {state.init_stats['relative_delta']:.3g} at gamma=0.3" in shown
    assert main(["inspect", str(path), "--no-plot", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["init_stats"]["loss_w0"] == state.init_stats["loss_w0"]
