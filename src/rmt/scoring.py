"""`rmt score`: entropy of every position under a reference model, and the tiers (SPEC section 2, step 1).

For position ``pos`` of a sequence (predicting token ``ids[pos]`` from ``ids[:pos]``) the entropy is
H_pos = -sum_v p(v | ids[:pos]) log p(v | ids[:pos]) in nats, over the full vocabulary (RMT) or over the
renormalised top-k probabilities (RPT). Position 0 has no prefix: its entropy is NaN and its tier ntp_only.
Positions with fewer than ``scoring.min_context`` tokens before them are ntp_only too: their entropy is high for
want of context (the start of a chunk cut from a longer document has none of the document's earlier text), not
because reasoning could win there. They are left out of the quantile boundaries and the entropy histogram, and the
summary counts how many positions of each tier they would have filled.

Scores are written shard by shard (``scores/<split>/shard-NNNNN``, each moved into place only when complete),
so an interrupted run resumes at the first missing shard (a damaged one is scored again). When every shard exists,
the tiers are computed and the scored corpus ``scored/<split>`` (input_ids, computed, entropy, tier) is written for
the trainer and evaluation, together with ``scores/summary.json`` (thresholds, tier counts, entropy histogram).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from rmt.config import RMTConfig, ScoringConfig
from rmt.errors import DataError, ModelError
from rmt.fileio import atomic_write_text, read_json_object, remove_orphans, swap_into_place, temp_prefix
from rmt.tiers import EASY, HARD, MEDIUM, NTP_ONLY, RL_TIERS, TIER_NAMES

log = logging.getLogger(__name__)

HIST_BIN = 0.25  # nats per histogram bin


# --- pure functions -------------------------------------------------------------------------------------------


def entropy_from_logits(logits: torch.Tensor, mode: str = "full", top_k: int = 16) -> torch.Tensor:
    """Entropy in nats of the softmax over the last dimension, computed in float32.

    mode="topk": RPT's variant, the entropy of the top-k probabilities renormalised to sum to 1.
    """
    logits = logits.float()
    if mode == "topk":
        logits = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values
    logp = torch.log_softmax(logits, dim=-1)
    # In place: one chunk x vocab temporary instead of three (memory and page-zeroing time).
    return logp.exp().mul_(logp).sum(-1).neg_()


def fused_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy in nats of the softmax over the last dimension (float32), as reductions over the logits alone.

    With z = logits - max(logits), s = sum e^z and t = sum e^z z: H = -sum p log p = log s - t / s. Eagerly that
    is three chunk-sized temporaries; under torch.compile one loop per row that reads each logit twice (the max,
    then both sums) and writes nothing of vocabulary size. Both terms are >= 0 (z <= 0), so nothing cancels.
    """
    z = logits.float()
    z = z - z.amax(dim=-1, keepdim=True)
    e = z.exp()
    s = e.sum(dim=-1)
    return s.log() - (e * z).sum(dim=-1) / s


COMPILE_MIN_LOGITS = 1e10  # scoring.compile=auto compiles from this many logits (positions x vocabulary) on


def compile_pays(mode: str, logits_to_score: float) -> bool:
    """Should this scoring run compile the entropy? ``mode`` is scoring.compile.

    Compiling costs ~5-25 s once per process (less with torch's on-disk cache) and saves ~2-5 ns per logit on a CPU
    core (docs/benchmarks.md, section 1): from ~1e10 logits on (66k positions at vocab 151,936) it pays.
    """
    if mode not in ("auto", "always", "never"):
        raise ValueError(f"scoring.compile must be auto, always or never, got {mode!r}")
    return mode == "always" or (mode == "auto" and logits_to_score >= COMPILE_MIN_LOGITS)


def assign_tiers(entropy: np.ndarray, eligible: np.ndarray, thresholds: tuple[float, float, float],
                 min_context: int = 1) -> np.ndarray:
    """Tier of each position of one sequence: ntp_only below thresholds[0], not eligible, or before
    ``min_context``; then easy / medium / hard.

    easy = [t0, t1), medium = [t1, t2), hard = [t2, inf). NaN entropy (position 0) is ntp_only.
    """
    t0, t1, t2 = thresholds
    entropy = np.asarray(entropy, dtype=np.float64)
    tiers = np.full(entropy.shape, NTP_ONLY, dtype=np.int8)
    ok = np.asarray(eligible, dtype=bool) & np.isfinite(entropy) & (np.arange(entropy.shape[-1]) >= min_context)
    tiers[ok & (entropy >= t0) & (entropy < t1)] = EASY
    tiers[ok & (entropy >= t1) & (entropy < t2)] = MEDIUM
    tiers[ok & (entropy >= t2)] = HARD
    return tiers


def eligible_token_table(tokenizer, vocab_size: int) -> np.ndarray:
    """Per token id: may this token be an RL target? Special tokens and whitespace-only tokens may not."""
    table = np.ones(vocab_size, dtype=bool)
    special = set(tokenizer.all_special_ids)
    for tid in range(min(vocab_size, len(tokenizer))):
        if tid in special or not tokenizer.decode([tid]).strip():
            table[tid] = False
    table[len(tokenizer) :] = False  # padding rows of the embedding matrix
    return table


# --- the model side -------------------------------------------------------------------------------------------


class _CompiledEntropy:
    """``fused_entropy`` under torch.compile, compiled on first use (once per device and dtype, and once more when
    the number of rows first changes, after which rows are a dynamic size). Where compiling fails, it warns once
    and returns None for the rest of the process: the caller then runs the eager passes."""

    def __init__(self) -> None:
        self.fn = None
        self.failed = False

    def __call__(self, logits: torch.Tensor) -> torch.Tensor | None:
        if self.failed:
            return None
        try:
            if self.fn is None:
                self.fn = torch.compile(fused_entropy)
            return self.fn(logits)
        except Exception as exc:  # no C++ compiler, no Triton, an unsupported platform: torch raises many kinds
            self.failed = True
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            log.warning("torch.compile of the entropy failed, scoring runs without it: %s", reason)
            return None


_compiled_entropy = _CompiledEntropy()


def _head_logits(head, hidden: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """The output head's logits of ``hidden`` (rows x hidden) written into ``out`` (rows x vocab, the head's dtype).

    A plain linear head runs as one matrix product into ``out`` (the same product ``head(hidden)`` runs, so the
    same bits); any other head module is called and its result copied.
    """
    if isinstance(head, torch.nn.Linear):
        if head.bias is None:
            return torch.matmul(hidden, head.weight.T, out=out)
        return torch.addmm(head.bias, hidden, head.weight.T, out=out)
    return out.copy_(head(hidden))


@torch.inference_mode()
def score_batch(model, sequences: list[list[int]], pad_id: int, scfg: ScoringConfig, compiled: bool = False) -> list[np.ndarray]:
    """Entropy per position for a batch of token sequences; memory bounded by chunk_positions x vocab.

    The decoder runs once over the (right-padded) batch; the output head and the entropy run over chunks of valid
    positions, so the full batch x length x vocabulary logits never exist at once. The chunks reuse buffers
    allocated once per call: a fresh chunk-sized tensor per chunk would cost the kernel's mapping and zeroing of
    its pages every time (docs/benchmarks.md, section 1). ``compiled`` (full entropy only): the entropy is
    ``fused_entropy`` under torch.compile, one chunk buffer (the head's output); otherwise the eager passes,
    log-softmax then sum p log p, in two fp32 chunk buffers (and one more in the head's dtype when not fp32).
    """
    device = next(model.parameters()).device
    lengths = [len(s) for s in sequences]
    width = max(lengths)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    ids, mask = ids.to(device), mask.to(device)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
    head = model.get_output_embeddings()
    # hidden[:, p] predicts token p + 1: keep the hidden states of positions 0 .. len-2 of each sequence.
    predict_mask = mask.clone()
    predict_mask[torch.arange(len(sequences)), torch.tensor(lengths, device=device) - 1] = 0
    flat = hidden[predict_mask.bool()]
    out = torch.empty(flat.shape[0], dtype=torch.float32, device=device)
    rows = max(1, min(scfg.chunk_positions, flat.shape[0]))
    head_buf = torch.empty((rows, int(head.weight.shape[0])), dtype=flat.dtype, device=device)
    eager_bufs = None  # (fp32 logits, fp32 work): made when the eager passes first run
    compiled = compiled and scfg.entropy == "full"
    for start in range(0, flat.shape[0], rows):
        k = min(rows, flat.shape[0] - start)
        logits = _head_logits(head, flat[start : start + k], head_buf[:k])
        ent = _compiled_entropy(logits) if compiled else None
        if ent is None:
            if eager_bufs is None:
                logits_buf = head_buf if head_buf.dtype == torch.float32 else torch.empty_like(head_buf, dtype=torch.float32)
                eager_bufs = logits_buf, torch.empty_like(logits_buf) if scfg.entropy == "full" else None
            ent = _eager_entropy(logits, eager_bufs[0][:k], None if eager_bufs[1] is None else eager_bufs[1][:k], scfg)
        out[start : start + k] = ent
    out = out.cpu().numpy()
    result, offset = [], 0
    for n in lengths:
        ent = np.full(n, np.nan, dtype=np.float32)
        ent[1:] = out[offset : offset + n - 1]
        offset += n - 1
        result.append(ent)
    return result


def _eager_entropy(logits: torch.Tensor, logits_buf: torch.Tensor, work_buf: torch.Tensor | None, scfg: ScoringConfig):
    """``entropy_from_logits`` (the same bits) inside preallocated fp32 buffers; ``logits`` may be ``logits_buf``."""
    if logits.data_ptr() != logits_buf.data_ptr():
        logits = logits_buf.copy_(logits)
    if scfg.entropy != "full":
        return entropy_from_logits(logits, scfg.entropy, scfg.top_k)
    logp = torch.log_softmax(logits, dim=-1, out=work_buf)
    return torch.exp(logp, out=logits).mul_(logp).sum(-1).neg_()


def _scorer_identity(cfg: RMTConfig, ref_path: str, prep_meta: dict) -> dict:
    return {
        "reference_model": ref_path,
        "entropy": cfg.scoring.entropy,
        "top_k": cfg.scoring.top_k if cfg.scoring.entropy == "topk" else None,
        "shard_sequences": cfg.scoring.shard_sequences,
        "corpus": prep_meta["tokenizer_fingerprint"],
        "data": prep_meta["data"],
    }


def _score_split(model, split_ds, out_dir: Path, cfg: RMTConfig, pad_id: int, split: str, rank: int, world: int):
    import datasets
    from tqdm.auto import tqdm

    scfg = cfg.scoring
    n = len(split_ds)
    n_shards = math.ceil(n / scfg.shard_sequences)
    todo = [
        i
        for i in range(n_shards)
        if i % world == rank
        and not _complete_shard(out_dir / f"shard-{i:05d}", min(scfg.shard_sequences, n - i * scfg.shard_sequences))
    ]
    if not todo:
        return
    remaining_tokens = sum(
        int(sum(len(x) for x in split_ds[i * scfg.shard_sequences : (i + 1) * scfg.shard_sequences]["input_ids"]))
        for i in todo
    )
    vocab = int(model.get_output_embeddings().weight.shape[0])
    compiled = scfg.entropy == "full" and compile_pays(scfg.compile, remaining_tokens * vocab)
    bar = tqdm(total=remaining_tokens, desc=f"score {split}", unit="tok", unit_scale=True, disable=rank != 0)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_orphans(out_dir)  # shards whose writer was killed
    for shard in todo:
        rows = split_ds[shard * scfg.shard_sequences : (shard + 1) * scfg.shard_sequences]["input_ids"]
        # Longest first within a shard keeps padding low; the order is restored when writing.
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
        entropies: list = [None] * len(rows)
        for b in range(0, len(order), scfg.batch_size):
            idx = order[b : b + scfg.batch_size]
            for i, ent in zip(idx, score_batch(model, [rows[i] for i in idx], pad_id, scfg, compiled)):
                entropies[i] = ent
            bar.update(sum(len(rows[i]) for i in idx))
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(f"shard-{shard:05d}"), dir=out_dir))
        datasets.Dataset.from_dict(
            {"entropy": [e.tolist() for e in entropies]},
            features=datasets.Features({"entropy": datasets.Sequence(datasets.Value("float32"))}),
        ).save_to_disk(str(tmp / "data"))
        tmp.rename(out_dir / f"shard-{shard:05d}")  # atomic: a shard is either complete or absent
    bar.close()


def _complete_shard(path: Path, rows: int) -> bool:
    """Whether the score shard ``path`` is there and loads with its ``rows`` rows. A damaged one (a full disk or a
    copy cut short: its writer moves only complete shards into place) is removed with a warning, to be scored again."""
    from rmt.data.prepare import load_split

    if not path.is_dir():
        return False
    try:
        found = len(load_split(path / "data", "scoring it again"))
        problem = f"score shard {path} is damaged ({found} rows for {rows} sequences); scoring it again"
    except DataError as e:
        found, problem = None, str(e)
    if found == rows:
        return True
    log.warning("%s", problem)
    shutil.rmtree(path)
    return False


def score_corpus(cfg: RMTConfig, model=None, tokenizer=None) -> dict:
    """Score ``data.prepared_dir`` (resuming), then tier it; returns the summary that is also saved as JSON."""
    from accelerate import PartialState

    from rmt.data.prepare import corpus_lock, load_meta
    from rmt.embedded import resolve_model_path, resolve_tokenizer_path
    from rmt.modeling import check_tokenizer_matches_model, load_model, load_tokenizer, tokenizer_fingerprint

    from rmt.modeling import check_model_paths

    if model is None:
        check_model_paths(cfg, ("scoring.reference_model", cfg.scoring.reference_model))
    prepared = Path(cfg.data.prepared_dir)
    prep_meta = load_meta(prepared)
    state = PartialState(cpu=not torch.cuda.is_available())
    ref_path = cfg.scoring.reference_model or (resolve_model_path(cfg) if model is None else "<given>")
    if tokenizer is None:
        tokenizer = load_tokenizer(resolve_tokenizer_path(cfg), cfg.model.trust_remote_code)
    if tokenizer_fingerprint(tokenizer) != prep_meta["tokenizer_fingerprint"]:
        raise ModelError(
            f"the corpus in {prepared} was tokenized with another tokenizer ({prep_meta['tokenizer']}); "
            "run `rmt prepare` again with this model's tokenizer"
        )
    if model is None:
        model = load_model(ref_path, cfg, state.device)
    model.eval()
    check_tokenizer_matches_model(tokenizer, model, where=f"reference model {ref_path}")

    # One job at a time scores and tiers a corpus; the processes of one job share the main process' hold.
    with corpus_lock(prepared) if state.is_main_process else contextlib.nullcontext():
        return _score_and_tier(cfg, prepared, prep_meta, state, model, tokenizer, ref_path)


def _score_and_tier(cfg: RMTConfig, prepared: Path, prep_meta: dict, state, model, tokenizer, ref_path) -> dict:
    from rmt.data.prepare import load_split

    scores_dir = prepared / "scores"
    identity = _scorer_identity(cfg, ref_path, prep_meta)
    id_path = scores_dir / "scorer.json"
    if state.is_main_process:
        recorded = _recorded_scorer(scores_dir, identity)
        if recorded is not None and recorded != identity:
            if not cfg.output.overwrite:
                what = "from another reference model or setting" if recorded else f"of an unknown scorer ({id_path} is damaged)"
                raise DataError(f"{scores_dir} holds scores {what}; set output.overwrite=true to score again from scratch")
            shutil.rmtree(scores_dir)
        scores_dir.mkdir(parents=True, exist_ok=True)
        if recorded != identity:
            atomic_write_text(id_path, json.dumps(identity, indent=2))
    state.wait_for_everyone()

    vocab = int(model.get_output_embeddings().weight.shape[0])
    remedy = f"delete {prepared} and run `rmt prepare` and `rmt score` again"
    splits = {s: load_split(prepared / s, remedy) for s in ("train", "eval")}
    for split, ds in splits.items():
        max_id = max((max(ids) for batch in ds.iter(batch_size=4096) for ids in batch["input_ids"]), default=-1)
        if max_id >= vocab:
            raise ModelError(f"corpus split {split} holds token id {max_id} but the reference model has {vocab} rows")
        _score_split(model, ds, scores_dir / split, cfg, tokenizer.pad_token_id or 0, split, state.process_index, state.num_processes)
    state.wait_for_everyone()
    if not state.is_main_process:
        return {}
    tiering = {"scorer": identity, "scoring": cfg.scoring.model_dump(mode="json"), "seed": cfg.data.seed,
               "eval_per_tier": cfg.eval.positions_per_tier}
    summary = _tiered_summary(prepared, tiering)
    if summary is not None:
        log.info("the scored corpus in %s is up to date; reusing its tiers", prepared)
        return summary
    return write_tiers(cfg, tokenizer, vocab, splits, tiering)


TIERS_FILE = "tiers.json"  # in scores/: the settings the scored splits were tiered with, written last


def _recorded_scorer(scores_dir: Path, identity: dict) -> dict | None:
    """The scorer identity in scores/scorer.json; None when there is none. A damaged file (cut short by a kill or a
    full disk) counts as none when no shard depends on it or tiers.json, written after the last shard, names this
    scorer; otherwise it is ``{}``: the shards' scorer is unknown."""
    id_path = scores_dir / "scorer.json"
    if not id_path.is_file():
        return None
    recorded = read_json_object(id_path)
    if recorded is not None:
        return recorded
    vouched = (read_json_object(scores_dir / TIERS_FILE) or {}).get("scorer") == identity
    if vouched or not any(scores_dir.glob("*/shard-*")):
        log.warning("%s is damaged; no scores of another scorer depend on it, so it is written again", id_path)
        return None
    return {}


def _tiered_summary(prepared: Path, tiering: dict) -> dict | None:
    """The summary of the scored splits when they were tiered from these scores with these settings and load;
    None when they must be written (again)."""
    scores = prepared / "scores"
    try:
        if json.loads((scores / TIERS_FILE).read_text()) != tiering:
            return None
        summary = json.loads((scores / "summary.json").read_text())
        for split in ("train", "eval"):
            load_scored(prepared, split)
    except (OSError, ValueError, DataError):
        return None
    return summary


FINE_BIN = 1e-3  # nats: resolution of the quantile boundaries (a histogram scales to any corpus size)


def _with_entropies(prepared: Path, split: str, ds):
    """The prepared split with its ``entropy`` column joined from the score shards."""
    import datasets

    from rmt.data.prepare import load_split

    shard_dir = prepared / "scores" / split
    shards = sorted(p for p in shard_dir.glob("shard-*") if p.is_dir()) if shard_dir.exists() else []
    if len(ds) == 0:
        return ds.add_column("entropy", [])
    remedy = "run `rmt score` again to score it again"
    ent = datasets.concatenate_datasets([load_split(p / "data", remedy) for p in shards]) if shards else None
    if ent is None or len(ent) != len(ds):
        raise DataError(f"{shard_dir}: {0 if ent is None else len(ent)} scored rows for {len(ds)} sequences (incomplete scoring)")
    return datasets.concatenate_datasets([ds, ent], axis=1)


def _eligible_entropies(ids, ent, table: np.ndarray, min_context: int) -> np.ndarray:
    """The entropies of one sequence's RL-eligible positions (eligible token, finite entropy, pos >= min_context)."""
    e = np.asarray(ent, dtype=np.float64)
    keep = table[np.asarray(ids)] & np.isfinite(e)
    keep[:min_context] = False
    return e[keep]


def _eligible_histogram(ds, table: np.ndarray, max_value: float, min_context: int) -> np.ndarray:
    """Counts of RL-eligible entropies in FINE_BIN bins, one batch at a time."""
    counts = np.zeros(int(max_value / FINE_BIN) + 2, dtype=np.int64)
    for batch in ds.iter(batch_size=1024):
        for ids, ent in zip(batch["input_ids"], batch["entropy"]):
            e = _eligible_entropies(ids, ent, table, min_context)
            np.add.at(counts, np.clip((e / FINE_BIN).astype(np.int64), 0, len(counts) - 1), 1)
    return counts


QUANTILE_SAMPLE = 2_000_000  # eligible entropies kept for the quantile boundaries (all of them in smaller corpora)


def _entropy_sample(ds, table: np.ndarray, min_context: int, seed: int = 0) -> np.ndarray:
    """The eligible entropies of a split, uniformly subsampled to at most ~QUANTILE_SAMPLE values."""
    total = sum(len(ids) for batch in ds.select_columns(["input_ids"]).iter(batch_size=4096) for ids in batch["input_ids"])
    rate = min(1.0, QUANTILE_SAMPLE / max(1, total))
    rng = np.random.default_rng(seed)
    kept = []
    for batch in ds.iter(batch_size=1024):
        for ids, ent in zip(batch["input_ids"], batch["entropy"]):
            e = _eligible_entropies(ids, ent, table, min_context)
            kept.append(e if rate == 1.0 else e[rng.random(e.size) < rate])
    return np.concatenate(kept) if kept else np.zeros(0)


def quantile_thresholds(values: np.ndarray, quantiles) -> tuple[float, float, float]:
    """Tier boundaries at quantiles of the eligible entropies; strictly increasing even when values tie."""
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        raise DataError("no eligible positions to compute quantile tier boundaries from")
    t = np.quantile(values, quantiles)
    t = np.maximum.accumulate(t + np.arange(3) * 1e-9)
    return float(t[0]), float(t[1]), float(t[2])


def write_tiers(cfg: RMTConfig, tokenizer, vocab: int, splits: dict, tiering: dict) -> dict:
    """Tier every position (the eval split with the boundaries fitted on train) and write scored/<split>, then the
    summary, then ``tiering`` (the settings, in scores/tiers.json) that lets a later call reuse them."""
    import datasets

    prepared = Path(cfg.data.prepared_dir)
    (prepared / "scores" / TIERS_FILE).unlink(missing_ok=True)
    table = eligible_token_table(tokenizer, vocab)
    joined = {s: _with_entropies(prepared, s, ds) for s, ds in splits.items()}
    max_h = math.log(max(2, vocab))
    min_context = cfg.scoring.min_context
    fine = _eligible_histogram(joined["train"], table, max_h, min_context)
    if cfg.scoring.tier_rule == "quantile":
        sample = _entropy_sample(joined["train"], table, min_context, cfg.data.seed)
        thresholds = quantile_thresholds(sample, cfg.scoring.quantiles)
    else:
        thresholds = tuple(cfg.scoring.thresholds)

    def add_tiers(batch):
        batch["tier"] = [
            assign_tiers(np.asarray(e, dtype=np.float64), table[np.asarray(ids)], thresholds, min_context)
            for ids, e in zip(batch["input_ids"], batch["entropy"])
        ]
        return batch

    summary = {"thresholds": list(thresholds), "tier_rule": cfg.scoring.tier_rule, "min_context": min_context,
               "splits": {}, "excluded_by_min_context": {}}
    features = None
    for split, ds in joined.items():
        features = datasets.Features({**ds.features, "tier": datasets.Sequence(datasets.Value("int8"))})
        scored = ds.map(add_tiers, batched=True, batch_size=1024, features=features, desc=f"tiers {split}")
        counts, excluded = np.zeros(4, dtype=np.int64), np.zeros(4, dtype=np.int64)
        for batch in scored.iter(batch_size=4096):
            for ids, e, t in zip(batch["input_ids"], batch["entropy"], batch["tier"]):
                counts += np.bincount(np.asarray(t, dtype=np.int64), minlength=4)
                # the tiers the first positions would have had without min_context
                head = assign_tiers(np.asarray(e[:min_context], dtype=np.float64), table[np.asarray(ids[:min_context])], thresholds)
                excluded += np.bincount(head.astype(np.int64), minlength=4)
        summary["splits"][split] = {TIER_NAMES[i]: int(counts[i]) for i in range(4)}
        summary["excluded_by_min_context"][split] = {TIER_NAMES[i]: int(excluded[i]) for i in RL_TIERS}
        target = prepared / "scored" / split
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_orphans(target.parent, split)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(split), dir=target.parent))
        scored.save_to_disk(str(tmp / "data"))
        swap_into_place(tmp / "data", target)
        shutil.rmtree(tmp, ignore_errors=True)
    coarse = int(round(HIST_BIN / FINE_BIN))
    n_coarse = int(math.ceil(len(fine) / coarse))
    hist_counts = np.pad(fine, (0, n_coarse * coarse - len(fine))).reshape(n_coarse, coarse).sum(1)
    summary["histogram"] = {
        "bin_edges": [round(i * HIST_BIN, 4) for i in range(n_coarse + 1)],
        "counts": hist_counts.tolist(),
    }
    summary["eligible_train_positions"] = int(fine.sum())
    from rmt.tier_sanity import sanity_report

    summary["sanity"] = sanity_report(
        load_scored(prepared, "train"), summary["splits"]["train"],
        summary["splits"].get("eval"), tokenizer, vocab, tier_rule=cfg.scoring.tier_rule, thresholds=thresholds,
        fine=fine, fine_bin=FINE_BIN, eval_per_tier=cfg.eval.positions_per_tier, seed=cfg.data.seed,
    )
    atomic_write_text(prepared / "scores" / "summary.json", json.dumps(summary, indent=2))
    atomic_write_text(prepared / "scores" / TIERS_FILE, json.dumps(tiering, indent=2))
    return summary


def load_scored(prepared_dir: str | Path, split: str):
    """The scored corpus of a split (input_ids, computed, entropy, tier), memory-mapped."""
    from rmt.data.prepare import load_split

    path = Path(prepared_dir) / "scored" / split
    if not path.is_dir():
        raise DataError(f"no scored corpus at {path} (run `rmt score` first)")
    return load_split(path, "run `rmt score` again to rebuild it")


def format_summary(summary: dict) -> str:
    """A short human table of tier counts and the entropy histogram."""
    lines = [f"tier boundaries ({summary['tier_rule']}): " + ", ".join(f"{t:.3f}" for t in summary["thresholds"]) + " nats"]
    for split, counts in summary["splits"].items():
        total = sum(counts.values()) or 1
        parts = ", ".join(f"{k} {v} ({100 * v / total:.1f}%)" for k, v in counts.items())
        lines.append(f"{split}: {parts}")
    for split, excluded in summary.get("excluded_by_min_context", {}).items():
        parts = ", ".join(f"{k} {v}" for k, v in excluded.items())
        lines.append(
            f"{split}: min_context {summary['min_context']} kept {sum(excluded.values())} positions out of the RL tiers "
            f"(counted as ntp_only above; they would have been {parts})"
        )
    sanity = summary.get("sanity")
    if sanity:
        from rmt.tier_sanity import format_contents

        lines += format_contents(sanity)
    hist = summary["histogram"]
    peak = max(hist["counts"]) or 1
    lines.append("entropy histogram of RL-eligible train positions (nats):")
    nonzero = [i for i, c in enumerate(hist["counts"]) if c] or [0]
    for i in range(nonzero[0], nonzero[-1] + 1):
        c = hist["counts"][i]
        lines.append(f"  [{hist['bin_edges'][i]:5.2f}, {hist['bin_edges'][i + 1]:5.2f})  {c:8d} {'#' * round(40 * c / peak)}")
    lines += [f"warning: {w}" for w in (sanity or {}).get("warnings", [])]
    return "\n".join(lines)
