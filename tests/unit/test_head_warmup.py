"""Head warm-up: a linear probe of the new classification head before estimation, kept in the state and applied."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel

from gora import GoraConfig, GoraState, apply_gora, estimate_gora
from gora.errors import GoraConfigError, GoraStateError

from conftest import make_bert_batches, make_lm_batches, tiny_llama

LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"])
STEPS = 4


def _seq_cls_lora(**changes) -> LoraConfig:
    return LoraConfig(**{**LORA, "task_type": "SEQ_CLS", **changes})


def _config(**changes) -> GoraConfig:
    return GoraConfig(**{"num_steps": STEPS, "show_progress": False, "head_warmup_steps": 6,
                         "head_warmup_lr": 1e-2, **changes})


def _weights(model) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in model.state_dict().items()}


def _logits(model, batches) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(**{k: v for k, v in b.items() if k != "labels"}).logits for b in batches])


def test_warm_up_leaves_the_model_bit_identical_and_changes_the_returned_head(tiny_bert):
    before = _weights(tiny_bert)
    state = estimate_gora(tiny_bert, _seq_cls_lora(), make_bert_batches(STEPS), _config())
    assert all(torch.equal(t, before[n]) for n, t in tiny_bert.state_dict().items())
    assert set(state.head) == {"classifier.weight", "classifier.bias"}
    assert not torch.equal(state.head["classifier.weight"], before["classifier.weight"])
    notes = state.notes["head_warmup"]
    assert notes["steps"] == 6 and notes["last_loss"] < notes["first_loss"]  # the probe learned
    peft_model = apply_gora(tiny_bert, _seq_cls_lora(), state)
    trainable = peft_model.base_model.model.classifier.modules_to_save["default"]
    torch.testing.assert_close(trainable.weight, state.head["classifier.weight"], rtol=0, atol=0)
    original = peft_model.base_model.model.classifier.original_module
    assert torch.equal(original.weight, before["classifier.weight"])  # the user's head is untouched


def test_estimation_runs_through_the_warmed_head(tiny_bert):
    """Estimating with the warmed head written in by hand gives the same importances as the warm-up run."""
    batches = make_bert_batches(STEPS)
    warmed = estimate_gora(tiny_bert, _seq_cls_lora(), batches, _config())
    plain = estimate_gora(tiny_bert, _seq_cls_lora(), batches, _config(head_warmup_steps=0))
    by_hand = copy.deepcopy(tiny_bert)
    with torch.no_grad():
        for name, tensor in warmed.head.items():
            by_hand.get_parameter(name).copy_(tensor)
    reference = estimate_gora(by_hand, _seq_cls_lora(), batches, _config(head_warmup_steps=0))
    assert warmed.importance == pytest.approx(reference.importance, rel=1e-5)
    assert warmed.importance != pytest.approx(plain.importance, rel=1e-3)
    assert plain.head == {} and "head_warmup" not in plain.notes


def test_the_warmed_head_round_trips_and_vanilla_peft_reloads_it_with_identical_logits(tiny_bert, tmp_path):
    batches = make_bert_batches(STEPS)
    state = estimate_gora(tiny_bert, _seq_cls_lora(), batches, _config())
    loaded = GoraState.load(state.save(tmp_path / "state"))
    assert loaded.head.keys() == state.head.keys()
    assert all(torch.equal(loaded.head[n], state.head[n]) for n in state.head)
    peft_model = apply_gora(copy.deepcopy(tiny_bert), _seq_cls_lora(), loaded).eval()
    expected = _logits(peft_model, batches)
    peft_model.save_pretrained(str(tmp_path / "adapter"))
    reloaded = PeftModel.from_pretrained(copy.deepcopy(tiny_bert), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(_logits(reloaded, batches), expected, rtol=0, atol=0)
    assert not torch.allclose(_logits(tiny_bert, batches), expected)


def test_the_tensor_file_of_a_state_with_a_head_is_checksummed(tiny_bert, tmp_path):
    from gora.atomic import TENSOR_FILE

    path = estimate_gora(tiny_bert, _seq_cls_lora(), make_bert_batches(STEPS), _config()).save(tmp_path / "s")
    data = bytearray((path / TENSOR_FILE).read_bytes())
    data[-3] ^= 0xFF
    (path / TENSOR_FILE).write_bytes(bytes(data))
    with pytest.raises(GoraStateError, match="checksum"):
        GoraState.load(path)


def test_a_state_with_a_head_refuses_a_model_whose_head_has_another_shape(tiny_bert):
    from transformers import BertForSequenceClassification

    state = estimate_gora(tiny_bert, _seq_cls_lora(), make_bert_batches(STEPS), _config())
    other = BertForSequenceClassification(tiny_bert.config.__class__(**{**tiny_bert.config.to_dict(),
                                                                        "num_labels": 3})).eval()
    before = _weights(other)
    with pytest.raises(GoraStateError, match="warmed head does not fit.*classifier.weight.*\\(3, 32\\)"):
        apply_gora(other, _seq_cls_lora(), state)
    assert all(torch.equal(t, before[n]) for n, t in other.state_dict().items()) and not hasattr(other, "peft_config")


def test_a_state_with_a_head_refuses_a_lora_config_that_does_not_keep_the_head_trainable(tiny_bert):
    state = estimate_gora(tiny_bert, _seq_cls_lora(), make_bert_batches(STEPS), _config())
    with pytest.raises(GoraStateError, match="does not keep trainable.*task_type='SEQ_CLS'"):
        apply_gora(tiny_bert, LoraConfig(**LORA), state)


def test_modules_to_save_alone_names_the_head_to_warm(tiny_bert):
    state = estimate_gora(tiny_bert, LoraConfig(**LORA, modules_to_save=["classifier"]), make_bert_batches(STEPS),
                          _config())
    assert set(state.head) == {"classifier.weight", "classifier.bias"}
    peft_model = apply_gora(tiny_bert, LoraConfig(**LORA, modules_to_save=["classifier"]), state)
    assert torch.equal(peft_model.base_model.model.classifier.modules_to_save["default"].bias,
                       state.head["classifier.bias"])


def test_a_causal_lm_has_no_head_to_warm():
    model = tiny_llama()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    with pytest.raises(GoraConfigError, match="head_warmup_steps needs a newly initialised head.*causal LM"):
        estimate_gora(model, lora, make_lm_batches(STEPS), _config())
    tied = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    with pytest.raises(GoraConfigError, match="shares its weights with.*embed_tokens"):
        estimate_gora(model, tied, make_lm_batches(STEPS), _config())


def test_no_head_in_the_lora_config_is_refused_before_any_work(tiny_bert):
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        return model(**batch).loss

    with pytest.raises(GoraConfigError, match="task_type='SEQ_CLS'"):
        estimate_gora(tiny_bert, LoraConfig(**LORA), make_bert_batches(STEPS), _config(), loss_fn=loss_fn)
    assert calls == []


def test_head_warmup_settings_are_validated():
    with pytest.raises(GoraConfigError, match="head_warmup_steps must be >= 0"):
        GoraConfig(head_warmup_steps=-1)
    with pytest.raises(GoraConfigError, match="head_warmup_lr=0 would leave the head"):
        GoraConfig(head_warmup_steps=3, head_warmup_lr=0.0)
    assert GoraConfig().head_warmup_steps == 0


def test_the_warm_up_cycles_over_fewer_batches_than_steps(tiny_bert):
    seen = []

    def loss_fn(model, batch):
        seen.append(int(batch["input_ids"][0, 0]))
        return model(**batch).loss

    batches = make_bert_batches(STEPS)
    estimate_gora(tiny_bert, _seq_cls_lora(), batches, _config(head_warmup_steps=10), loss_fn=loss_fn)
    firsts = [int(b["input_ids"][0, 0]) for b in batches]
    assert seen[:10] == [firsts[i % STEPS] for i in range(10)]  # the warm-up, cycled
    assert seen[10:] == firsts  # then estimation over the same batches, none lost


def test_a_bf16_head_is_warmed_through_fp32_copies_and_kept_in_bf16(tiny_bert):
    model = tiny_bert.to(torch.bfloat16)
    before = _weights(model)
    state = estimate_gora(model, _seq_cls_lora(), make_bert_batches(STEPS), _config(head_warmup_lr=1e-3))
    assert state.head["classifier.weight"].dtype == torch.bfloat16
    assert not torch.equal(state.head["classifier.weight"], before["classifier.weight"])  # 1e-3 steps survive
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
