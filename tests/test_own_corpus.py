"""The own-corpus path of docs/own-corpus.md, end to end on a small prose corpus made here (not the embedded math):
a single text file becomes documents with an eval split, `rmt score` says what its tiers hold, and the pre-flight
check stops `rmt train` on a model pre-trained on plain prose and lets one pre-trained with thinking blocks
(pretrain.think_blocks) through."""

import json
import random

import numpy as np
import pytest
from typer.testing import CliRunner

from rmt.cli import app
from rmt.config import load_config
from rmt.pretrain import insert_think_blocks, weight_settings

NOUNS = "river mill garden window kettle lantern harbour meadow letter bridge".split()
VERBS = "crosses passes opens warms lights shelters reaches follows".split()
ADJS = "old quiet narrow bright small green cold".split()

# The CPU sizes of the guide, made smaller still for a test (the guide's numbers are measured in docs/own-corpus.md).
PRETRAIN = ["pretrain.hidden_size=64", "pretrain.num_layers=2", "pretrain.num_heads=2", "pretrain.intermediate_size=128",
            "pretrain.steps=200", "pretrain.batch_size=16", "pretrain.seq_len=64", "pretrain.vocab_size=320",
            "pretrain.eval_every=1000", "pretrain.save_every=1000", "pretrain.warmup_steps=10"]
TRAIN = ["train.total_steps=2", "train.sequences_per_step=4", "rollout.group_size=2", "budget.b0=8",
         "budget.answer_allowance=2", "rollout.max_response_tokens=24", "eval.positions_per_tier=10"]


def prose(path, n: int = 150, seed: int = 0):
    """Paragraphs of plain English sentences, separated by blank lines, in one text file."""
    rng = random.Random(seed)
    paras = [" ".join(f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} {rng.choice(VERBS)} the {rng.choice(ADJS)} "
                      f"{rng.choice(NOUNS)}." for _ in range(rng.randint(2, 5))) for _ in range(n)]
    path.write_text("\n\n".join(paras) + "\n")
    return path


def test_insert_think_blocks_by_hand():
    class Fixed:  # a generator whose draws are given
        def __init__(self, u):
            self.u = np.asarray(u)

        def random(self, n):
            return self.u[:n]

    assert insert_think_blocks([5, 6, 7], 0.5, [1, 2], Fixed([0.9, 0.1, 0.4])) == [5, 6, 1, 2, 7, 1, 2]
    assert insert_think_blocks([5, 6], 0.0, [1, 2], None) == [5, 6]
    rng = np.random.default_rng(0)
    out = insert_think_blocks(list(range(100, 10100)), 0.03, [1, 2], rng)
    assert [t for t in out if t >= 100] == list(range(100, 10100))  # the text itself is untouched
    assert 0.02 < out.count(1) / 10_000 < 0.04 and out.count(1) == out.count(2)


def test_think_blocks_off_keeps_the_identity_of_existing_models():
    assert "think_blocks" not in weight_settings(load_config(None, []).pretrain)
    assert weight_settings(load_config(None, ["pretrain.think_blocks=0.03"]).pretrain)["think_blocks"] == 0.03


def _cli(*args):
    return CliRunner().invoke(app, list(args))


@pytest.mark.slow
def test_own_prose_corpus_end_to_end(tmp_path):
    corpus = prose(tmp_path / "prose.txt")
    results = {}
    for name, blocks in (("plain", 0.0), ("think", 0.03)):
        base = tmp_path / f"base-{name}"
        res = _cli("pretrain", f"pretrain.corpus={corpus}", f"pretrain.output_dir={base}", f"pretrain.think_blocks={blocks}", *PRETRAIN)
        assert res.exit_code == 0, res.output
        data = [f"model.path={base}", f"data.path={corpus}", f"data.prepared_dir={tmp_path / name / 'corpus'}",
                "data.seq_len=64", "data.document_chars=400"]
        assert _cli("prepare", *data).exit_code == 0
        meta = json.loads((tmp_path / name / "corpus" / "meta.json").read_text())
        assert meta["counts"]["eval"]["sequences"] > 0, "one text file, cut at blank lines: an eval split"
        res = _cli("score", *data)
        assert res.exit_code == 0 and "what each tier holds" in res.output
        results[name] = _cli("train", "-c", "rmt", *data, *TRAIN, f"output.dir={tmp_path / name / 'rmt'}")
        results[name + "-record"] = json.loads((tmp_path / name / "rmt" / "preflight.json").read_text())
    # plain prose: the model never closes </think>; the run stops before its first step, saying why and how on
    assert results["plain"].exit_code == 1
    assert "pre-flight check failed" in results["plain"].output and "preflight.on_fail=warn" in results["plain"].output
    assert results["plain-record"]["wellformed_frac"] < 0.2 and not (tmp_path / "plain" / "rmt" / "final").exists()
    # with thinking blocks in pre-training it closes them: the check passes and the run trains
    assert results["think"].exit_code == 0, results["think"].output
    assert results["think-record"]["passed"] and results["think-record"]["wellformed_frac"] >= 0.5
    assert (tmp_path / "think" / "rmt" / "final" / "model.safetensors").is_file()
    # rmt eval in reasoning mode: the same check, per model, before any evaluation
    ev = [f"data.prepared_dir={tmp_path / 'plain' / 'corpus'}", f"model.path={tmp_path / 'base-plain'}", "eval.positions_per_tier=10",
          "eval.max_response_tokens=16", f"output.dir={tmp_path / 'plain' / 'rmt'}"]
    res = _cli("eval", *ev, "--mode", "reasoning", "--out", str(tmp_path / "e.json"))
    assert res.exit_code == 1 and "reasoning-mode evaluation of model base" in res.output and "--mode ntp" in res.output
    assert _cli("eval", *ev, "--mode", "ntp", "--out", str(tmp_path / "e.json")).exit_code == 0
