"""What changes with the training step: the token budget B_t and the tier distribution p_t (SPEC section 2, steps 2-3).

Pure functions of (step t, total steps T, config numbers). ``budget_at`` and ``tier_probs_at`` take the config
sections, so the trainer calls one function for each.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction

from rmt.config import BudgetConfig, CurriculumConfig

Probs = tuple[float, float, float]

# A computed B_0 * gamma^(t/T) closer than this (relatively) to an integer is settled by exact arithmetic.
_NEAR_INTEGER = 1e-9


# --- step 2: token budget -------------------------------------------------------------------------------------


def token_budget(step: int, total_steps: int, b0: int, b_min: int, gamma: float) -> int:
    """B_t = max(B_min, floor(B_0 * gamma^(t/T))).

    The floor is exact: 800 * 0.2^1 is 160, although in floating point it is 160.00000000000003 or 159.99999999999997
    depending on the order of operations. gamma is read as the decimal the user wrote (0.2 = 1/5, not the nearest
    binary fraction); when the float result is within 1e-9 of an integer n, the comparison B_0 * gamma^(t/T) >= n is
    decided with integers: B_0^q * gamma^p >= n^q, where t/T = p/q in lowest terms.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if not 0 < gamma <= 1:
        raise ValueError(f"gamma must be in (0, 1], got {gamma}")
    value = b0 * gamma ** (step / total_steps)
    nearest = round(value)
    if nearest >= 1 and abs(value - nearest) <= _NEAR_INTEGER * nearest:
        floor = nearest if _at_least(nearest, b0, Fraction(repr(gamma)), Fraction(step, total_steps)) else nearest - 1
    else:
        floor = math.floor(value)
    return max(b_min, floor)


def _at_least(n: int, b0: int, gamma: Fraction, exponent: Fraction) -> bool:
    """Exactly: b0 * gamma^exponent >= n, for positive n, b0 and gamma."""
    p, q = exponent.numerator, exponent.denominator
    return b0**q * gamma.numerator**p >= n**q * gamma.denominator**p


def budget_at(step: int, total_steps: int, cfg: BudgetConfig) -> int:
    """The budget of step t for this config: the decaying B_t, or the fixed B_0 when budget.dynamic is off.

    Returned also when budget.enabled is off; the caller then leaves it out of the prompt and the reward.
    """
    for name in ("b0", "b_min"):
        if getattr(cfg, name) == "auto":
            raise ValueError(f"budget.{name}=auto must be resolved to a number first (rmt train measures it on the model)")
    if not cfg.dynamic:
        return cfg.b0
    return token_budget(step, total_steps, cfg.b0, cfg.b_min, cfg.gamma)


def auto_b0(think_lengths: Sequence[int], quantile: float, b_min: int) -> int:
    """B_0 from measured thinking lengths (budget.b0=auto): the ``quantile`` quantile (numpy's linear
    interpolation, rounded up) of the lengths of responses that think at all, at least ``b_min``; ``b_min`` when
    none does."""
    length = _thinking_quantile(think_lengths, quantile)
    return b_min if length is None else max(b_min, length)


def auto_b_min(think_lengths: Sequence[int], quantile: float) -> int:
    """B_min from measured thinking lengths (budget.b_min=auto): half the ``quantile`` quantile of the lengths of
    responses that think at all (the length auto_b0 takes), rounded up, so that the thinking cap 2*B_min is at least
    that length; 1 when none thinks."""
    length = _thinking_quantile(think_lengths, quantile)
    return 1 if length is None else max(1, math.ceil(length / 2))


def _thinking_quantile(think_lengths: Sequence[int], quantile: float) -> int | None:
    """The ``quantile`` quantile (numpy's linear interpolation, rounded up) of the positive lengths; None if none."""
    import numpy as np

    thinking = [n for n in think_lengths if n > 0]
    if not thinking:
        return None
    return math.ceil(float(np.quantile(np.asarray(thinking, dtype=np.float64), quantile)) - 1e-9)


def response_cap(budget: int | None, answer_allowance: int, max_response_tokens: int) -> int:
    """Most new tokens a rollout may generate: 2*B_t thinking tokens plus the answer allowance (closing tag and
    answer), never more than rollout.max_response_tokens. Beyond 2*B_t the length reward is 0 anyway (SPEC section 2).
    budget None (no budget) = max_response_tokens."""
    if budget is None:
        return max_response_tokens
    return min(2 * budget + answer_allowance, max_response_tokens)


# --- step 3: curriculum over tiers ----------------------------------------------------------------------------


def knot_probs(fraction: float, knots: Sequence[tuple[float, Sequence[float]]]) -> Probs:
    """Tier distribution at ``fraction`` = t/T of a piecewise-linear schedule through ``knots``.

    knots = [(f_0, p_0), (f_1, p_1), ...] with increasing f_i: p = p_0 before f_0, p = p_last from the last knot on,
    and between f_i <= x < f_{i+1} the linear mix (1 - tau) p_i + tau p_{i+1} with tau = (x - f_i) / (f_{i+1} - f_i).
    The paper's schedule is the two-knot case [(t1, p_early), (t2, p_late)]. The result is clipped at 0 and
    renormalised, so it is a distribution despite rounding.
    """
    if not knots:
        raise ValueError("knots must hold at least one (fraction, probs) knot")
    fracs = [f for f, _ in knots]
    if any(b <= a for a, b in zip(fracs, fracs[1:])):
        raise ValueError(f"knot fractions must be strictly increasing, got {fracs}")
    if fraction < fracs[0]:
        return _normalised(knots[0][1])
    for (f_a, p_a), (f_b, p_b) in zip(knots, knots[1:]):
        if fraction < f_b:
            tau = (fraction - f_a) / (f_b - f_a)
            return _normalised([(1 - tau) * a + tau * b for a, b in zip(p_a, p_b)])
    return _normalised(knots[-1][1])


def curriculum_probs(
    step: int, total_steps: int, p_early: Sequence[float], p_late: Sequence[float], t1: float, t2: float
) -> Probs:
    """p_t of the paper: p_early for t < t1*T; linear from p_early to p_late for t1*T <= t < t2*T with
    tau = (t - t1*T) / (t2*T - t1*T); p_late for t >= t2*T. t1 and t2 are fractions of T (paper: 0.3, 0.7)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0 <= t1 < t2:
        raise ValueError(f"need 0 <= t1 < t2, got t1={t1} t2={t2}")
    return knot_probs(step / total_steps, [(t1, p_early), (t2, p_late)])


def uniform_probs(step: int, total_steps: int, cfg: CurriculumConfig) -> Probs:
    """Ablation rmt-no-cas: every tier equally likely at every step."""
    return (1 / 3, 1 / 3, 1 / 3)


def scheduled_probs(step: int, total_steps: int, cfg: CurriculumConfig) -> Probs:
    """The easy-to-hard curriculum: curriculum.knots when given, else the paper's two transition points."""
    if cfg.knots is not None:
        return knot_probs(step / total_steps, cfg.knots)
    return curriculum_probs(step, total_steps, cfg.p_early, cfg.p_late, cfg.t1, cfg.t2)


CURRICULA: dict[str, Callable[[int, int, CurriculumConfig], Probs]] = {
    "curriculum": scheduled_probs,
    "uniform": uniform_probs,
}


def tier_probs_at(step: int, total_steps: int, cfg: CurriculumConfig) -> Probs:
    """p_t = (p_easy, p_medium, p_hard) of step t for this config (curriculum.mode picks the schedule)."""
    return CURRICULA[cfg.mode](step, total_steps, cfg)


def _normalised(probs: Sequence[float]) -> Probs:
    if len(probs) != 3:
        raise ValueError(f"a tier distribution has 3 entries (easy, medium, hard), got {list(probs)}")
    clipped = [max(0.0, float(p)) for p in probs]
    total = sum(clipped)
    if total <= 0:
        raise ValueError(f"tier probabilities must not all be 0, got {list(probs)}")
    return tuple(p / total for p in clipped)  # type: ignore[return-value]
