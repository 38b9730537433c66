"""The trained tokenizer: round trips, single-token digits and markers, a standard HF folder."""

from __future__ import annotations

import pytest

from rmt.config import EmbeddedConfig
from rmt.embedded.corpus import build_corpus
from rmt.data.tokenizer import train_tokenizer
from rmt.errors import DataError


@pytest.fixture(scope="module")
def math_texts():
    corpus = build_corpus(EmbeddedConfig(base_problems=800, midtrain_problems=16, eval_problems=8, posttrain_problems=4))
    return [d["text"] for d in corpus["base"]]


@pytest.fixture(scope="module")
def math_tok(math_texts):
    return train_tokenizer(math_texts, vocab_size=512)


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_round_trip_math_and_other_text(math_tok, math_texts):
    for text in math_texts[:20] + ["Ünïcödé — 日本語, tabs\tand\nnewlines  ", "=-13 </think>-4\n"]:
        assert math_tok.decode(_ids(math_tok, text)) == text


def test_markers_and_digits_are_single_tokens(math_tok):
    think = "5-1+4=<think>5-1=4;4+4=8</think>8"
    tokens = math_tok.convert_ids_to_tokens(_ids(math_tok, think))
    assert tokens[:7] == ["5", "-", "1", "+", "4", "=", "<think>"]
    assert tokens.count("<think>") == 1 and tokens.count("</think>") == 1
    # every digit alone, and '=' never merges with the answer's sign: a prompt ending at '=' tokenizes like the corpus
    assert math_tok.convert_ids_to_tokens(_ids(math_tok, "=-13")) == ["=", "-", "1", "3"]
    assert _ids(math_tok, "1-5-9=") == _ids(math_tok, "1-5-9=-13")[:6]
    # markers survive decoding with skip_special_tokens (they are added, not special tokens)
    assert "<think>" in math_tok.decode(_ids(math_tok, think), skip_special_tokens=True)


def test_special_tokens_and_hf_folder(math_tok, tmp_path):
    from transformers import AutoTokenizer

    math_tok.save_pretrained(str(tmp_path))
    loaded = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (loaded.bos_token, loaded.eos_token, loaded.pad_token) == ("<s>", "</s>", "<pad>")
    assert len({loaded.bos_token_id, loaded.eos_token_id, loaded.pad_token_id}) == 3
    text = "7-4+6-3=<think>7-4=3;3+6=9;9-3=6</think>6\n8-3-6=-1"
    assert _ids(loaded, text) == _ids(math_tok, text)
    assert loaded(text)["input_ids"] == _ids(loaded, text)  # adds no BOS/EOS on its own
    assert len(loaded) == len(math_tok)


def test_training_is_deterministic(math_texts):
    a, b = train_tokenizer(math_texts, 512), train_tokenizer(math_texts, 512)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()


def test_bpe_merges_words_but_not_digits():
    texts = ["the cat sat on the mat while the other cat ate 12345 apples"] * 50
    tok = train_tokenizer(texts, vocab_size=300)
    tokens = tok.convert_ids_to_tokens(_ids(tok, "the cat ate 2024"))
    assert "the" in tokens or "Ġthe" in tokens
    assert tokens[-4:] == ["2", "0", "2", "4"]


def test_empty_corpus_is_a_data_error():
    with pytest.raises(DataError):
        train_tokenizer(["", "  \n"])
