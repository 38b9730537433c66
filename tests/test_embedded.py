"""The embedded corpus: deterministic bytes, disjoint splits, the documented formats, the cache."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from rmt.config import EmbeddedConfig, load_config
from rmt.embedded import corpus as embedded
from rmt.embedded import embedded_paths, ensure_embedded
from rmt.embedded.corpus import (
    Problem,
    build_corpus,
    draw_problems,
    parse_problem,
    render_plain,
    render_think,
    score_posttrain,
    write_corpus,
)
from rmt.errors import DataError

SMALL = dict(base_problems=400, midtrain_problems=80, eval_problems=40, posttrain_problems=20)

# sha256 of the files written by write_corpus(EmbeddedConfig(seed=0, **SMALL)) with reasoning-gym 0.1.25.
# A change here means the default corpus changed: bump CORPUS_FORMAT and say so in docs/embedded.md.
# Format 3 changed "base" (scratchpads inside values; empty blocks never inside a value) and "posttrain" (a "terms"
# field); FORMAT1_BASE is the base file with embedded.empty_think, inside_think and compact_steps all 0.
FORMAT1_BASE = "e28b2a030effee11c01d55efb59481e49b48f44ac01582bc54c386ed5236df6b"
EXPECTED_SHA256 = {
    "base": "d09bdacd06df6622c517448a57868aeced950f1cd4c950119dd25cdeab4c0b4b",
    "midtrain": "16d19991a51664baf5ecb4b09dbdef46f2448c439c36116add1a2d6bf8d66c52",
    "eval": "5b79c519b2cd9d7f3a2fff5abe672223764cd473d9f4ba1b9862f2168d5b2eab",
    "posttrain": "d05dc9f6228b4b15a31dc075313c6c85e2271f3906711c71321ce92abdccda2c",
}


def _entry(expression: str, answer: str) -> dict:
    return {"question": f"... {expression} =", "answer": answer, "metadata": {"source_dataset": "chain_sum", "expression": expression}}


def test_render_think_and_plain():
    p = parse_problem(_entry("5 - 1 + 4", "8"))
    assert p.expression == "5-1+4"
    assert render_think(p) == "5-1+4=<think>5-1=4;4+4=8</think>8"
    line, (a, b) = render_plain(p)
    assert line == "5-1+4=8" and line[a:b] == "8"
    neg = parse_problem(_entry("1 - 5 - 9", "-13"))
    assert render_think(neg) == "1-5-9=<think>1-5=-4;-4-9=-13</think>-13"
    line, (a, b) = render_plain(neg)
    assert line[a:b] == "-13"


def test_render_think_with_an_empty_block():
    p = parse_problem(_entry("1 - 5 - 9", "-13"))  # 1-5-9=-13: the answer starts at character 6
    pad, empty = "<think>1-5=-4;-4-9=-13</think>", "<think></think>"
    assert render_think(p, 0) == f"{empty}1-5-9={pad}-13"
    assert render_think(p, 1) == f"1{empty}-5-9={pad}-13"
    assert render_think(p, 5) == f"1-5-9{empty}={pad}-13"
    assert render_think(p, 9) == f"1-5-9={pad}-13{empty}"
    for bad in (6, 7, 8, -1, 10):  # at or inside the answer (the scratchpad's place); outside the line
        with pytest.raises(ValueError):
            render_think(p, bad)


def test_render_think_inside_the_value_restates_it_and_compact_steps():
    p = parse_problem(_entry("1 - 5 - 9", "-13"))
    assert render_think(p, inside_at=7) == "1-5-9=-<think>1-5=-4;-4-9=-13</think>-13"
    assert render_think(p, inside_at=8) == "1-5-9=-1<think>1-5=-4;-4-9=-13</think>-13"
    assert render_think(p, compact=True) == "1-5-9=<think>-4;-13</think>-13"
    assert render_think(p, 2, inside_at=8, compact=True) == "1-<think></think>5-9=-1<think>-4;-13</think>-13"
    assert render_think(p, 9, inside_at=7) == "1-5-9=-<think>1-5=-4;-4-9=-13</think>-13<think></think>"
    for bad in (6, 9):  # the value's start (no part written yet) and its end are not inside it
        with pytest.raises(ValueError):
            render_think(p, inside_at=bad)


def test_render_think_rechecked_writes_the_steps_again():
    p = parse_problem(_entry("1 - 5 - 9", "-13"))
    assert render_think(p, passes=2) == "1-5-9=<think>1-5=-4;-4-9=-13|1-5=-4;-4-9=-13</think>-13"
    assert render_think(p, 2, inside_at=8, passes=3) == (
        "1-<think></think>5-9=-1<think>1-5=-4;-4-9=-13|1-5=-4;-4-9=-13|1-5=-4;-4-9=-13</think>-13"
    )
    assert render_think(p, compact=True, passes=2) == "1-5-9=<think>-4;-13|-4;-13</think>-13"
    assert render_think(p, passes=1) == render_think(p)


def test_rechecked_scratchpads_change_nothing_else(tmp_path):
    """embedded.recheck rewrites only the scratchpads it picks, at its rate, with 1 + recheck_passes copies of the
    steps; the lines with their extra passes removed are the corpus without it, and the other splits are unchanged."""
    plain = build_corpus(EmbeddedConfig(seed=0, **{**SMALL, "base_problems": 1_500}))
    cfg = EmbeddedConfig(seed=0, recheck=0.6, recheck_passes=2, **{**SMALL, "base_problems": 1_500})
    rechecked = build_corpus(cfg)
    for split in ("midtrain", "eval", "posttrain"):
        assert rechecked[split] == plain[split]
    lines = picked = 0
    for a, b in zip(plain["base"], rechecked["base"], strict=True):
        assert a["think"] == b["think"]
        for line_a, line_b in zip(a["text"].split("\n"), b["text"].split("\n"), strict=True):
            lines += a["think"]  # every line of a thinking document has its scratchpad
            if "|" not in line_b:
                assert line_b == line_a
                continue
            picked += 1
            bar = line_b.index("|")
            pad = line_b[line_b.rindex("<think>", 0, bar) + len("<think>") : line_b.index("</think>", bar)]
            first, *again = pad.split("|")
            assert again == [first, first], line_b
            assert line_b.replace(pad, first) == line_a
    assert abs(picked / lines - cfg.recheck) < 0.06, (picked, lines)


def test_recheck_unset_keeps_the_corpus_key_and_the_shipped_base_model():
    """The default config finds the base model shipped in the package; recheck, added after it was trained, leaves
    the key alone unless it is set."""
    from rmt.embedded import cache

    default = load_config(None, [])
    assert (cache.shipped_model_dir(default) / "model.safetensors").is_file()
    same = load_config(None, ["embedded.recheck_passes=5"])
    assert cache.corpus_key(same.embedded) == cache.corpus_key(default.embedded)
    assert cache.model_key(same) == cache.model_key(default)
    other = load_config(None, ["embedded.recheck=0.5"])
    assert cache.corpus_key(other.embedded) != cache.corpus_key(default.embedded)
    more = load_config(None, ["embedded.recheck=0.5", "embedded.recheck_passes=3"])
    assert cache.corpus_key(more.embedded) != cache.corpus_key(other.embedded)


def test_parse_rejects_wrong_answer():
    with pytest.raises(DataError):
        parse_problem(_entry("5 - 1", "3"))


def test_corpus_is_deterministic_and_matches_checked_in_hashes(tmp_path):
    cfg = EmbeddedConfig(seed=0, **SMALL)
    assert build_corpus(cfg) == build_corpus(cfg)
    m1 = write_corpus(cfg, tmp_path / "a")
    m2 = write_corpus(cfg, tmp_path / "b")
    for split in embedded.SPLITS:
        assert (tmp_path / "a" / f"{split}.jsonl").read_bytes() == (tmp_path / "b" / f"{split}.jsonl").read_bytes()
    assert m1 == m2
    got = {s: m1["files"][s]["sha256"] for s in embedded.SPLITS}
    assert got == EXPECTED_SHA256, got
    other = write_corpus(EmbeddedConfig(seed=1, **SMALL), tmp_path / "c")
    assert other["files"]["midtrain"]["sha256"] != got["midtrain"]
    legacy = write_corpus(EmbeddedConfig(seed=0, empty_think=0.0, inside_think=0.0, compact_steps=0.0, **SMALL), tmp_path / "d")
    assert legacy["files"]["base"]["sha256"] == FORMAT1_BASE


def test_splits_are_disjoint_and_held_out_splits_have_no_repeats():
    problems = draw_problems(EmbeddedConfig(seed=3, **SMALL))
    keys = {s: [p.expression for p in ps] for s, ps in problems.items()}
    assert {s: len(k) for s, k in keys.items()} == {
        "base": 400, "midtrain": 80, "eval": 40, "posttrain": 20,
    }
    for s in ("midtrain", "eval", "posttrain"):
        assert len(set(keys[s])) == len(keys[s])
    names = list(keys)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert not set(keys[a]) & set(keys[b]), (a, b)


def test_document_formats():
    cfg = EmbeddedConfig(seed=0, problems_per_doc=4, **SMALL)
    corpus = build_corpus(cfg)
    for split in ("midtrain", "eval"):
        for doc in corpus[split]:
            text, spans = doc["text"], doc["computed_spans"]
            assert "<think>" not in text and "</think>" not in text
            lines = text.split("\n")
            assert len(lines) == len(spans) <= 4
            for line, (a, b) in zip(lines, spans):
                # each span is exactly the answer after '=' on its line
                assert text[a:b] == line.split("=")[1]
                assert text[b : b + 1] in ("", "\n")
    think_docs = [d for d in corpus["base"] if d["think"]]
    plain_docs = [d for d in corpus["base"] if not d["think"]]
    assert think_docs and plain_docs
    assert all("<think>" not in d["text"] for d in plain_docs)
    share = len(think_docs) / len(corpus["base"])
    assert 0.3 < share < 0.7


def _explain(p, line: str, newline: bool):
    """The (empty_at, inside_at, compact) that render a thinking line, or None."""
    plain, (a, b) = render_plain(p)
    empties = [None] + [i for i in range(len(plain) + (1 if newline else 0)) if not a <= i < b]
    for empty_at in empties:
        for inside_at in [None, *range(a + 1, b)]:
            for compact in (False, True):
                if render_think(p, empty_at, inside_at, compact) == line:
                    return empty_at, inside_at, compact
    return None


def test_thinking_lines_hold_the_scratchpad_inside_blocks_compact_steps_and_empty_blocks():
    """Every thinking line is its scratchpad (after '=' or inside the value, restating it; full or compact steps)
    plus at most one empty block outside the answer, never after the last line of a document; each choice at its
    configured rate."""
    cfg = EmbeddedConfig(seed=0, **{**SMALL, "base_problems": 1_500})
    problems = iter(draw_problems(cfg)["base"])
    counts = {"lines": 0, "empty": 0, "inside": 0, "can_inside": 0, "compact": 0}
    for doc in build_corpus(cfg)["base"]:
        text_lines = doc["text"].split("\n")
        for i, line in enumerate(text_lines):
            p = next(problems)
            if not doc["think"]:
                assert line == render_plain(p)[0]
                continue
            how = _explain(p, line, newline=i < len(text_lines) - 1)
            assert how is not None, line
            empty_at, inside_at, compact = how
            counts["lines"] += 1
            counts["empty"] += empty_at is not None
            counts["inside"] += inside_at is not None
            counts["can_inside"] += len(p.answer) > 1
            counts["compact"] += compact
    assert abs(counts["empty"] / counts["lines"] - cfg.empty_think) < 0.06, counts
    assert abs(counts["inside"] / counts["can_inside"] - cfg.inside_think) < 0.06, counts
    assert abs(counts["compact"] / counts["lines"] - cfg.compact_steps) < 0.06, counts


def test_long_problems_are_rare_in_the_base_split_and_common_in_the_held_out_ones():
    cfg = EmbeddedConfig(seed=0, long_terms=5, long_fraction=0.25, long_base_fraction=0.05, **SMALL)
    corpus = build_corpus(cfg)
    terms = lambda line: line.split("=")[0].count("+") + line.split("=")[0].count("-") + 1  # noqa: E731  (no signs in operands)
    base_exprs = [ln.replace("<think></think>", "").split("=")[0] for d in corpus["base"] for ln in d["text"].split("\n")]
    assert len(base_exprs) == SMALL["base_problems"] and sum(terms(e) == 5 for e in base_exprs) == round(0.05 * SMALL["base_problems"])
    held = set()
    for split, n in (("midtrain", SMALL["midtrain_problems"]), ("eval", SMALL["eval_problems"])):
        lines = [ln for d in corpus[split] for ln in d["text"].split("\n")]
        assert len(lines) == n and sum(terms(ln) == 5 for ln in lines) == round(0.25 * n)
        held |= {ln.split("=")[0] for ln in lines}
    post = corpus["posttrain"]
    assert len(post) == SMALL["posttrain_problems"] and sum(r["terms"] == 5 for r in post) == round(0.25 * len(post))
    assert all(score_posttrain(r, r["answer"]) == 1.0 for r in post)
    assert not held & set(base_exprs)  # a held-out problem is never a base problem
    # the regular problems are those of the corpus without long ones, in the same order
    plain = build_corpus(EmbeddedConfig(seed=0, **SMALL))
    regular = [ln for d in corpus["eval"] for ln in d["text"].split("\n") if terms(ln) < 5]
    assert regular == [ln for d in plain["eval"] for ln in d["text"].split("\n")][: len(regular)]


def test_posttrain_records_are_verifiable():
    records = build_corpus(EmbeddedConfig(seed=0, **SMALL))["posttrain"]
    r = records[0]
    assert r["prompt"].endswith("=") and " " not in r["prompt"]
    assert score_posttrain(r, r["answer"]) == 1.0
    assert score_posttrain(r, str(int(r["answer"]) + 1)) == 0.0
    assert score_posttrain(r, None) == 0.0
    json.dumps(r)  # JSON-ready


def test_problem_space_too_small_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(embedded, "STALL_DRAWS", 5_000)
    cfg = EmbeddedConfig(min_terms=2, max_terms=2, base_problems=10, midtrain_problems=5_000, eval_problems=5, posttrain_problems=5)
    with pytest.raises(DataError, match="too small"):
        draw_problems(cfg)


def test_ensure_embedded_builds_once_and_honours_rmt_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RMT_CACHE", str(tmp_path / "cache"))
    cfg = load_config(None, [f"embedded.{k}={v}" for k, v in SMALL.items()])
    arts = ensure_embedded(cfg, model=False)
    assert arts.root.is_relative_to(tmp_path / "cache")
    for path in (arts.base_path, arts.midtrain_path, arts.eval_path, arts.posttrain_path, arts.tokenizer_dir / "tokenizer.json"):
        assert path.is_file(), path
    first = {p: p.stat().st_mtime_ns for p in arts.root.rglob("*") if p.is_file()}

    def boom(*a, **k):
        raise AssertionError("rebuilt")

    monkeypatch.setattr(embedded, "write_corpus", boom)
    monkeypatch.setattr("rmt.data.tokenizer.train_tokenizer", boom)
    again = ensure_embedded(cfg, model=False)
    assert again == arts
    assert {p: p.stat().st_mtime_ns for p in arts.root.rglob("*") if p.is_file()} == first
    # another seed is another cache entry; the cache key ignores where the cache is
    other = load_config(None, [f"embedded.{k}={v}" for k, v in SMALL.items()] + ["embedded.seed=5"])
    assert embedded_paths(other).root != arts.root


def test_corpus_hash_of_file_matches_manifest(tmp_path):
    manifest = write_corpus(EmbeddedConfig(seed=2, **SMALL), tmp_path)
    for split in embedded.SPLITS:
        data = (tmp_path / f"{split}.jsonl").read_bytes()
        assert hashlib.sha256(data).hexdigest() == manifest["files"][split]["sha256"]
        assert data.decode().count("\n") == manifest["files"][split]["records"]


def test_problem_steps_are_left_to_right():
    p = Problem((3, 4, 9), ("-", "+"), _entry("3 - 4 + 9", "8"))
    assert p.steps() == ["3-4=-1", "-1+9=8"]


def test_held_out_splits_do_not_depend_on_the_base_size():
    small = build_corpus(EmbeddedConfig(seed=0, **SMALL))
    bigger = build_corpus(EmbeddedConfig(seed=0, **{**SMALL, "base_problems": 3_000}))
    for split in ("midtrain", "eval", "posttrain"):
        assert small[split] == bigger[split]
    assert small["base"] == bigger["base"][: len(small["base"])]


TINY_PRETRAIN = ["pretrain.hidden_size=32", "pretrain.num_layers=1", "pretrain.num_heads=2", "pretrain.intermediate_size=64",
                 "pretrain.seq_len=32", "pretrain.batch_size=4", "pretrain.vocab_size=300", "pretrain.steps=3",
                 "pretrain.warmup_steps=1", "pretrain.probe_problems=0"]


def _ship(monkeypatch, tmp_path, cfg) -> Path:
    """Train ``cfg``'s base model in one cache and ship it (as reproduce_base_model.py --install does)."""
    from rmt.embedded import cache
    from rmt.pretrain import DONE_FILE

    monkeypatch.setenv("RMT_CACHE", str(tmp_path / "trained"))
    arts = ensure_embedded(load_config(None, [*cfg, "pretrain.use_shipped=false"]), progress=False)
    monkeypatch.setattr(cache, "SHIPPED_DIR", tmp_path / "shipped")
    shipped = cache.shipped_model_dir(load_config(None, cfg))
    shipped.mkdir(parents=True)
    for f in (*cache.SHIPPED_FILES, DONE_FILE):
        if (arts.base_model_dir / f).is_file():
            shutil.copyfile(arts.base_model_dir / f, shipped / f)
    return shipped


def test_shipped_base_model_is_used_instead_of_training(tmp_path, monkeypatch):
    from rmt import pretrain
    from rmt.pretrain import is_complete

    cfg = [f"embedded.{k}={v}" for k, v in SMALL.items()] + TINY_PRETRAIN
    shipped = _ship(monkeypatch, tmp_path, cfg)

    def boom(*a, **k):
        raise AssertionError("trained although a matching base model is shipped")

    monkeypatch.setattr(pretrain, "train_base_model", boom)
    monkeypatch.setenv("RMT_CACHE", str(tmp_path / "fresh"))
    arts = ensure_embedded(load_config(None, cfg), progress=False)
    assert is_complete(arts.base_model_dir)
    assert (arts.base_model_dir / "model.safetensors").read_bytes() == (shipped / "model.safetensors").read_bytes()
    # the copy is an ordinary, loadable cache entry that records this machine's corpus and tokenizer paths
    run = json.loads((arts.base_model_dir / pretrain.RUN_FILE).read_text())
    assert run["corpus"] == str(arts.base_path.resolve()) and run["tokenizer"] == str(arts.tokenizer_dir.resolve())
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(arts.base_model_dir), use_safetensors=True)
    # pretrain.use_shipped=false trains (here: reaches the patched trainer)
    monkeypatch.setenv("RMT_CACHE", str(tmp_path / "own"))
    with pytest.raises(AssertionError, match="trained although"):
        ensure_embedded(load_config(None, [*cfg, "pretrain.use_shipped=false"]), progress=False)


def test_shipped_base_model_with_another_tokenizer_is_not_used(tmp_path, monkeypatch, caplog):
    from rmt import pretrain

    cfg = [f"embedded.{k}={v}" for k, v in SMALL.items()] + TINY_PRETRAIN
    shipped = _ship(monkeypatch, tmp_path, cfg)
    tok = json.loads((shipped / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[300 - 40], list(vocab)[300 - 41]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two merged tokens swap ids: same config, other tokenizer
    (shipped / "tokenizer.json").write_text(json.dumps(tok))
    trained = []
    monkeypatch.setattr(pretrain, "train_base_model", lambda *a, **k: trained.append(1) or (_ for _ in ()).throw(RuntimeError("stop")))
    monkeypatch.setenv("RMT_CACHE", str(tmp_path / "fresh"))
    with pytest.raises(RuntimeError, match="stop"):
        ensure_embedded(load_config(None, cfg), progress=False)
    assert trained and "another tokenizer" in caplog.text


def test_the_package_ships_the_default_base_model():
    """Changing the default recipe (embedded, pretrain, tokenizer, corpus format) needs a re-shipped base model:
    ``python benchmarks/reproduce_base_model.py --install``."""
    from rmt.embedded.cache import SHIPPED_DIR, shipped_model_dir
    from rmt.pretrain import DONE_FILE

    shipped = shipped_model_dir(load_config(None, []))
    assert (shipped / DONE_FILE).is_file(), f"{shipped.name} is not shipped; have: {[p.name for p in SHIPPED_DIR.glob('base-*')]}"
    assert (shipped / "model.safetensors").is_file() and (shipped / "probe.json").is_file()
    assert [p.name for p in SHIPPED_DIR.glob("base-*")] == [shipped.name]  # no stale copies in the package
