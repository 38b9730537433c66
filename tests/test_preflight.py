"""The pre-flight check of the reasoning format (rmt/preflight.py): before the first RL step of `rmt train` and before
reasoning mode of `rmt eval`, a model that does not close its thinking block stops the stage with a message; one
that does passes; preflight.on_fail=warn goes on; the measurement is recorded."""

import json
import random

import pytest
import torch
from conftest import CORPUS_TEXTS, build_tiny_model, build_tiny_tokenizer, text_corpus

import rmt.evaluate as ev
import rmt.trainer as trainer
from rmt import preflight
from rmt.config import load_config
from rmt.data.prepare import prepare_corpus
from rmt.errors import ModelError
from rmt.run_dir import read_metrics
from rmt.scoring import score_corpus


def train_format_model(path, seed: int = 0, steps: int = 60):
    """A tiny Llama taught the thinking format on the test corpus: an empty ``<think></think>`` after 30% of the
    tokens, so that prompted with ``prefix<think>`` it closes the block and goes on with a token. The random
    fixture model closes it in ~6% of responses; this one in nearly all (about a second of training)."""
    tok = build_tiny_tokenizer(path)
    model = build_tiny_model(path, tok, seed=seed)
    think = tok.encode("<think></think>", add_special_tokens=False)
    rng = random.Random(seed)
    rows = []
    for text in CORPUS_TEXTS:
        ids = [tok.bos_token_id]
        for i in tok.encode(text, add_special_tokens=False):
            ids += [i, *think] if rng.random() < 0.3 else [i]
        rows.append(ids[:64])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for step in range(steps):
        batch = [rows[(step * 8 + j) % len(rows)] for j in range(8)]
        width = max(map(len, batch))
        x = torch.tensor([b + [tok.pad_token_id] * (width - len(b)) for b in batch])
        labels = x.masked_fill(x == tok.pad_token_id, -100)
        model(input_ids=x, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def format_model_dir(tmp_path_factory):
    return train_format_model(tmp_path_factory.mktemp("format_model"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    base = [*text_corpus(tmp_path_factory.mktemp("corpus"), tiny_model_dir), "scoring.tier_rule=quantile", "preflight.on_fail=stop"]
    cfg = load_config(None, base)
    prepare_corpus(cfg)
    score_corpus(cfg)
    return base


SMALL = ["train.total_steps=1", "train.sequences_per_step=4", "rollout.group_size=2", "budget.b0=6",
         "budget.answer_allowance=2", "rollout.max_response_tokens=16", "preflight.positions=16"]


def _cfg(corpus, tmp_path, *extra, preset="rmt"):
    return load_config(preset, [*corpus, f"output.dir={tmp_path / 'run'}", *SMALL, *extra])


# --- pure functions -------------------------------------------------------------------------------------------


def test_format_rates_counts_by_hand():
    r = preflight.format_rates([True, True, False, False], [True, False, False, False], ["ok", "no_answer", "no_close", "truncated"])
    assert (r["measured"], r["closed"], r["wellformed"]) == (4, 2, 1)
    assert r["closed_frac"] == 0.5 and r["wellformed_frac"] == 0.25
    assert r["statuses"] == {"no_answer": 1, "no_close": 1, "ok": 1, "truncated": 1}
    assert preflight.passes(r, 0.25) and not preflight.passes(r, 0.26)
    assert preflight.passes(preflight.format_rates([], [], []), 0.9)  # nothing to ask: not a failure
    assert preflight.describe({**r, "think_close": "</think>"}) == (
        "closed </think> in 2 of 4 responses (50.0%), parsable answer in 1 (25.0%)")


def test_failure_message_says_what_why_and_how():
    cfg = load_config(None, [])
    record = {**preflight.format_rates([False] * 32, [False] * 32, ["truncated"] * 32), "budget": 800, "cap": 1616,
              "temperature": 0.8, "think_close": "</think>", "examples": [{"response": "abc"}]}
    msg = preflight.failure_message("training (rmt)", record, cfg)
    assert "closed </think> in 0 of 32 responses (0.0%)" in msg and "truncated 32" in msg and "'abc'" in msg
    assert "prompt.style=chat" in msg and "reward 0" in msg and "preflight.on_fail=warn" in msg
    assert "docs/own-corpus.md" in msg and "pretrain.think_blocks" in msg and "generation cap" not in msg
    # a model that closes the block but reasons past the cap is told to give it room, not to change model
    long = {**record, **preflight.format_rates([True] * 4 + [False] * 28, [True] * 4 + [False] * 28, ["ok"] * 4 + ["truncated"] * 28)}
    assert "cut by the generation cap of 1616 tokens" in preflight.failure_message("training (rmt)", long, cfg)


def test_config_rejects_a_bad_threshold():
    from rmt.config import ConfigError

    with pytest.raises(ConfigError, match="preflight.min_wellformed"):
        load_config(None, ["preflight.min_wellformed=1.5"])
    with pytest.raises(ConfigError, match="preflight.on_fail"):
        load_config(None, ["preflight.on_fail=ignore"])


# --- rmt train ------------------------------------------------------------------------------------------------


def test_train_stops_before_the_first_step_on_a_model_that_cannot_reason(corpus, tmp_path):
    with pytest.raises(ModelError, match="pre-flight check failed") as e:
        trainer.train(_cfg(corpus, tmp_path))
    assert "closed </think> in" in str(e.value) and "preflight.on_fail=warn" in str(e.value)
    run = tmp_path / "run"
    record = json.loads((run / "preflight.json").read_text())
    assert record["measured"] == 16 and record["passed"] is False and record["wellformed_frac"] < 0.2
    assert not (run / "metrics.jsonl").exists() or read_metrics(run) == [], "no RL step ran"
    # the same command with the override goes on, in the same folder (preflight.* does not change what a run computes)
    rows = read_metrics(trainer.train(_cfg(corpus, tmp_path, "preflight.on_fail=warn")))
    assert rows[0]["preflight_wellformed_frac"] == record["wellformed_frac"]
    assert rows[0]["preflight_closed_frac"] == record["closed_frac"]


def test_train_passes_on_a_model_that_reasons_in_the_template(corpus, tmp_path, format_model_dir):
    rows = read_metrics(trainer.train(_cfg(corpus, tmp_path, f"model.path={format_model_dir}")))
    record = json.loads((tmp_path / "run" / "preflight.json").read_text())
    assert record["passed"] and record["wellformed_frac"] >= 0.8, record
    assert rows[0]["preflight_wellformed_frac"] == record["wellformed_frac"]


def test_ntp_and_a_zero_positions_check_measure_nothing(corpus, tmp_path):
    run = trainer.train(_cfg(corpus, tmp_path, preset="ntp"))
    assert not (run / "preflight.json").exists() and "preflight_wellformed_frac" not in read_metrics(run)[0]
    run = trainer.train(_cfg(corpus, tmp_path / "b", "preflight.positions=0"))
    assert not (run / "preflight.json").exists()


# --- rmt eval -------------------------------------------------------------------------------------------------


def _eval_cfg(corpus, tmp_path, *extra):
    return load_config("rmt", [*corpus, f"output.dir={tmp_path / 'run'}", "eval.positions_per_tier=4", "eval.modes=[reasoning]",
                               "eval.max_response_tokens=12", "preflight.positions=8", *extra])


def test_eval_stops_before_reasoning_mode_on_a_model_that_cannot_reason(corpus, tmp_path, tiny_model_dir, format_model_dir):
    models = {"good": str(format_model_dir), "base": str(tiny_model_dir)}
    with pytest.raises(ModelError, match="pre-flight check failed for reasoning-mode evaluation of model base") as e:
        ev.evaluate(_eval_cfg(corpus, tmp_path), models, tmp_path / "e.json")
    assert "--mode ntp" in str(e.value)
    assert not (tmp_path / "e.json").exists(), "stopped before any evaluation"
    result = ev.evaluate(_eval_cfg(corpus, tmp_path, "preflight.on_fail=warn"), models, tmp_path / "e.json")
    good, base = result["results"]["good"]["preflight"], result["results"]["ntr"]["preflight"]
    assert good["passed"] and not base["passed"] and good["measured"] == 8
    assert "Pre-flight check of the reasoning format" in result["table_markdown"] and "(below the threshold)" in result["table_markdown"]


def test_eval_in_ntp_mode_does_no_check(corpus, tmp_path, tiny_model_dir):
    result = ev.evaluate(_eval_cfg(corpus, tmp_path, "eval.modes=[ntp]"), {"base": str(tiny_model_dir)}, tmp_path / "e.json")
    assert "preflight" not in result["results"]["base"]
