import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmt.config import RewardConfig
from rmt.rewards import (
    MATCH_REWARDS,
    Reward,
    continuation_pieces,
    exact_match_reward,
    length_reward,
    prefix_match_reward,
    response_reward,
    total_reward,
    Truth,
)

# --- length reward --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "length, expected", [(0, 0.0), (50, 0.5), (100, 1.0), (150, 0.5), (200, 0.0), (300, 0.0), (1, 0.01), (199, 0.01)]
)
def test_length_reward_hand_values(length, expected):
    assert length_reward(length, 100) == pytest.approx(expected)
    assert length_reward(length, 100, r_max=2.0) == pytest.approx(2 * expected)


def test_length_reward_odd_budget_and_errors():
    assert [length_reward(l, 3) for l in range(8)] == pytest.approx([0, 1 / 3, 2 / 3, 1, 2 / 3, 1 / 3, 0, 0])
    with pytest.raises(ValueError):
        length_reward(5, 0)
    with pytest.raises(ValueError):
        length_reward(-1, 10)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 5000), st.integers(1, 1000), st.floats(0.01, 10))
def test_length_reward_bounded_and_peaks_at_budget(length, budget, r_max):
    r = length_reward(length, budget, r_max)
    assert 0.0 <= r <= r_max
    assert length_reward(budget, budget, r_max) == r_max
    if length != budget:
        assert r < r_max


# --- exact match ----------------------------------------------------------------------------------------------


def test_exact_match_and_leading_space():
    assert exact_match_reward(" the", " the") == 1.0
    assert exact_match_reward("the", " the") == 1.0  # BPE token carries the space; the model writes the word
    assert exact_match_reward("the", " the", strip_leading_space=False) == 0.0
    assert exact_match_reward(" the", " the", strip_leading_space=False) == 1.0
    assert exact_match_reward("the ", " the") == 0.0  # only leading whitespace is ignored
    assert exact_match_reward("The", " the") == 0.0
    assert exact_match_reward("", "") == 0.0  # an empty prediction never matches
    assert exact_match_reward(" ", " ") == 0.0
    assert exact_match_reward("日", "日".encode()) == 1.0


def test_exact_match_compares_token_ids_and_never_two_partial_characters():
    # Two different tokens that each hold part of a multi-byte character decode alone to U+FFFD: equal texts, but
    # not the same token.
    assert exact_match_reward("\ufffd", "\ufffd", prediction_id=7, target_id=9) == 0.0
    assert exact_match_reward("\ufffd", "\ufffd", prediction_id=9, target_id=9) == 1.0
    assert exact_match_reward("\ufffd", "\ufffd") == 0.0  # text alone never matches a partial character
    assert exact_match_reward("the", " the", prediction_id=3, target_id=4) == 1.0  # leading space, as before
    assert exact_match_reward("the", " the", False, prediction_id=3, target_id=4) == 0.0


def test_exact_match_on_a_byte_level_tokenizer(tmp_path):
    from conftest import build_tiny_tokenizer

    from rmt.rewards import Truth

    tok = build_tiny_tokenizer(tmp_path)
    ids = tok.encode("日本語", add_special_tokens=False)
    decode = lambda x: tok.decode(x, clean_up_tokenization_spaces=False)  # noqa: E731
    partial = [i for i in ids if "\ufffd" in decode([i])]
    assert len(partial) >= 2 and len({decode([i]) for i in partial}) == 1
    truth = Truth.from_ids(ids, decode)
    wrong = next(i for i in partial if i != ids[0])
    assert MATCH_REWARDS["exact"](decode([wrong]), wrong, truth, True) == 0.0
    assert MATCH_REWARDS["exact"](decode([ids[0]]), ids[0], truth, True) == 1.0
    assert MATCH_REWARDS["prefix"]("日", None, truth, True) == 1.0


# --- prefix match ---------------------------------------------------------------------------------------------

TOKENS = [" the", " cat", " sat"]


@pytest.mark.parametrize(
    "prediction, expected",
    [(" the", 1.0), (" the cat", 1.0), (" the cat sat", 1.0), (" th", 0.0), (" the ca", 0.0), (" the cat sat.", 0.0),
     (" a", 0.0), ("", 0.0), ("the", 0.0)],
)
def test_prefix_match_hand_values(prediction, expected):
    assert prefix_match_reward(prediction, TOKENS) == expected
    assert prefix_match_reward(prediction, [t.encode() for t in TOKENS]) == expected  # bytes give the same


def test_prefix_match_strip_leading_space():
    assert prefix_match_reward("the", TOKENS, strip_leading_space=True) == 1.0
    assert prefix_match_reward("the cat", TOKENS, strip_leading_space=True) == 1.0
    assert prefix_match_reward("  the cat", TOKENS, strip_leading_space=True) == 1.0
    assert prefix_match_reward("th", TOKENS, strip_leading_space=True) == 0.0
    assert prefix_match_reward(" ", TOKENS, strip_leading_space=True) == 0.0
    assert prefix_match_reward("x", [" ", "\n", "x", "y"], strip_leading_space=True) == 1.0


def test_prefix_match_multibyte_split_token():
    # "日" is 3 bytes; a byte-level BPE may cut it across two tokens: no boundary inside the character.
    char = "日".encode()
    tokens = [b"a" + char[:1], char[1:] + b"b", b"c"]
    assert prefix_match_reward("a日b", tokens) == 1.0
    assert prefix_match_reward("a日bc", tokens) == 1.0
    assert prefix_match_reward("a", tokens) == 0.0
    assert prefix_match_reward("a日", tokens) == 0.0


pieces = st.lists(st.text(alphabet=" ab日é\n", min_size=1, max_size=4), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(pieces, st.integers(0, 30))
def test_prefix_reward_is_one_exactly_on_token_boundaries(tokens, cut):
    text = "".join(tokens)
    prediction = text[: cut % (len(text) + 1)]
    boundaries = {len("".join(tokens[:k]).encode()) for k in range(1, len(tokens) + 1)}
    expected = float(len(prediction.encode()) in boundaries)
    assert prefix_match_reward(prediction, tokens) == expected
    assert prefix_match_reward(prediction + "z", tokens) == 0.0


# GPT-2's byte <-> printable-character table of byte-level BPE, written out here to read raw token bytes.
def _byte_level_table() -> dict[str, int]:
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {chr(b): b for b in printable}, 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def test_prefix_match_with_a_real_bpe_tokenizer(tmp_path):
    from conftest import build_tiny_tokenizer

    tok = build_tiny_tokenizer(tmp_path)
    text = " Mid-training uses raw text: Ünïcödé ok — 日本語 too."
    ids = tok.encode(text, add_special_tokens=False)
    table = _byte_level_table()
    token_bytes = [bytes(table[c] for c in t) for t in tok.convert_ids_to_tokens(ids)]
    assert b"".join(token_bytes) == text.encode()
    assert any(not _decodes(b) for b in token_bytes), "the test needs a token that splits a character"

    decoded = continuation_pieces(ids, tok.decode)
    assert "".join(decoded) == text
    assert all("\ufffd" not in p for p in decoded)

    boundaries = {len(b"".join(token_bytes[:k])) for k in range(1, len(ids) + 1)}
    for end in range(len(text) + 1):  # every character-aligned prediction
        prediction = text[:end]
        expected = float(len(prediction.encode()) in boundaries)
        assert prefix_match_reward(prediction, token_bytes) == expected, prediction
        assert prefix_match_reward(prediction, decoded) == expected, prediction
    word = tok.decode(ids[:2])  # " Mi": the leading space belongs to the continuation
    assert word.startswith(" ") and prefix_match_reward(word, token_bytes) == 1.0
    assert prefix_match_reward(word.lstrip(), token_bytes) == 0.0
    assert prefix_match_reward(word.lstrip(), token_bytes, strip_leading_space=True) == 1.0


def _decodes(b: bytes) -> bool:
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


# --- total reward ---------------------------------------------------------------------------------------------


def test_total_reward_and_response_reward():
    assert total_reward(1.0, 0.5, 0.2) == pytest.approx(0.9)
    cfg = RewardConfig()  # exact, w = 0.2, r_max = 1
    cont = Truth(5, " cat", (" cat", " sat"))
    assert response_reward("cat", 10, cont, 10, cfg) == Reward(1.0, 1.0, 1.0)
    assert response_reward("dog", 10, cont, 10, cfg) == Reward(pytest.approx(0.2), 0.0, 1.0)
    assert response_reward("cat", 15, cont, 10, cfg) == Reward(pytest.approx(0.9), 1.0, 0.5)
    assert response_reward(None, 10, cont, 10, cfg) == Reward(0.0, 0.0, 0.0)  # no parsable answer: nothing
    assert response_reward("cat", 10, cont, None, cfg) == Reward(pytest.approx(0.8), 1.0, 0.0)  # no budget
    prefix = RewardConfig(match="prefix", length_weight=0.0)
    assert response_reward("cat sat", 999, cont, None, prefix).total == 1.0
    assert response_reward("cat sat", 999, cont, None, cfg).total == 0.0  # exact reads only the next token
    assert set(MATCH_REWARDS) == {"exact", "prefix"}
    assert MATCH_REWARDS["exact"]("x", None, Truth(None, "", ()), True) == 0.0
    assert response_reward(" dog", 10, cont, 10, cfg, prediction_id=5).match == 1.0  # the same token id
