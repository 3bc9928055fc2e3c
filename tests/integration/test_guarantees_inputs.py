"""Every bad input to estimate_gora / apply_gora gets a gora error that names the problem and the fix,
before work is wasted where the problem can be seen up front; never a stray IndexError, KeyError,
StopIteration, AttributeError or ZeroDivisionError from deep inside."""

import copy
import logging
import math
from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import BertForSequenceClassification

import gora.peft_bridge
from gora import GoraConfig, GoraState, apply_gora, estimate_gora
from gora.errors import (
    GoraConfigError,
    GoraConfigTypeError,
    GoraDataError,
    GoraNumericalError,
    GoraStateError,
    GoraTargetError,
    GoraTypeError,
    GoraUnsupportedError,
)

from conftest import _bert_config, make_bert_batches, tiny_gpt2
from test_hygiene import ModelSnapshot

LORA: dict[str, Any] = dict(r=4, lora_alpha=8, target_modules=["query", "value"])
STEPS = 3


def _config(**kwargs):
    return GoraConfig(num_steps=STEPS, show_progress=False, **kwargs)


class CountingLoss:
    """Default loss (``model(**batch).loss``) that counts forward passes, to show no work was wasted."""

    def __init__(self, transform=None):
        self.calls = 0
        self.transform = transform

    def __call__(self, model, batch):
        self.calls += 1
        loss = model(**batch).loss
        return self.transform(loss, self.calls - 1) if self.transform else loss


# -- batches ------------------------------------------------------------------------------------------
class LyingLength:
    """Claims 10 batches, yields 2 (a sized iterable whose __len__ is wrong)."""

    def __len__(self):
        return 10

    def __iter__(self):
        return iter(make_bert_batches(2))


@pytest.mark.parametrize("batches, message, forward_passes", [
    ([], "the batches are empty", 0),
    (make_bert_batches(2),
     r"hold 2 items but num_steps=3; pass at least 3 batches, or set GoraConfig\(num_steps=2\)", 0),
    (iter([]), "the batches are empty", 0),
    (iter(make_bert_batches(2)), r"gave 2 items but num_steps=3.*GoraConfig\(num_steps=2\)", 2),
    (LyingLength(), "gave 2 items but num_steps=3", 2),
    (5, "batches must be an iterable of batches.*got int", 0),
    ("input_ids", "batches must be an iterable of batches.*got str", 0),
    (make_bert_batches(1)[0], "batches is a single batch \\(a dict\\); pass an iterable of batches", 0),
], ids=["empty list", "short list", "empty iterator", "short iterator", "lying __len__", "int", "str", "one dict"])
def test_empty_short_or_wrong_batches_are_refused_with_counts(tiny_bert, batches, message, forward_passes):
    loss = CountingLoss()
    with pytest.raises(GoraDataError, match=message):
        estimate_gora(tiny_bert, LoraConfig(**LORA), batches, _config(), loss_fn=loss)
    assert loss.calls == forward_passes


def test_batches_without_labels_and_no_loss_fn_say_how_to_fix_it(tiny_bert):
    batches = [{k: v for k, v in b.items() if k != "labels"} for b in make_bert_batches(STEPS)]
    with pytest.raises(GoraDataError, match=r"returned no loss: include labels .* or pass loss_fn"):
        estimate_gora(tiny_bert, LoraConfig(**LORA), batches, _config())


def test_tuple_batches_need_a_loss_fn(tiny_bert):
    batches = [(b["input_ids"], b["labels"]) for b in make_bert_batches(STEPS)]
    with pytest.raises(GoraDataError, match="a batch is a tuple; the default loss is model\\(\\*\\*batch\\).loss"):
        estimate_gora(tiny_bert, LoraConfig(**LORA), batches, _config())


@pytest.mark.parametrize("loss_fn, message", [
    (lambda model, batch: model(**batch).logits, r"the loss must be a scalar tensor, got Tensor \(4, 2\)"),
    (lambda model, batch: 0.7, "the loss must be a scalar tensor, got float"),
    (lambda model, batch: torch.tensor(0.7), "the loss does not depend on any target weight"),
], ids=["logits", "float", "constant"])
def test_a_loss_fn_that_returns_no_usable_loss_is_refused(tiny_bert, loss_fn, message):
    with pytest.raises(GoraDataError, match=message):
        estimate_gora(tiny_bert, LoraConfig(**LORA), make_bert_batches(STEPS), _config(), loss_fn=loss_fn)


def test_a_loss_fn_that_is_not_callable_is_refused_before_any_forward_pass(tiny_bert):
    calls = []
    handle = tiny_bert.register_forward_pre_hook(lambda module, args: calls.append(1))
    try:
        with pytest.raises(GoraTypeError, match="loss_fn must be a function .* got str") as caught:
            estimate_gora(tiny_bert, LoraConfig(**LORA), make_bert_batches(STEPS), _config(), loss_fn="loss")
    finally:
        handle.remove()
    assert isinstance(caught.value, TypeError) and calls == []


def test_adaptive_gamma_without_held_out_batches_is_refused(tiny_bert):
    with pytest.raises(GoraDataError, match="adaptive_gamma needs held-out batches .* pass eval_batches"):
        estimate_gora(tiny_bert, LoraConfig(**LORA), make_bert_batches(STEPS), _config(adaptive_gamma=True))


# -- numbers ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, step", [(math.nan, 0), (math.inf, 2)])
def test_a_non_finite_loss_names_the_step(tiny_bert, bad, step):
    loss = CountingLoss(lambda value, i: value * bad if i == step else value)
    with pytest.raises(GoraNumericalError, match=f"the loss at estimation step {step + 1} is {bad}"):  # from 1
        estimate_gora(tiny_bert, LoraConfig(**LORA), make_bert_batches(STEPS), _config(), loss_fn=loss)
    assert loss.calls == step + 1  # stopped at once


def test_a_non_finite_gradient_names_the_layer_and_the_step(tiny_bert):
    def loss_fn(model, batch):
        loss_fn.step = getattr(loss_fn, "step", -1) + 1
        output = model(**batch)
        if loss_fn.step == 1:  # a finite loss whose gradients overflow at step 1
            output.logits.register_hook(lambda grad: grad * math.inf)
        return output.loss

    with pytest.raises(GoraNumericalError, match=r"gradient of \['bert\.encoder\.layer\.0\..*'\] at estimation step 2 "
                                                 "contains NaN or Inf"):
        estimate_gora(tiny_bert, LoraConfig(**LORA), make_bert_batches(STEPS), _config(), loss_fn=loss_fn)


def test_fp16_overflow_that_loss_scaling_fixes_is_recovered_and_recorded(tiny_bert):
    model = tiny_bert.half()

    def loss_fn(model, batch):
        output = model(**batch)
        output.logits.register_hook(lambda grad: grad * 1000.0)  # overflows at scale 1024, not at 1024/2**k
        return output.loss

    state = estimate_gora(model, LoraConfig(**LORA), make_bert_batches(STEPS), _config(), loss_fn=loss_fn)
    assert state.notes["fp16_final_loss_scale"] < 1024
    assert all(math.isfinite(v) for v in state.importance.values())
    assert all(torch.isfinite(c).all() for c in state.C.values())


# -- targets and layer types -------------------------------------------------------------------------
def test_targets_that_match_nothing_list_the_layers_that_exist(tiny_bert):
    loss = CountingLoss()
    with pytest.raises(GoraTargetError, match=r"target_modules=.*'qkv'.* matched no adaptable layer. Linear layers in "
                                              r"this model include 'bert\.encoder\.layer\.0\.attention\.self\.query'"):
        estimate_gora(tiny_bert, LoraConfig(r=4, lora_alpha=8, target_modules=["qkv"]), make_bert_batches(STEPS),
                      _config(), loss_fn=loss)
    assert loss.calls == 0


def test_targeting_only_embeddings_says_what_was_left_out(tiny_bert):
    with pytest.raises(GoraTargetError, match="left out: .*word_embeddings': 'embedding'"):
        estimate_gora(tiny_bert, LoraConfig(r=4, lora_alpha=8, target_modules=["word_embeddings"]),
                      make_bert_batches(STEPS), _config())


def test_an_unsupported_layer_type_is_refused_before_any_forward_pass(tiny_bert):
    loss = CountingLoss()
    with pytest.raises(GoraUnsupportedError, match="'bert.embeddings.LayerNorm' is a LayerNorm; GoRA adapts nn.Linear"):
        estimate_gora(tiny_bert, LoraConfig(r=4, lora_alpha=8, target_modules=["LayerNorm"]),
                      make_bert_batches(STEPS), _config(), loss_fn=loss)
    assert loss.calls == 0


class Params4bit(nn.Parameter):
    """Stands in for bitsandbytes' Params4bit: a Parameter subclass (recognised by its type, whatever its dtype)."""


class Linear4bit(nn.Linear):
    """Stands in for bitsandbytes' Linear4bit, whose weight is a Params4bit."""


def _quantised_by_name(model):
    old = model.bert.encoder.layer[1].attention.self.value
    new = Linear4bit(old.in_features, old.out_features)
    new.load_state_dict(old.state_dict())
    new.weight = Params4bit(new.weight.data, requires_grad=False)
    model.bert.encoder.layer[1].attention.self.value = new


def _quantised_by_dtype(model):
    layer = model.bert.encoder.layer[0].attention.self.query
    layer.weight = nn.Parameter(torch.zeros_like(layer.weight, dtype=torch.int8), requires_grad=False)


@pytest.mark.parametrize("quantise", [_quantised_by_name, _quantised_by_dtype], ids=["class name", "int8 weight"])
def test_quantised_modules_are_refused_during_estimation_with_the_qgora_recipe(tiny_bert, quantise):
    quantise(tiny_bert)
    loss = CountingLoss()
    with pytest.raises(GoraUnsupportedError, match="is quantised; estimate on the full-precision model, save the "
                                                   "GoraState, then apply_gora to the quantised model"):
        estimate_gora(tiny_bert, LoraConfig(**LORA), make_bert_batches(STEPS), _config(), loss_fn=loss)
    assert loss.calls == 0


# -- configs --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lora_config, gora_config, error, message", [
    (LoraConfig(**LORA), {"num_steps": 3}, GoraConfigTypeError, "gora_config must be a GoraConfig or None, got dict"),
    (dict(LORA), None, GoraConfigTypeError, "lora_config must be a peft.LoraConfig, got dict"),
    (LoraConfig(r=4, lora_alpha=0, target_modules=["query"]), None, GoraConfigError, "lora_alpha must be a finite"),
    (LoraConfig(r=0, lora_alpha=8, target_modules=["query"]), None, GoraConfigError, "LoraConfig.r must be >= 1"),
    (LoraConfig(r=1, lora_alpha=8, target_modules=["query"]), "min_rank=5", GoraConfigError,
     r"\[5, 4\], which is empty"),
], ids=["config dict", "lora dict", "alpha 0", "r 0", "empty rank range"])
def test_unusable_configs_are_refused_before_any_forward_pass(tiny_bert, lora_config, gora_config, error, message):
    if gora_config == "min_rank=5":
        gora_config = _config(min_rank=5)
    loss = CountingLoss()
    with pytest.raises(error, match=message):
        estimate_gora(tiny_bert, lora_config, make_bert_batches(STEPS), gora_config, loss_fn=loss)
    assert loss.calls == 0


# -- apply_gora ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_state():
    torch.manual_seed(0)
    model = BertForSequenceClassification(_bert_config()).eval()  # the architecture of tiny_bert
    return estimate_gora(model, LoraConfig(**LORA), make_bert_batches(STEPS), _config())


@pytest.fixture
def bert_state(shared_state):
    return copy.deepcopy(shared_state)


def _other_models():
    wider = _bert_config()
    wider.hidden_size, wider.intermediate_size = 48, 96
    shallower = _bert_config()
    shallower.num_hidden_layers = 1
    torch.manual_seed(1)
    return {
        "wider": (BertForSequenceClassification(wider).eval(), r"is 48x48, the state has \(32, 32\)"),
        "fewer layers": (BertForSequenceClassification(shallower).eval(),
                         "'bert.encoder.layer.1.attention.self.query' does not exist"),
        "another family": (tiny_gpt2(), "does not exist"),
    }


@pytest.mark.parametrize("which", ["wider", "fewer layers", "another family"])
def test_a_state_from_another_model_is_refused_before_the_model_is_touched(bert_state, tmp_path, monkeypatch, which):
    bert_state.save(tmp_path / "state")
    state = GoraState.load(tmp_path / "state")  # as a user would: from disk
    model, message = _other_models()[which]
    monkeypatch.setattr(gora.peft_bridge, "get_peft_model",
                        lambda *a, **k: pytest.fail("the model reached PEFT despite a foreign state"))
    snapshot = ModelSnapshot(model)
    with pytest.raises(GoraStateError, match=f"does not fit the model .*{message}.*BertForSequenceClassification; "
                                             "estimate again on this model"):
        apply_gora(model, LoraConfig(**LORA), state)
    snapshot.assert_unchanged()


@pytest.mark.parametrize("make_args, error, message", [
    (lambda m, s: (m, LoraConfig(**LORA), "runs/state"), GoraTypeError,
     "state must be a GoraState, got str.*GoraState.load"),
    (lambda m, s: (m, LoraConfig(r=4, lora_alpha=0), s), GoraConfigError, "lora_alpha must be a finite number > 0"),
    (lambda m, s: (m, dict(LORA), s), GoraConfigTypeError, "lora_config must be a peft.LoraConfig"),
    (lambda m, s: (get_peft_model(m, LoraConfig(**LORA)), LoraConfig(**LORA), s), GoraTargetError,
     "already a PeftModel"),
], ids=["path instead of state", "alpha 0", "lora dict", "PeftModel"])
def test_apply_refuses_wrong_arguments_with_gora_errors(tiny_bert, bert_state, make_args, error, message):
    model, lora_config, state = make_args(tiny_bert, bert_state)
    with pytest.raises(error, match=message):
        apply_gora(model, lora_config, state)


def test_a_model_that_already_holds_adapters_is_refused_and_unload_is_the_fix(tiny_bert, bert_state):
    """get_peft_model injects LoRA into the base model in place: estimating or applying again on it must say so
    (not "is a Linear, not a linear layer" or "matched no adaptable layer"), change nothing, and the advised
    ``unload()`` must work."""
    peft_model = apply_gora(tiny_bert, LoraConfig(**LORA), bert_state)
    snapshot = ModelSnapshot(tiny_bert)
    message = r"already holds 4 PEFT adapter layers .*query.*base = peft_model.unload\(\)"
    with pytest.raises(GoraTargetError, match=message):
        apply_gora(tiny_bert, LoraConfig(**LORA), bert_state)  # the same base model, a second time
    with pytest.raises(GoraTargetError, match=message):
        estimate_gora(peft_model, LoraConfig(**LORA), make_bert_batches(STEPS), _config())
    snapshot.assert_unchanged()
    base = peft_model.unload()
    assert apply_gora(base, LoraConfig(**LORA), bert_state) is not None


@pytest.mark.parametrize("targets, warned", [(["query", "value"], False), (["key"], True),
                                              (["query", "value", "key"], True), (["value"], True)])
def test_apply_warns_when_target_modules_differ_from_the_states_layers(tiny_bert, bert_state, caplog, targets, warned):
    with caplog.at_level(logging.WARNING, logger="gora"):
        peft_model = apply_gora(tiny_bert, LoraConfig(**{**LORA, "target_modules": targets}), bert_state)
    assert ("differs from the state's targets" in caplog.text) == warned
    adapted = {n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == set(bert_state.adapted)  # the state decides, whatever the warning


@pytest.mark.parametrize("gamma", [math.nan, -0.1, math.inf])
def test_apply_refuses_a_gamma_override_that_is_not_a_finite_non_negative_number(tiny_bert, bert_state, gamma):
    snapshot = ModelSnapshot(tiny_bert)
    with pytest.raises(GoraStateError, match="gamma must be a finite number >= 0"):
        apply_gora(tiny_bert, LoraConfig(**LORA), bert_state, gamma=gamma)
    snapshot.assert_unchanged()


def test_apply_refuses_a_state_that_adapts_nothing(tiny_bert, bert_state):
    bert_state.ranks = {name: 0 for name in bert_state.ranks}
    bert_state.A, bert_state.C = {}, {}
    with pytest.raises(GoraStateError, match="adapts no layer"):
        apply_gora(tiny_bert, LoraConfig(**LORA), bert_state)
