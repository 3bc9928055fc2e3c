"""Protocol 2 on tiny random models: the head's own lr group, the learning curve, and real arm runs end to end."""

import math
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from gora.bench.builders import MethodConfig, head_parameters
from gora.bench.methods import build_method
from gora.bench.train import TrainConfig, encode, evaluate_loss_and_accuracy, optimise, train

TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def _model(num_labels=2):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=num_labels, max_position_embeddings=64)
    return BertForSequenceClassification(config)


def _batches(n=6, batch=8, length=8):
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 100, (batch, length), generator=gen),
             "attention_mask": torch.ones(batch, length, dtype=torch.long),
             "labels": torch.randint(0, 2, (batch,), generator=gen)} for _ in range(n)]


@pytest.fixture
def tokenizer():
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "plot", "very"]
    return BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})


@pytest.mark.parametrize("method", ["lora", "rslora_loraplus", "gora", "full"])
def test_the_new_head_trains_in_its_own_group_at_head_lr(method):
    cfg = MethodConfig(target_modules=TARGETS, init_steps=2, lr=1e-5, head_lr=3e-3)
    built = build_method(method, _model(), cfg, _batches())
    head = {id(p) for p in head_parameters(built.model, cfg)}
    assert head and len(head) == 2  # the classifier's weight and bias
    head_groups = [g for g in built.optimizer.param_groups if {id(p) for p in g["params"]} & head]
    assert len(head_groups) == 1 and {id(p) for p in head_groups[0]["params"]} == head
    assert head_groups[0]["lr"] == 3e-3
    others = [g for g in built.optimizer.param_groups if g is not head_groups[0]]
    assert others and all(g["lr"] in (1e-5, 1e-5 * cfg.loraplus_ratio) for g in others)
    trainable = {id(p) for p in built.model.parameters() if p.requires_grad}
    grouped = [id(p) for g in built.optimizer.param_groups for p in g["params"]]
    assert sorted(grouped) == sorted(trainable)  # every trainable parameter exactly once


def test_without_head_lr_the_head_shares_the_adapter_lr_as_in_protocol_1():
    built = build_method("lora", _model(), MethodConfig(target_modules=TARGETS, lr=1e-5))
    assert [g["lr"] for g in built.optimizer.param_groups] == [1e-5]


def test_curve_train_loss_is_the_mean_since_the_previous_checkpoint():
    class Fixed(torch.nn.Module):  # loss = the batch's value, so every step's loss is known
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return SimpleNamespace(loss=(self.w * 0).sum() + x)

    model = Fixed()
    evaluated = []
    result = optimise(model, torch.optim.AdamW(model.parameters()), ({"x": torch.tensor(float(s))} for s in
                      range(1, 61)), 60, warmup_ratio=0.0, max_grad_norm=1.0, progress=False,
                      checkpoints=[25, 50, 60], evaluate=lambda: evaluated.append(1) or {"val_loss": 0.5})
    assert [(p["step"], p["train_loss"], p["val_loss"]) for p in result["curve"]] == [
        (25, 13.0, 0.5), (50, 38.0, 0.5), (60, 55.5, 0.5)]
    assert len(evaluated) == 3 and result["eval_seconds"] >= 0


def test_training_records_a_curve_on_validation_and_stays_in_train_mode(tokenizer):
    df = pd.DataFrame({"text": ["good film", "bad plot", "very good plot", "bad film bad"] * 6,
                       "label": [1, 0, 1, 0] * 6})
    data = encode(df, tokenizer, max_length=8)
    built = build_method("lora", _model(), MethodConfig(target_modules=TARGETS, lr=1e-2, head_lr=1e-2))
    stats = train(built, data, tokenizer, TrainConfig(batch_size=8, steps=30, curve=True, progress=False), seed=0,
                  val_data=data[:10])
    assert [p["step"] for p in stats["curve"]] == [25, 30] and stats["steps"] == 30
    for point in stats["curve"]:
        assert set(point) == {"step", "train_loss", "val_loss", "val_metric"}
        assert math.isfinite(point["val_loss"]) and 0.0 <= point["val_metric"] <= 1.0
    assert built.model.training  # evaluation went back to train mode
    loss, acc = evaluate_loss_and_accuracy(built.model, data[:10], tokenizer, TrainConfig(eval_batch_size=3))
    last = stats["curve"][-1]
    assert (loss, acc) == pytest.approx((last["val_loss"], last["val_metric"]), abs=1e-5)
    assert built.model.training


# ---------------------------------------------------------------- real arms end to end (tiny BERT saved to disk)


@pytest.fixture
def tiny_setup(tmp_path, tokenizer):
    from gora.bench.runner import DataConfig

    model_dir = tmp_path / "model"
    _model().save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    words = ["good", "bad", "film", "plot", "very"]
    gen = torch.Generator().manual_seed(0)
    rows = [{"text": " ".join(words[i] for i in torch.randint(0, 5, (4,), generator=gen).tolist()),
             "label": "pos" if k % 3 else "neg"} for k in range(120)]
    pd.DataFrame(rows[:90]).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(rows[90:]).to_csv(tmp_path / "test.csv", index=False)
    data = DataConfig(user_tasks={"mine": (str(tmp_path / "train.csv"), str(tmp_path / "test.csv"))})
    return str(model_dir), data


def test_arms_run_end_to_end_with_curves_head_lr_and_init_diagnostics(tmp_path, tiny_setup):
    from gora.bench.protocol2 import run_arm_grid
    from gora.bench.records import load_records

    model_path, data_config = tiny_setup
    records = run_arm_grid(
        ["lora", "gora_gamma0", "gora_fixed_rank"], ["mine"], [0], out_dir=tmp_path / "grid", r=4,
        lr_grid={"lora": (1e-3, 2e-3), "gora_gamma0": (1e-3,), "gora_fixed_rank": (1e-3,)}, max_extensions=0,
        train_config=TrainConfig(steps=6, batch_size=8, max_length=8, progress=False),
        method_config=MethodConfig(target_modules=TARGETS, init_steps=2),
        data_config=data_config, model_path=model_path,
    )
    by_arm = {r["arm"]: r for r in records}
    assert set(by_arm) == {"lora", "gora_gamma0", "gora_fixed_rank"}
    for record in by_arm.values():
        assert record["protocol"] == 2 and record["head_lr"] == 1e-3 and record["steps"] == 6
        assert record["batch_size"] == 8 and record["max_length"] == 8 and record["epochs"] is None
        assert [p["step"] for p in record["curve"]] == [6] and math.isfinite(record["val_loss"])
        assert record["val_loss"] == record["curve"][-1]["val_loss"]
        assert record["majority_rate"] == pytest.approx(20 / 30)  # 'pos' in 2 of 3 test rows
        assert {"init_relative_delta", "init_loss_w0", "init_loss_after", "selected_by"} <= set(record)
    assert by_arm["lora"]["method"] == "lora" and by_arm["lora"]["init_relative_delta"] is None
    assert by_arm["gora_gamma0"]["method"] == "gora" and by_arm["gora_gamma0"]["gamma"] == 0.0
    assert set(by_arm["gora_fixed_rank"]["ranks"].values()) == {4}
    assert by_arm["gora_gamma0"]["num_steps"] == 2
    lr_runs = load_records(tmp_path / "grid" / "lr_search.json")
    assert sorted((r["seed"], r["lr"]) for r in lr_runs) == [(100, 1e-3), (100, 2e-3), (101, 1e-3), (101, 2e-3)]
    assert by_arm["lora"]["selected_by"].startswith("val_loss mean over seeds 100,101; grid 0.001..0.002")
    # selection runs are validated, never tested; the test runs are
    assert all(r["value"] is None and r["test_top_class_share"] is None and 0 <= r["val_value"] <= 1
               for r in lr_runs)
    assert all(0 <= r["value"] <= 1 for r in records)
