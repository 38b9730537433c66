"""Verifiers: right and wrong answers with formatting variants, the registry, user verifiers by dotted path."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmt.verifiers import (
    VERIFIERS,
    VerifierError,
    call_verifier,
    exact_verifier,
    load_verifier,
    math_verify_verifier,
    normalize_answer,
    posttrain_reward,
    reasoning_gym_verifier,
)

RIGHT_12 = ["12", " 12", "12 ", "12.0", "\\boxed{12}", "$12$", "+12"]
WRONG_12 = ["13", "1.2", "120", "-12", "twelve", ""]


@pytest.fixture(scope="module")
def rg_record():
    """An embedded post-training record: reasoning-gym's own entry kept under ``entry``."""
    import reasoning_gym

    entry = reasoning_gym.create_dataset("chain_sum", min_terms=3, max_terms=3, min_digits=1, max_digits=1, seed=3, size=1)[0]
    return {"prompt": "x=", "answer": entry["answer"], "task": "chain_sum", "entry": entry}


@pytest.mark.parametrize("prediction", RIGHT_12)
def test_exact_accepts_formatting_variants(prediction):
    assert exact_verifier(prediction, "12", {}) == 1.0


@pytest.mark.parametrize("prediction", WRONG_12 + [None])
def test_exact_rejects_wrong_answers(prediction):
    assert exact_verifier(prediction, "12", {}) == 0.0


def test_exact_compares_numbers_numerically_and_text_after_stripping():
    assert exact_verifier("0.50", "0.5", {}) == 1.0
    assert exact_verifier("1/2", "0.5", {}) == 1.0
    assert exact_verifier("1,000", "1000", {}) == 1.0
    assert exact_verifier(" Paris ", "Paris", {}) == 1.0
    assert exact_verifier("paris", "Paris", {}) == 0.0
    assert normalize_answer("  \\boxed{ -3.0 } ") == "-3"


@given(st.integers(-10**6, 10**6))
@settings(max_examples=50, deadline=None)
def test_exact_on_any_integer(n):
    assert exact_verifier(f" {n}.0", str(n), {}) == 1.0
    assert exact_verifier(f"\\boxed{{{n}}}", str(n), {}) == 1.0
    assert exact_verifier(str(n + 1), str(n), {}) == 0.0


@pytest.mark.parametrize("prediction", RIGHT_12[:6])
def test_math_verify_accepts_formatting_variants(prediction):
    assert math_verify_verifier(prediction, "12", {}) == 1.0


def test_math_verify_knows_equivalent_forms_and_rejects_wrong():
    assert math_verify_verifier("\\frac{1}{2}", "0.5", {}) == 1.0
    assert math_verify_verifier("$\\sqrt{4}$", "2", {}) == 1.0
    for wrong in ("13", "-12", "", None):
        assert math_verify_verifier(wrong, "12", {}) == 0.0


def test_reasoning_gym_scores_with_the_generators_own_verifier(rg_record):
    answer = rg_record["answer"]
    for right in (answer, f" {answer}", f"{answer}.0", f"\\boxed{{{answer}}}"):
        assert reasoning_gym_verifier(right, answer, rg_record) == 1.0
    assert reasoning_gym_verifier(str(int(answer) + 1), answer, rg_record) < 1.0
    assert reasoning_gym_verifier(None, answer, rg_record) == 0.0
    # a reasoning-gym entry itself (metadata.source_dataset) works too
    assert reasoning_gym_verifier(answer, answer, rg_record["entry"]) == 1.0


def test_reasoning_gym_refuses_records_from_elsewhere():
    with pytest.raises(VerifierError, match="reasoning-gym records"):
        reasoning_gym_verifier("12", "12", {"question": "q", "answer": "12"})


def test_registry_names_load():
    for name, fn in VERIFIERS.items():
        assert load_verifier(name) is fn


# --- user verifiers -----------------------------------------------------------------------------------------------

CALLS: list[tuple] = []


def user_verifier(prediction, answer, record):
    CALLS.append((prediction, answer, record))
    return 1.0 if prediction == answer else 0.25


def two_arguments(prediction, answer):
    return 1.0


def out_of_range(prediction, answer, record):
    return 2.0


NOT_CALLABLE = 3


def test_user_verifier_by_dotted_path_is_called_with_the_documented_arguments():
    fn = load_verifier(f"{__name__}:user_verifier")
    CALLS.clear()
    record = {"question": "1+1=", "answer": "2", "id": 7}
    assert call_verifier(fn, "mine", "2", "2", record) == 1.0
    assert call_verifier(fn, "mine", None, "2", record) == 0.25
    assert CALLS == [("2", "2", record), (None, "2", record)]


@pytest.mark.parametrize(
    "spec, message",
    [
        (f"{__name__}:two_arguments", "has signature"),
        (f"{__name__}:NOT_CALLABLE", "not callable"),
        (f"{__name__}:missing", "no attribute"),
        ("no_such_module_xyz:fn", "cannot import"),
        ("nonsense", "neither a built-in"),
    ],
)
def test_bad_user_verifiers_are_rejected_with_the_field_named(spec, message):
    with pytest.raises(VerifierError, match=message) as err:
        load_verifier(spec)
    assert "posttrain.verifier" in str(err.value)


def test_results_outside_zero_one_are_an_error():
    fn = load_verifier(f"{__name__}:out_of_range")
    with pytest.raises(VerifierError, match=r"in \[0, 1\]"):
        call_verifier(fn, "out_of_range", "1", "1", {})


def test_reward_mixes_verifier_and_format():
    assert posttrain_reward(1.0, True, 0.0) == 1.0
    assert posttrain_reward(0.0, True, 0.2) == pytest.approx(0.2)
    assert posttrain_reward(1.0, True, 0.2) == pytest.approx(1.0)
    assert posttrain_reward(0.0, False, 0.2) == 0.0
