"""Read documents from a corpus on disk: text files, folders, JSONL, Parquet, saved HF datasets.

Each reader yields ``{"text": str, "computed_spans": list[[start, end]]}`` per document. ``computed_spans``
(character offsets) is optional in the input; the embedded default's generator writes it to mark the values a
document computes, as opposed to random operands (SPEC section 8). Every problem with the input raises
``DataError`` naming the file (and line or byte offset) so the user can fix it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

from rmt.errors import DataError

TEXT_SUFFIXES = {".txt", ".text", ".md"}


def detect_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "hf"
        return "text"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def _decode(raw: bytes, where: str, errors: str) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise DataError(
            f"{where}: undecodable bytes at byte offset {e.start} (not UTF-8); "
            "fix the file or set data.encoding_errors=replace"
        ) from None


def _text_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
    if not files:
        other = sorted({p.suffix.lower() for p in path.rglob("*") if p.is_file() and p.suffix.lower() in (".jsonl", ".json", ".parquet")})
        hint = f"; for its {', '.join(other)} files give one file as data.path" if other else ""
        raise DataError(f"folder {path} holds no text files ({', '.join(sorted(TEXT_SUFFIXES))}){hint}")
    return files


_BLANK_LINES = re.compile(r"\n[ \t\r\f\v]*\n\s*")  # a run of lines with nothing on them, and the whitespace after


def cut_to_size(text: str, size: int) -> list[str]:
    """``text`` in pieces of at most ``size`` characters, each cut after the last line break in its second half, else
    after the last whitespace there, else at ``size`` exactly. Lossless: the pieces join back into ``text``."""
    pieces = []
    while len(text) > size:
        window = text[:size]
        cut = window.rfind("\n") + 1
        if cut <= size // 2:
            cut = max(window.rfind(" "), window.rfind("\t")) + 1
        if cut <= size // 2:
            cut = size
        pieces.append(text[:cut])
        text = text[cut:]
    return pieces + ([text] if text else [])


def split_text(text: str, mode: str, size: int) -> list[str]:
    """Documents of one text file (data.document_split). Lossless: the documents join back into ``text``.

    - ``file``: the whole file is one document.
    - ``blank_lines``: cut at runs of blank lines (paragraphs); consecutive paragraphs are joined into documents of at
      most ``size`` characters, so a document keeps some context; a paragraph longer than ``size`` is cut by
      ``cut_to_size`` (at line breaks, else at whitespace).
    - ``size``: ``cut_to_size`` alone: pieces of at most ``size`` characters, cut at line breaks where possible.
    """
    if mode == "file":
        return [text] if text else []
    if mode == "size":
        return cut_to_size(text, size)
    if mode != "blank_lines":
        raise ValueError(f"unknown document split {mode!r}")
    paragraphs, start = [], 0
    for m in _BLANK_LINES.finditer(text):
        paragraphs.append(text[start : m.end()])
        start = m.end()
    if start < len(text):
        paragraphs.append(text[start:])
    docs: list[str] = []
    current = ""
    for para in paragraphs:
        if current and len(current) + len(para) > size:
            docs.append(current)
            current = ""
        if len(para) > size:
            *whole, current = cut_to_size(para, size)
            docs += whole
        else:
            current += para
    return docs + ([current] if current else [])


def text_split_mode(path: Path, mode: str) -> str:
    """data.document_split=auto: a single text file is cut at blank lines; each file of a folder is one document."""
    if mode != "auto":
        return mode
    return "blank_lines" if path.is_file() else "file"


def read_text(path: Path, errors: str, split: str = "file", size: int = 2000) -> Iterator[dict]:
    """The documents of a text file or a folder of text files: by default one per file; ``split`` (data.document_split)
    cuts each file into several (``split_text``)."""
    split = text_split_mode(path, split)
    for f in _text_files(path):
        for doc in split_text(_decode(f.read_bytes(), str(f), errors), split, size):
            yield {"text": doc, "computed_spans": []}


def read_jsonl(path: Path, field: str, errors: str) -> Iterator[dict]:
    files = [path] if path.is_file() else sorted(path.rglob("*.jsonl"))
    if not files:
        raise DataError(f"folder {path} holds no .jsonl files")
    for f in files:
        with open(f, "rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                line = _decode(raw, f"{f}:{lineno}", errors).strip()
                if not line:
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{f}:{lineno}: not valid JSON ({e.msg})") from None
                if not isinstance(record, dict):
                    raise DataError(f'{f}:{lineno}: not a JSON object; each line must be one, like {{"{field}": ...}}')
                if field not in record:
                    raise DataError(f"{f}:{lineno}: no field {field!r} (set data.text_field to the field holding the text)")
                text = record[field]
                if not isinstance(text, str):
                    raise DataError(f"{f}:{lineno}: field {field!r} is {type(text).__name__}, not a string")
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as e:  # an escape such as "\ud800" is valid JSON but no character
                    raise DataError(
                        f"{f}:{lineno}: field {field!r} holds a lone surrogate {text[e.start]!a} at character {e.start}, "
                        "which is not text (UTF-8 cannot encode it); fix the line"
                    ) from None
                yield {"text": text, "computed_spans": _spans(record.get("computed_spans"), f"{f}:{lineno}")}


def _spans(spans, where: str) -> list[list[int]]:
    if spans is None:
        return []
    try:
        return [[int(a), int(b)] for a, b in spans]
    except (TypeError, ValueError, OverflowError):  # OverflowError: a number too large for a float (1e999)
        raise DataError(f"{where}: computed_spans must be a list of [start, end] pairs") from None


def read_table(path: Path, fmt: str, field: str) -> Iterator[dict]:
    """Parquet files or a saved Hugging Face dataset, streamed batch by batch (memory-mapped)."""
    import datasets

    try:
        if fmt == "parquet":
            files = [str(path)] if path.is_file() else sorted(str(p) for p in path.rglob("*.parquet"))
            if not files:
                raise DataError(f"folder {path} holds no .parquet files")
            ds = datasets.load_dataset("parquet", data_files=files, split="train")
        else:
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                if "train" not in ds:
                    raise DataError(f"{path}: dataset has splits {list(ds)}, none named 'train'")
                ds = ds["train"]
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - the library's error, named
        raise DataError(f"{path}: cannot read as {fmt}: {e}") from None
    if field not in ds.column_names:
        raise DataError(f"{path}: no column {field!r}; columns are {ds.column_names} (set data.text_field)")
    has_spans = "computed_spans" in ds.column_names
    ds = ds.select_columns(sorted({field, "computed_spans"} & set(ds.column_names)))  # the other columns are not read
    n = 0
    try:
        for row in ds:
            text = row[field]
            if not isinstance(text, str):
                raise DataError(f"{path}: column {field!r} holds {type(text).__name__}, not strings")
            yield {"text": text, "computed_spans": _spans(row["computed_spans"], str(path)) if has_spans else []}
            n += 1
    except UnicodeDecodeError as e:  # Arrow strings are not checked when written: bytes that are not UTF-8
        raise DataError(f"{path}: row {n} (counting from 0) of column {field!r} is not UTF-8 text ({e.reason})") from None


def read_documents(path: str | Path, fmt: str = "auto", field: str = "text", errors: str = "strict",
                   split: str = "file", size: int = 2000) -> Iterator[dict]:
    """Documents of a corpus; the path is checked before anything is read. ``split`` and ``size``: how text files are
    cut into documents (data.document_split, data.document_chars); records of JSONL, Parquet and datasets are
    documents as they are."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"corpus not found: {path}")
    fmt = detect_format(path, fmt)
    if fmt == "text":
        return read_text(path, errors, split, size)
    if fmt == "jsonl":
        return read_jsonl(path, field, errors)
    return read_table(path, fmt, field)
