"""Train the tokenizer of a from-scratch base model: byte-level BPE that keeps digits and punctuation apart.

- Every digit is its own token (as in Llama and Qwen tokenizers): merged multi-digit tokens make arithmetic much
  harder for a small model (SPEC section 8).
- Every symbol and punctuation character is its own token, so ``=`` never merges with the sign of an answer (``=-13``) and a
  prompt that ends at ``=`` tokenizes exactly as the corpus did. On the embedded math corpus this makes the
  tokenizer character level; on ordinary text, words still merge.
- ``<think>`` and ``</think>`` are single added tokens (not special: decoding keeps them); ``<s>``, ``</s>`` and
  ``<pad>`` are the special tokens. Encoding adds nothing on its own: the callers add BOS/EOS per document.

Saved as a standard Hugging Face tokenizer folder (``AutoTokenizer.from_pretrained`` loads it). In transformers 5,
``GPT2TokenizerFast(vocab_file=...)`` silently ignores its files (SPEC section 7), hence ``tokenizer_object=``.
"""

from __future__ import annotations

from collections.abc import Iterable

from rmt.errors import DataError

TOKENIZER_FORMAT = 1  # bump when the trained tokenizer changes for the same corpus and vocab size
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
THINK_TOKENS = ("<think>", "</think>")


def train_tokenizer(texts: Iterable[str], vocab_size: int = 512, think_tokens: tuple[str, ...] = THINK_TOKENS):
    """A ``PreTrainedTokenizerFast`` trained on ``texts`` (deterministic for the same texts and vocab size)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    # The markers become added tokens after training; the trainer must not learn merges from their letters.
    texts = [_strip_markers(t, think_tokens) for t in texts]
    if not any(t.strip() for t in texts):
        raise DataError("cannot train a tokenizer on an empty corpus")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[^\s\p{L}\p{N}]"), behavior="isolated"),  # each symbol alone
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: any text encodes
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in think_tokens])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )


def _strip_markers(text: str, markers: tuple[str, ...]) -> str:
    for m in markers:
        text = text.replace(m, "\n")
    return text
