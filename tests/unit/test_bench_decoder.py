"""Pure helpers of the decoder task (no model, no data packages): answer extraction, padding, CLI options."""

import pytest
import torch

from gora.bench.cli import _decoder_config, build_parser
from gora.bench.decoder import DEFAULT_LRS, DecoderConfig, collate_prompts, collate_train, final_answer, lenient_answer


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


def test_decoder_options_become_a_config():
    args = build_parser().parse_args([
        "decoder", "--out-dir", "x", "--steps", "40", "--batch-size", "4", "--max-length", "192", "--test-size", "50",
        "--lr", "2e-4", "gora=1e-4", "--gora-steps", "8", "--max-new-tokens", "128", "--no-progress",
    ])
    cfg = _decoder_config(args)
    assert (cfg.steps, cfg.batch_size, cfg.max_length, cfg.test_size, cfg.gora_steps) == (40, 4, 192, 50, 8)
    assert cfg.lrs == {"lora": 2e-4, "gora": 1e-4} and cfg.max_new_tokens == 128 and not cfg.progress
    assert args.methods == ["base", "lora", "gora"]
    assert _decoder_config(build_parser().parse_args(["decoder", "--out-dir", "x"])).lrs == DEFAULT_LRS


def test_decoder_help_and_bad_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["decoder", "--help"])
    assert exit_info.value.code == 0 and "usage: python -m gora.bench decoder" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_parser().parse_args(["decoder", "--out-dir", "x", "--lr", "gora=fast"])
    assert "METHOD=LR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["decoder", "--out-dir", "x", "--methods", "dora"])


def test_settings_leave_out_what_records_carry():
    settings = DecoderConfig(steps=7).settings()
    assert settings["decoder.steps"] == 7 and "decoder.lrs" not in settings and "decoder.device" not in settings
    with pytest.raises(ValueError, match="steps"):
        DecoderConfig(steps=0)
