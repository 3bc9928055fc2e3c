"""Property tests of ``allocate_ranks`` over random shapes, importances and budgets.

Exact bound (features = identity, f_i = in_i + out_i, T = r·Σ f_i, p_i = I_i / Σ I_j):
a layer's rank before clipping is r'_i = floor(round(T p_i) / f_i), so r'_i f_i ≤ round(T p_i) ≤ T p_i + 1/2.
Clipping at max_rank and the min(in, out) cap only lower a rank; only clipping *up* to min_rank can
raise it, and then r_i = min(min_rank, cap_i). Hence, per layer,

    r_i f_i ≤ max(T p_i + 1/2, min(min_rank, cap_i) · f_i)

and summed, with min_rank = 0 (nothing forced up): Σ r_i f_i ≤ T + n/2, i.e. ≤ T + ⌊n/2⌋ in integers.
The floor loses less than one rank unit: a layer below its upper bound has r_i f_i > T p_i − 1/2 − f_i.
Ratios are computed exactly (fractions); TOL covers the float64 error of T·p_i in the library.
"""

import math
from fractions import Fraction

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from gora.allocation import allocate_ranks
from gora.errors import GoraNumericalError

SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

dims = st.integers(min_value=1, max_value=300)
scores = st.one_of(st.just(0.0), st.floats(min_value=1e-12, max_value=1e6, allow_nan=False, allow_infinity=False))


@st.composite
def problems(draw, min_rank_zero: bool = False):
    n = draw(st.integers(min_value=1, max_value=10))
    names = [f"model.layers.{i}.proj" for i in range(n)]
    shapes = {name: (draw(dims), draw(dims)) for name in names}
    importance = {name: draw(scores) for name in names}
    assume(any(v > 0 for v in importance.values()))
    r = draw(st.integers(min_value=1, max_value=16))
    min_rank = 0 if min_rank_zero else draw(st.integers(min_value=0, max_value=2 * r))
    max_rank = draw(st.integers(min_value=max(1, min_rank), max_value=5 * r))
    return importance, shapes, r, min_rank, max_rank


def _exact_targets(importance, shapes, r):
    """Exact T·p_i (Fraction) per layer, and T, with f_i = in_i + out_i."""
    total_score = sum(Fraction(v) for v in importance.values())
    budget = r * sum(sum(shape) for shape in shapes.values())
    return {n: budget * Fraction(v) / total_score for n, v in importance.items()}, budget


def _tol(budget) -> float:
    return 1e-9 * float(budget) + 1e-9


@SETTINGS
@given(problems())
def test_ranks_respect_bounds_and_the_min_in_out_cap(problem):
    importance, shapes, r, min_rank, max_rank = problem
    ranks = allocate_ranks(importance, shapes, r, min_rank, max_rank).ranks
    assert set(ranks) == set(importance)
    for name, rank in ranks.items():
        cap = min(shapes[name])
        assert isinstance(rank, int)
        assert min(min_rank, cap) <= rank <= min(max_rank, cap), (name, rank, shapes[name])


@SETTINGS
@given(problems())
def test_parameter_count_stays_within_budget_plus_rounding_unless_min_rank_forces_more(problem):
    importance, shapes, r, min_rank, max_rank = problem
    allocation = allocate_ranks(importance, shapes, r, min_rank, max_rank)
    shares, budget = _exact_targets(importance, shapes, r)
    bound = Fraction(0)
    for name, rank in allocation.ranks.items():
        f = sum(shapes[name])
        forced = min(min_rank, min(shapes[name])) * f
        assert rank * f <= max(shares[name] + Fraction(1, 2), forced) + _tol(budget), name
        bound += max(shares[name] + Fraction(1, 2), Fraction(forced))
    assert allocation.actual_params <= bound + _tol(budget)
    assert allocation.budget == budget
    assert allocation.actual_params == sum(rank * sum(shapes[n]) for n, rank in allocation.ranks.items())


@SETTINGS
@given(problems(min_rank_zero=True))
def test_without_min_rank_the_count_never_exceeds_budget_plus_half_a_unit_per_layer(problem):
    importance, shapes, r, min_rank, max_rank = problem
    allocation = allocate_ranks(importance, shapes, r, min_rank, max_rank)
    n = len(importance)
    assert allocation.actual_params <= allocation.budget + n // 2


@SETTINGS
@given(problems())
def test_floor_loses_less_than_one_rank_unit_per_unsaturated_layer(problem):
    importance, shapes, r, min_rank, max_rank = problem
    allocation = allocate_ranks(importance, shapes, r, min_rank, max_rank)
    shares, budget = _exact_targets(importance, shapes, r)
    for name, rank in allocation.ranks.items():
        if rank < min(max_rank, min(shapes[name])):  # not cut down by max_rank or the cap
            f = sum(shapes[name])
            assert rank * f > shares[name] - Fraction(1, 2) - f - _tol(budget), name


@SETTINGS
@given(problems(), st.randoms(use_true_random=False))
def test_allocation_does_not_depend_on_the_order_of_the_input_dicts(problem, rng):
    importance, shapes, r, min_rank, max_rank = problem
    reference = allocate_ranks(importance, shapes, r, min_rank, max_rank)
    names = list(importance)
    rng.shuffle(names)
    other_names = list(shapes)
    rng.shuffle(other_names)
    shuffled = allocate_ranks({n: importance[n] for n in names}, {n: shapes[n] for n in other_names},
                              r, min_rank, max_rank)
    assert shuffled == reference


@SETTINGS
@given(problems(), st.integers(min_value=-20, max_value=20))
def test_scaling_every_importance_by_a_power_of_two_changes_nothing(problem, exponent):
    importance, shapes, r, min_rank, max_rank = problem
    scaled = {n: math.ldexp(v, exponent) for n, v in importance.items()}  # exact in float64
    assume(all(v == 0.0 or math.isfinite(s) and s > 0 and s >= 1e-300 for v, s in zip(importance.values(),
                                                                                       scaled.values())))
    assert allocate_ranks(scaled, shapes, r, min_rank, max_rank) == allocate_ranks(importance, shapes, r, min_rank,
                                                                                   max_rank)


@SETTINGS
@given(problems())
def test_a_more_important_layer_of_the_same_shape_never_gets_a_smaller_rank(problem):
    importance, shapes, r, min_rank, max_rank = problem
    first = next(iter(shapes))
    same = {n: shapes[first] for n in shapes}  # every layer the same shape
    ranks = allocate_ranks(importance, same, r, min_rank, max_rank).ranks
    ordered = sorted(importance, key=importance.get)
    for low, high in zip(ordered, ordered[1:]):
        assert ranks[low] <= ranks[high], (importance[low], importance[high])


@SETTINGS
@given(problems())
def test_sqrt_features_respect_the_same_bound_with_sqrt_costs(problem):
    importance, shapes, r, min_rank, max_rank = problem
    ranks = allocate_ranks(importance, shapes, r, min_rank, max_rank, features="sqrt").ranks
    costs = {n: math.sqrt(sum(s)) for n, s in shapes.items()}
    total = r * math.fsum(costs.values())
    score_sum = math.fsum(importance.values())
    for name, rank in ranks.items():
        share = total * importance[name] / score_sum
        forced = min(min_rank, min(shapes[name])) * costs[name]
        assert rank * costs[name] <= max(share + 0.5, forced) + 1e-9 * total + 1e-9, name
        assert min(min_rank, min(shapes[name])) <= rank <= min(max_rank, min(shapes[name]))


def _usable(importance) -> bool:
    if any(not math.isfinite(v) or v < 0 for v in importance.values()):
        return False
    try:
        total = math.fsum(importance.values())
    except OverflowError:
        return False
    return 0 < total < math.inf


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(st.sampled_from(["a", "b", "c", "d"]),
                    st.floats(allow_nan=True, allow_infinity=True, width=64), min_size=1),
    st.integers(min_value=1, max_value=8),
)
@example({"a": 1.7e308, "b": 1.7e308}, 4)  # finite scores whose sum overflows float64
@example({"a": 0.0, "b": 0.0}, 4)
@example({"a": 5e-324, "b": 0.0}, 4)  # a subnormal score
def test_any_importance_values_give_ranks_or_a_numerical_error_never_another_exception(importance, r):
    shapes = {n: (8, 16) for n in importance}
    try:
        allocation = allocate_ranks(importance, shapes, r, 0, 4 * r)
    except GoraNumericalError as error:
        assert not _usable(importance), error
        return
    assert _usable(importance)
    assert all(0 <= rank <= 8 for rank in allocation.ranks.values())
