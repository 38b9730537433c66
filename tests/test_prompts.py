import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmt.config import PromptConfig
from rmt.prompts import (
    ANSWER_RULES,
    PROMPT_BUILDERS,
    ParsedResponse,
    build_prompt_ids,
    last_boxed,
    parse_response,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from conftest import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer(tmp_path_factory.mktemp("tok"))
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# --- prompts --------------------------------------------------------------------------------------------------


def test_raw_prompt_keeps_prefix_ids_as_they_are(tok):
    canonical = tok.encode("The cat sat", add_special_tokens=False)
    # the same text in single-character tokens: re-tokenizing its decoded text would merge them
    spelled = [tid for ch in "The cat sat" for tid in tok.encode(ch, add_special_tokens=False)]
    assert spelled != canonical and tok.decode(spelled) == tok.decode(canonical)
    think = tok.convert_tokens_to_ids("<think>")
    cfg = PromptConfig()  # "{prefix}<think>", no budget statement
    assert build_prompt_ids(spelled, tok, cfg, budget=160) == spelled + [think]
    assert build_prompt_ids([tok.bos_token_id] + canonical, tok, cfg) == [tok.bos_token_id] + canonical + [think]


def test_raw_prompt_with_budget_statement(tok):
    cfg = PromptConfig(raw_template="Text: {prefix}{budget_text}<think>", raw_budget_text=" (think {budget} tokens)")
    prefix = tok.encode(" the mat", add_special_tokens=False)
    with_budget = build_prompt_ids(prefix, tok, cfg, budget=42)
    before = tok.encode("Text: ", add_special_tokens=False)
    assert with_budget[: len(before)] == before and with_budget[len(before) : len(before) + len(prefix)] == prefix
    assert tok.decode(with_budget) == "Text:  the mat (think 42 tokens)<think>"
    assert tok.decode(build_prompt_ids(prefix, tok, cfg, budget=None)) == "Text:  the mat<think>"
    with pytest.raises(ValueError):
        build_prompt_ids(prefix, tok, PromptConfig(raw_template="no prefix here<think>"))


def test_chat_prompt(tok):
    cfg = PromptConfig(style="chat")
    prefix = [tok.bos_token_id] + tok.encode("The cat sat on", add_special_tokens=False)
    text = tok.decode(build_prompt_ids(prefix, tok, cfg, budget=357))
    assert text.startswith("<|user|>Predict the next token")
    assert "\\boxed{}" in text and "Please use exactly 357 tokens within <think></think>." in text
    assert text.endswith("The cat sat on\n<|assistant|>") and "<s>" not in text
    no_budget = tok.decode(build_prompt_ids(prefix, tok, cfg, budget=None))
    assert "Please use" not in no_budget
    system = PromptConfig(style="chat", chat_system="You predict text.")
    assert tok.decode(build_prompt_ids(prefix, tok, system, 10)).startswith("<|system|>You predict text.\n<|user|>")
    assert set(PROMPT_BUILDERS) == {"raw", "chat"}


# --- parsing with a hand-made vocabulary ---------------------------------------------------------------------

VOCAB = ["<think>", "</think>", "a", "b", " c", "\\boxed{", "}", "{", "\n", "<eos>", "x</think>y", " d"]
THINK, CLOSE, A, B, C, BOX, RB, LB, NL, EOS, MIXED, D = range(len(VOCAB))


def decode(ids):
    return "".join(VOCAB[i] for i in ids)


RAW = PromptConfig()
LINE = PromptConfig(raw_answer="line")
BOXED = PromptConfig(raw_answer="boxed")
CHAT = PromptConfig(style="chat")


def parse(ids, cfg=RAW, **kw):
    return parse_response(ids, decode, cfg, eos_ids=[EOS], **kw)


def test_raw_first_token():
    assert parse([A, B, A, CLOSE, C, D]) == ParsedResponse("ok", " c", 3, C, 5)  # response starts inside thinking
    assert parse([CLOSE, C]) == ParsedResponse("ok", " c", 0, C, 2)
    assert parse([A, CLOSE]) == ParsedResponse("no_answer", None, 1)
    assert parse([A, CLOSE, EOS, C]) == ParsedResponse("no_answer", None, 1)  # cut at EOS
    assert parse([A, B, A]) == ParsedResponse("no_close", None, 3)
    assert parse([A, B, A], truncated=True) == ParsedResponse("truncated", None, 3)
    assert parse([A, CLOSE, C], truncated=True).status == "ok"  # complete before the cap


def test_raw_line_and_boxed_rules():
    assert parse([A, CLOSE, C, D, NL, A], LINE) == ParsedResponse("ok", " c d", 1)
    assert parse([A, CLOSE, NL, NL, C, NL], LINE).prediction == " c"  # blank lines after </think> skipped
    assert parse([A, CLOSE, C, D], LINE).prediction == " c d"  # ended by EOS or stop: the line is complete
    assert parse([A, CLOSE, C, D], LINE, truncated=True).status == "truncated"
    assert parse([A, CLOSE, NL], LINE).status == "no_answer"
    assert parse([A, CLOSE, BOX, C, RB], BOXED) == ParsedResponse("ok", " c", 1)


def test_chat_boxed():
    assert parse([THINK, A, B, CLOSE, A, BOX, A, LB, B, RB, RB], CHAT) == ParsedResponse("ok", "a{b}", 2)
    assert parse([THINK, A, CLOSE, BOX, A, RB, BOX, D, RB], CHAT).prediction == " d"  # the last box
    assert parse([THINK, A, CLOSE, BOX, A, RB, BOX, D], CHAT).status == "unbalanced"
    assert parse([THINK, A, CLOSE, BOX, A, RB, BOX, D], CHAT, truncated=True).status == "truncated"
    assert parse([THINK, A, CLOSE, A], CHAT).status == "no_answer"
    assert parse([THINK, A, CLOSE, BOX, RB], CHAT).status == "no_answer"  # empty box
    assert parse([THINK, BOX, A, RB], CHAT) == ParsedResponse("no_close", None, 3)
    assert parse([BOX, A, RB, CLOSE, BOX, B, RB], CHAT).prediction == "b"  # a box inside the thinking is not the answer
    assert parse([A, THINK, A, B, CLOSE, BOX, B, RB], CHAT).think_tokens == 2


def test_marker_inside_a_token():
    # a token "x</think>y": it is neither thinking nor answer token, its tail belongs to the answer text
    assert parse([A, B, MIXED, NL], LINE) == ParsedResponse("ok", "y", 2)
    assert parse([A, MIXED, C], RAW) == ParsedResponse("ok", " c", 1, C, 3)


def test_last_boxed():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == ("\\frac{1}{2}", "ok")
    assert last_boxed("\\boxed{\\boxed{x}}") == ("\\boxed{x}", "ok")
    assert last_boxed("nothing") == (None, "no_answer")
    assert last_boxed("\\boxed{a} \\boxed{b") == (None, "unbalanced")
    assert set(ANSWER_RULES) == {"first_token", "boxed", "line"}


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, len(VOCAB) - 1), max_size=20),
    st.sampled_from([RAW, LINE, BOXED, CHAT]),
    st.booleans(),
)
def test_parse_never_raises_and_is_consistent(ids, cfg, truncated):
    parsed = parse(ids, cfg, truncated=truncated)
    assert parsed.status in {"ok", "no_close", "no_answer", "unbalanced", "truncated"}
    assert (parsed.prediction is not None) == parsed.ok
    assert 0 <= parsed.think_tokens <= len(ids)
    if parsed.prediction_id is not None:  # the first-token rule: the token read is the one at answer_end - 1
        assert ids[parsed.answer_end - 1] == parsed.prediction_id and decode([parsed.prediction_id]) == parsed.prediction
    if CLOSE not in ids and MIXED not in ids:
        assert parsed.status in {"no_close", "truncated"}


# --- parsing with a real tokenizer ----------------------------------------------------------------------------


def test_parse_with_tokenizer(tok):
    response = tok.encode("12+7 is 19</think> the", add_special_tokens=False) + [tok.eos_token_id]
    parsed = parse_response(response, tok, RAW)
    n_think = len(tok.encode("12+7 is 19", add_special_tokens=False))
    assert parsed == ParsedResponse("ok", tok.decode(response[n_think + 1 : n_think + 2]), n_think, response[n_think + 1], n_think + 2)
    chat = tok.encode("<think>so it is</think>The answer: \\boxed{ mat}", add_special_tokens=False)
    assert parse_response(chat, tok, CHAT).prediction == " mat"
    assert parse_response(chat, tok, CHAT).think_tokens == len(tok.encode("so it is", add_special_tokens=False))


# --- restatement of the part of the current value already written --------------------------------------------

DIGITS = ["<s>", "7", "-", "4", "+", "6", "3", "=", "1", "2", "\n", "<think>", "</think>", " ele", "p", "hant", " the", "x"]
DX = {t: i for i, t in enumerate(DIGITS)}


def dids(*tokens):
    return [DX[t] for t in tokens]


def ddecode(ids):
    return "".join(DIGITS[i] for i in ids)


@pytest.mark.parametrize(
    "prefix, written",
    [
        (("<s>", "7", "-", "4", "=", "-", "1"), ("-", "1")),  # a sign after "=" belongs to the value
        (("<s>", "7", "-", "4", "+", "6", "-", "3"), ("3",)),  # "-" after a digit is an operator
        (("<s>", "7", "-"), ()),  # an operator: no value begun
        (("<s>", "7", "=", "-"), ("-",)),  # the sign alone
        (("<s>", "7", "=", "1", "2"), ("1", "2")),
        (("<s>", "7", "="), ()),
        ((" the", " ele", "p"), (" ele", "p")),  # a word-initial BPE token ends the run
        (("x",), ("x",)),
    ],
)
def test_current_value_ids(prefix, written):
    from rmt.prompts import current_value_ids

    assert current_value_ids(dids(*prefix), ddecode) == dids(*written)


def test_restatement_length_hand_values():
    from rmt.prompts import restatement_length

    w = dids("-", "1")
    assert restatement_length(dids("-", "1", "2", "\n"), w, ddecode) == 2  # whole value restated: read "2"
    assert restatement_length(dids("-", "1", "\n"), w, ddecode) == 2  # a finished value restated: read the newline
    assert restatement_length(dids("-", "1"), w, ddecode) == 0  # nothing after it: no
    assert restatement_length(dids("2", "\n"), w, ddecode) == 0  # the next token right away
    assert restatement_length(dids("-", "2"), w, ddecode) == 0  # not a restatement
    assert restatement_length(dids("1", "2"), dids("1"), ddecode) == 1
    assert restatement_length(dids("1", "2"), [], ddecode) == 0


def test_parse_reads_past_a_restatement_and_the_switch_turns_it_off():
    close = DX["</think>"]
    cfg = PromptConfig()
    written = dids("-", "1")
    got = parse_response(dids("7", "</think>", "-", "1", "2", "\n"), ddecode, cfg, written_ids=written)
    assert got == ParsedResponse("ok", "2", 1, DX["2"], 5)
    assert parse_response(dids("7", "</think>", "2"), ddecode, cfg, written_ids=written).prediction == "2"
    off = PromptConfig(skip_restatement=False)
    assert parse_response(dids("7", "</think>", "-", "1", "2"), ddecode, off, written_ids=written).prediction == "-"
    assert close in dids("</think>")


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, len(DIGITS) - 1), max_size=8), st.lists(st.integers(0, len(DIGITS) - 1), max_size=4))
def test_restatement_is_a_proper_prefix_that_decodes_to_the_written_part(after, written):
    from rmt.prompts import restatement_length

    k = restatement_length(after, written, ddecode)
    assert 0 <= k < max(1, len(after))
    if k:
        assert ddecode(after[:k]) == ddecode(written) and k < len(after)
