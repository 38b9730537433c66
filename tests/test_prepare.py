import json

import datasets
import pytest

from rmt.config import load_config
from rmt.data.prepare import chunk, computed_mask, doc_split, load_meta, prepare_corpus
from rmt.errors import DataError


def cfg_for(tmp_path, model_dir, path, *extra):
    return load_config(
        None,
        [f"model.path={model_dir}", f"data.path={path}", f"data.prepared_dir={tmp_path / 'prep'}", "data.seq_len=16",
         "data.min_tokens=4", "data.eval_fraction=0.25", *extra],
    )


def write_jsonl(path, texts, spans=None):
    with open(path, "w") as f:
        for i, t in enumerate(texts):
            rec = {"text": t}
            if spans:
                rec["computed_spans"] = spans[i]
            f.write(json.dumps(rec) + "\n")
    return path


DOCS = [f"document number {i}: the cat sat on the mat and 12+7=19." * (1 + i % 3) for i in range(40)]


def test_pure_helpers():
    assert computed_mask([(0, 2), (2, 3), (3, 5), (5, 5)], [[2, 4]]) == [0, 1, 1, 0]
    assert computed_mask([(0, 1)], []) == [0]
    pieces = list(chunk(list(range(10)), [0] * 10, 4, 3))
    assert [p for p, _ in pieces] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # the last piece (2 tokens) is dropped
    assert doc_split(3, 0, 0.0) == "train" and doc_split(3, 0, 0.999999) == "eval"
    assert [doc_split(i, 7, 0.5) for i in range(20)] == [doc_split(i, 7, 0.5) for i in range(20)]


def test_jsonl_is_chunked_split_by_document_and_marks_computed_tokens(tmp_path, tiny_model_dir):
    spans = [[[t.index("19"), t.index("19") + 2]] for t in DOCS]
    src = write_jsonl(tmp_path / "c.jsonl", DOCS, spans)
    out = prepare_corpus(cfg_for(tmp_path, tiny_model_dir, src))
    train, ev = datasets.load_from_disk(str(out / "train")), datasets.load_from_disk(str(out / "eval"))
    assert len(train) and len(ev)
    assert not set(train["doc_id"]) & set(ev["doc_id"]), "a document lands in one split only"
    assert all(4 <= len(x) <= 16 for x in train["input_ids"])
    # Long documents are chunked, not dropped: every document contributes.
    assert set(train["doc_id"]) | set(ev["doc_id"]) == set(range(len(DOCS)))
    # Without packing a sequence never crosses a document: each row belongs to one doc and starts at its BOS or inside it.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    marked = [tok.decode([i]) for row, comp in zip(train["input_ids"], train["computed"]) for i, c in zip(row, comp) if c]
    assert marked and set("".join(marked)) <= set("19")
    meta = load_meta(out)
    assert meta["counts"]["train"]["documents"] + meta["counts"]["eval"]["documents"] == len(DOCS)


def test_split_is_seeded_and_rerun_reuses(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    cfg = cfg_for(tmp_path, tiny_model_dir, src)
    out = prepare_corpus(cfg)
    first = datasets.load_from_disk(str(out / "eval"))["doc_id"]
    mtime = (out / "meta.json").stat().st_mtime_ns
    assert prepare_corpus(cfg) == out and (out / "meta.json").stat().st_mtime_ns == mtime
    other = cfg_for(tmp_path / "b", tiny_model_dir, src)
    assert datasets.load_from_disk(str(prepare_corpus(other) / "eval"))["doc_id"] == first


def test_a_corpus_file_with_other_contents_is_not_taken_for_the_prepared_one(tmp_path, tiny_model_dir):
    """The prepared corpus used to be reused after its source file was rewritten with other documents (it was
    known by its path only): training then ran on the old text. A source whose size or time moved is compared by
    digest: other contents are refused without output.overwrite (and prepared again with it); the same bytes
    written again are still up to date, and their new stamp is recorded."""
    import os
    import shutil

    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    cfg = cfg_for(tmp_path, tiny_model_dir, src)
    out = prepare_corpus(cfg)
    docs_before = datasets.load_from_disk(str(out / "train"))["doc_id"]
    same = tmp_path / "copy.jsonl"
    shutil.copyfile(src, same)
    os.replace(same, src)  # the same bytes, a new modification time
    mtime = (out / "train").stat().st_mtime_ns
    assert prepare_corpus(cfg) == out and (out / "train").stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert load_meta(out)["source_stamp"][0][0][2] == src.stat().st_mtime_ns  # the new stamp, recorded
    write_jsonl(src, DOCS[::-1] + ["another document, added later, with some words in it"])
    with pytest.raises(DataError, match=rf"{src} changed since the corpus in {out} was prepared from it; set output.overwrite=true"):
        prepare_corpus(cfg)
    assert datasets.load_from_disk(str(out / "train"))["doc_id"] == docs_before  # left as it was
    prepare_corpus(cfg_for(tmp_path, tiny_model_dir, src, "output.overwrite=true"))
    assert load_meta(out)["counts"]["train"]["documents"] + load_meta(out)["counts"]["eval"]["documents"] == len(DOCS) + 1
    # a corpus prepared before sources were recorded is taken as it is
    meta = load_meta(out)
    for key in ("source_stamp", "source_digest"):
        del meta[key]
    (out / "meta.json").write_text(json.dumps(meta))
    write_jsonl(src, DOCS)
    assert prepare_corpus(cfg) == out


def test_packing_fills_sequences(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    out = prepare_corpus(cfg_for(tmp_path, tiny_model_dir, src, "data.pack=true"))
    lengths = [len(x) for x in datasets.load_from_disk(str(out / "train"))["input_ids"]]
    assert all(n == 16 for n in lengths[:-1])


def test_text_folder_and_parquet_and_hf_dataset(tmp_path, tiny_model_dir):
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, t in enumerate(DOCS[:12]):
        (folder / f"{i:02d}.txt").write_text(t)
    n_text = load_meta(prepare_corpus(cfg_for(tmp_path / "a", tiny_model_dir, folder)))["counts"]
    ds = datasets.Dataset.from_dict({"body": DOCS[:12]})
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.save_to_disk(str(tmp_path / "hf"))
    n_parquet = load_meta(prepare_corpus(cfg_for(tmp_path / "b", tiny_model_dir, tmp_path / "c.parquet", "data.text_field=body")))["counts"]
    n_hf = load_meta(prepare_corpus(cfg_for(tmp_path / "c", tiny_model_dir, tmp_path / "hf", "data.text_field=body")))["counts"]
    assert n_text == n_parquet == n_hf


def test_bad_inputs_give_clear_errors_and_keep_earlier_outputs(tmp_path, tiny_model_dir):
    good = write_jsonl(tmp_path / "good.jsonl", DOCS)
    out = prepare_corpus(cfg_for(tmp_path, tiny_model_dir, good))
    before = (out / "meta.json").read_text()

    def fails(path, match, *extra):
        with pytest.raises(DataError, match=match):
            prepare_corpus(cfg_for(tmp_path, tiny_model_dir, path, "output.overwrite=true", *extra))
        assert (out / "meta.json").read_text() == before, "an earlier prepared corpus must survive a failed run"

    fails(tmp_path / "missing.jsonl", "not found")
    (tmp_path / "empty.jsonl").write_text("")
    fails(tmp_path / "empty.jsonl", "empty")
    (tmp_path / "blank.txt").write_text("   \n\n")
    fails(tmp_path / "blank.txt", "empty")
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{not json}\n')
    fails(tmp_path / "bad.jsonl", r"bad.jsonl:2: not valid JSON")
    (tmp_path / "nofield.jsonl").write_text('{"text": "fine"}\n{"body": "x"}\n')
    fails(tmp_path / "nofield.jsonl", r"nofield.jsonl:2: no field 'text'")
    (tmp_path / "bytes.txt").write_bytes(b"hello \xff\xfe world")
    fails(tmp_path / "bytes.txt", r"undecodable bytes at byte offset 6")
    write_jsonl(tmp_path / "short.jsonl", ["a", "b c"])
    fails(tmp_path / "short.jsonl", "shorter than data.min_tokens", "data.min_tokens=50")
    (tmp_path / "nothing").mkdir()
    fails(tmp_path / "nothing", "no text files")


def test_undecodable_bytes_replaced_when_asked(tmp_path, tiny_model_dir):
    (tmp_path / "bytes.txt").write_bytes(b"hello \xff\xfe world, a longer text to make a few tokens")
    out = prepare_corpus(cfg_for(tmp_path, tiny_model_dir, tmp_path / "bytes.txt", "data.encoding_errors=replace", "data.eval_fraction=0"))
    assert load_meta(out)["counts"]["train"]["sequences"] > 0


def test_changed_settings_refuse_without_overwrite(tmp_path, tiny_model_dir):
    src = write_jsonl(tmp_path / "c.jsonl", DOCS)
    prepare_corpus(cfg_for(tmp_path, tiny_model_dir, src))
    with pytest.raises(DataError, match="other settings"):
        prepare_corpus(cfg_for(tmp_path, tiny_model_dir, src, "data.seq_len=32"))
    prepare_corpus(cfg_for(tmp_path, tiny_model_dir, src, "data.seq_len=32", "output.overwrite=true"))


def test_separate_eval_corpus(tmp_path, tiny_model_dir):
    train_src = write_jsonl(tmp_path / "train.jsonl", DOCS[:20])
    eval_src = write_jsonl(tmp_path / "eval.jsonl", DOCS[20:26])
    out = prepare_corpus(cfg_for(tmp_path, tiny_model_dir, train_src, f"data.eval_path={eval_src}"))
    counts = load_meta(out)["counts"]
    assert counts["train"]["documents"] == 20 and counts["eval"]["documents"] == 6
