"""GoRA → plain PeftModel: per-layer ranks and scaling, the initial step, save/reload, merge, portable export."""

import copy
import json
import logging
import math

import pytest
import torch
from peft import LoraConfig, PeftModel

from gora import GoraConfig, GoraState, apply_gora, estimate_gora, export_adapter, get_gora_model

from conftest import make_bert_batches

LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")


def _inputs(batch):
    return {k: v for k, v in batch.items() if k != "labels"}


def _logits(model, batch):
    with torch.no_grad():
        return model(**_inputs(batch)).logits


@pytest.fixture
def gora_model(tiny_bert):
    base_weights = copy.deepcopy(tiny_bert.state_dict())
    config = GoraConfig(num_steps=8, show_progress=False)
    state = estimate_gora(tiny_bert, LoraConfig(**LORA), make_bert_batches(8), config)
    return apply_gora(tiny_bert, LoraConfig(**LORA), state), state, base_weights


def _fresh_base(tiny_bert_cls_weights):
    from transformers import BertForSequenceClassification

    from conftest import _bert_config

    model = BertForSequenceClassification(_bert_config()).eval()
    model.load_state_dict(tiny_bert_cls_weights)
    return model


def test_layers_get_their_rank_and_rslora_scaling(gora_model):
    peft_model, state, _ = gora_model
    modules = dict(peft_model.base_model.model.named_modules())
    for name, rank in state.ranks.items():
        layer = modules[name]
        if rank == 0:
            assert not hasattr(layer, "lora_A")
            continue
        assert layer.lora_A["default"].weight.shape == (rank, state.shapes[name][1])
        assert layer.lora_B["default"].weight.shape == (state.shapes[name][0], rank)
        assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(rank))
    assert len(set(state.ranks.values())) > 1  # ranks really differ across layers


def test_initial_delta_is_the_projected_descent_step(gora_model, tiny_bert):
    peft_model, state, _ = gora_model
    modules = dict(peft_model.base_model.model.named_modules())
    name = state.adapted[0]
    layer = modules[name]
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    delta = layer.scaling["default"] * b @ a
    rank, in_features = a.shape
    c = state.C[name]
    torch.testing.assert_close(delta, -state.gamma * math.sqrt(in_features / rank) * c @ a, rtol=1e-5, atol=1e-7)


def test_base_weights_are_untouched_and_logits_move(gora_model, tiny_bert):
    peft_model, _, base_weights = gora_model
    batch = make_bert_batches(1, seed=9)[0]
    base = _fresh_base(base_weights)
    for key, value in base.state_dict().items():
        torch.testing.assert_close(value, base_weights[key], rtol=0, atol=0)
    with peft_model.disable_adapter():
        torch.testing.assert_close(_logits(peft_model, batch), _logits(base, batch))
    assert not torch.allclose(_logits(peft_model, batch), _logits(base, batch))


def test_vanilla_peft_reload_gives_same_logits(gora_model, tmp_path):
    peft_model, _, base_weights = gora_model
    batch = make_bert_batches(1, seed=9)[0]
    peft_model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["use_rslora"] is True and "gora" not in json.dumps(config).lower()
    reloaded = PeftModel.from_pretrained(_fresh_base(base_weights), tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded, batch), _logits(peft_model, batch), rtol=0, atol=0)


def test_merge_and_unload_matches_adapter_forward(gora_model):
    peft_model, _, _ = gora_model
    batch = make_bert_batches(1, seed=9)[0]
    expected = _logits(peft_model, batch)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(_logits(merged, batch), expected, rtol=1e-5, atol=1e-6)


def test_portable_export_reloads_to_same_logits(gora_model, tmp_path, caplog):
    peft_model, state, base_weights = gora_model
    batch = make_bert_batches(1, seed=9)[0]
    with caplog.at_level(logging.WARNING, logger="gora"):
        export_adapter(peft_model, tmp_path / "portable", portable=True)
    r_max = max(state.ranks.values())
    assert f"--max-lora-rank >= {r_max}" in caplog.text  # spec §5: warn, a default logging setup shows it
    config = json.loads((tmp_path / "portable" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False
    assert config["r"] == max(state.ranks.values()) == config["lora_alpha"]
    assert set(config["rank_pattern"]) == set(config["alpha_pattern"])
    assert all(config["alpha_pattern"][k] == v for k, v in config["rank_pattern"].items())
    sidecar = json.loads((tmp_path / "portable" / "gora_config.json").read_text())
    assert sidecar["ranks"] == state.ranks and sidecar["importance"] == pytest.approx(state.importance)
    reloaded = PeftModel.from_pretrained(_fresh_base(base_weights), tmp_path / "portable").eval()
    torch.testing.assert_close(_logits(reloaded, batch), _logits(peft_model, batch), rtol=1e-5, atol=1e-6)
    scalings = [m.scaling["default"] for m in reloaded.base_model.model.modules()
                if isinstance(getattr(m, "scaling", None), dict) and "default" in m.scaling]
    assert scalings and set(scalings) == {1.0}


def test_state_round_trip_gives_same_model(tiny_bert, tmp_path):
    config = GoraConfig(num_steps=4, show_progress=False)
    state = estimate_gora(tiny_bert, LoraConfig(**LORA), make_bert_batches(4), config)
    state.save(tmp_path / "state")
    loaded = GoraState.load(tmp_path / "state")
    assert loaded.ranks == state.ranks and loaded.importance == state.importance
    assert loaded.shapes == state.shapes and loaded.budget == state.budget
    for name in state.adapted:
        assert torch.equal(loaded.A[name], state.A[name]) and torch.equal(loaded.C[name], state.C[name])


def test_gamma_can_change_at_apply_time(tiny_bert):
    config = GoraConfig(num_steps=4, show_progress=False)
    state = estimate_gora(tiny_bert, LoraConfig(**LORA), make_bert_batches(4), config)
    name = state.adapted[0]
    b_default = _lora_b(apply_gora(copy.deepcopy(tiny_bert), LoraConfig(**LORA), state), name)
    b_double = _lora_b(apply_gora(copy.deepcopy(tiny_bert), LoraConfig(**LORA), state, gamma=2 * state.gamma), name)
    torch.testing.assert_close(b_double, 2 * b_default)
    b_zero = _lora_b(apply_gora(copy.deepcopy(tiny_bert), LoraConfig(**LORA), state, gamma=0.0), name)
    assert torch.count_nonzero(b_zero) == 0


def _lora_b(peft_model, name):
    return dict(peft_model.base_model.model.named_modules())[name].lora_B["default"].weight.detach()


def test_rank_zero_layers_stay_plain(tiny_bert):
    config = GoraConfig(num_steps=4, min_rank=0, show_progress=False)
    lora = LoraConfig(r=1, lora_alpha=2, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")
    state = estimate_gora(tiny_bert, lora, make_bert_batches(4), config)
    zero = [n for n, r in state.ranks.items() if r == 0]
    assert zero, "expected some rank-0 layers at r=1 with min_rank=0"
    peft_model = apply_gora(tiny_bert, lora, state)
    modules = dict(peft_model.base_model.model.named_modules())
    for name in zero:
        assert type(modules[name]).__name__ == "Linear" and not hasattr(modules[name], "lora_A")
    assert all(n not in peft_model.peft_config["default"].target_modules for n in zero)


def test_get_gora_model_equals_estimate_then_apply(tiny_bert):
    batches = make_bert_batches(4)
    config = GoraConfig(num_steps=4, show_progress=False)
    one = get_gora_model(copy.deepcopy(tiny_bert), LoraConfig(**LORA), batches, gora_config=config)
    state = estimate_gora(tiny_bert, LoraConfig(**LORA), batches, gora_config=config)
    two = apply_gora(tiny_bert, LoraConfig(**LORA), state)
    for (k1, v1), (k2, v2) in zip(one.state_dict().items(), two.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_layers_without_gradient_are_reported_and_left_plain(tiny_bert):
    def loss_fn(model, batch):  # never reads the pooler
        return model.bert(input_ids=batch["input_ids"]).last_hidden_state.pow(2).mean()

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "pooler.dense"])
    state = estimate_gora(tiny_bert, lora, make_bert_batches(3), GoraConfig(num_steps=3, show_progress=False),
                          loss_fn=loss_fn)
    assert state.skipped == {"bert.pooler.dense": "no gradient"}
    assert state.ranks["bert.pooler.dense"] == 0 and "bert.pooler.dense" not in state.importance
    assert state.budget == 4 * 2 * (32 + 32)  # the gradient-less layer is out of the budget
    peft_model = apply_gora(tiny_bert, lora, state)
    assert not hasattr(dict(peft_model.base_model.model.named_modules())["bert.pooler.dense"], "lora_A")
