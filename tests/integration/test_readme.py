"""The README's Quick start runs as written, on a tiny BERT, and its adapter loads in vanilla PEFT."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from conftest import _bert_config, make_bert_batches

README = Path(__file__).resolve().parents[2] / "README.md"


def _quick_start_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def _fresh_model():
    from transformers import BertForSequenceClassification

    torch.manual_seed(0)
    return BertForSequenceClassification(_bert_config()).eval()


def test_the_quick_start_runs_as_written_and_its_adapter_loads_in_vanilla_peft(tmp_path, monkeypatch, capsys):
    from peft import PeftModel

    one_call, two_steps = _quick_start_blocks()
    monkeypatch.chdir(tmp_path)
    namespace = {"model": _fresh_model(), "train_batches": make_bert_batches(32)}
    exec(compile(one_call, "README.md (Quick start, one call)", "exec"), namespace)
    peft_model = namespace["peft_model"]
    assert isinstance(peft_model, PeftModel)
    assert "trainable params" in capsys.readouterr().out
    probe = make_bert_batches(1, seed=7)[0]
    probe.pop("labels")
    with torch.no_grad():
        expected = peft_model(**probe).logits
        reloaded = PeftModel.from_pretrained(_fresh_model(), str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(reloaded(**probe).logits, expected)
        assert not torch.allclose(_fresh_model()(**probe).logits, expected)  # GoRA's start is not the base model

    # the two-step form is an alternative to the one call: it starts again from an unwrapped model
    namespace["model"] = _fresh_model()
    exec(compile(two_steps, "README.md (Quick start, two steps)", "exec"), namespace)
    assert "budget" in capsys.readouterr().out  # state.summary()
    assert (tmp_path / "gora_state").is_dir()
    with torch.no_grad():  # same model, batches and seed: the same adapter as the one call
        torch.testing.assert_close(namespace["peft_model"](**probe).logits, expected)
