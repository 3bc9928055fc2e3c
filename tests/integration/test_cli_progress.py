"""`--no-progress` (and ``GoraConfig(show_progress=False)``): no progress bar is drawn, and so tqdm starts no
monitor thread, in `gora init` and `gora export`, transformers' loading and saving bars included."""

from __future__ import annotations

import pytest
import tqdm.std
from peft import LoraConfig

from gora import GoraConfig, estimate_gora
from gora.cli import main

from conftest import make_lm_batches, tiny_llama

WORDS = "the a movie film good bad great awful plot actor boring fun story love hate was is and".split()


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from transformers import BertTokenizer

    root = tmp_path_factory.mktemp("progress")
    tiny_llama().save_pretrained(root / "llama")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    BertTokenizer(vocab={w: i for i, w in enumerate(vocab)}).save_pretrained(root / "llama")
    (root / "corpus.txt").write_text("\n".join(" ".join(WORDS[i:i + 6]) for i in range(12)) + "\n")
    return root


@pytest.fixture
def bars(monkeypatch):
    """Every tqdm created, with whether it draws, and every monitor thread tqdm starts. tqdm starts its monitor
    thread when any bar is created, even ``tqdm(disable=True)``: "no bar" must mean no tqdm at all."""
    created: list[tuple[object, bool]] = []
    real = tqdm.std.tqdm.__init__
    real_monitor = tqdm.std.TMonitor.__init__

    def record(self, *args, **kwargs):
        real(self, *args, **kwargs)
        created.append((kwargs.get("desc") or (args[1] if len(args) > 1 else None), not self.disable))

    def record_monitor(self, *args, **kwargs):
        created.append(("monitor thread", True))
        real_monitor(self, *args, **kwargs)

    monkeypatch.setattr(tqdm.std.tqdm, "__init__", record)
    monkeypatch.setattr(tqdm.std.TMonitor, "__init__", record_monitor)
    return created


def _init_and_export(root, tmp_path, *flags: str) -> None:
    assert main(["init", str(root / "llama"), str(root / "corpus.txt"), "-o", str(tmp_path / "state"), "--r", "2",
                 "--targets", "q_proj,v_proj", "--num-steps", "2", "--batch-size", "2", "--max-length", "16",
                 *flags]) == 0
    assert main(["export", str(root / "llama"), str(tmp_path / "state"), "-o", str(tmp_path / "merged"), "--merged",
                 *flags]) == 0


def test_no_progress_draws_no_bar_and_starts_no_monitor_thread(model_dir, tmp_path, bars, capfd):
    _init_and_export(model_dir, tmp_path, "--no-progress")
    assert [bar for bar in bars if bar[1]] == []  # PEFT's merge creates a disabled bar: it draws nothing
    assert "it/s" not in capfd.readouterr().err


def test_without_the_flag_the_bars_are_drawn(model_dir, tmp_path, bars):
    from transformers.utils import logging as hf_logging

    _init_and_export(model_dir, tmp_path)
    drawn = {desc for desc, draws in bars if draws}
    assert "GoRA gradient estimation" in drawn and "Loading weights" in drawn, bars
    assert hf_logging.is_progress_bar_enabled()  # --no-progress in the first test switched them off only for itself


def test_show_progress_false_draws_no_bar_in_estimation(bars):
    lora = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM")
    estimate_gora(tiny_llama(), lora, make_lm_batches(2), GoraConfig(num_steps=2, show_progress=False))
    assert bars == []


def test_gguf_loading_without_progress_creates_no_tqdm(monkeypatch, bars):
    """The dequantisation loop of transformers' GGUF loader (its module-level ``tqdm``) runs bar-free. The GGUF model
    itself is an optional download, so the loader's own call is replayed: the loop as transformers writes it."""
    import transformers
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from gora.bench import decoder

    seen = []

    def from_pretrained(*args, **kwargs):
        seen.extend(gguf_utils.tqdm(["a", "b"], desc="Converting and de-quantizing GGUF tensors..."))
        return tiny_llama()

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    monkeypatch.setattr(decoder, "smollm2_dir", lambda: "unused")
    decoder.load_smollm2(progress=False)
    assert seen == ["a", "b"] and bars == []
    decoder.load_smollm2(progress=True)
    assert ("Converting and de-quantizing GGUF tensors...", True) in bars  # the switch is what hid it


def test_a_switched_off_bar_is_no_tqdm_at_all(bars):
    from gora.progress import progress

    items = range(3)
    assert progress(items, enabled=False, desc="loop") is items
    with progress(total=3, enabled=False, desc="grid") as bar:
        bar.update(1)
        bar.set_postfix_str("cell")
    assert bars == []
    list(progress(items, enabled=True, desc="loop", disable=False))
    assert ("loop", True) in bars
