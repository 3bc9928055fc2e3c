"""Every method builds on a tiny random BERT at LoRA's budget; the training loop runs and calls callbacks."""

import pytest
import torch

from gora import GoraConfig
from gora.bench.builders import MethodConfig
from gora.bench.cli import METHOD_IDS
from gora.bench.methods import ADAPTER_METHODS, METHODS, build_method
from gora.bench.train import TrainConfig, accuracy, encode, train

# The pooler is left out here: on a random tiny BERT it takes nearly all of GoRA's importance, hits max_rank and
# the unspent budget is (by design) not redistributed, which says nothing about budget matching.
TARGETS = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
CFG = MethodConfig(target_modules=TARGETS, init_steps=4, total_steps=10)


def _model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, num_labels=2, max_position_embeddings=64)
    return BertForSequenceClassification(config)


def _batches(n=4, batch=16, length=8):
    # EVA needs at least r * rho = 16 sequences per batch (the pooler sees one vector per sequence).
    gen = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(0, 100, (batch, length), generator=gen),
             "attention_mask": torch.ones(batch, length, dtype=torch.long),
             "labels": torch.randint(0, 2, (batch,), generator=gen)} for _ in range(n)]


@pytest.fixture(scope="module")
def lora_params():
    return build_method("lora", _model(), CFG, _batches()).info["trainable_params"]


def test_cli_lists_exactly_the_registered_methods():
    assert set(METHOD_IDS) == set(METHODS)


@pytest.mark.parametrize("method", ADAPTER_METHODS)
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # PEFT's LoRA-GA hooks on an input without grad
@pytest.mark.filterwarnings("ignore:lora with eva initialization used with low_cpu_mem_usage")  # PEFT's EVA advice
def test_adapter_methods_build_within_15_percent_of_lora_params(method, lora_params):
    built = build_method(method, _model(), CFG, _batches())
    assert abs(built.info["trainable_params"] / lora_params - 1) <= 0.15
    head = built.model.base_model.model.classifier
    assert all(p.requires_grad for p in head.modules_to_save["default"].parameters())
    trainable = {id(p) for p in built.model.parameters() if p.requires_grad}
    assert trainable == {id(p) for g in built.optimizer.param_groups for p in g["params"]}


def test_full_fine_tuning_trains_every_parameter(lora_params):
    model = _model()
    built = build_method("full", model, CFG)
    assert built.info["trainable_params"] == sum(p.numel() for p in model.parameters()) > 3 * lora_params


@pytest.mark.parametrize("method", ["loraplus", "gora_loraplus"])
def test_loraplus_gives_lora_b_sixteen_times_the_rate(method):
    built = build_method(method, _model(), MethodConfig(target_modules=TARGETS, init_steps=2, lr=1e-4), _batches())
    rates = {g["lr"] for g in built.optimizer.param_groups if g["params"]}
    assert rates == {1e-4, 16e-4}


def test_gora_records_its_ranks_and_settings():
    info = build_method("gora", _model(), CFG, _batches()).info
    assert set(info["ranks"]) == {f"bert.encoder.layer.{i}.{m}" for i in range(2) for m in (
        "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
        "intermediate.dense", "output.dense")}
    assert all(info["min_rank"] <= r <= info["max_rank"] for r in info["ranks"].values())
    assert (info["gamma"], info["num_steps"], info["min_rank"], info["max_rank"]) == (5e-2, 4, 4, 32)
    assert info["init_seconds"] > 0


def test_data_driven_methods_refuse_to_build_without_batches():
    with pytest.raises(ValueError, match="pass training batches"):
        build_method("loraga", _model(), CFG)


def test_unknown_method_lists_the_choices():
    with pytest.raises(ValueError, match="choose from.*gora"):
        build_method("qlora", _model(), CFG)


@pytest.fixture
def tokenizer():
    from transformers import BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "good", "bad", "film", "plot"]
    return BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})


def test_training_loop_steps_callbacks_and_scores(tokenizer):
    import pandas as pd

    df = pd.DataFrame({"text": ["good film", "bad plot", "good plot", "bad film bad"] * 5, "label": [1, 0, 1, 0] * 5})
    data = encode(df, tokenizer, max_length=8)
    built = build_method("adalora", _model(), MethodConfig(target_modules=TARGETS, total_steps=3, lr=1e-2))
    steps_seen = []
    update = built.step_callback
    built.step_callback = lambda step: (steps_seen.append(step), update(step))
    stats = train(built, data, tokenizer, TrainConfig(batch_size=8, progress=False), seed=0)
    assert stats["steps"] == 3 and steps_seen == [1, 2, 3]
    assert 0.0 <= accuracy(built.model, data, tokenizer, TrainConfig(eval_batch_size=6)) <= 1.0


def test_encode_keeps_pairs_together(tokenizer):
    import pandas as pd

    data = encode(pd.DataFrame({"text": ["good"], "text_pair": ["bad film"], "label": [1]}), tokenizer, 16)
    assert data[0]["input_ids"] == [2, 5, 3, 6, 7, 3] and data[0]["labels"] == 1
    assert data[0]["token_type_ids"] == [0, 0, 0, 1, 1, 1]


def test_eva_draws_its_own_batch_count_and_gradient_methods_use_n():
    from gora.bench.methods import init_batch_count

    cfg = MethodConfig(init_steps=2, eva_steps=32)
    counts = {m: init_batch_count(m, cfg) for m in ("lora", "eva", "gora", "loraga", "full")}
    assert counts == {"lora": 0, "eva": 32, "gora": 2, "loraga": 2, "full": 0}


def test_top_class_share_flags_a_collapsed_classifier():
    from gora.bench.train import top_class_share

    assert top_class_share([1, 1, 1]) == 1.0
    assert top_class_share([0, 1, 1, 1]) == 0.75


def test_adaptive_gamma_scores_on_held_out_batches_and_records_its_choice():
    from gora.bench.builders import GAMMA_BATCHES
    from gora.bench.methods import init_batch_count

    cfg = MethodConfig(target_modules=TARGETS, init_steps=2, total_steps=10, gora_adaptive_gamma=True)
    assert init_batch_count("gora", cfg) == 2 + GAMMA_BATCHES
    assert init_batch_count("loraga", cfg) == 2  # only GoRA holds batches out
    info = build_method("gora", _model(), cfg, _batches(n=2 + GAMMA_BATCHES)).info
    assert info["adaptive_gamma"] is True and info["num_steps"] == 2
    # the search refines between grid points (golden section), so gamma lies in the grid's range, not on it
    assert 0.0 <= info["gamma"] <= max(GoraConfig().resolved_gamma_grid())


def test_rank_range_options_reach_gora():
    cfg = MethodConfig(target_modules=TARGETS, init_steps=2, total_steps=10, gora_min_rank=8, gora_max_rank=8)
    info = build_method("gora", _model(), cfg, _batches(n=2)).info
    assert set(info["ranks"].values()) == {8} and (info["min_rank"], info["max_rank"]) == (8, 8)


def test_sketch_estimator_reaches_gora_and_its_record():
    base = dict(target_modules=TARGETS, init_steps=2, total_steps=10, gora_importance="frobenius")
    full = build_method("gora", _model(), MethodConfig(**base), _batches(n=2)).info
    sketch = build_method("gora", _model(), MethodConfig(**base, gora_estimator="sketch"), _batches(n=2)).info
    assert (full["estimator"], sketch["estimator"]) == ("full", "sketch")
    assert sketch["importance"] == "frobenius" and sketch["budget"] == full["budget"]
    assert set(sketch["ranks"]) == set(full["ranks"])


@pytest.mark.parametrize("show", [True, False])
def test_gora_estimation_bar_follows_show_progress(show, capsys):
    cfg = MethodConfig(target_modules=TARGETS, init_steps=2, total_steps=10, show_progress=show)
    build_method("gora", _model(), cfg, _batches(n=2))
    assert ("GoRA gradient estimation" in capsys.readouterr().err) == show
