"""QGoRA on a CUDA GPU with bitsandbytes: a state estimated in fp32 applied to an NF4 base gives the same adapters."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
bnb = pytest.importorskip("bitsandbytes")


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def test_nf4_base_gets_the_adapters_of_the_full_precision_estimate(tmp_path):
    from peft import LoraConfig

    from gora import GoraConfig, GoraState, apply_gora, estimate_gora
    from gora.quantized import load_4bit_and_apply

    model = _tiny_llama()
    model.save_pretrained(tmp_path / "model")
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        ids = torch.randint(0, 128, (2, 16), generator=generator)
        batches.append({"input_ids": ids, "labels": ids})
    lora_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM")
    state = estimate_gora(model, lora_config, batches, gora_config=GoraConfig(num_steps=4, show_progress=False))
    state.save(tmp_path / "state")
    reference = apply_gora(_tiny_llama(), lora_config, state)

    quantized = load_4bit_and_apply(str(tmp_path / "model"), lora_config, GoraState.load(tmp_path / "state"))
    layers = {n: m for n, m in quantized.base_model.model.named_modules()
              if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert set(layers) == set(state.adapted)
    assert all(isinstance(m.base_layer, bnb.nn.Linear4bit) for m in layers.values())
    expected = dict(reference.base_model.model.named_modules())
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            got = getattr(layer, part)["default"].weight.float().cpu()
            want = getattr(expected[name], part)["default"].weight.float()
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)  # bf16 storage at most
        assert layer.scaling["default"] == pytest.approx(expected[name].scaling["default"])
    ids = batches[0]["input_ids"].to(quantized.device)
    with torch.no_grad():
        loss = quantized(input_ids=ids, labels=ids).loss
    assert torch.isfinite(loss)
