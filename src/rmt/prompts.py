"""Prompts for an RL position, and the reading of a response (SPEC section 2, steps 2 and 4).

Templates are data (``PromptConfig``), not code. Two styles, chosen by name from ``PROMPT_BUILDERS``:

- ``raw`` (base models): ``prompt.raw_template`` with ``{prefix}`` and ``{budget_text}``. The prompt's ids are the
  corpus prefix ids as they are, with the tokenized template text before and after them: the decoded prefix is
  never re-tokenized, since that can change its tokens. The default template ends with ``<think>``, so a raw
  response starts inside its thinking.
- ``chat`` (instruct models): ``prompt.chat_user`` (with ``{prefix}`` and ``{budget_text}``; optional
  ``prompt.chat_system``) rendered by the tokenizer's chat template with the generation prompt. Chat templates
  work on text, so here the prefix is decoded.

The budget statement (``raw_budget_text`` / ``chat_budget_text`` with ``{budget}``) is filled in only when a budget
is given (budget.enabled); otherwise ``{budget_text}`` is empty.

Parsing never raises on malformed output: ``parse_response`` classifies it (``ParsedResponse.status``):
ok | no_close (no </think>) | no_answer (closed, but no answer by the rule) | unbalanced (a \\boxed{ never closes)
| truncated (the response hit the token cap before it was complete).

Restatement (raw first-token rule, ``prompt.skip_restatement``). A base model asked to think in the middle of a
number (``...4+6+2=1<think>``) may write the steps and then the whole value (``12``) rather than its next character
(``2``). The rule reads past a restatement of the part of the current value already written (``current_value_ids``,
``restatement_length``): the same rule for every model, in the reward and in the evaluation.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Literal

from rmt.config import PromptConfig

Decode = Callable[[list[int]], str]
Status = Literal["ok", "no_close", "no_answer", "unbalanced", "truncated"]

_PREFIX_SLOT = "\x00rmt-prefix\x00"  # stands in for the prefix while the template is rendered
BOXED = "\\boxed{"


# --- prompts --------------------------------------------------------------------------------------------------


def budget_statement(template: str, budget: int | None) -> str:
    """The budget sentence with ``{budget}`` filled in; empty without a budget."""
    return "" if budget is None else template.format(budget=budget)


def raw_prompt_ids(prefix_ids: Sequence[int], tokenizer, cfg: PromptConfig, budget: int | None = None) -> list[int]:
    """tokens(template text before {prefix}) + prefix_ids + tokens(template text after {prefix})."""
    rendered = cfg.raw_template.format(prefix=_PREFIX_SLOT, budget_text=budget_statement(cfg.raw_budget_text, budget))
    parts = rendered.split(_PREFIX_SLOT)
    if len(parts) != 2:
        raise ValueError(f"prompt.raw_template must contain {{prefix}} exactly once, got {cfg.raw_template!r}")
    before, after = (tokenizer.encode(p, add_special_tokens=False) if p else [] for p in parts)
    return before + [int(i) for i in prefix_ids] + after


def chat_prompt_ids(prefix_ids: Sequence[int], tokenizer, cfg: PromptConfig, budget: int | None = None) -> list[int]:
    """The chat template applied to [system?, user] with the assistant's generation prompt."""
    prefix_text = tokenizer.decode(list(prefix_ids), skip_special_tokens=True)
    user = cfg.chat_user.format(prefix=prefix_text, budget_text=budget_statement(cfg.chat_budget_text, budget))
    messages = ([{"role": "system", "content": cfg.chat_system}] if cfg.chat_system else []) + [
        {"role": "user", "content": user}
    ]
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))


PROMPT_BUILDERS: dict[str, Callable[..., list[int]]] = {"raw": raw_prompt_ids, "chat": chat_prompt_ids}


def build_prompt_ids(prefix_ids: Sequence[int], tokenizer, cfg: PromptConfig, budget: int | None = None) -> list[int]:
    """Prompt token ids for the RL position right after ``prefix_ids`` (prompt.style picks the builder).

    ``budget``: B_t when the budget is on (it is stated in the prompt), None when off.
    """
    return PROMPT_BUILDERS[cfg.style](prefix_ids, tokenizer, cfg, budget)


# --- answers --------------------------------------------------------------------------------------------------


def last_boxed(text: str) -> tuple[str | None, Status]:
    """Content of the last complete, outermost ``\\boxed{...}`` of ``text`` (nested braces kept inside it).

    Returns (content, "ok"); (None, "no_answer") without a box or with an empty one; (None, "unbalanced") when a
    box opened after the last complete one never closes.
    """
    content, status, start = None, "no_answer", 0
    while (open_at := text.find(BOXED, start)) != -1:
        depth, i = 1, open_at + len(BOXED)
        while i < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            i += 1
        if depth:
            return None, "unbalanced"
        content, start = text[open_at + len(BOXED) : i - 1], i
        status = "ok" if content else "no_answer"
    return (content if status == "ok" else None), status


def current_value_ids(prefix_ids: Sequence[int], decode: Decode) -> list[int]:
    """The trailing tokens of ``prefix_ids`` that hold the part of the current number or word already written.

    A run of tokens whose text is letters and digits (the first may start with whitespace: a word-initial BPE token
    ends the run), plus a sign (``-``/``+``) right before it when the sign follows something that is not a letter
    or digit (``=-1`` is the value ``-1``; in ``6-3`` the ``-`` is an operator). A trailing sign alone counts
    (``=-``). Empty when the prefix does not end inside a number or word.
    """
    texts = [decode([int(t)]) for t in prefix_ids]
    k = len(texts)
    while k > 0 and texts[k - 1].strip().isalnum():
        k -= 1
        if texts[k][:1].isspace():
            break
    if k > 0 and texts[k - 1] in ("-", "+") and not (k >= 2 and texts[k - 2][-1:].isalnum()):
        k -= 1  # a sign, not an operator
    return [int(t) for t in prefix_ids[k:]]


def restatement_length(after_ids: Sequence[int], written_ids: Sequence[int], decode: Decode) -> int:
    """How many tokens at the start of ``after_ids`` restate ``written_ids`` before the answer goes on; 0 for none.

    A restatement counts when its text equals the written part exactly at a token boundary and another token follows
    it: a model that writes the whole value after thinking (``=1<think>...</think>12``) is read as predicting ``2``,
    and one that restates a finished value and ends the line (``=12<think>...</think>12`` then a newline) as
    predicting the newline, the corpus convention of restating the whole value read consistently; one that writes
    only the next token (``2``) is read from its first token. The one reading this gets wrong is a model that
    ignores the convention and whose next token equals the whole written part (``=1`` of ``11`` answered ``1``,
    newline): the written part alone is never read as a restatement, but ``1`` then a newline is.
    """
    if not written_ids:
        return 0
    written = decode(list(written_ids))
    for k in range(1, len(after_ids)):
        text = decode(list(after_ids[:k]))
        if text == written:
            return k
        if not written.startswith(text):
            break
    return 0


@dataclass(frozen=True)
class Answer:
    """What an answer rule read after </think>: the prediction's text, the token it is (first-token rule only, as
    an index into the tokens after </think>), and the status."""

    text: str | None
    status: Status
    token_index: int | None = None


def _first_token(after_text: str, after_ids: list[int], decode: Decode, truncated: bool, written: Sequence[int]) -> Answer:
    """The first token after </think> (the raw template's default: the model writes the token right away), past a
    restatement of the part of the current value already written (``restatement_length``; ``written`` is empty
    when prompt.skip_restatement is off)."""
    k = restatement_length(after_ids, written, decode)
    return Answer(decode(after_ids[k : k + 1]), "ok", k) if after_ids else Answer(None, "no_answer")


def _boxed(after_text: str, after_ids: list[int], decode: Decode, truncated: bool, written: Sequence[int]) -> Answer:
    return Answer(*last_boxed(after_text))


def _line(after_text: str, after_ids: list[int], decode: Decode, truncated: bool, written: Sequence[int]) -> Answer:
    """The rest of the line after </think> (blank lines right after it skipped; trailing whitespace removed). A line
    cut by the token cap before its newline is not an answer."""
    text = after_text.lstrip("\r\n")
    if "\n" not in text and truncated:
        return Answer(None, "truncated")
    line = text.split("\n", 1)[0].rstrip()
    return Answer(line, "ok") if line else Answer(None, "no_answer")


ANSWER_RULES: dict[str, Callable[[str, list[int], Decode, bool, Sequence[int]], Answer]] = {
    "first_token": _first_token,
    "boxed": _boxed,
    "line": _line,
}


@dataclass(frozen=True)
class ParsedResponse:
    status: Status
    prediction: str | None  # the answer when status == "ok", else None
    think_tokens: int  # tokens strictly between <think> and </think> (to the end when never closed)
    prediction_id: int | None = None  # the predicted token (raw first-token rule), compared by id
    answer_end: int | None = None  # response tokens up to and including the predicted token (first-token rule)

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def parse_response(
    response_ids: Sequence[int],
    tokenizer_or_decode,
    cfg: PromptConfig,
    *,
    truncated: bool = False,
    eos_ids: Sequence[int] | None = None,
    written_ids: Sequence[int] = (),
) -> ParsedResponse:
    """Read a response: reasoning length, prediction and status.

    ``tokenizer_or_decode``: a tokenizer (its ``decode``, and its EOS id unless ``eos_ids`` is given) or a function
    from token ids to text. The response is cut at its first EOS id. Thinking starts after a ``<think>`` in the
    response, or at the response's start when there is none before the first ``</think>`` (the raw prompt already
    ends with ``<think>``). The prediction is read after the first ``</think>``: chat = last \\boxed{}; raw =
    prompt.raw_answer. ``written_ids``: the part of the current value the prompt's prefix already holds
    (``current_value_ids``); the first-token rule skips a restatement of it when prompt.skip_restatement is on.
    ``truncated``: the response stopped at the token cap; an incomplete response is then classified ``truncated``
    instead of no_close / no_answer / unbalanced.
    """
    decode, eos = _decoder(tokenizer_or_decode, eos_ids)
    ids = [int(i) for i in response_ids]
    cut = next((k for k, tid in enumerate(ids) if tid in eos), None)
    ids = ids if cut is None else ids[:cut]

    pieces = [decode([tid]) for tid in ids]
    starts = [0, *accumulate(len(p) for p in pieces)]
    text = "".join(pieces)

    def token_at(char: int) -> int:
        return bisect_right(starts, char) - 1

    think_start, search_from = 0, 0
    open_at, close_at = text.find(cfg.think_open), text.find(cfg.think_close)
    if open_at != -1 and (close_at == -1 or open_at < close_at):
        search_from = open_at + len(cfg.think_open)
        think_start = token_at(search_from - 1) + 1
        close_at = text.find(cfg.think_close, search_from)
    if close_at == -1:
        return ParsedResponse("truncated" if truncated else "no_close", None, max(0, len(ids) - think_start))

    think_tokens = max(0, token_at(close_at) - think_start)
    close_end = close_at + len(cfg.think_close)
    last_marker_token = token_at(close_end - 1)
    after_ids = ids[last_marker_token + 1 :]
    after_text = text[close_end : starts[last_marker_token + 1]] + (decode(after_ids) if after_ids else "")
    rule = "boxed" if cfg.style == "chat" else cfg.raw_answer
    written = written_ids if cfg.skip_restatement else ()
    answer = ANSWER_RULES[rule](after_text, after_ids, decode, truncated, written)
    status = answer.status
    if status != "ok" and truncated:
        status = "truncated"
    if status != "ok":
        return ParsedResponse(status, None, think_tokens)
    if answer.token_index is None:
        return ParsedResponse(status, answer.text, think_tokens)
    at = last_marker_token + 1 + answer.token_index
    return ParsedResponse(status, answer.text, think_tokens, prediction_id=ids[at], answer_end=at + 1)


def _decoder(tokenizer_or_decode, eos_ids: Sequence[int] | None) -> tuple[Decode, set[int]]:
    if hasattr(tokenizer_or_decode, "decode"):
        tokenizer = tokenizer_or_decode
        if eos_ids is None:
            eos_ids = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
        return (lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)), set(eos_ids)
    return tokenizer_or_decode, set(eos_ids or ())
