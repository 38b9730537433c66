import json
import logging
import os
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import text_corpus
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

import rmt.scoring as scoring
from rmt.config import load_config
from rmt.data.prepare import corpus_lock, load_split, prepare_corpus
from rmt.errors import DataError, ModelError
from rmt.scoring import (
    assign_tiers,
    eligible_token_table,
    compile_pays,
    entropy_from_logits,
    fused_entropy,
    load_scored,
    quantile_thresholds,
    score_batch,
    score_corpus,
)
from rmt.tiers import EASY, HARD, MEDIUM, NTP_ONLY

TEXTS = [f"line {i}: the cat sat on the mat, 12+{i}={12 + i}; a fox ran. " * (1 + i % 4) for i in range(30)]


@pytest.fixture
def prepared(tmp_path, tiny_model_dir):
    base = text_corpus(tmp_path, tiny_model_dir, TEXTS, seq_len=24)

    def make(*extra):
        cfg = load_config(
            None,
            [*base, "data.eval_fraction=0.2", "scoring.shard_sequences=7", "scoring.batch_size=3", "scoring.chunk_positions=5", *extra],
        )
        prepare_corpus(cfg)
        return cfg

    return make


def test_entropy_matches_torch_categorical():
    logits = torch.randn(6, 50) * 3
    ref = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(entropy_from_logits(logits), ref, rtol=1e-5, atol=1e-5)
    top = logits.topk(4, dim=-1).values
    torch.testing.assert_close(entropy_from_logits(logits, "topk", 4), torch.distributions.Categorical(logits=top).entropy())
    # Uniform over V tokens has entropy ln V; a one-hot distribution has 0.
    assert entropy_from_logits(torch.zeros(1, 8)).item() == pytest.approx(np.log(8))
    assert entropy_from_logits(torch.tensor([[0.0, -1e4, -1e4]])).item() == pytest.approx(0.0, abs=1e-6)


def test_score_batch_equals_unchunked_full_logits(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    seqs = [[1, 5, 9, 33, 7, 80, 81, 2], [1, 44, 45], [1, 6, 7, 8, 9, 10]]
    cfg = load_config(None, ["scoring.chunk_positions=2"])
    got = score_batch(model, seqs, pad_id=0, scfg=cfg.scoring)
    for s, ent in zip(seqs, got):
        with torch.no_grad():
            logits = model(torch.tensor([s])).logits[0]
        ref = torch.distributions.Categorical(logits=logits[:-1].float()).entropy().numpy()
        assert np.isnan(ent[0]) and len(ent) == len(s)
        np.testing.assert_allclose(ent[1:], ref, rtol=1e-4, atol=1e-5)


def _entropies_one_chunk_at_a_time(model, seqs, chunk, mode="full", top_k=16):
    """The scoring loop as it was before its buffers: a fresh head output per chunk, then entropy_from_logits."""
    with torch.inference_mode():
        out = []
        for s in seqs:
            hidden = model.get_decoder()(input_ids=torch.tensor([s])).last_hidden_state[0, :-1]
            ent = [entropy_from_logits(model.get_output_embeddings()(hidden[i : i + chunk]), mode, top_k)
                   for i in range(0, hidden.shape[0], chunk)]
            out.append(torch.cat(ent).numpy() if ent else np.zeros(0, dtype=np.float32))
    return out


@pytest.mark.parametrize("chunk", [1, 3, 5, 256])
@pytest.mark.parametrize("variant", ["fp32", "bias", "bf16", "topk"])
def test_score_batch_buffers_give_the_same_bits(tiny_model_dir, chunk, variant):
    """The preallocated chunk buffers (logits, log-probs) change nothing: every entropy is bit-identical to a fresh
    head output per chunk, for a bias in the head, a bf16 model and the top-k entropy too."""
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    head = model.get_output_embeddings()
    if variant == "bias":
        biased = torch.nn.Linear(head.in_features, head.out_features, bias=True)
        with torch.no_grad():
            biased.weight.copy_(head.weight)
            biased.bias.copy_(torch.linspace(-2, 2, head.out_features))
        model.set_output_embeddings(biased)
    if variant == "bf16":
        model = model.to(torch.bfloat16)
    mode = "topk" if variant == "topk" else "full"
    seqs = [[1, 5, 9, 33, 7, 80, 81, 2, 9, 9, 4], [1, 44, 45], [7], [1, 6, 7, 8, 9, 10]]
    cfg = load_config(None, [f"scoring.chunk_positions={chunk}", f"scoring.entropy={mode}", "scoring.top_k=4"])
    # one sequence per call (the chunks then cut the same rows as the reference) and the whole batch at once
    ref = _entropies_one_chunk_at_a_time(model, seqs, chunk, mode, 4)
    for s, r in zip(seqs, ref):
        got = score_batch(model, [s], pad_id=0, scfg=cfg.scoring)[0]
        assert np.isnan(got[0]) and got[1:].tobytes() == r.astype(np.float32).tobytes()
    if variant == "fp32":
        batch = score_batch(model, seqs, pad_id=0, scfg=cfg.scoring)
        for got, r in zip(batch, ref):
            np.testing.assert_allclose(got[1:], r, rtol=1e-5, atol=1e-6)  # same values; batching may move the last bit


def test_fused_entropy_by_hand():
    # p = (1/4, 3/4): H = -(1/4 ln 1/4 + 3/4 ln 3/4) = 0.5623351446...
    assert fused_entropy(torch.tensor([[0.0, np.log(3.0)]])).item() == pytest.approx(0.5623351446, abs=1e-6)
    assert fused_entropy(torch.zeros(2, 8)).tolist() == pytest.approx([np.log(8)] * 2)
    assert fused_entropy(torch.tensor([[0.0, -1e4, -1e4]])).item() == pytest.approx(0.0, abs=1e-6)
    # far from zero (max subtraction) and in bf16 (computed in float32)
    logits = torch.randn(6, 300) * 4 + 1e3
    ref = torch.distributions.Categorical(logits=logits.double()).entropy().float()
    torch.testing.assert_close(fused_entropy(logits), ref, rtol=2e-6, atol=2e-6)
    half = (torch.randn(6, 300) * 4).bfloat16()
    torch.testing.assert_close(fused_entropy(half), entropy_from_logits(half), rtol=1e-5, atol=1e-5)
    assert fused_entropy(half).dtype == torch.float32


def test_compile_pays_by_hand():
    assert compile_pays("always", 0) and not compile_pays("never", 1e12)
    assert not compile_pays("auto", 9.9e9) and compile_pays("auto", 1e10)
    with pytest.raises(ValueError, match="auto, always or never"):
        compile_pays("yes", 1)


def test_compile_failure_falls_back_to_the_eager_bits(tiny_model_dir, monkeypatch, caplog):
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    seqs = [[1, 5, 9, 33, 7, 80, 81, 2, 9, 9, 4]]
    scfg = load_config(None, ["scoring.chunk_positions=3"]).scoring

    def no_compiler(fn, *a, **k):
        def fails(*args):
            raise RuntimeError("InvalidCxxCompiler: no working C++ compiler found")
        return fails

    monkeypatch.setattr(scoring, "_compiled_entropy", scoring._CompiledEntropy())
    monkeypatch.setattr(torch, "compile", no_compiler)
    with caplog.at_level("WARNING", logger="rmt.scoring"):
        got = score_batch(model, seqs, 0, scfg, compiled=True)
    assert "torch.compile of the entropy failed" in caplog.text and "InvalidCxxCompiler" in caplog.text
    assert got[0].tobytes() == score_batch(model, seqs, 0, scfg)[0].tobytes()
    assert scoring._compiled_entropy.failed


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_entropy_matches_the_eager_passes(tiny_model_dir, monkeypatch, dtype):
    """torch.compile of fused_entropy (compiles for a few seconds, hence slow) gives the eager entropies."""
    monkeypatch.setattr(scoring, "_compiled_entropy", scoring._CompiledEntropy())
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval().to(dtype)
    seqs = [[1, 5, 9, 33, 7, 80, 81, 2, 9, 9, 4], [1, 44, 45], [1, 6, 7, 8, 9, 10]]
    scfg = load_config(None, ["scoring.chunk_positions=4"]).scoring
    got = score_batch(model, seqs, 0, scfg, compiled=True)
    assert not scoring._compiled_entropy.failed, "torch.compile failed here: the test needs a working compiler"
    for g, r in zip(got, score_batch(model, seqs, 0, scfg)):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5)


def test_assign_tiers_by_hand():
    ent = np.array([np.nan, 0.1, 0.5, 0.99, 1.0, 1.49, 1.5, 7.0, 3.0])
    elig = np.array([1, 1, 1, 1, 1, 1, 1, 1, 0], dtype=bool)
    tiers = assign_tiers(ent, elig, (0.5, 1.0, 1.5))
    assert tiers.tolist() == [NTP_ONLY, NTP_ONLY, EASY, EASY, MEDIUM, MEDIUM, HARD, HARD, NTP_ONLY]


def test_positions_before_min_context_are_ntp_only_by_hand():
    ent = np.array([np.nan, 3.0, 0.7, 1.2, 3.0, 0.7, 1.2, 0.1])
    elig = np.ones(8, dtype=bool)
    assert assign_tiers(ent, elig, (0.5, 1.0, 1.5), min_context=1).tolist() == [
        NTP_ONLY, HARD, EASY, MEDIUM, HARD, EASY, MEDIUM, NTP_ONLY]
    assert assign_tiers(ent, elig, (0.5, 1.0, 1.5), min_context=4).tolist() == [
        NTP_ONLY, NTP_ONLY, NTP_ONLY, NTP_ONLY, HARD, EASY, MEDIUM, NTP_ONLY]
    assert (assign_tiers(ent, elig, (0.5, 1.0, 1.5), min_context=100) == NTP_ONLY).all()


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 10) | st.just(float("nan")), min_size=1, max_size=40), st.integers(1, 45))
def test_min_context_only_removes_the_first_positions(values, min_context):
    ent = np.array(values)
    plain = assign_tiers(ent, np.ones(len(ent), bool), (0.5, 1.0, 1.5))
    cut = assign_tiers(ent, np.ones(len(ent), bool), (0.5, 1.0, 1.5), min_context)
    assert (cut[:min_context] == NTP_ONLY).all() and np.array_equal(cut[min_context:], plain[min_context:])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 10), min_size=2, max_size=40))
def test_tiers_are_monotone_in_entropy(values):
    ent = np.array(sorted(values))
    tiers = assign_tiers(ent, np.ones(len(ent), bool), (0.5, 1.0, 1.5))
    assert (np.diff(tiers.astype(int)) >= 0).all()


def test_quantile_thresholds():
    values = np.arange(101) / 100  # 0.00, 0.01, ..., 1.00: the q-quantile is q
    assert quantile_thresholds(values[::-1], (0.25, 0.5, 0.75)) == pytest.approx((0.25, 0.5, 0.75), abs=1e-6)
    tied = quantile_thresholds(np.zeros(10), (0.2, 0.5, 0.8))
    assert tied[0] < tied[1] < tied[2]
    with pytest.raises(DataError):
        quantile_thresholds(np.zeros(0), (0.1, 0.2, 0.3))


def test_special_and_whitespace_tokens_are_not_eligible(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    table = eligible_token_table(tok, len(tok) + 3)
    assert not table[tok.bos_token_id] and not table[tok.eos_token_id] and not table[tok.pad_token_id]
    space = tok.convert_tokens_to_ids("Ġ")
    assert not table[space]
    assert table[tok.convert_tokens_to_ids("Ġthe")]
    assert not table[len(tok):].any()


def test_score_corpus_writes_tiers_and_summary(prepared, tmp_path):
    cfg = prepared()
    summary = score_corpus(cfg)
    train = load_scored(cfg.data.prepared_dir, "train")
    assert {"input_ids", "entropy", "tier", "computed"} <= set(train.column_names)
    for ids, ent, tier in zip(train["input_ids"], train["entropy"], train["tier"]):
        assert len(ids) == len(ent) == len(tier) and np.isnan(ent[0]) and tier[0] == NTP_ONLY
    saved = json.loads((tmp_path / "prep" / "scores" / "summary.json").read_text())
    assert saved == summary
    total = sum(len(x) for x in train["input_ids"])
    assert sum(summary["splits"]["train"].values()) == total
    assert sum(summary["histogram"]["counts"]) == summary["eligible_train_positions"]


def test_min_context_moves_the_first_positions_to_ntp_only_and_the_summary_counts_them(prepared, monkeypatch):
    cfg = prepared("scoring.min_context=1")
    before = score_corpus(cfg)
    assert before["excluded_by_min_context"]["train"] == {"easy": 0, "medium": 0, "hard": 0}
    calls = {"n": 0}
    real = scoring.score_batch
    monkeypatch.setattr(scoring, "score_batch", lambda *a, **k: calls.__setitem__("n", calls["n"] + 1) or real(*a, **k))
    after = score_corpus(cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update={"min_context": 6})}))
    assert calls["n"] == 0, "changing min_context re-tiers the stored entropies; no model pass"
    assert after["min_context"] == 6
    for split in ("train", "eval"):
        excluded = after["excluded_by_min_context"][split]
        assert sum(excluded.values()) > 0
        for tier in ("easy", "medium", "hard"):
            assert after["splits"][split][tier] == before["splits"][split][tier] - excluded[tier]
        assert after["splits"][split]["ntp_only"] == before["splits"][split]["ntp_only"] + sum(excluded.values())
        for tiers in load_scored(cfg.data.prepared_dir, split)["tier"]:
            assert all(t == NTP_ONLY for t in tiers[:6])
    assert after["eligible_train_positions"] == before["eligible_train_positions"] - sum(after["excluded_by_min_context"]["train"].values())
    assert "min_context 6 kept" in scoring.format_summary(after)


def test_quantile_boundaries_leave_out_the_positions_before_min_context(prepared):
    cfg = prepared("scoring.tier_rule=quantile", "scoring.min_context=6")
    summary = score_corpus(cfg)
    train = load_scored(cfg.data.prepared_dir, "train")
    table = eligible_token_table(AutoTokenizer.from_pretrained(cfg.model.path), 10_000)
    kept = np.concatenate([np.asarray(e)[6:][table[np.asarray(ids)][6:] & np.isfinite(np.asarray(e)[6:])]
                           for ids, e in zip(train["input_ids"], train["entropy"])])
    assert summary["thresholds"] == pytest.approx(list(quantile_thresholds(kept, cfg.scoring.quantiles)), abs=1e-8)


def test_quantile_rule_spreads_positions_over_tiers(prepared):
    cfg = prepared("scoring.tier_rule=quantile", "scoring.quantiles=[0.25,0.5,0.75]")
    summary = score_corpus(cfg)
    counts = summary["splits"]["train"]
    eligible = counts["easy"] + counts["medium"] + counts["hard"] + 0
    assert counts["easy"] > 0 and counts["medium"] > 0 and counts["hard"] > 0
    assert counts["hard"] == pytest.approx(eligible / 3, rel=0.35)


def test_interrupted_scoring_resumes_without_redoing_shards(prepared, monkeypatch):
    cfg = prepared()
    real = scoring.score_batch
    calls = {"n": 0}

    def crash_after_four(*a, **k):
        calls["n"] += 1
        if calls["n"] > 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(scoring, "score_batch", crash_after_four)
    with pytest.raises(KeyboardInterrupt):
        score_corpus(cfg)
    shards_dir = f"{cfg.data.prepared_dir}/scores/train"
    import pathlib

    done = sorted(p.name for p in pathlib.Path(shards_dir).iterdir())
    assert done == ["shard-00000"], "only complete shards are visible; the interrupted one left nothing"
    counted = {"n": 0}

    def counting(*a, **k):
        counted["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(scoring, "score_batch", counting)
    resumed = score_corpus(cfg)
    resumed_train = load_scored(cfg.data.prepared_dir, "train")["entropy"]
    n_batches_resumed, counted["n"] = counted["n"], 0
    cfg2 = cfg.model_copy(deep=True)
    cfg2.output.overwrite = True
    import shutil

    shutil.rmtree(f"{cfg.data.prepared_dir}/scores")
    fresh = score_corpus(cfg2)
    assert resumed == fresh
    np.testing.assert_allclose(
        np.concatenate(resumed_train), np.concatenate(load_scored(cfg.data.prepared_dir, "train")["entropy"])
    )
    # The first shard (7 sequences in batches of 3 = 3 batches) was not scored again.
    assert n_batches_resumed == counted["n"] - 3


def _in_thread(fn, *args):
    """Run fn(*args) in a thread; the result (or the error) lands in the returned dict once joined."""
    out = {}

    def run():
        try:
            out["result"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised by the test
            out["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _prepare_and_score(cfg, model, tokenizer):
    prepare_corpus(cfg, tokenizer)
    return score_corpus(cfg, model, tokenizer)


def test_jobs_sharing_a_corpus_prepare_and_score_it_once(tmp_path, tiny_model_dir, monkeypatch):
    """Seeds launched side by side on one output folder (benchmarks/paper_tables.py --seeds S ... &) share its
    corpus: one job prepares and scores it, the others wait and reuse it. Before the corpus lock, the second job to
    finish a score shard crashed renaming it onto the first's (OSError: Directory not empty)."""
    cfg = load_config(None, [*text_corpus(tmp_path, tiny_model_dir, TEXTS, seq_len=24), "data.eval_fraction=0.2",
                             "scoring.shard_sequences=7", "scoring.batch_size=3"])
    real, calls = scoring.score_batch, []
    monkeypatch.setattr(scoring, "score_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    # (the model is loaded once: transformers' loading is not thread-safe; separate jobs are separate processes)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_model_dir), AutoTokenizer.from_pretrained(tiny_model_dir)
    jobs = [_in_thread(_prepare_and_score, cfg, model, tokenizer) for _ in range(3)]
    for thread, _ in jobs:
        thread.join()
    for _, out in jobs:
        if "error" in out:
            raise out["error"]
    summaries = [out["result"] for _, out in jobs]
    assert summaries[0] == summaries[1] == summaries[2]
    sizes = [len(load_scored(cfg.data.prepared_dir, s)) for s in ("train", "eval")]
    n_batches = sum(-(-min(7, n - start) // 3) for n in sizes for start in range(0, n, 7))  # shards of 7, batches of 3
    assert len(calls) == n_batches, "the corpus was scored once, not once per job"
    assert not [p.name for p in (tmp_path / "prep" / "scores" / "train").iterdir() if not p.name.startswith("shard-")]


def test_a_job_waits_while_another_holds_the_corpus(prepared, caplog):
    cfg = prepared()
    caplog.set_level(logging.INFO, logger="rmt.fileio")
    with corpus_lock(cfg.data.prepared_dir):
        thread, out = _in_thread(score_corpus, cfg)
        deadline = time.monotonic() + 300  # a bound for a stuck test, not a timing
        while not any("waiting for another process" in r.getMessage() for r in caplog.records):
            assert thread.is_alive() and "error" not in out, f"scoring did not wait for the lock: {out}"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert not (Path(cfg.data.prepared_dir) / "scores").exists(), "nothing is written while another job holds it"
    thread.join()
    assert out["result"] == json.loads((Path(cfg.data.prepared_dir) / "scores" / "summary.json").read_text())


def test_a_finished_corpus_in_a_folder_that_cannot_take_the_lock_is_still_used(prepared, monkeypatch, caplog):
    """A shared corpus prepared and scored by someone else, beside which this user cannot write: preparing and
    scoring it again only read it, so they go on without the lock (saying so) instead of failing on the lock file."""
    import errno

    import rmt.fileio as fileio

    cfg = prepared()
    first = score_corpus(cfg)

    def read_only(path, *a, **k):
        if str(path).endswith(".lock"):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return open(path, *a, **k)

    monkeypatch.setattr(fileio, "open", read_only, raising=False)
    caplog.set_level(logging.WARNING, logger="rmt.fileio")
    assert prepare_corpus(cfg) == Path(cfg.data.prepared_dir)
    assert score_corpus(cfg) == first
    assert any("going on without it" in r.getMessage() for r in caplog.records)


def test_scoring_again_reuses_the_tiers_unless_a_setting_or_a_split_changed(prepared, monkeypatch):
    cfg = prepared()
    first = score_corpus(cfg)
    train = Path(cfg.data.prepared_dir) / "scored" / "train"
    inode = os.stat(train).st_ino
    monkeypatch.setattr(scoring, "write_tiers", lambda *a, **k: pytest.fail("tiers written again"))
    assert score_corpus(cfg) == first
    assert os.stat(train).st_ino == inode, "a job reading the scored corpus never sees it replaced by another's call"
    monkeypatch.undo()
    quantile = cfg.model_copy(update={"scoring": cfg.scoring.model_copy(update={"tier_rule": "quantile"})})
    assert score_corpus(quantile)["tier_rule"] == "quantile"
    assert score_corpus(cfg) == first
    tiers = [list(t) for t in load_scored(cfg.data.prepared_dir, "train")["tier"]]
    arrows = list(train.glob("*.arrow"))
    assert arrows
    for arrow in arrows:  # a new file in its place (writing into the old one would break its memory maps)
        arrow.unlink()
        arrow.write_bytes(b"damaged")
    assert score_corpus(cfg) == first  # a damaged split is tiered again, not reused
    assert [list(t) for t in load_scored(cfg.data.prepared_dir, "train")["tier"]] == tiers


def test_mismatched_tokenizer_or_model_is_an_error(prepared, tmp_path, tiny_model_dir):
    from conftest import build_tiny_model, build_tiny_tokenizer

    cfg = prepared()
    small = tmp_path / "small"
    tok = build_tiny_tokenizer(small, vocab_size=280)
    build_tiny_model(small, tok)
    # A proxy reference model whose vocabulary is smaller than the corpus tokenizer's.
    with pytest.raises(ModelError, match="do not belong together|token id"):
        score_corpus(load_config(None, [f"model.path={tiny_model_dir}", f"scoring.reference_model={small}",
                                        f"data.prepared_dir={cfg.data.prepared_dir}", "output.overwrite=true"]))
    # A tokenizer that is not the one the corpus was prepared with.
    with pytest.raises(ModelError, match="another tokenizer"):
        score_corpus(load_config(None, [f"model.path={small}", f"data.prepared_dir={cfg.data.prepared_dir}"]))


def test_scoring_without_prepared_corpus_is_an_error(tmp_path, tiny_model_dir):
    with pytest.raises(DataError, match="rmt prepare"):
        score_corpus(load_config(None, [f"model.path={tiny_model_dir}", f"data.prepared_dir={tmp_path / 'none'}"]))


def test_a_damaged_scorer_json_is_written_again_when_no_score_depends_on_it(prepared, caplog):
    """scores/scorer.json cut short (a kill or a full disk while it was written) with the scores it names: written
    again when tiers.json (written after the last shard) names this scorer or no shard exists; an error naming it
    when the shards' scorer is unknown, until output.overwrite=true scores them again from scratch."""
    cfg = prepared()
    first = score_corpus(cfg)
    scores = Path(cfg.data.prepared_dir) / "scores"
    identity = (scores / "scorer.json").read_text()
    caplog.set_level(logging.WARNING, logger="rmt.scoring")
    for damaged in ("", '{"reference_model": "', "[1, 2]"):
        (scores / "scorer.json").write_text(damaged)
        assert score_corpus(cfg) == first
        assert (scores / "scorer.json").read_text() == identity
        assert any("scorer.json is damaged" in r.getMessage() for r in caplog.records)
    (scores / "scorer.json").write_text("")
    (scores / "tiers.json").unlink()
    with pytest.raises(DataError, match=r"scorer\.json is damaged\); set output\.overwrite=true"):
        score_corpus(cfg)
    assert (scores / "scorer.json").read_text() == "" and list((scores / "train").glob("shard-*")), "nothing removed"
    assert score_corpus(cfg.model_copy(update={"output": cfg.output.model_copy(update={"overwrite": True})})) == first
    for split in ("train", "eval"):  # no shard: nothing depends on the damaged file
        shutil.rmtree(scores / split)
    (scores / "scorer.json").write_text("")
    (scores / "tiers.json").unlink()
    assert score_corpus(cfg) == first


def test_a_damaged_score_shard_is_scored_again(prepared, monkeypatch, caplog):
    cfg = prepared()
    first = score_corpus(cfg)
    prep = Path(cfg.data.prepared_dir)
    scores = prep / "scores"
    (scores / "tiers.json").unlink()  # the tiers are derived from the shards again
    shard = scores / "train" / "shard-00001"
    for arrow in (shard / "data").glob("*.arrow"):  # a new file in its place, cut short
        data = arrow.read_bytes()
        arrow.unlink()
        arrow.write_bytes(data[: len(data) // 3])
    with pytest.raises(DataError, match=r"shard-00001/data is damaged .*; run `rmt score` again"):
        scoring._with_entropies(prep, "train", load_split(prep / "train", ""))
    real, calls = scoring.score_batch, []
    monkeypatch.setattr(scoring, "score_batch", lambda *a, **k: calls.append(1) or real(*a, **k))
    caplog.set_level(logging.WARNING, logger="rmt.scoring")
    assert score_corpus(cfg) == first
    assert len(calls) == 3, "only the damaged shard (7 sequences in batches of 3) was scored again"
    assert any("shard-00001/data is damaged" in r.getMessage() for r in caplog.records)
