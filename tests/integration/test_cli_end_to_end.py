"""`gora init / inspect / export` end to end on tiny local models (word-level tokenizer, CSV and text data)."""

from __future__ import annotations

import csv
import json
import random
import shutil
import subprocess

import pytest
import torch

from gora import GoraConfig, GoraState, apply_gora, estimate_gora
from gora.cli import main

WORDS = "the a movie film good bad great awful plot actor boring fun story love hate was is and".split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
INIT_OPTIONS = ["--r", "4", "--alpha", "8", "--targets", "query,value,dense", "--num-steps", "3", "--batch-size", "4",
                "--max-length", "16", "--seed", "1"]


def _tokenizer():
    from transformers import BertTokenizer

    return BertTokenizer(vocab={w: i for i, w in enumerate(VOCAB)})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    bert = BertForSequenceClassification(BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=4, intermediate_size=64,
                                                    max_position_embeddings=64))
    bert.save_pretrained(root / "bert")
    _tokenizer().save_pretrained(root / "bert")
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=len(VOCAB), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64, eos_token_id=3, bos_token_id=2))
    llama.save_pretrained(root / "llama")
    _tokenizer().save_pretrained(root / "llama")
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(40)]
    with (root / "reviews.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        writer.writerows((s, rng.choice(["fresh", "rotten", "mixed"])) for s in sentences)
    (root / "corpus.txt").write_text("\n".join(sentences) + "\n")
    assert main(["init", str(root / "bert"), str(root / "reviews.csv"), "-o", str(root / "state"), *INIT_OPTIONS]) == 0
    return root


def _classifier(files):
    """The base model exactly as `gora init --seed 1` loads it (new 3-class head drawn from the seed)."""
    from transformers import AutoModelForSequenceClassification, set_seed

    set_seed(1)
    return AutoModelForSequenceClassification.from_pretrained(str(files / "bert"), num_labels=3,
                                                              ignore_mismatched_sizes=True).eval()


def _probe():
    encoded = _tokenizer()(["the movie was good", "awful plot and boring actor"], padding=True, return_tensors="pt")
    return dict(encoded)


def test_init_saves_the_state_the_python_api_computes_from_the_same_batches(files):
    from peft import LoraConfig

    from gora.data_files import collator_for, load_text_data, subsample, tokenize
    from gora.trainer import estimation_batches

    state = GoraState.load(files / "state")
    data = load_text_data(files / "reviews.csv")
    features = tokenize(subsample(data, 3 * 4, seed=1), _tokenizer(), 16)
    batches = estimation_batches(features, collator_for("seq-cls", _tokenizer()), 4, 3, seed=1)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value", "dense"], task_type="SEQ_CLS")
    expected = estimate_gora(_classifier(files), lora, batches, gora_config=GoraConfig(num_steps=3, seed=1))
    assert state.ranks == expected.ranks and state.num_samples == 12
    for name in expected.A:
        assert torch.equal(state.A[name], expected.A[name])
        torch.testing.assert_close(state.C[name], expected.C[name])
    cli_info = state.config["extra"]["cli"]
    assert cli_info["task"] == "seq-cls" and cli_info["label_names"] == ["fresh", "mixed", "rotten"]


def test_inspect_prints_every_layer_with_budget_and_writes_the_rank_map(files, tmp_path, capsys):
    state = GoraState.load(files / "state")
    assert main(["inspect", str(files / "state"), "--plot", str(tmp_path / "ranks.png")]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in state.ranks)
    assert f"budget {state.budget:,} params" in out
    assert (tmp_path / "ranks.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["inspect", str(files / "state"), "--json", "--no-plot"]) == 0
    assert json.loads(capsys.readouterr().out)["ranks"] == state.ranks


def test_export_portable_adapter_reloads_in_vanilla_peft_with_gora_logits(files, tmp_path, capsys):
    from peft import LoraConfig, PeftModel

    state = GoraState.load(files / "state")
    assert main(["export", str(files / "bert"), str(files / "state"), "-o", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_rslora"] is False and config["r"] == max(state.ranks.values())

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=state.adapted, task_type="SEQ_CLS")
    with torch.no_grad():
        expected = apply_gora(_classifier(files), lora, state).eval()(**_probe()).logits
        reloaded = PeftModel.from_pretrained(_classifier(files), str(tmp_path / "adapter")).eval()
        torch.testing.assert_close(reloaded(**_probe()).logits, expected, rtol=1e-5, atol=1e-6)
    assert main(["inspect", str(tmp_path / "adapter"), "--no-plot"]) == 0  # the sidecar is readable
    assert "budget" in capsys.readouterr().out


def test_export_merged_model_gives_the_adapter_logits(files, tmp_path):
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification

    state = GoraState.load(files / "state")
    assert main(["export", str(files / "bert"), str(files / "state"), "-o", str(tmp_path / "merged"),
                 "--merged", "--gamma", "0.5"]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    assert merged.config.id2label == {0: "fresh", 1: "mixed", 2: "rotten"}
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=state.adapted, task_type="SEQ_CLS")
    with torch.no_grad():
        expected = apply_gora(_classifier(files), lora, state, gamma=0.5).eval()(**_probe()).logits
        base = _classifier(files)(**_probe()).logits
        torch.testing.assert_close(merged(**_probe()).logits, expected, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(expected, base, atol=1e-4)  # the merge changed the model


def test_init_on_a_plain_text_file_estimates_a_causal_lm_and_exports_natively(files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    status = main(["init", str(files / "llama"), str(files / "corpus.txt"), "-o", str(tmp_path / "state"),
                   "--targets", "q_proj,v_proj", "--num-steps", "2", "--batch-size", "4", "--r", "2"])
    assert status == 0
    state = GoraState.load(tmp_path / "state")
    assert state.config["extra"]["cli"]["task"] == "causal-lm"
    assert set(state.ranks) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert main(["export", str(files / "llama"), str(tmp_path / "state"), "-o", str(tmp_path / "native"),
                 "--native"]) == 0
    assert json.loads((tmp_path / "native" / "adapter_config.json").read_text())["use_rslora"] is True
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(files / "llama")),
                                      str(tmp_path / "native"))
    ranks = {n: m.lora_A["default"].weight.shape[0] for n, m in model.base_model.model.named_modules()
             if hasattr(m, "lora_A") and "default" in m.lora_A}
    assert ranks == {n: r for n, r in state.ranks.items() if r > 0}


@pytest.mark.parametrize("labels", [["--num-labels", "3"], []], ids=["given", "read from the saved head"])
def test_export_merges_an_adapter_directory_with_its_saved_head(files, tmp_path, labels):
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification

    state = GoraState.load(files / "state")
    assert main(["export", str(files / "bert"), str(files / "state"), "-o", str(tmp_path / "native"), "--native"]) == 0
    assert main(["export", str(files / "bert"), str(tmp_path / "native"), "-o", str(tmp_path / "merged"),
                 "--merged", *labels]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(str(tmp_path / "merged")).eval()
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=state.adapted, task_type="SEQ_CLS")
    with torch.no_grad():
        expected = apply_gora(_classifier(files), lora, state).eval()(**_probe()).logits
        torch.testing.assert_close(merged(**_probe()).logits, expected, rtol=1e-4, atol=1e-5)


def test_console_script_inspects_a_state(files):
    executable = shutil.which("gora")
    if executable is None:
        pytest.skip("the gora console script is not on PATH (package not installed)")
    result = subprocess.run([executable, "inspect", str(files / "state"), "--no-plot"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "budget" in result.stdout


# -- outputs and bad input: refused up front with exit 2, nothing written or changed ---------------------------
def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_merged_export_never_overwrites_the_model_a_file_or_another_directory(files, tmp_path, capsys):
    export = ["export", str(files / "bert"), str(files / "state")]
    (tmp_path / "afile").write_text("keep")
    assert main([*export, "-o", str(files / "state"), "--portable"]) == 2  # the source itself
    assert main([*export, "-o", str(tmp_path / "adapter"), "--native"]) == 0
    model, adapter = _tree(files / "bert"), _tree(tmp_path / "adapter")
    for output in (files / "bert", tmp_path / "afile", tmp_path / "adapter"):
        assert main([*export, "-o", str(output), "--merged"]) == 2
    errors = capsys.readouterr().err
    assert "is the base model's directory" in errors and "is a file" in errors
    assert "refusing to replace" in errors and "adapter_config.json" in errors
    assert _tree(files / "bert") == model and _tree(tmp_path / "adapter") == adapter
    assert (tmp_path / "afile").read_text() == "keep"
    assert main([*export, "-o", str(tmp_path / "merged"), "--merged"]) == 0
    assert main([*export, "-o", str(tmp_path / "merged"), "--merged", "--gamma", "0.5"]) == 0  # replaces its own
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_inspect_then_init_or_export_again_replaces_the_directory_and_its_stale_plot(files, tmp_path):
    state_dir, adapter = tmp_path / "state", tmp_path / "adapter"
    assert main(["init", str(files / "bert"), str(files / "reviews.csv"), "-o", str(state_dir), *INIT_OPTIONS]) == 0
    assert main(["export", str(files / "bert"), str(state_dir), "-o", str(adapter)]) == 0
    for directory in (state_dir, adapter):
        assert main(["inspect", str(directory)]) == 0
        assert (directory / "gora_ranks.png").is_file()  # the default plot goes inside
    assert main(["init", str(files / "bert"), str(files / "reviews.csv"), "-o", str(state_dir), *INIT_OPTIONS]) == 0
    assert main(["export", str(files / "bert"), str(state_dir), "-o", str(adapter)]) == 0
    assert not (state_dir / "gora_ranks.png").exists() and not (adapter / "gora_ranks.png").exists()  # stale: gone


@pytest.mark.parametrize("output, options, message", [
    ("afile", [], "exists and is a file"),
    ("busy", [], "refusing to replace .* notes.txt"),
    ("state", ["--max-length", "65"], "--max-length 65 exceeds the 64 positions .* pass --max-length 64 or less"),
    ("state", ["--device", "gpu0"], "--device 'gpu0' is not a device"),
], ids=["output is a file", "output holds other files", "too long", "unknown device"])
def test_init_refuses_bad_options_before_loading_or_estimating(files, tmp_path, monkeypatch, capsys, output, options,
                                                               message):
    import re

    import gora

    (tmp_path / "afile").write_text("keep")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")

    def never(*args, **kwargs):
        raise AssertionError("estimation ran before the bad option was refused")

    monkeypatch.setattr(gora, "estimate_gora", never)
    before = _tree(tmp_path)
    status = main(["init", str(files / "bert"), str(files / "reviews.csv"), "-o", str(tmp_path / output),
                   *INIT_OPTIONS, *options])
    assert status == 2 and re.search(message, capsys.readouterr().err)
    assert _tree(tmp_path) == before and not (tmp_path / "state").exists()


def test_init_refuses_targets_that_match_nothing_before_preparing_the_data(files, tmp_path, monkeypatch, capsys):
    from gora import data_files

    def never(*args, **kwargs):
        raise AssertionError("the data was tokenised before the targets were checked")

    monkeypatch.setattr(data_files, "tokenize", never)
    options = [*INIT_OPTIONS[:4], "--targets", "nosuch", *INIT_OPTIONS[6:]]
    assert main(["init", str(files / "bert"), str(files / "reviews.csv"), "-o", str(tmp_path / "state"),
                 *options]) == 2
    assert "target_modules={'nosuch'} matched no adaptable layer" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize("form", ["--portable", "--native", "--merged"])
def test_export_refuses_a_directory_with_other_files_before_loading_the_model(files, tmp_path, monkeypatch, capsys,
                                                                             form):
    from gora.cli import export

    def never(*args, **kwargs):
        raise AssertionError("the model was loaded before the output was refused")

    monkeypatch.setattr(export, "model_from_state", never)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep")
    assert main(["export", str(files / "bert"), str(files / "state"), "-o", str(tmp_path / "busy"), form]) == 2
    assert "refusing to replace" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["notes.txt"]


def test_inspect_names_the_plot_it_writes_and_refuses_an_unwritable_place(files, tmp_path, capsys):
    assert main(["inspect", str(files / "state"), "--plot", str(tmp_path / "ranks")]) == 0
    assert f"wrote rank plot to {tmp_path / 'ranks.png'}" in capsys.readouterr().out
    assert (tmp_path / "ranks.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["inspect", str(files / "state"), "--plot", str(tmp_path / "no" / "such" / "r.png")]) == 2
    assert "cannot write the rank plot" in capsys.readouterr().err


def test_export_of_an_adapter_onto_another_base_model_says_which_model_to_pass(files, tmp_path, capsys):
    from transformers import BertConfig, BertForSequenceClassification

    wider = tmp_path / "bert48"
    BertForSequenceClassification(BertConfig(vocab_size=len(VOCAB), hidden_size=48, num_hidden_layers=2,
                                             num_attention_heads=4, intermediate_size=64,
                                             max_position_embeddings=64)).save_pretrained(wider)
    _tokenizer().save_pretrained(wider)
    assert main(["export", str(files / "bert"), str(files / "state"), "-o", str(tmp_path / "native"), "--native"]) == 0
    assert main(["export", str(wider), str(tmp_path / "native"), "-o", str(tmp_path / "merged"), "--merged"]) == 2
    assert "does not fit the model" in capsys.readouterr().err and not (tmp_path / "merged").exists()
