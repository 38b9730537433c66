"""`rmt prepare`: tokenize a corpus into sequences with a seeded train/eval split by document.

Output (``data.prepared_dir``): ``train/`` and ``eval/`` Hugging Face datasets (memory-mapped Arrow) with columns
``input_ids``, ``doc_id``, ``computed`` (1 where the token lies in a computed span of the document, else 0), and
``meta.json`` that names the tokenizer and the settings. Everything is written to a temporary folder first and
moved into place at the end, so a failure never leaves a half-written corpus or destroys an earlier one.

Nothing the tool did not write is ever deleted: ``data.prepared_dir`` must be absent, empty, or a corpus prepared
here (``meta.json``, ``train/``, ``eval/`` and what `rmt score` and `rmt eval` add), and must not be, contain or lie
inside the corpus it is made from.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rmt.config import RMTConfig
from rmt.data.readers import read_documents
from rmt.errors import DataError
from rmt.fileio import atomic_write_text, exclusive, is_orphan, remove_orphans, source_digest, source_stamp, swap_into_place, temp_prefix

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
TOKENIZE_BATCH = 256
# What a prepared corpus folder holds: `rmt prepare`'s meta and splits, `rmt score`'s scores, `rmt eval`'s set.
PREPARED_ENTRIES = {"meta.json", "train", "eval", "scores", "scored", "eval_set.json"}


def corpus_sources(cfg: RMTConfig) -> list[tuple[Path, str | None]]:
    """(path, forced split or None) of every corpus to read; None = split by data.eval_fraction."""
    if cfg.data.path is not None:
        if cfg.data.eval_path is not None:
            return [(Path(cfg.data.path), "train"), (Path(cfg.data.eval_path), "eval")]
        return [(Path(cfg.data.path), None)]
    from rmt.embedded import ensure_embedded

    arts = ensure_embedded(cfg)
    return [(Path(arts.midtrain_path), "train"), (Path(cfg.data.eval_path or arts.eval_path), "eval")]


def doc_split(doc_id: int, seed: int, eval_fraction: float) -> str:
    """Deterministic, streaming train/eval assignment of a document (independent of corpus size)."""
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return "eval" if int.from_bytes(h, "big") / 2**64 < eval_fraction else "train"


def computed_mask(offsets: list[tuple[int, int]], spans: list[list[int]]) -> list[int]:
    """1 for each token whose character range overlaps a computed span, else 0."""
    if not spans:
        return [0] * len(offsets)
    return [int(any(a < e and s < b for s, e in spans)) if b > a else 0 for a, b in offsets]


def chunk(ids: list[int], computed: list[int], seq_len: int, min_tokens: int) -> Iterator[tuple[list[int], list[int]]]:
    """Cut one document into pieces of seq_len tokens; a last piece shorter than min_tokens is dropped."""
    for start in range(0, len(ids), seq_len):
        piece = ids[start : start + seq_len]
        if len(piece) >= min_tokens:
            yield piece, computed[start : start + seq_len]


def _all_documents(cfg: RMTConfig, sources: list[tuple[Path, str | None]]) -> Iterator[dict]:
    for path, split in sources:
        for doc in read_documents(path, cfg.data.format, cfg.data.text_field, cfg.data.encoding_errors,
                                  cfg.data.document_split, cfg.data.document_chars):
            yield {**doc, "split": split}


def _tokenized_docs(cfg: RMTConfig, tokenizer, sources) -> Iterator[tuple[int, str | None, list[int], list[int]]]:
    """(doc_id, forced split, token ids, computed flags) for every non-empty document, tokenized in batches."""
    docs = _all_documents(cfg, sources)
    bos = [tokenizer.bos_token_id] if cfg.data.add_bos and tokenizer.bos_token_id is not None else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    batch: list[dict] = []
    doc_id = 0

    def flush():
        nonlocal doc_id
        texts = [d["text"] for d in batch]
        enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=tokenizer.is_fast)
        for i, d in enumerate(batch):
            ids = enc["input_ids"][i]
            flags = computed_mask(enc["offset_mapping"][i], d["computed_spans"]) if tokenizer.is_fast else [0] * len(ids)
            yield doc_id, d["split"], bos + ids + eos, [0] * len(bos) + flags + [0] * len(eos)
            doc_id += 1

    n_read = 0
    for d in docs:
        n_read += 1
        if cfg.data.max_documents is not None and n_read > cfg.data.max_documents:
            break
        if not d["text"].strip():
            continue
        batch.append(d)
        if len(batch) == TOKENIZE_BATCH:
            yield from flush()
            batch = []
    if batch:
        yield from flush()


def _rows(cfg: RMTConfig, tokenizer, sources, stats: dict) -> Iterator[dict]:
    seq_len, min_tokens, pack = cfg.data.seq_len, cfg.data.min_tokens, cfg.data.pack
    buffers = {s: ([], [], -1) for s in SPLITS}  # packing: ids, computed, first doc id
    for doc_id, forced, ids, flags in _tokenized_docs(cfg, tokenizer, sources):
        split = forced or doc_split(doc_id, cfg.data.seed, cfg.data.eval_fraction)
        stats["documents"] += 1
        stats[f"{split}_documents"] += 1
        if not pack:
            for piece, comp in chunk(ids, flags, seq_len, min_tokens):
                yield {"split": split, "doc_id": doc_id, "input_ids": piece, "computed": comp}
            continue
        buf_ids, buf_comp, first = buffers[split]
        buf_ids, buf_comp, first = buf_ids + ids, buf_comp + flags, doc_id if first < 0 else first
        while len(buf_ids) >= seq_len:
            yield {"split": split, "doc_id": first, "input_ids": buf_ids[:seq_len], "computed": buf_comp[:seq_len]}
            buf_ids, buf_comp, first = buf_ids[seq_len:], buf_comp[seq_len:], doc_id
        buffers[split] = (buf_ids, buf_comp, first)
    if pack:
        for split, (buf_ids, buf_comp, first) in buffers.items():
            if len(buf_ids) >= min_tokens:
                yield {"split": split, "doc_id": first, "input_ids": buf_ids, "computed": buf_comp}


def prepare_meta(cfg: RMTConfig, tokenizer, sources) -> dict:
    from rmt.modeling import tokenizer_fingerprint

    return {
        "source": [[str(p.resolve()), split] for p, split in sources],
        "tokenizer": tokenizer.name_or_path,
        "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer),
        "vocab_size": len(tokenizer),
        "data": cfg.data.model_dump(mode="json", exclude={"prepared_dir"} | _unused_fields(cfg, sources)),
    }


# What meta.json records of the result and of the source files, beside the settings that make the corpus.
SOURCE_RECORD = ("counts", "source_stamp", "source_digest")


def changed_sources(out: Path, old: dict, sources, stamps: list) -> list[str]:
    """The sources whose contents differ from those ``out`` was prepared from: a source whose size or modification
    time moved is read and compared by digest; one with the same bytes (copied, or written again) gets its new
    stamp recorded. A corpus prepared before sources were recorded is taken as it is."""
    if "source_digest" not in old:
        return []
    if old.get("source_stamp") == stamps:
        return []
    digests = [source_digest(p) for p, _ in sources]
    changed = [str(p) for (p, _), new, was in zip(sources, digests, old["source_digest"]) if new != was]
    if not changed:
        atomic_write_text(out / "meta.json", json.dumps({**old, "source_stamp": stamps}, indent=2))
    return changed


def _unused_fields(cfg: RMTConfig, sources) -> set[str]:
    """Settings that cannot change this corpus, left out of its identity (so that a corpus prepared before they
    existed is still up to date): how text files are cut, when no source is text."""
    from rmt.data.readers import detect_format

    if any(detect_format(Path(p), cfg.data.format) == "text" for p, _ in sources if Path(p).exists()):
        return set()
    return {"document_split", "document_chars"}


def load_meta(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"no prepared corpus in {prepared_dir} (run `rmt prepare` first)")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or "tokenizer_fingerprint" not in meta:
            raise ValueError("not the meta of a prepared corpus")
    except (ValueError, OSError) as e:
        raise DataError(
            f"{path} is damaged ({e}); run `rmt prepare` again with output.overwrite=true to rebuild the corpus"
        ) from None
    return meta


def load_split(path: str | Path, remedy: str):
    """A saved dataset folder (memory-mapped); DataError naming the folder when it is missing or damaged (a
    truncated Arrow file, a broken state.json). ``remedy`` says how to make it again."""
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise DataError(f"no dataset at {path} ({remedy})")
    try:
        return datasets.load_from_disk(str(path))
    except Exception as e:  # noqa: BLE001 - pyarrow and datasets raise many kinds; all mean a damaged folder
        raise DataError(f"{path} is damaged ({type(e).__name__}: {e}); {remedy}") from None


def _foreign_entries(folder: Path) -> list[str]:
    """Entries of a prepared corpus folder that `rmt prepare`, `rmt score` and `rmt eval` did not write."""
    return sorted(
        p.name for p in folder.iterdir()
        if p.name not in PREPARED_ENTRIES and not is_orphan(p) and not p.name.startswith(".eval_set.")
    )


def check_prepared_dir(out: Path, sources: list[tuple[Path, str | None]]) -> None:
    """Refuse a data.prepared_dir that preparing could destroy: the corpus itself, a folder inside it or holding it,
    a file, or a folder that is not a prepared corpus (before any work; nothing is changed)."""
    target = out.resolve()
    for path, _ in sources:
        src = path.resolve()
        if target == src:
            raise DataError(f"data.prepared_dir={out} is the corpus itself; choose another folder for the prepared corpus")
        if src in target.parents:
            raise DataError(f"data.prepared_dir={out} lies inside the corpus {path}; choose a folder outside it")
        if target in src.parents:
            raise DataError(
                f"the corpus {path} lies inside data.prepared_dir={out}, which preparing replaces; choose another folder"
            )
    if out.exists() and not out.is_dir():
        raise DataError(f"data.prepared_dir={out} is a file; choose a folder (nothing was changed)")
    if out.is_dir() and not (out / "meta.json").is_file():
        entries = [p.name for p in out.iterdir() if not is_orphan(p)]
        if entries:
            raise DataError(
                f"data.prepared_dir={out} exists and is not a corpus prepared by `rmt prepare` (no meta.json; it holds "
                f"{', '.join(sorted(entries)[:3])}{', ...' if len(entries) > 3 else ''}); choose another folder (nothing was changed)"
            )


def check_model_context(cfg: RMTConfig, model_dir: str | Path) -> None:
    """data.seq_len must fit the model's context: checked here, from the model's config.json when it is a local
    folder, so that a corpus no stage could use is never built (`rmt train` checks again with the loaded model)."""
    from types import SimpleNamespace

    from rmt.modeling import check_context_fits

    config_file = Path(model_dir).expanduser() / "config.json"
    if not config_file.parent.is_dir():
        return  # a hub name: its config is read when the model is loaded
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # the model's own loading reports a missing or damaged config
    if isinstance(config, dict):
        check_context_fits(cfg.data.seq_len, SimpleNamespace(**config), where=f"model {config_file.parent}")


def prepare_corpus(cfg: RMTConfig, tokenizer=None) -> Path:
    """Tokenize, chunk and split the corpus into ``data.prepared_dir``; returns that folder.

    An existing prepared corpus made with the same settings and tokenizer is reused; one made with different
    settings is kept unless ``output.overwrite`` is set (its scores would no longer match).
    """
    from rmt.modeling import check_local_path

    for what, path in (("model", cfg.model.path), ("tokenizer", cfg.model.tokenizer)):
        if path is not None:
            check_local_path(path, what)  # at once, before the libraries load
    if cfg.model.path is not None:
        check_model_context(cfg, cfg.model.path)

    out = Path(cfg.data.prepared_dir)
    # Before the embedded default's material is built: the folder, and the corpus files the user named.
    check_prepared_dir(out, [(Path(p), None) for p in (cfg.data.path, cfg.data.eval_path) if p is not None])
    sources = corpus_sources(cfg)
    for path, _ in sources:
        if not path.exists():
            raise DataError(f"corpus not found: {path}")
    check_prepared_dir(out, sources)
    with corpus_lock(out):  # runs sharing the folder (seeds launched side by side) prepare it once
        return _prepare(cfg, out, sources, tokenizer)


def corpus_lock(prepared_dir: str | Path):
    """The lock that preparing and scoring ``prepared_dir`` hold: a file beside the folder (preparing replaces the
    folder itself), so that runs sharing a corpus build it once and never replace it under one another."""
    out = Path(prepared_dir)
    return exclusive(out.parent / f".{out.name}.lock", f"preparing or scoring {out}")


def _prepare(cfg: RMTConfig, out: Path, sources, tokenizer) -> Path:
    import datasets

    from rmt.embedded import resolve_tokenizer_path
    from rmt.modeling import load_tokenizer

    source = sources[0][0] if len(sources) == 1 else " + ".join(str(p) for p, _ in sources)
    if tokenizer is None:
        tokenizer = load_tokenizer(resolve_tokenizer_path(cfg), cfg.model.trust_remote_code)
    if cfg.model.path is None:  # the embedded base model, built by now
        from rmt.embedded import resolve_model_path

        check_model_context(cfg, resolve_model_path(cfg))
    meta = prepare_meta(cfg, tokenizer, sources)
    stamps = [source_stamp(p) for p, _ in sources]  # before reading: a change made while preparing shows next time
    if (out / "meta.json").is_file():
        try:
            old = load_meta(out)
        except DataError:
            if not cfg.output.overwrite:
                raise
            old = {}
        if {k: v for k, v in old.items() if k not in SOURCE_RECORD} == meta:
            changed = changed_sources(out, old, sources, stamps)
            if not changed:
                log.info("prepared corpus in %s is up to date; reusing it", out)
                return out
            if not cfg.output.overwrite:
                raise DataError(
                    f"{', '.join(changed)} changed since the corpus in {out} was prepared from it; set "
                    "output.overwrite=true to prepare it again, or choose another data.prepared_dir"
                )
        elif not cfg.output.overwrite:
            raise DataError(
                f"{out} holds a corpus prepared with other settings or another tokenizer; "
                "choose another data.prepared_dir or set output.overwrite=true to replace it"
            )
        foreign = _foreign_entries(out)
        if foreign:
            raise DataError(
                f"{out} holds files `rmt prepare` did not write ({', '.join(foreign[:5])}); move them out of the way "
                "before replacing the corpus (nothing was changed)"
            )

    out.parent.mkdir(parents=True, exist_ok=True)
    remove_orphans(out.parent, out.name)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(out.name), dir=out.parent))
    try:
        stats = {"documents": 0, "train_documents": 0, "eval_documents": 0}
        features = datasets.Features(
            {
                "split": datasets.Value("string"),
                "doc_id": datasets.Value("int64"),
                "input_ids": datasets.Sequence(datasets.Value("int32")),
                "computed": datasets.Sequence(datasets.Value("int8")),
            }
        )
        rows = _build_rows(cfg, tokenizer, sources, stats, features, tmp / "cache")
        if stats["documents"] == 0:
            raise DataError(f"corpus {source} is empty: no document with any text")
        if rows is None or len(rows) == 0:
            raise DataError(
                f"corpus {source}: all {stats['documents']} documents are shorter than data.min_tokens="
                f"{cfg.data.min_tokens} tokens"
            )
        counts = {}
        for split in SPLITS:
            part = rows.filter(lambda s, split=split: s == split, input_columns="split").remove_columns("split")
            part.save_to_disk(str(tmp / split))
            counts[split] = {"sequences": len(part), "documents": stats[f"{split}_documents"]}
            counts[split]["tokens"] = int(sum(len(x) for x in part.with_format("numpy")["input_ids"])) if len(part) else 0
        if counts["train"]["sequences"] == 0:
            raise DataError(f"corpus {source}: the training split is empty (lower data.eval_fraction)")
        if counts["eval"]["sequences"] == 0 and (cfg.data.eval_fraction > 0 or cfg.data.eval_path is not None):
            raise DataError(empty_eval_message(cfg, source, stats))
        del rows
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        digests = [source_digest(p) for p, _ in sources]
        (tmp / "meta.json").write_text(json.dumps({**meta, "counts": counts, "source_stamp": stamps, "source_digest": digests}, indent=2))
        _replace_dir(tmp, out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.filename is None:  # a full disk: say where
            raise OSError(e.errno, e.strerror or str(e), str(out)) from None
        raise
    log.info("prepared %s: %s", out, counts)
    return out


def empty_eval_message(cfg: RMTConfig, source, stats: dict) -> str:
    """Why the eval split came out empty, and the ways to fill it (an empty eval split is an error: `rmt eval`
    would have nothing to judge; data.eval_fraction=0 asks for none)."""
    if cfg.data.eval_path is not None:
        return (f"the eval corpus {cfg.data.eval_path} gave no sequence: its {stats['eval_documents']} documents are "
                f"empty or shorter than data.min_tokens={cfg.data.min_tokens} tokens")
    n = stats["documents"]
    why = (f"corpus {source}: the eval split is empty: data.eval_fraction={cfg.data.eval_fraction:g} of {n} "
           f"document{'s' if n != 1 else ''} put {stats['eval_documents']} in it"
           + (" (shorter than data.min_tokens)" if stats["eval_documents"] else "") + ". ")
    ways = []
    if n < 20:
        ways.append("give more documents: a text file is cut into documents at blank lines by default "
                    "(data.document_split=blank_lines, documents of up to data.document_chars characters); "
                    "data.document_split=size cuts text without blank lines, and a smaller data.document_chars makes more documents")
    ways.append("raise data.eval_fraction")
    ways.append("give a separate held-out corpus with data.eval_path")
    return why + "To fill it: " + "; or ".join(ways) + ". To prepare without an eval split, set data.eval_fraction=0."


def _build_rows(cfg: RMTConfig, tokenizer, sources, stats: dict, features, cache_dir: Path):
    """All chunks of the corpus as one Arrow dataset on disk; None when the corpus yields no chunk."""
    import datasets

    try:
        return datasets.Dataset.from_generator(
            _generate_rows,
            gen_kwargs={"cfg_json": cfg.model_dump_json(), "tokenizer": tokenizer, "sources": [[str(p), s] for p, s in sources], "stats": stats},
            features=features,
            cache_dir=str(cache_dir),
        )
    except datasets.exceptions.DatasetGenerationError as e:
        cause = e.__cause__ or e.__context__
        while cause is not None and not isinstance(cause, DataError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            raise cause from None
        raise
    except ValueError as e:
        if "corresponds to no data" in str(e):  # the generator yielded nothing
            return None
        raise


def _generate_rows(cfg_json: str, tokenizer, sources: list, stats: dict):
    """Generator for Dataset.from_generator (arguments must be picklable/hashable for the datasets cache)."""
    cfg = RMTConfig.model_validate_json(cfg_json)
    yield from _rows(cfg, tokenizer, [(Path(p), s) for p, s in sources], stats)


def _replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing target (a prepared corpus, checked above) is swapped out first and
    only deleted afterwards."""
    new.chmod(0o755)  # mkdtemp makes it private; a corpus is ordinary files
    swap_into_place(new, target)
