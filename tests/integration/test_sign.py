"""The sign of B: GoRA's initial adapter is a descent step (official HEAD dropped the minus: ascent)."""

import copy

import pytest
import torch
from peft import LoraConfig
from torch import nn

from gora import GoraConfig, apply_gora, estimate_gora

from conftest import make_bert_batches


class LinearRegression(nn.Module):
    def __init__(self, in_features=256, out_features=8):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features)

    def forward(self, x, y):
        return {"loss": nn.functional.mse_loss(self.proj(x), y)}


def _regression_batches(n=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    true_weight = torch.randn(8, 256, generator=generator) / 16
    batches = []
    for _ in range(n):
        x = torch.randn(64, 256, generator=generator)
        batches.append({"x": x, "y": x @ true_weight.t() + 0.1 * torch.randn(64, 8, generator=generator)})
    return batches


def _mean_loss(model, batches):
    with torch.no_grad():
        return sum(model(**b)["loss"].item() for b in batches) / len(batches)


@pytest.mark.parametrize("gamma", [1e-3, 5e-2])
def test_initial_step_lowers_the_loss_and_flipped_sign_raises_it(gamma):
    torch.manual_seed(0)
    model = LinearRegression().eval()
    batches = _regression_batches()
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["proj"])
    state = estimate_gora(model, lora, batches, GoraConfig(num_steps=8, gamma=gamma, show_progress=False))
    w0_loss = _mean_loss(model, batches)
    descent = _mean_loss(apply_gora(copy.deepcopy(model), lora, state), batches)
    flipped = copy.deepcopy(state)
    flipped.C = {n: -c for n, c in state.C.items()}
    ascent = _mean_loss(apply_gora(copy.deepcopy(model), lora, flipped), batches)
    assert descent < w0_loss < ascent


def test_loss_decreases_after_init_on_a_transformer(tiny_bert):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")
    batches = make_bert_batches(6)
    state = estimate_gora(tiny_bert, lora, batches, GoraConfig(num_steps=6, gamma=1e-2, show_progress=False))
    w0_loss = sum(tiny_bert(**b).loss.item() for b in batches) / 6
    peft_model = apply_gora(copy.deepcopy(tiny_bert), lora, state).eval()
    with torch.no_grad():
        gora_loss = sum(peft_model(**b).loss.item() for b in batches) / 6
    assert gora_loss < w0_loss
