"""What ``scoring.min_context`` removes, and why: entropy for want of context at the start of a sequence.

The embedded default's mid-training split is prepared twice and scored with min_context = 1: as whole documents
(``data.seq_len=128``: one sequence per document, the demo's setting) and cut into chunks (``data.seq_len=32``:
a document's second and later chunks start in the middle of it, with none of its earlier text). Two tables:

1. The entropy excess at position p of a continuation chunk: the entropy of a token scored in its chunk, minus the
   entropy of the same token scored with the whole document before it. This is entropy that context, not
   reasoning, removes.
2. For min_context in (4, 8, 12, 16): how many RL-tier positions (easy/medium/hard with the fixed thresholds) it
   turns into ntp_only, and how many of those are computed positions (the values a document computes, which
   reasoning can win), for both layouts.

Uses the embedded base model (built by ``rmt pretrain`` on first use and cached under $RMT_CACHE). Run from the
repository root:

    python benchmarks/bench_min_context.py --out runs/min_context    # about 2 minutes once the base model exists
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the tables only

import numpy as np
import torch

from rmt.config import load_config
from rmt.data.prepare import prepare_corpus
from rmt.scoring import assign_tiers, eligible_token_table, load_scored, score_corpus
from rmt.tiers import NTP_ONLY

WHOLE, CHUNK = 128, 32
POSITIONS = 16
MIN_CONTEXTS = (4, 8, 12, 16)


def prepared(out: Path, seq_len: int, extra: list[str]):
    cfg = load_config(None, [f"data.seq_len={seq_len}", "data.min_tokens=16", f"data.prepared_dir={out / f'seq{seq_len}'}",
                             "scoring.min_context=1", "scoring.batch_size=16", *extra])
    if not (Path(cfg.data.prepared_dir) / "meta.json").is_file():
        prepare_corpus(cfg)
    score_corpus(cfg)
    return cfg, load_scored(cfg.data.prepared_dir, "train")


def context_excess(whole, chunks) -> list[tuple[int, float, int]]:
    """(p, mean entropy excess at position p of continuation chunks, count) for p = 1 .. POSITIONS."""
    by_doc = {d: (ids, np.asarray(e, dtype=np.float64)) for ids, e, d in zip(whole["input_ids"], whole["entropy"], whole["doc_id"])}
    excess = {p: [] for p in range(1, POSITIONS + 1)}
    offset: dict[int, int] = {}
    for ids, ent, d in zip(chunks["input_ids"], chunks["entropy"], chunks["doc_id"]):
        start = offset.get(d, 0)
        offset[d] = start + len(ids)
        doc_ids, doc_ent = by_doc[d]
        if doc_ids[start : start + len(ids)] != ids:
            raise SystemExit("a document is longer than one whole-document sequence: raise WHOLE")
        if start == 0:  # the document's first chunk has the same context as the whole document
            continue
        for p in range(1, min(POSITIONS + 1, len(ids))):
            excess[p].append(ent[p] - doc_ent[start + p])
    return [(p, float(np.mean(v)), len(v)) for p, v in excess.items() if v]


def exclusions(ds, table, thresholds) -> tuple[int, int, dict[int, tuple[int, int]]]:
    """RL-tier positions, computed ones among them, and {min_context: (excluded, excluded computed)}."""
    total = computed = 0
    out = dict.fromkeys(MIN_CONTEXTS, (0, 0))
    for ids, ent, comp in zip(ds["input_ids"], ds["entropy"], ds["computed"]):
        rl = assign_tiers(np.asarray(ent, dtype=np.float64), table[np.asarray(ids)], thresholds) != NTP_ONLY
        comp = np.asarray(comp) == 1
        total, computed = total + int(rl.sum()), computed + int((rl & comp).sum())
        for m in MIN_CONTEXTS:
            a, b = out[m]
            out[m] = (a + int(rl[:m].sum()), b + int((rl[:m] & comp[:m]).sum()))
    return total, computed, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="runs/min_context", help="folder for the two prepared corpora")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("overrides", nargs="*", help="config overrides (e.g. model.path=... data.path=...)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    import datasets

    datasets.disable_progress_bars()
    out = Path(args.out)
    cfg, whole = prepared(out, WHOLE, args.overrides)
    _, chunks = prepared(out, CHUNK, args.overrides)

    print(f"Entropy excess at position p of a continuation chunk (seq_len {CHUNK}) over the same token with the whole "
          "document before it, nats:")
    print("| p | " + " | ".join(str(p) for p, _, _ in context_excess(whole, chunks)) + " |")
    print("|---|" + "---|" * POSITIONS)
    print("| excess | " + " | ".join(f"{x:.2f}" for _, x, _ in context_excess(whole, chunks)) + " |")

    from rmt.embedded import resolve_tokenizer_path
    from rmt.modeling import load_tokenizer

    table = eligible_token_table(load_tokenizer(resolve_tokenizer_path(cfg)), 1 << 20)
    thresholds = tuple(cfg.scoring.thresholds)
    print(f"\nRL-tier positions (fixed thresholds {list(thresholds)}) that min_context turns into ntp_only, train split:")
    print("| layout | min_context | excluded | of all RL-tier | computed excluded | of all computed |")
    print("|---|---|---|---|---|---|")
    for name, ds in ((f"whole documents (seq_len {WHOLE})", whole), (f"chunks (seq_len {CHUNK})", chunks)):
        total, computed, by_m = exclusions(ds, table, thresholds)
        for m, (ex, exc) in by_m.items():
            print(f"| {name} | {m} | {ex} | {100 * ex / total:.1f}% | {exc} | {100 * exc / max(computed, 1):.1f}% |")


if __name__ == "__main__":
    main()
