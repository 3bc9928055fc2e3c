"""Every model family GoRA must handle: estimate, apply, forward, with the targets PEFT would pick."""

import copy

import pytest
import torch
from peft import LoraConfig

from gora import GoraConfig, apply_gora, estimate_gora

from conftest import (
    make_bert_batches,
    make_lm_batches,
    make_t5_batches,
    make_vit_batches,
    tiny_gpt2,
    tiny_llama,
    tiny_t5,
    tiny_vit,
)

CONFIG = GoraConfig(num_steps=3, show_progress=False)


def _check(model, lora_config, batches, expected_count):
    weights = copy.deepcopy(model.state_dict())
    state = estimate_gora(model, lora_config, batches, CONFIG)
    assert len(state.ranks) == expected_count, sorted(state.ranks)
    for key, value in model.state_dict().items():
        assert torch.equal(value, weights[key])
    peft_model = apply_gora(model, lora_config, state)
    batch = {k: v for k, v in batches[0].items()}
    loss = peft_model(**batch).loss
    loss.backward()
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    return state


def test_llama_all_linear_excludes_tied_head():
    model = tiny_llama()
    state = _check(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"), make_lm_batches(3), 2 * 7)
    assert not any("lm_head" in n for n in state.ranks)


def test_llama_tied_head_named_explicitly_is_never_adapted():
    model = tiny_llama()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"])
    state = estimate_gora(model, lora, make_lm_batches(3), CONFIG)
    assert "lm_head" in state.skipped and "lm_head" not in state.ranks


def test_gpt2_conv1d_layers_are_adapted():
    model = tiny_gpt2()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)
    state = _check(model, lora, make_lm_batches(3), 2 * 4)
    assert state.shapes["transformer.h.0.attn.c_attn"] == (96, 32)  # (out, in), although Conv1D stores in × out


def test_t5_short_names_match_by_dotted_suffix_not_substring():
    model = tiny_t5()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v", "o"])
    state = _check(model, lora, make_t5_batches(3), 2 * 2 * 3 + 2 * 3)
    # "o" must not hit wo, lm_head, or any name merely containing the letter o
    assert all(name.split(".")[-1] in {"q", "v", "o"} for name in state.ranks)


def test_vit_image_classifier():
    model = tiny_vit()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"])
    _check(model, lora, make_vit_batches(3), 2 * 2)


def test_bert_regex_targets(tiny_bert):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*layer\.1\.attention\.self\.(query|key)",
                      task_type="SEQ_CLS")
    state = _check(tiny_bert, lora, make_bert_batches(3), 2)
    assert set(state.ranks) == {"bert.encoder.layer.1.attention.self.query", "bert.encoder.layer.1.attention.self.key"}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_estimate_in_fp32(tiny_bert, dtype):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"])
    reference = estimate_gora(copy.deepcopy(tiny_bert), lora, make_bert_batches(3), CONFIG)
    model = tiny_bert.to(dtype)
    weights = copy.deepcopy(model.state_dict())
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    state = estimate_gora(model, lora, make_bert_batches(3), CONFIG)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(c.dtype == torch.float32 and torch.isfinite(c).all() for c in state.C.values())
    for name in state.importance:  # same scores as fp32, up to half-precision forward error
        assert state.importance[name] == pytest.approx(reference.importance[name], rel=0.3)
    if dtype == torch.float16:
        assert state.notes["fp16_final_loss_scale"] >= 1.0
        # this model's gradients are far from fp16's range at any scale tried: no step overflows, the scale stays
        assert state.notes["fp16_final_loss_scale"] == CONFIG.fp16_loss_scale == 1024.0
    else:
        assert "fp16_final_loss_scale" not in state.notes  # bf16 needs no loss scaling
    peft_model = apply_gora(model, lora, state)
    out = peft_model(**{k: v for k, v in make_bert_batches(1)[0].items() if k != "labels"}).logits
    assert torch.isfinite(out).all()
