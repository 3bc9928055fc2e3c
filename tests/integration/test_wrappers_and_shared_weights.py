"""Targets that are not plain, separate nn.Linear layers: a weight Parameter shared by two layers, torch's
``nn.MultiheadAttention`` (whose ``out_proj`` is a ``NonDynamicallyQuantizableLinear``), and parametrized
weights (``weight_norm``, ``spectral_norm``). Each is estimated correctly, left out with its reason, or refused
with the fix, never a raw torch error or a wrong "quantised" refusal."""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn.utils import parametrizations

from gora import GoraConfig, apply_gora, estimate_gora
from gora.errors import GoraTargetError, GoraUnsupportedError
from gora.estimation import run_estimation
from gora.targets import _is_quantised, resolve_targets

from test_hygiene import ModelSnapshot

CONFIG = GoraConfig(num_steps=3, show_progress=False)


def _regression_batches(count: int = 3, width: int = 8, seed: int = 0) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    return [{"x": torch.randn(4, width, generator=generator), "y": torch.randn(4, width, generator=generator)}
            for _ in range(count)]


def _loss(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


# -- a weight Parameter shared by two target layers ----------------------------------------------------------
class SharedWeight(nn.Module):
    """``second`` is registered first but ``first`` sorts first: the shared weight belongs to ``first``."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.second = nn.Linear(8, 8)
        self.first = nn.Linear(8, 8)
        self.second.weight = self.first.weight  # one Parameter, used twice per forward
        self.last = nn.Linear(8, 8)

    def forward(self, x):
        return self.last(torch.tanh(self.second(torch.tanh(self.first(x)))))


SHARED_LORA = LoraConfig(r=2, lora_alpha=4, target_modules=["first", "second", "last"])


def test_a_layer_sharing_an_earlier_targets_weight_is_left_out_with_the_reason(caplog):
    with caplog.at_level(logging.WARNING, logger="gora.targets"):
        targets, skipped = resolve_targets(SharedWeight(), SHARED_LORA)
    assert [t.name for t in targets] == ["first", "last"]
    assert skipped == {"second": "shares its weight with 'first'"}
    assert "'second' shares its weight Parameter with 'first'" in caplog.text
    assert "covers both uses" in caplog.text


def test_the_owner_of_a_shared_weight_accumulates_the_gradient_of_both_uses():
    model, batches = SharedWeight().eval(), _regression_batches()
    targets, _ = resolve_targets(model, SHARED_LORA)
    run = run_estimation(model, targets, iter(batches), CONFIG, _loss, None, torch.device("cpu"))
    assert {name: sums.count for name, sums in run.sums.items()} == {"first": 3, "last": 3}

    reference = copy.deepcopy(model)  # plain autograd: the Parameter's gradient sums both uses
    total = torch.zeros(8, 8, dtype=torch.float64)
    for batch in batches:
        (grad,) = torch.autograd.grad(_loss(reference, batch), [reference.first.weight])
        total += grad.double()
    torch.testing.assert_close(run.sums["first"].grad.double() / 3, total / 3, rtol=1e-5, atol=1e-8)


def test_a_shared_weight_is_estimated_and_adapted_once():
    model = SharedWeight()
    snapshot = ModelSnapshot(model)
    state = estimate_gora(model, SHARED_LORA, _regression_batches(), CONFIG, loss_fn=_loss)
    snapshot.assert_unchanged()
    assert sorted(state.ranks) == ["first", "last"] and all(rank > 0 for rank in state.ranks.values())
    assert state.skipped == {"second": "shares its weight with 'first'"}  # not "no gradient", not rank 0
    peft_model = apply_gora(model, SHARED_LORA, state)
    adapted = sorted(name for name, module in peft_model.base_model.model.named_modules() if hasattr(module, "lora_A"))
    assert adapted == ["first", "last"]
    _loss(peft_model, _regression_batches(1)[0]).backward()


# -- nn.MultiheadAttention ------------------------------------------------------------------------------------
class WithAttention(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Linear(8, 8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 8)

    def forward(self, x):
        hidden = torch.tanh(self.inp(x)).unsqueeze(1).expand(-1, 3, -1)
        attended, _ = self.mha(hidden, hidden, hidden)
        return self.head(attended.mean(1))


OUT_PROJ_REASON = "out_proj of an nn.MultiheadAttention, which never calls it: a LoRA adapter would not run"


def test_all_linear_on_a_model_with_multihead_attention_is_estimated_and_applied():
    model = WithAttention()
    assert type(model.mha.out_proj).__name__ == "NonDynamicallyQuantizableLinear"  # once refused as "quantised"
    lora = LoraConfig(r=2, lora_alpha=4, target_modules="all-linear")
    snapshot = ModelSnapshot(model)
    state = estimate_gora(model, lora, _regression_batches(), CONFIG, loss_fn=_loss)
    snapshot.assert_unchanged()
    assert sorted(state.ranks) == ["head", "inp"] and all(rank > 0 for rank in state.ranks.values())
    assert state.skipped == {"mha.out_proj": OUT_PROJ_REASON}
    peft_model = apply_gora(model, lora, state)
    _loss(peft_model, _regression_batches(1)[0]).backward()
    assert all(p.grad is not None for n, p in peft_model.named_parameters() if "lora_" in n)


def test_out_proj_named_alone_is_refused_with_the_reason_it_is_left_out():
    with pytest.raises(GoraTargetError, match="matched no adaptable layer .*out_proj of an nn.MultiheadAttention"):
        estimate_gora(WithAttention(), LoraConfig(r=2, lora_alpha=4, target_modules=["out_proj"]),
                      _regression_batches(), CONFIG, loss_fn=_loss)


def test_why_out_proj_is_left_out_a_peft_adapter_on_it_never_changes_the_output():
    """Why GoRA leaves it out: nn.MultiheadAttention reads out_proj.weight in F.multi_head_attention_forward."""
    model = WithAttention().eval()
    x = _regression_batches(1)[0]["x"]
    with torch.no_grad():
        before = model(x)
    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["out_proj"]))
    lora_b = peft_model.base_model.model.mha.out_proj.lora_B["default"].weight
    with torch.no_grad():
        lora_b.fill_(10.0)  # a large adapter: any effect would show
        after = peft_model(x)
    torch.testing.assert_close(after, before)


class Params4bit(nn.Parameter):
    """Stands in for bitsandbytes' Params4bit: a Parameter subclass (its data may still be float)."""


@pytest.mark.parametrize("make, quantised", [
    (lambda: nn.Linear(4, 4), False),
    (lambda: nn.MultiheadAttention(4, 2).out_proj, False),  # NonDynamicallyQuantizableLinear: a plain Linear
    (lambda: _with_weight(nn.Linear(4, 4), lambda w: Params4bit(w.data)), True),
    (lambda: _with_weight(nn.Linear(4, 4), lambda w: nn.Parameter(w.data.to(torch.int8), requires_grad=False)), True),
    (lambda: _with_weight(nn.Linear(4, 4), lambda w: nn.Parameter(w.data.to(torch.float8_e4m3fn),
                                                                 requires_grad=False)), True),
    (lambda: type("QuantLinear", (nn.Module,), {})(), True),  # GPTQ/AWQ style: no float weight, a hinting name
], ids=["Linear", "MultiheadAttention.out_proj", "Params4bit", "int8", "float8", "no weight"])
def test_quantised_is_told_by_the_weight_not_by_a_plain_linear_class_name(make, quantised):
    assert _is_quantised(make()) is quantised


def _with_weight(module: nn.Module, change) -> nn.Module:
    module.weight = change(module.weight)
    return module


# -- parametrized weights -------------------------------------------------------------------------------------
class TwoLayers(nn.Module):
    def __init__(self, wrap):
        super().__init__()
        torch.manual_seed(0)
        self.a = wrap(nn.Linear(8, 8))
        self.b = nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _old_weight_norm(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated, still in use
        return torch.nn.utils.weight_norm(module)


@pytest.mark.parametrize("wrap", [parametrizations.weight_norm, parametrizations.spectral_norm, _old_weight_norm],
                         ids=["parametrizations.weight_norm", "spectral_norm", "old weight_norm"])
def test_a_parametrized_target_is_refused_with_the_fix_before_any_work(wrap):
    model = TwoLayers(wrap)
    snapshot = ModelSnapshot(model)
    calls = []

    def loss(module, batch):
        calls.append(1)
        return _loss(module, batch)

    with pytest.raises(GoraUnsupportedError, match=r"module 'a' .*has a parametrized weight.*remove_parametrizations"
                                                   r"\(module, 'weight'\).*exclude_modules"):
        estimate_gora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b"]), _regression_batches(), CONFIG,
                      loss_fn=loss)
    assert not calls
    snapshot.assert_unchanged()
    # leaving the layer out is the other fix
    state = estimate_gora(model, LoraConfig(r=2, lora_alpha=4, target_modules=["a", "b"], exclude_modules=["a"]),
                          _regression_batches(), CONFIG, loss_fn=loss)
    assert list(state.ranks) == ["b"]
