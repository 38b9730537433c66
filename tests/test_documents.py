"""Documents from plain text (data.document_split, data.document_chars) and the empty eval split as an error."""

import datasets
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rmt.config import load_config
from rmt.data.prepare import doc_split, load_meta, prepare_corpus
from rmt.data.readers import cut_to_size, split_text, text_split_mode
from rmt.errors import DataError


def test_split_text_by_hand():
    text = "a\n\nb\n\n\nc"
    assert split_text(text, "blank_lines", 100) == [text]  # paragraphs joined up to the size
    assert split_text(text, "blank_lines", 4) == ["a\n\n", "b\n\n\n", "c"]
    assert split_text(text, "file", 4) == [text] and split_text("", "file", 4) == []
    assert cut_to_size("aaaa\nbbbb\ncc", 6) == ["aaaa\n", "bbbb\n", "cc"]  # at line breaks
    assert cut_to_size("aaa bbbbbb", 6) == ["aaa ", "bbbbbb"]  # else at whitespace
    assert cut_to_size("abcdefgh", 3) == ["abc", "def", "gh"]  # else at the size
    # a paragraph longer than the size is cut at its lines; the short one after it starts a new document
    assert split_text("l1\nl2\nl3\n\nshort", "blank_lines", 6) == ["l1\nl2\n", "l3\n\n", "short"]
    # a blank line holding spaces still separates paragraphs
    assert split_text("x\n  \ny", "blank_lines", 5) == ["x\n  \n", "y"]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab \n\t", max_size=300), st.integers(min_value=1, max_value=40), st.sampled_from(["blank_lines", "size"]))
def test_split_text_is_lossless_and_bounded(text, size, mode):
    docs = split_text(text, mode, size)
    assert "".join(docs) == text
    assert all(0 < len(d) <= size for d in docs)


def test_auto_cuts_a_single_file_not_a_folder(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("x")
    assert text_split_mode(f, "auto") == "blank_lines" and text_split_mode(tmp_path, "auto") == "file"
    assert text_split_mode(f, "size") == "size"


def _cfg(tmp_path, model_dir, path, *extra):
    return load_config(None, [f"model.path={model_dir}", f"data.path={path}", f"data.prepared_dir={tmp_path / 'prep'}",
                              "data.seq_len=32", "data.min_tokens=4", *extra])


PARAGRAPHS = [f"Section {i}\n=========\n\nThe cat sat on mat number {i}. It was a fine mat;\nthe fox ran far away.\n"
              for i in range(60)]


def test_a_single_text_file_gives_an_eval_split(tmp_path, tiny_model_dir):
    src = tmp_path / "manual.txt"
    src.write_text("\n".join(PARAGRAPHS))
    out = prepare_corpus(_cfg(tmp_path, tiny_model_dir, src, "data.document_chars=200"))
    counts = load_meta(out)["counts"]
    assert counts["train"]["documents"] + counts["eval"]["documents"] == 30  # two sections of ~100 characters each
    assert counts["eval"]["sequences"] > 0
    texts = [datasets.load_from_disk(str(out / s))["doc_id"] for s in ("train", "eval")]
    assert not set(texts[0]) & set(texts[1]), "split by document"


def test_an_empty_eval_split_is_an_error_unless_asked_for(tmp_path, tiny_model_dir):
    src = tmp_path / "one.txt"
    src.write_text("\n".join(PARAGRAPHS))
    with pytest.raises(DataError, match="the eval split is empty: data.eval_fraction=0.1 of 1 document put 0") as e:
        prepare_corpus(_cfg(tmp_path, tiny_model_dir, src, "data.document_split=file"))
    assert "data.document_split" in str(e.value) and "data.eval_fraction=0" in str(e.value)
    assert not (tmp_path / "prep").exists(), "nothing was written"
    out = prepare_corpus(_cfg(tmp_path, tiny_model_dir, src, "data.document_split=file", "data.eval_fraction=0"))
    assert load_meta(out)["counts"]["eval"]["sequences"] == 0


def test_an_empty_eval_corpus_is_an_error(tmp_path, tiny_model_dir):
    src, held = tmp_path / "t.txt", tmp_path / "e.txt"
    src.write_text("\n".join(PARAGRAPHS))
    held.write_text("a")  # BOS a EOS: shorter than data.min_tokens=4
    with pytest.raises(DataError, match="the eval corpus .* gave no sequence"):
        prepare_corpus(_cfg(tmp_path, tiny_model_dir, src, f"data.eval_path={held}"))


def test_jsonl_identity_does_not_depend_on_text_settings(tmp_path, tiny_model_dir):
    import json

    src = tmp_path / "c.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in PARAGRAPHS))
    assert sum(doc_split(i, 0, 0.1) == "eval" for i in range(60)) > 0
    out = prepare_corpus(_cfg(tmp_path, tiny_model_dir, src))
    assert "document_split" not in load_meta(out)["data"]
    prepare_corpus(_cfg(tmp_path, tiny_model_dir, src, "data.document_chars=300"))  # the same corpus: reused, no error


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"text": "bad \\ud800 x"}', r"c\.jsonl:2: field 'text' holds a lone surrogate '\\ud800' at character 4"),
        ('{"text": "x", "computed_spans": [[1e999, 3]]}', r"c\.jsonl:2: computed_spans must be a list of \[start, end\] pairs"),
        ("[1, 2, 3]", r"c\.jsonl:2: not a JSON object"),
    ],
    ids=["lone_surrogate", "span_beyond_float", "not_an_object"],
)
def test_jsonl_lines_that_are_not_documents_are_errors_naming_the_line(tmp_path, line, message):
    from rmt.data.readers import read_documents

    src = tmp_path / "c.jsonl"
    src.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(DataError, match=message):
        list(read_documents(src))


def test_parquet_text_that_is_not_utf8_is_an_error_naming_the_row(tmp_path):
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from rmt.data.readers import read_documents

    values = [b"fine", b"also fine", b"bad \xed\xa0\x80 x"]  # an encoded surrogate: Arrow does not check its strings
    offsets = np.cumsum([0, *map(len, values)]).astype(np.int32)
    text = pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()), pa.py_buffer(b"".join(values))])
    pq.write_table(pa.table({"text": text, "other": ["a", "b", "c"]}), tmp_path / "c.parquet")
    with pytest.raises(DataError, match=r"c\.parquet: row 2 \(counting from 0\) of column 'text' is not UTF-8 text"):
        list(read_documents(tmp_path / "c.parquet"))


def test_a_folder_without_text_files_says_what_it_holds_instead(tmp_path):
    from rmt.data.readers import read_documents

    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(DataError, match=r"holds no text files .*; for its \.jsonl files give one file as data.path"):
        list(read_documents(tmp_path))
    (tmp_path / "a.jsonl").unlink()
    with pytest.raises(DataError, match=r"holds no text files \([^)]*\)$"):
        list(read_documents(tmp_path))
