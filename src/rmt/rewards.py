"""Rewards of one response (SPEC section 2, steps 2 and 4): match, prefix-match, length, and their mix.

    r = (1 - w) * r_match + w * r_len

A response with no parsable answer gets r_match = 0 and r_len = 0, so a model cannot collect the length reward by
thinking for B tokens and never answering. Match rewards are chosen by name from ``MATCH_REWARDS``
(reward.match: ``exact`` for RMT, ``prefix`` for RPT).

Leading whitespace. Byte-level BPE tokens carry the space before a word (`` the``), while a model asked for "the
next token" usually writes ``\\boxed{the}``. With reward.strip_leading_space (default) both match rewards ignore
leading whitespace on the prediction and on the truth, so `` the`` and ``the`` are the same answer; the prefix
reward's token boundaries then count from the first non-whitespace byte. Off, the bytes must agree exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from rmt.config import RewardConfig

Piece = str | bytes


def length_reward(length: int, budget: int, r_max: float = 1.0) -> float:
    """Triangular reward for ``length`` = number of tokens inside <think></think>, peaking at the budget B:

    r_len = r_max * l / B for 0 <= l <= B;  r_max * (2B - l) / B for B < l <= 2B;  0 for l > 2B.
    """
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if length <= budget:
        return r_max * (length / budget)  # ratio first: exactly r_max at l = B, never above
    if length <= 2 * budget:
        return r_max * ((2 * budget - length) / budget)
    return 0.0


def exact_match_reward(prediction: str, target: Piece, strip_leading_space: bool = True, *,
                       prediction_id: int | None = None, target_id: int | None = None) -> float:
    """RMT's r_match = 1[y = tau_pos]: 1.0 when the prediction is the next token, else 0.0.

    The same token id when both ids are known (a raw first-token answer is a token). Otherwise, or when the ids
    differ, the same text: ``target`` is the decoded next token (bytes are decoded as UTF-8); with
    ``strip_leading_space`` leading whitespace is removed from both sides first (see the module docstring). A text
    holding U+FFFD (a token that is only part of a multi-byte character decodes to it) never matches by text: two
    different partial-character tokens would otherwise be "equal". An empty prediction never matches.
    """
    if prediction_id is not None and target_id is not None and prediction_id == target_id:
        return 1.0
    target = target.decode("utf-8", errors="replace") if isinstance(target, bytes) else target
    if "\ufffd" in prediction or "\ufffd" in target:
        return 0.0
    if strip_leading_space:
        prediction, target = prediction.lstrip(), target.lstrip()
    return float(prediction != "" and prediction == target)


def prefix_match_reward(prediction: str, continuation_tokens: Sequence[Piece], strip_leading_space: bool = False) -> float:
    """RPT's prefix-matching reward: 1.0 when the prediction's UTF-8 bytes equal the first l bytes of the true
    continuation and l is a token boundary of it (one of the cumulative byte lengths of its tokens), else 0.0.

    ``continuation_tokens``: the true next tokens in order, each as its decoded string or its raw bytes. Pass bytes
    (or pieces from ``continuation_pieces``) when a token can end inside a multi-byte character. With
    ``strip_leading_space`` leading ASCII whitespace bytes are removed from the prediction and from the continuation,
    and the boundaries shift with it. An empty prediction never matches.
    """
    predicted = prediction.encode("utf-8")
    predicted = predicted.lstrip() if strip_leading_space else predicted
    if not predicted:
        return 0.0
    pieces = [p if isinstance(p, bytes) else p.encode("utf-8") for p in continuation_tokens]
    truth = b"".join(pieces)
    skipped = len(truth) - len(truth.lstrip()) if strip_leading_space else 0
    boundary, at_boundary = 0, False
    for piece in pieces:
        boundary += len(piece)
        if boundary - skipped == len(predicted):
            at_boundary = True
            break
    return float(at_boundary and truth[skipped : skipped + len(predicted)] == predicted)


def continuation_pieces(token_ids: Sequence[int], decode: Callable[[list[int]], str]) -> list[str]:
    """Decoded text of each token of a continuation, for ``prefix_match_reward``.

    A token that ends inside a multi-byte character (byte-level BPE splits some characters over two tokens) decodes
    to U+FFFD on its own; it is merged with the tokens that complete the character, so the pieces join into the
    true text and no boundary falls inside a character (where a text prediction could never end anyway).
    """
    pieces, run = [], []
    for tid in token_ids:
        run.append(int(tid))
        text = decode(run)
        if not text.endswith("\ufffd"):
            pieces.append(text)
            run = []
    if run:
        pieces.append(decode(run))
    return pieces


@dataclass(frozen=True)
class Truth:
    """The true continuation at a position, as the match rewards read it: the next token's id and text, and the
    texts of the next tokens (``continuation_pieces``, for the prefix match)."""

    next_id: int | None
    next_text: str
    pieces: tuple[str, ...]

    @classmethod
    def from_ids(cls, token_ids: Sequence[int], decode: Callable[[list[int]], str]) -> "Truth":
        ids = [int(t) for t in token_ids]
        if not ids:
            return cls(None, "", ())
        return cls(ids[0], decode(ids[:1]), tuple(continuation_pieces(ids, decode)))


# --- registry of match rewards: (prediction, prediction id, truth, strip_leading_space) -> reward -----------------


def _exact(prediction: str, prediction_id: int | None, truth: Truth, strip_leading_space: bool) -> float:
    if truth.next_id is None:
        return 0.0
    return exact_match_reward(prediction, truth.next_text, strip_leading_space, prediction_id=prediction_id, target_id=truth.next_id)


def _prefix(prediction: str, prediction_id: int | None, truth: Truth, strip_leading_space: bool) -> float:
    return prefix_match_reward(prediction, truth.pieces, strip_leading_space)


MATCH_REWARDS: dict[str, Callable[[str, int | None, Truth, bool], float]] = {
    "exact": _exact,  # the next token only
    "prefix": _prefix,  # any whole number of the next tokens
}


def total_reward(r_match: float, r_len: float, length_weight: float) -> float:
    """r = (1 - w) * r_match + w * r_len."""
    return (1 - length_weight) * r_match + length_weight * r_len


@dataclass(frozen=True)
class Reward:
    """The reward of one response and its two parts (for logging)."""

    total: float
    match: float
    length: float


def response_reward(
    prediction: str | None,
    think_tokens: int,
    truth: Truth,
    budget: int | None,
    cfg: RewardConfig,
    prediction_id: int | None = None,
) -> Reward:
    """The reward of one parsed response.

    ``prediction`` None = no parsable answer: every part is 0. ``truth``: the true continuation from the position on
    (``exact`` reads only the next token; ``prediction_id`` is compared with its id). ``budget`` None = no budget in
    this run: r_len = 0.
    """
    if prediction is None:
        return Reward(0.0, 0.0, 0.0)
    r_match = MATCH_REWARDS[cfg.match](prediction, prediction_id, truth, cfg.strip_leading_space)
    r_len = 0.0 if budget is None else length_reward(think_tokens, budget, cfg.r_max)
    return Reward(total_reward(r_match, r_len, cfg.length_weight), r_match, r_len)
