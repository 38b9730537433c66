import math
from decimal import Decimal, getcontext

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmt.config import BudgetConfig, CurriculumConfig
from rmt.schedules import (
    CURRICULA,
    budget_at,
    curriculum_probs,
    knot_probs,
    response_cap,
    tier_probs_at,
    token_budget,
)

P_EARLY, P_LATE = (0.6, 0.3, 0.1), (0.1, 0.3, 0.6)


# --- token budget ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("T", [2, 10, 100, 1000])
def test_budget_paper_values(T):
    assert token_budget(0, T, 800, 1, 0.2) == 800
    assert token_budget(T // 2, T, 800, 1, 0.2) == 357 == math.floor(800 * 0.2**0.5)
    assert token_budget(T, T, 800, 1, 0.2) == 160


@pytest.mark.parametrize(
    "step, total, b0, gamma, expected",
    [
        (1, 1, 100, 0.29, 29),  # 100 * 0.29 = 28.999999999999996 in floating point
        (10, 10, 800, 0.57, 456),  # 455.99999999999994
        (4, 4, 800, 0.29, 232),
        (1, 2, 100, 0.04, 20),  # 100 * sqrt(0.04) = 20 exactly
        (3, 3, 800, 0.2, 160),
    ],
)
def test_budget_floor_is_exact_at_integers(step, total, b0, gamma, expected):
    assert token_budget(step, total, b0, 1, gamma) == expected


def test_budget_floor_and_errors():
    assert token_budget(100, 100, 800, 200, 0.2) == 200  # B_min wins
    assert token_budget(100, 100, 10, 1, 0.01) == 1
    with pytest.raises(ValueError):
        token_budget(-1, 10, 800, 1, 0.2)
    with pytest.raises(ValueError):
        token_budget(0, 0, 800, 1, 0.2)


def _reference_budget(step, total, b0, b_min, gamma):
    getcontext().prec = 60
    value = Decimal(b0) * Decimal(repr(gamma)) ** (Decimal(step) / Decimal(total))
    return max(b_min, math.floor(value + Decimal("1e-40")))  # 1e-40 absorbs the last digit of a 60-digit power


budget_args = st.tuples(
    st.integers(1, 500), st.integers(1, 2000), st.floats(0.01, 0.99).map(lambda g: round(g, 3)), st.integers(1, 2000)
)


@settings(max_examples=200, deadline=None)
@given(budget_args, st.integers(1, 100))
def test_budget_matches_high_precision_reference(args, b_min_cap):
    T, b0, gamma, step = args
    step = step % (T + 1)
    b_min = min(b_min_cap, b0)
    assert token_budget(step, T, b0, b_min, gamma) == _reference_budget(step, T, b0, b_min, gamma)


@settings(max_examples=100, deadline=None)
@given(budget_args)
def test_budget_is_non_increasing_and_floored(args):
    T, b0, gamma, _ = args
    b_min = max(1, b0 // 7)
    budgets = [token_budget(t, T, b0, b_min, gamma) for t in range(0, T + 1, max(1, T // 50))] + [
        token_budget(T, T, b0, b_min, gamma)
    ]
    assert budgets[0] == b0
    assert all(b >= b_min for b in budgets)
    assert all(a >= b for a, b in zip(budgets, budgets[1:]))


def test_budget_at_config():
    cfg = BudgetConfig()
    assert [budget_at(t, 100, cfg) for t in (0, 50, 100)] == [800, 357, 160]
    fixed = BudgetConfig(dynamic=False)
    assert [budget_at(t, 100, fixed) for t in (0, 50, 100)] == [800, 800, 800]


def test_response_cap():
    assert response_cap(160, 16, 2048) == 336
    assert response_cap(800, 16, 1000) == 1000
    assert response_cap(None, 16, 2048) == 2048


# --- curriculum -----------------------------------------------------------------------------------------------


def approx(p):
    return pytest.approx(p, abs=1e-12)


def test_curriculum_around_transition_points():
    T = 1000  # t1 = step 300, t2 = step 700
    p = lambda t: curriculum_probs(t, T, P_EARLY, P_LATE, 0.3, 0.7)  # noqa: E731
    assert p(0) == approx(P_EARLY)
    assert p(299) == approx(P_EARLY)
    assert p(300) == approx(P_EARLY)  # tau = 0
    assert p(301) == approx((0.6 - 0.5 / 400, 0.3, 0.1 + 0.5 / 400))
    assert p(500) == approx((0.35, 0.3, 0.35))  # tau = 1/2
    assert p(699) == approx((0.1 + 0.5 / 400, 0.3, 0.6 - 0.5 / 400))
    assert p(700) == approx(P_LATE)
    assert p(1000) == approx(P_LATE)


def test_general_knots():
    knots = [(0.0, (1.0, 0.0, 0.0)), (0.5, (0.0, 1.0, 0.0)), (1.0, (0.0, 0.0, 1.0))]
    assert knot_probs(0.0, knots) == approx((1, 0, 0))
    assert knot_probs(0.25, knots) == approx((0.5, 0.5, 0))
    assert knot_probs(0.75, knots) == approx((0, 0.5, 0.5))
    assert knot_probs(1.0, knots) == approx((0, 0, 1))
    assert knot_probs(0.4, [(0.2, (0.2, 0.3, 0.5))]) == approx((0.2, 0.3, 0.5))  # one knot: constant
    # the paper's form is the two-knot case
    for t in range(0, 101, 7):
        assert knot_probs(t / 100, [(0.3, P_EARLY), (0.7, P_LATE)]) == approx(curriculum_probs(t, 100, P_EARLY, P_LATE, 0.3, 0.7))
    with pytest.raises(ValueError):
        knot_probs(0.5, [])
    with pytest.raises(ValueError):
        knot_probs(0.5, [(0.5, P_EARLY), (0.5, P_LATE)])


def test_tier_probs_at_config():
    cfg = CurriculumConfig()
    assert tier_probs_at(0, 100, cfg) == approx(P_EARLY)
    assert tier_probs_at(100, 100, cfg) == approx(P_LATE)
    uniform = CurriculumConfig(mode="uniform")
    assert all(tier_probs_at(t, 100, uniform) == approx((1 / 3,) * 3) for t in (0, 50, 100))
    knotted = CurriculumConfig(knots=[(0.0, (0, 0, 1)), (1.0, (1, 0, 0))])
    assert tier_probs_at(50, 100, knotted) == approx((0.5, 0, 0.5))
    assert set(CURRICULA) == {"curriculum", "uniform"}


distribution = st.lists(st.floats(0, 1), min_size=3, max_size=3).filter(lambda p: sum(p) > 0.01).map(
    lambda p: tuple(x / sum(p) for x in p)
)


@settings(max_examples=200, deadline=None)
@given(distribution, distribution, st.floats(0.01, 0.98), st.floats(0.01, 0.5), st.integers(1, 500), st.integers(0, 600))
def test_curriculum_is_a_distribution_between_its_ends(p_early, p_late, t1, gap, T, step):
    t2 = min(0.99, t1 + gap)
    p = curriculum_probs(step, T, p_early, p_late, t1, t2)
    assert all(x >= 0 for x in p)
    assert sum(p) == pytest.approx(1.0, abs=1e-12)
    for x, a, b in zip(p, p_early, p_late):
        assert min(a, b) - 1e-9 <= x <= max(a, b) + 1e-9


def test_auto_b0_is_a_quantile_of_the_lengths_that_think():
    from rmt.schedules import auto_b0

    assert auto_b0([0, 0, 10, 20, 30, 40, 50], 0.5, 1) == 30  # zeros (no thinking) are left out
    assert auto_b0([10, 20], 0.9, 1) == 19  # 10 + 0.9 * 10, rounded up
    assert auto_b0([10, 20], 1.0, 1) == 20
    assert auto_b0([0, 0], 0.9, 3) == 3  # nothing thinks: B_min
    assert auto_b0([2], 0.5, 5) == 5  # never below B_min


def test_auto_b_min_is_half_the_measured_length_rounded_up():
    from rmt.schedules import auto_b_min

    assert auto_b_min([0, 0, 10, 20, 30, 40, 50], 0.5) == 15  # the median of the lengths that think, 30, halved
    assert auto_b_min([10, 20], 0.9) == 10  # 19 halved, rounded up: the cap 2 * 10 covers 19
    assert auto_b_min([22], 0.9) == 11
    assert auto_b_min([1], 0.9) == 1
    assert auto_b_min([0, 0], 0.9) == 1  # nothing thinks: the paper's floor


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 500), max_size=40), st.floats(0.05, 1.0))
def test_auto_floor_keeps_the_cap_at_the_measured_length(lengths, quantile):
    """The thinking cap 2 * B_min reaches the measured B_0 (the same quantile) and the floor never exceeds B_0."""
    from rmt.schedules import auto_b0, auto_b_min

    b_min = auto_b_min(lengths, quantile)
    b0 = auto_b0(lengths, quantile, b_min)
    assert 1 <= b_min <= b0 <= 2 * b_min
