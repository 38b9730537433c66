"""Shared fixtures: a tiny tokenizer and a tiny randomly initialised Llama, built locally (no downloads)."""

from __future__ import annotations

import json

import pytest
import torch

# Tiny test models are overhead-bound: one thread is as fast and does not oversubscribe a shared CPU.
torch.set_num_threads(1)

TINY_TEXT = [
    "The cat sat on the mat. 12+7=19 and 3*4=12.",
    "A quick brown fox jumps over the lazy dog; 5-2=3.",
    "Mid-training uses raw text: every token is a target. Ünïcödé ok — 日本語 too.",
    "Numbers like 1234 and 98765 are split into single digits.",
]


# A small raw-text corpus for training and scoring tests: varied lengths, numbers, repeated phrases.
CORPUS_TEXTS = [f"line {i}: the cat sat on the mat, 12+{i}={12 + i}; a fox ran far away. " * (1 + i % 3) for i in range(40)]


# The learning rate, as a multiple of train.lr, at steps 0..5 of a 6-step run with 2 warm-up steps, by hand: warm-up
# t/2; then constant 1, linear (6 - t)/4, cosine (1 + cos(pi (t - 2)/4))/2. It depends on the step only: the same
# for any number of processes and any grpo.num_iterations.
LR_WARMUP2_T6 = {
    "constant": [0.0, 0.5, 1.0, 1.0, 1.0, 1.0],
    "linear": [0.0, 0.5, 1.0, 0.75, 0.5, 0.25],
    "cosine": [0.0, 0.5, 1.0, 0.8535534, 0.5, 0.1464466],
}
LR_WARMUP2_T6_ARGS = ("train.total_steps=6", "train.warmup_steps=2")

# The random test models cannot reason in the thinking format: the pre-flight check warns instead of stopping.
PREFLIGHT_WARN = "preflight.on_fail=warn"


def text_corpus(root, model_dir, texts=CORPUS_TEXTS, seq_len: int = 32) -> list[str]:
    """Write ``texts`` to ``root/c.jsonl``; the overrides that point a config at it, the model and ``root/prep``.

    With ``preflight.on_fail=warn``: the random tiny model closes its thinking block in ~6% of responses, so the
    pre-flight check would stop every RL run and reasoning evaluation; tests/test_preflight.py tests the check."""
    src = root / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return [f"model.path={model_dir}", f"data.path={src}", f"data.prepared_dir={root / 'prep'}", f"data.seq_len={seq_len}",
            PREFLIGHT_WARN]


def build_tiny_tokenizer(path, texts=TINY_TEXT, vocab_size=300):
    """Byte-level BPE with individual digits and <think>/</think> as single added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.add_tokens(["<think>", "</think>"])
    fast.save_pretrained(str(path))
    return fast


def build_tiny_model(path, tokenizer, hidden=32, layers=2, heads=2, seed=0, max_pos=512):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_pos,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return model


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A folder holding a tiny Llama and its tokenizer, loadable with from_pretrained."""
    path = tmp_path_factory.mktemp("tiny_model")
    tok = build_tiny_tokenizer(path)
    build_tiny_model(path, tok)
    return path


def crash_on_third_step(monkeypatch):
    """Make the trainer's third ``train_step`` call raise (a crash mid-run); returns the real step to restore."""
    import rmt.trainer as trainer

    real_step, calls = trainer.train_step, {"n": 0}

    def step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", step)
    return real_step
