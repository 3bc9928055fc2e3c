"""CUDA end to end (skipped without a GPU): bf16 model, accumulators on the device or offloaded."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel

from gora import GoraConfig, apply_gora, estimate_gora

from conftest import make_bert_batches

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
LORA = dict(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")


def _cuda(batches):
    return [{k: v.cuda() for k, v in b.items()} for b in batches]


@pytest.mark.parametrize("offload", [False, True])
def test_bf16_cuda_estimation_matches_cpu_fp32(tiny_bert, offload):
    batches = make_bert_batches(4)
    reference = estimate_gora(copy.deepcopy(tiny_bert), LoraConfig(**LORA), batches,
                              GoraConfig(num_steps=4, show_progress=False))
    model = tiny_bert.to("cuda", torch.bfloat16)
    weights = copy.deepcopy(model.state_dict())
    state = estimate_gora(model, LoraConfig(**LORA), batches, GoraConfig(num_steps=4, offload=offload,
                                                                          show_progress=False))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert state.peak_memory_bytes > 0
    for name, value in reference.importance.items():
        assert state.importance[name] == pytest.approx(value, rel=0.2)
    peft_model = apply_gora(model, LoraConfig(**LORA), state)
    out = peft_model(**{k: v.cuda() for k, v in batches[0].items()}).loss
    out.backward()
    assert torch.isfinite(out)


def test_cuda_a_matrices_equal_cpu_ones(tiny_bert):
    batches = make_bert_batches(2)
    config = GoraConfig(num_steps=2, show_progress=False)
    cpu_state = estimate_gora(copy.deepcopy(tiny_bert), LoraConfig(**LORA), batches, config)
    gpu_state = estimate_gora(tiny_bert.cuda(), LoraConfig(**LORA), _cuda(batches), config)
    assert gpu_state.ranks == cpu_state.ranks
    for name in cpu_state.adapted:
        assert torch.equal(gpu_state.A[name], cpu_state.A[name])  # drawn on the CPU from the layer seed
        torch.testing.assert_close(gpu_state.C[name], cpu_state.C[name], rtol=1e-3, atol=1e-5)


def test_cuda_save_and_vanilla_reload(tiny_bert, tmp_path):
    model = tiny_bert.cuda()
    weights = copy.deepcopy(model.state_dict())
    state = estimate_gora(model, LoraConfig(**LORA), _cuda(make_bert_batches(2)),
                          GoraConfig(num_steps=2, show_progress=False))
    peft_model = apply_gora(model, LoraConfig(**LORA), state).eval()
    peft_model.save_pretrained(tmp_path)
    from transformers import BertForSequenceClassification

    from conftest import _bert_config

    base = BertForSequenceClassification(_bert_config()).cuda().eval()
    base.load_state_dict(weights)
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    inputs = {k: v.cuda() for k, v in make_bert_batches(1)[0].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, peft_model(**inputs).logits)
