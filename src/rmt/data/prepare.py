"""`rmt prepare`: tokenize a corpus into sequences with a seeded train/eval split by document.

Output (``data.prepared_dir``): ``train/`` and ``eval/`` Hugging Face datasets (memory-mapped Arrow) with columns
``input_ids``, ``doc_id``, ``computed`` (1 where the token lies in a computed span of the document, else 0), and
``meta.json`` that names the tokenizer and the settings. Everything is written to a temporary folder first and
moved into place at the end, so a failure never leaves a half-written corpus or destroys an earlier one.
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

log = logging.getLogger(__name__)

SPLITS = ("train", "eval")
TOKENIZE_BATCH = 256


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
        for doc in read_documents(path, cfg.data.format, cfg.data.text_field, cfg.data.encoding_errors):
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
        "data": cfg.data.model_dump(mode="json", exclude={"prepared_dir"}),
    }


def load_meta(prepared_dir: str | Path) -> dict:
    path = Path(prepared_dir) / "meta.json"
    if not path.is_file():
        raise DataError(f"no prepared corpus in {prepared_dir} (run `rmt prepare` first)")
    return json.loads(path.read_text())


def prepare_corpus(cfg: RMTConfig, tokenizer=None) -> Path:
    """Tokenize, chunk and split the corpus into ``data.prepared_dir``; returns that folder.

    An existing prepared corpus made with the same settings and tokenizer is reused; one made with different
    settings is kept unless ``output.overwrite`` is set (its scores would no longer match).
    """
    import datasets

    from rmt.embedded import resolve_tokenizer_path
    from rmt.modeling import load_tokenizer

    sources = corpus_sources(cfg)
    for path, _ in sources:
        if not path.exists():
            raise DataError(f"corpus not found: {path}")
    source = sources[0][0] if len(sources) == 1 else " + ".join(str(p) for p, _ in sources)
    if tokenizer is None:
        tokenizer = load_tokenizer(resolve_tokenizer_path(cfg), cfg.model.trust_remote_code)
    out = Path(cfg.data.prepared_dir)
    meta = prepare_meta(cfg, tokenizer, sources)
    if (out / "meta.json").is_file():
        old = load_meta(out)
        if {k: v for k, v in old.items() if k != "counts"} == meta:
            log.info("prepared corpus in %s is up to date; reusing it", out)
            return out
        if not cfg.output.overwrite:
            raise DataError(
                f"{out} holds a corpus prepared with other settings or another tokenizer; "
                "choose another data.prepared_dir or set output.overwrite=true to replace it"
            )

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
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
        del rows
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        (tmp / "meta.json").write_text(json.dumps({**meta, "counts": counts}, indent=2))
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("prepared %s: %s", out, counts)
    if counts["eval"]["sequences"] == 0 and cfg.data.eval_fraction > 0:
        log.warning("the eval split is empty (%d documents); evaluation needs more documents", stats["documents"])
    return out


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
    """Move ``new`` to ``target``; an existing target is swapped out first and only deleted afterwards."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{new.name[-8:]}")
        target.rename(old)
    new.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
