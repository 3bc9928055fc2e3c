"""GoRA on the real pretrained MiniLM encoder (skipped when its package is absent)."""

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel

from gora import GoraConfig, apply_gora, estimate_gora

from conftest import minilm_path

SENTENCES = [
    ("a gripping, beautifully acted film", 1), ("dull, lifeless and far too long", 0),
    ("one of the best movies of the year", 1), ("the plot makes no sense at all", 0),
    ("warm, funny and smart", 1), ("a tedious mess", 0), ("an utter delight", 1), ("i want my two hours back", 0),
]


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    path = minilm_path()
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batches = []
    for i in range(0, len(SENTENCES), 2):
        texts, labels = zip(*SENTENCES[i:i + 2])
        batch = dict(tokenizer(list(texts), padding=True, return_tensors="pt"))
        batch["labels"] = torch.tensor(labels)
        batches.append(batch)
    return model, batches


def test_minilm_gets_uneven_ranks_lower_loss_and_reloads(minilm, tmp_path):
    model, batches = minilm
    weights = copy.deepcopy(model.state_dict())
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], task_type="SEQ_CLS")
    state = estimate_gora(model, lora, batches, GoraConfig(num_steps=4, gamma=2e-2, show_progress=False))
    assert len(state.ranks) == 6 * 6 + 1  # q, k, v, attention.output.dense, intermediate.dense, output.dense; pooler
    assert len(set(state.ranks.values())) > 2
    assert state.actual_params <= state.budget * 1.05
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())

    with torch.no_grad():
        w0_loss = sum(model(**b).loss.item() for b in batches)
    peft_model = apply_gora(model, lora, state).eval()
    with torch.no_grad():
        gora_loss = sum(peft_model(**b).loss.item() for b in batches)
    assert gora_loss < w0_loss

    peft_model.save_pretrained(tmp_path)
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2).eval()
    base.load_state_dict(weights)
    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    inputs = {k: v for k, v in batches[0].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, peft_model(**inputs).logits, rtol=0, atol=0)
