"""GoraConfig and LoraConfig validation: every bad value is refused at construction, with a gora error."""

import inspect
import math

import pytest
from peft import LoraConfig

from gora import GoraConfig
from gora.config import check_gora_config, check_lora_config
from gora.errors import GoraConfigError, GoraConfigTypeError, GoraError, GoraTypeError

BAD_VALUES = [
    # (field values, message fragment)
    (dict(num_steps=0), "num_steps must be >= 1"),
    (dict(num_steps=-3), "num_steps must be >= 1"),
    (dict(min_rank=-1), "min_rank must be >= 0"),
    (dict(max_rank=0), "max_rank must be >= 1"),
    (dict(max_rank=-4), "max_rank must be >= 1"),
    (dict(min_rank=9, max_rank=4), r"min_rank \(9\) is larger than max_rank \(4\)"),
    (dict(gamma=-1e-3), "gamma must be a finite number >= 0"),
    (dict(gamma=math.nan), "gamma must be a finite number"),
    (dict(gamma=math.inf), "gamma must be a finite number"),
    (dict(importance="mean-abs"), "importance='mean-abs' is not known; choose one of mean_abs"),
    (dict(importance="nuclear"), "is not known"),
    (dict(features="log"), "features='log' is not known"),
    (dict(estimator="lowrank"), "estimator='lowrank' is not known"),
    (dict(estimator="sketch", importance="mean_abs"), "pass importance='frobenius' with the sketch estimator"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(sketch_dim=0), "sketch_dim must be >= 1"),
    (dict(min_steps=0), "min_steps must be >= 1"),
    (dict(gamma_batches=0), "gamma_batches must be >= 1"),
    (dict(convergence_threshold=-0.1), "convergence_threshold must be a finite number >= 0"),
    (dict(fp16_loss_scale=0.5), "fp16_loss_scale must be a finite number >= 1"),
    (dict(gamma_grid=[]), "gamma_grid is empty"),
    (dict(gamma_grid=[0.1, -0.2]), "gamma_grid entry must be a finite number >= 0"),
    (dict(gamma_grid=[math.nan]), "gamma_grid entry must be a finite number"),
]

BAD_TYPES = [
    (dict(num_steps=32.0), "num_steps must be an integer, got 32.0"),
    (dict(num_steps="32"), "num_steps must be an integer"),
    (dict(num_steps=True), "num_steps must be an integer"),
    (dict(min_rank=2.5), "min_rank must be an integer"),
    (dict(max_rank="16"), "max_rank must be an integer"),
    (dict(seed=0.0), "seed must be an integer"),
    (dict(gamma="5e-2"), "gamma must be a number"),
    (dict(gamma=None), "gamma must be a number"),
    (dict(gamma=False), "gamma must be a number"),
    (dict(offload="yes"), "offload must be True, False or None"),
    (dict(offload=1), "offload must be True, False or None"),
    (dict(adaptive_steps=1), "adaptive_steps must be True or False"),
    (dict(adaptive_gamma="no"), "adaptive_gamma must be True or False"),
    (dict(train_mode=None), "train_mode must be True or False"),
    (dict(gradient_checkpointing=0), "gradient_checkpointing must be True or False"),
    (dict(show_progress="false"), "show_progress must be True or False"),
    (dict(gamma_grid=0.1), "gamma_grid must be a list"),
    (dict(gamma_grid="0.1"), "gamma_grid must be a list"),
    (dict(gamma_grid=["0.1"]), "gamma_grid entry must be a number"),
    (dict(extra=None), "extra must be a dict"),
]


@pytest.mark.parametrize("values, message", BAD_VALUES, ids=[str(v) for v, _ in BAD_VALUES])
def test_invalid_config_value_is_refused_with_a_config_error(values, message):
    with pytest.raises(GoraConfigError, match=message) as info:
        GoraConfig(**values)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("values, message", BAD_VALUES, ids=[str(v) for v, _ in BAD_VALUES])
def test_a_field_set_after_construction_is_checked_when_the_config_is_used(values, message):
    config = GoraConfig()
    for name, value in values.items():
        setattr(config, name, value)  # a mutable dataclass: no check runs here
    with pytest.raises(GoraConfigError, match=message):
        check_gora_config(config)  # what estimate_gora and get_gora_model call first


@pytest.mark.parametrize("values, message", BAD_TYPES, ids=[str(v) for v, _ in BAD_TYPES])
def test_config_value_of_wrong_type_is_both_a_config_and_a_type_error(values, message):
    with pytest.raises(GoraConfigTypeError, match=message) as info:
        GoraConfig(**values)
    assert isinstance(info.value, GoraTypeError) and isinstance(info.value, TypeError)
    assert isinstance(info.value, ValueError)  # still caught by code that catches GoraConfigError / ValueError


def test_extra_notes_that_are_not_json_are_refused_before_any_save():
    with pytest.raises(GoraConfigError, match="JSON-serialisable"):
        GoraConfig(extra={"callback": object()})
    with pytest.raises(GoraConfigError, match="JSON-serialisable"):
        GoraConfig(extra={"score": math.nan})


def test_legal_edge_values_are_accepted():
    config = GoraConfig(num_steps=1, min_rank=0, max_rank=1, gamma=0.0, seed=0, gamma_grid=(0.5, 0.0),
                        convergence_threshold=0.0, extra={"note": [1, "a"]})
    assert config.rank_bounds(8) == (0, 1)  # min_rank=0 is legal and kept (not replaced by a default)


def test_rank_bounds_defaults_use_is_none_not_truthiness():
    assert GoraConfig().rank_bounds(8) == (4, 32)
    assert GoraConfig().rank_bounds(1) == (1, 4)
    assert GoraConfig(min_rank=0).rank_bounds(8) == (0, 32)


def test_rank_bounds_refuse_an_empty_range_from_defaults():
    with pytest.raises(GoraConfigError, match=r"rank range is \[5, 4\], which is empty"):
        GoraConfig(min_rank=5).rank_bounds(1)  # max_rank default 4 * r = 4


@pytest.mark.parametrize("r, error", [(0, GoraConfigError), (-8, GoraConfigError), (8.0, GoraConfigTypeError)])
def test_rank_bounds_refuse_a_bad_reference_rank(r, error):
    with pytest.raises(error, match="LoraConfig.r must be"):
        GoraConfig().rank_bounds(r)


def test_from_dict_round_trips_and_refuses_unknown_fields():
    config = GoraConfig(num_steps=4, min_rank=0, gamma=0.01, importance="frobenius")
    assert GoraConfig.from_dict(config.to_dict()) == config
    with pytest.raises(GoraConfigError, match=r"unknown GoraConfig fields \['num_step'\]"):
        GoraConfig.from_dict({"num_step": 4})
    with pytest.raises(GoraConfigTypeError, match="needs a dict"):
        GoraConfig.from_dict([("num_steps", 4)])
    with pytest.raises(GoraConfigError, match="num_steps must be >= 1"):
        GoraConfig.from_dict({"num_steps": 0})


def test_unknown_keyword_is_a_gora_type_error_that_names_the_field_meant():
    with pytest.raises(GoraConfigTypeError, match=r"unknown GoraConfig fields \['num_step'\]; Did you mean "
                                                  r"'num_steps' for 'num_step'\?") as caught:
        GoraConfig(num_step=8)
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, GoraError)  # as Python's own refusal
    with pytest.raises(GoraConfigTypeError, match=r"\['gama', 'zzz'\]; Did you mean 'gamma' for 'gama'\? known"):
        GoraConfig(gama=0.1, zzz=1)
    with pytest.raises(GoraConfigError, match=r"\['xyz_qq'\]; known fields"):  # nothing close: no suggestion
        GoraConfig.from_dict({"xyz_qq": 1})
    config = GoraConfig(8, gamma=0.01)  # positional and keyword arguments still reach the dataclass
    assert (config.num_steps, config.gamma) == (8, 0.01)
    assert "num_steps" in str(inspect.signature(GoraConfig))  # the signature stays readable


def test_check_gora_config_accepts_none_and_refuses_a_dict():
    assert check_gora_config(None) == GoraConfig()
    with pytest.raises(GoraConfigTypeError, match="gora_config must be a GoraConfig or None, got dict"):
        check_gora_config({"num_steps": 4})


@pytest.mark.parametrize(
    "lora_config, error, message",
    [
        ({"r": 8}, GoraConfigTypeError, "lora_config must be a peft.LoraConfig, got dict"),
        (LoraConfig(r=8, lora_alpha=0), GoraConfigError, "lora_alpha must be a finite number > 0, got 0"),
        (LoraConfig(r=8, lora_alpha=-16), GoraConfigError, "lora_alpha must be a finite number > 0"),
        (LoraConfig(r=8, lora_alpha=math.inf), GoraConfigError, "lora_alpha must be a finite number > 0"),  # type: ignore[arg-type]
        (LoraConfig(r=8, lora_alpha="16"), GoraConfigTypeError, "lora_alpha must be a number"),  # type: ignore[arg-type]
        (LoraConfig(r=0, lora_alpha=16), GoraConfigError, "LoraConfig.r must be >= 1"),
    ],
)
def test_check_lora_config_refuses_what_gora_cannot_use(lora_config, error, message):
    with pytest.raises(error, match=message) as info:
        check_lora_config(lora_config)
    assert isinstance(info.value, GoraError)


def test_check_lora_config_accepts_a_usual_config():
    check_lora_config(LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj"]))


def test_the_paper_preset_holds_the_papers_settings():
    paper = GoraConfig.paper()
    assert (paper.num_steps, paper.gamma, paper.importance, paper.features) == (32, 5e-2, "mean_abs", "sqrt")
    assert (paper.min_rank, paper.max_rank, paper.estimator) == (None, None, "full")
    assert not paper.adaptive_steps and not paper.adaptive_gamma and paper.head_warmup_steps == 0
    assert paper.rank_bounds(8) == (4, 32)
    assert GoraConfig.paper(seed=42).seed == 42 and GoraConfig.paper(seed=42).features == "sqrt"
    with pytest.raises(TypeError, match="num_step"):
        GoraConfig.paper(num_step=8)
