"""Verifiable rewards for post-training (SPEC section 4, post-training transfer): is this answer right?

A verifier is a function ``fn(prediction: str | None, answer: str, record: dict) -> float`` in [0, 1]:

- ``prediction``: the answer parsed from the response (``None`` when the response had no parsable answer);
- ``answer``: the reference answer of the question, as a string;
- ``record``: the question's whole input record (every field of its JSONL line or Parquet row), for verifiers that
  need more than the answer (reasoning-gym's ``score_answer`` reads the generator's own entry).

Built-ins are chosen by name from ``VERIFIERS``:

- ``exact``: normalised string match (see ``normalize_answer``); two numbers are compared as numbers.
- ``math_verify``: Hugging Face's math-verify library (LaTeX and plain expressions, symbolic equivalence).
- ``reasoning_gym``: the generator's own ``score_answer`` (the embedded default; may give partial credit).

A user's own verifier is a dotted path ``package.module:function`` (``posttrain.verifier``); ``load_verifier``
imports it and checks at start-up that it can be called with the three arguments above.
"""

from __future__ import annotations

import importlib
import inspect
import math
import re
import threading
from collections.abc import Callable
from fractions import Fraction

from rmt.errors import RMTError
from rmt.prompts import last_boxed

Verifier = Callable[[str | None, str, dict], float]


class VerifierError(RMTError):
    """A verifier that cannot be loaded or called, or that returned something other than a number in [0, 1]."""


# --- exact ------------------------------------------------------------------------------------------------------

_THOUSANDS = re.compile(r"^[+-]?\d{1,3}(,\d{3})+(\.\d+)?$")


def normalize_answer(text: str) -> str:
    """The comparable form of an answer: whitespace stripped, the content of a last ``\\boxed{}`` taken, surrounding
    ``$`` removed, thousands separators dropped from a number (``1,000``), and a trailing ``.0`` dropped (``12.0``)."""
    text = text.strip()
    boxed, _ = last_boxed(text)
    if boxed is not None:
        text = boxed.strip()
    if len(text) >= 2 and text[0] == text[-1] == "$":
        text = text.strip("$").strip()
    if _THOUSANDS.match(text):
        text = text.replace(",", "")
    if re.fullmatch(r"[+-]?\d+\.0+", text):
        text = text.split(".")[0]
    return text


def as_number(text: str) -> Fraction | None:
    """``12``, ``-3.5``, ``1e3``, ``3/4`` as an exact fraction; None when the text is not a finite number."""
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):
        return None
    return value


def exact_verifier(prediction: str | None, answer: str, record: dict) -> float:
    """1.0 when the normalised prediction equals the normalised answer (numerically when both are numbers)."""
    if prediction is None:
        return 0.0
    pred, gold = normalize_answer(prediction), normalize_answer(answer)
    if not pred:
        return 0.0
    p, g = as_number(pred), as_number(gold)
    if p is not None and g is not None:
        return float(p == g)
    return float(pred == gold)


# --- math-verify ------------------------------------------------------------------------------------------------


def math_verify_verifier(prediction: str | None, answer: str, record: dict) -> float:
    """1.0 when math-verify finds the prediction equivalent to the answer (``\\frac{1}{2}`` = ``0.5``), else 0.0.

    math-verify's time limits use SIGALRM, which only the main thread may set: elsewhere they are switched off.
    """
    if prediction is None or not prediction.strip():
        return 0.0
    from math_verify import parse, verify

    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold = parse(_as_math(answer), parsing_timeout=limit)
    pred = parse(_as_math(prediction), parsing_timeout=limit)
    if not gold or not pred:
        return 0.0
    return float(verify(gold, pred, timeout_seconds=limit))


def _as_math(text: str) -> str:
    """math-verify reads LaTeX inside ``$...$`` or ``\\boxed{}``; a bare answer is wrapped so that it is found."""
    text = text.strip()
    return text if "$" in text or "\\boxed" in text or "\\(" in text or "\\[" in text else f"${text}$"


# --- reasoning-gym ----------------------------------------------------------------------------------------------


def reasoning_gym_verifier(prediction: str | None, answer: str, record: dict) -> float:
    """The generator's own ``score_answer`` on the prediction (a ``\\boxed{}`` unwrapped first).

    ``record`` is an embedded post-training record (``task`` and ``entry``) or a reasoning-gym entry itself
    (``metadata.source_dataset``). reasoning-gym gives some wrong answers partial credit; accuracy counts 1.0 only.
    """
    import reasoning_gym

    task, entry = reasoning_gym_entry(record)
    if prediction is not None:
        boxed, _ = last_boxed(prediction)
        prediction = (boxed if boxed is not None else prediction).strip()
    return float(reasoning_gym.get_score_answer_fn(task)(prediction or None, entry))


def reasoning_gym_entry(record: dict) -> tuple[str, dict]:
    """(task name, generator entry) of a record; VerifierError when the record is not from reasoning-gym."""
    if isinstance(record.get("entry"), dict) and isinstance(record.get("task"), str):
        return record["task"], record["entry"]
    source = (record.get("metadata") or {}).get("source_dataset") if isinstance(record.get("metadata"), dict) else None
    if isinstance(source, str) and "answer" in record:
        return source, record
    raise VerifierError(
        "posttrain.verifier=reasoning_gym needs reasoning-gym records: fields 'task' and 'entry' (the embedded "
        "post-training split) or a reasoning-gym entry with metadata.source_dataset; use exact or math_verify for other data"
    )


# --- registry and loading ---------------------------------------------------------------------------------------

VERIFIERS: dict[str, Verifier] = {
    "exact": exact_verifier,
    "math_verify": math_verify_verifier,
    "reasoning_gym": reasoning_gym_verifier,
}


def load_verifier(spec: str) -> Verifier:
    """A built-in verifier by name, or a user's ``package.module:function``, checked to accept
    ``(prediction, answer, record)``. Raises VerifierError naming posttrain.verifier and what is wrong."""
    if spec in VERIFIERS:
        return VERIFIERS[spec]
    if ":" not in spec:
        raise VerifierError(
            f"posttrain.verifier={spec!r} is neither a built-in verifier ({', '.join(VERIFIERS)}) nor a dotted path "
            "'package.module:function'"
        )
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise VerifierError(f"posttrain.verifier={spec!r}: cannot import module {module_name!r} ({e})") from None
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise VerifierError(f"posttrain.verifier={spec!r}: module {module_name!r} has no attribute {attr!r}")
    check_signature(fn, spec)
    return fn


def check_signature(fn, name: str) -> None:
    """A verifier must be callable as fn(prediction, answer, record): checked by binding, without calling it."""
    if not callable(fn):
        raise VerifierError(f"posttrain.verifier={name!r} is not callable")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: checked at the first call
    try:
        sig.bind("prediction", "answer", {})
    except TypeError as e:
        raise VerifierError(
            f"posttrain.verifier={name!r} has signature {sig}, but a verifier is called as "
            f"fn(prediction: str | None, answer: str, record: dict) -> float in [0, 1] ({e})"
        ) from None


def call_verifier(fn: Verifier, name: str, prediction: str | None, answer: str, record: dict) -> float:
    """Call a verifier and check its result: a finite number in [0, 1] (VerifierError otherwise)."""
    value = fn(prediction, answer, record)
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise VerifierError(f"verifier {name!r} returned {value!r} for prediction {prediction!r}; it must return a number in [0, 1]") from None
    if not math.isfinite(score) or not 0.0 <= score <= 1.0:
        raise VerifierError(f"verifier {name!r} returned {score!r} for prediction {prediction!r}; it must return a number in [0, 1]")
    return score


# --- the reward -------------------------------------------------------------------------------------------------


def posttrain_reward(verified: float, well_formed: bool, format_weight: float) -> float:
    """r = (1 - w_f) * r_verify + w_f * r_format, r_format = 1 for a closed ``</think>`` and a parsable answer.

    ``verified`` is the verifier's score (0 when no answer was parsed). With w_f = 0 (default) r = r_verify.
    """
    return (1.0 - format_weight) * verified + format_weight * float(well_formed)
