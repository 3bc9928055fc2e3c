import math

import pytest

from gora import GoraConfig
from gora.allocation import allocate_ranks
from gora.errors import GoraConfigError, GoraNumericalError


def test_formula_on_hand_made_inputs():
    # f = in + out: 64, 64, 128; T = r * sum f = 4 * 256 = 1024
    shapes = {"a": (32, 32), "b": (32, 32), "c": (64, 64)}
    importance = {"a": 1.0, "b": 2.0, "c": 5.0}  # p = 1/8, 2/8, 5/8
    alloc = allocate_ranks(importance, shapes, reference_rank=4, min_rank=1, max_rank=16)
    # a: round(1024/8)=128 // 64 = 2; b: 256 // 64 = 4; c: 640 // 128 = 5
    assert alloc.ranks == {"a": 2, "b": 4, "c": 5}
    assert alloc.budget == 1024
    assert alloc.actual_params == 2 * 64 + 4 * 64 + 5 * 128


def test_ranks_are_clipped_to_bounds():
    shapes = {n: (16, 16) for n in "abcd"}
    alloc = allocate_ranks({"a": 100.0, "b": 1e-6, "c": 1.0, "d": 1.0}, shapes, 4, min_rank=2, max_rank=8)
    assert alloc.ranks["a"] == 8 and alloc.ranks["b"] == 2
    assert all(2 <= r <= 8 for r in alloc.ranks.values())


def test_ranks_never_exceed_min_in_out():
    shapes = {"thin": (3, 500), "wide": (500, 500)}
    alloc = allocate_ranks({"thin": 10.0, "wide": 1.0}, shapes, 8, min_rank=1, max_rank=64)
    assert alloc.ranks["thin"] <= 3


def test_min_rank_zero_leaves_unimportant_layers_unadapted():
    shapes = {"a": (32, 32), "b": (32, 32)}
    alloc = allocate_ranks({"a": 1.0, "b": 1e-9}, shapes, 4, min_rank=0, max_rank=16)
    assert alloc.ranks["b"] == 0 and alloc.ranks["a"] == 8


def test_allocation_is_invariant_to_layer_order():
    shapes = {f"l{i}": (16 * (i % 3 + 1), 32) for i in range(9)}
    importance = {name: 1.0 / (i + 1) for i, name in enumerate(shapes)}
    forward = allocate_ranks(importance, shapes, 8, 4, 32)
    backward = allocate_ranks(dict(reversed(importance.items())), dict(reversed(shapes.items())), 8, 4, 32)
    assert forward == backward


def test_equal_importance_of_equal_layers_gives_reference_rank():
    shapes = {n: (64, 64) for n in "abcd"}
    alloc = allocate_ranks({n: 3.0 for n in shapes}, shapes, 8, 4, 32)
    assert set(alloc.ranks.values()) == {8}
    assert alloc.actual_params == alloc.budget


def test_sqrt_features_divide_by_square_root():
    shapes = {"a": (50, 50), "b": (50, 50)}  # f = sqrt(100) = 10; T = 4 * 20 = 80
    alloc = allocate_ranks({"a": 3.0, "b": 1.0}, shapes, 4, 1, 100, features="sqrt")
    assert alloc.ranks == {"a": 6, "b": 2}  # round(60)//10, round(20)//10


def test_default_bounds_follow_reference_rank():
    assert GoraConfig().rank_bounds(8) == (4, 32)
    assert GoraConfig().rank_bounds(1) == (1, 4)
    assert GoraConfig(min_rank=0).rank_bounds(8) == (0, 32)  # 0 is legal: `is None`, not truthiness
    assert GoraConfig(max_rank=5).rank_bounds(8) == (4, 5)


def test_bad_bounds_and_scores_are_refused():
    with pytest.raises(GoraConfigError, match="min_rank"):
        allocate_ranks({"a": 1.0}, {"a": (4, 4)}, 4, 5, 2)
    with pytest.raises(GoraNumericalError, match="zero"):
        allocate_ranks({"a": 0.0}, {"a": (4, 4)}, 4, 1, 8)
    with pytest.raises(GoraNumericalError, match="finite"):
        allocate_ranks({"a": math.nan, "b": 1.0}, {"a": (4, 4), "b": (4, 4)}, 4, 1, 8)
