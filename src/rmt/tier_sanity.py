"""What the tiers of `rmt score` hold, and warnings when they cannot mean what RMT needs.

RMT's curriculum moves from easy to hard tokens, and the evaluation reports accuracy per tier: both assume that
the tiers split the corpus into groups of different difficulty, each large enough to sample from. On a corpus the
reference model knows poorly, fixed thresholds can put nearly every position into one tier, and what is left in a
small tier may be one kind of token (heading underlines, backticks) rather than "easy" text. So `rmt score` shows,
per tier, its most frequent tokens and a few decoded examples in context, and warns when

- one tier holds most RL positions (``DOMINANT_SHARE``), or a tier is nearly empty (``SPARSE_SHARE``), or the eval
  split has fewer positions in a tier than ``eval.positions_per_tier``;
- one token makes up most of a tier (``TOKEN_SHARE``);
- the tier boundaries lie close together (``NARROW_NATS``), or the typical entropy is near that of a uniform guess
  (``UNIFORM_SHARE`` of ln V): the reference model barely predicts this corpus,

with a suggestion: quantile tiers, thresholds at this corpus' own quantiles (the numbers), or a reference model
that knows the corpus. ``sanity_report`` reads the scored training split once; the other functions are pure.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rmt.tiers import RL_TIERS, TIER_NAMES

DOMINANT_SHARE = 0.8  # one tier with more than this share of the RL positions
SPARSE_SHARE = 0.02  # a tier with less than this share of the RL positions
TOKEN_SHARE = 0.5  # one token with more than this share of a tier's positions ...
TOKEN_MIN_POSITIONS = 20  # ... counted only in a tier of at least this many positions
NARROW_NATS = 0.5  # quantile boundaries spread over less than this
UNIFORM_SHARE = 0.8  # median entropy above this share of ln V: predictions close to a uniform guess
EXAMPLES_PER_TIER = 4
TOP_TOKENS = 3
SUGGESTED_QUANTILES = (0.25, 0.5, 0.75)

RL_NAMES = tuple(TIER_NAMES[t] for t in RL_TIERS)


def histogram_quantiles(counts: np.ndarray, bin_width: float, quantiles: Sequence[float]) -> list[float]:
    """Quantiles of values binned at ``bin_width`` (``counts[i]`` values in [i w, (i+1) w)), each read as the upper
    edge of the bin where the cumulative count first reaches q x total. Empty counts give an empty list."""
    counts = np.asarray(counts, dtype=np.int64)
    total = int(counts.sum())
    if total == 0:
        return []
    cum = np.cumsum(counts)
    return [round((int(np.searchsorted(cum, q * total, side="left")) + 1) * bin_width, 3) for q in quantiles]


def tier_warnings(counts: dict[str, int], eval_counts: dict[str, int] | None, top_tokens: dict[str, list], *,
                  tier_rule: str, thresholds: Sequence[float], suggested: Sequence[float], median_entropy: float | None,
                  max_entropy: float, eval_per_tier: int) -> list[str]:
    """Warnings (each with what to do) about the tiers of the training split.

    ``counts``: positions per tier name (train); ``eval_counts``: the same for the eval split; ``top_tokens``: per
    RL tier, [(token text, count), ...] most frequent first; ``suggested``: thresholds at this corpus' own
    quantiles (``SUGGESTED_QUANTILES`` of the eligible entropies); ``median_entropy``, ``max_entropy`` (= ln V) in
    nats."""
    rl_total = sum(counts.get(t, 0) for t in RL_NAMES)
    if rl_total == 0:
        return ["no position is in an RL tier (easy, medium, hard): nothing to train with RL or to evaluate; lower "
                "scoring.thresholds[0] or scoring.min_context, or use scoring.tier_rule=quantile"]
    fix = _suggestion(tier_rule, suggested)
    out = []
    for tier in RL_NAMES:
        share = counts.get(tier, 0) / rl_total
        if share > DOMINANT_SHARE:
            out.append(f"the {tier} tier holds {100 * share:.0f}% of the RL positions: the curriculum and the per-tier "
                       f"accuracies can hardly tell tiers apart; {fix}")
        elif counts.get(tier, 0) == 0:
            out.append(f"the {tier} tier is empty: no position to train on or to evaluate there; {fix}")
        elif share < SPARSE_SHARE:
            out.append(f"the {tier} tier is nearly empty ({counts.get(tier, 0)} positions, {100 * share:.1f}% of the RL "
                       f"positions): its accuracies rest on few, possibly peculiar tokens; {fix}")
    if eval_counts is not None:
        short = [f"{t} {eval_counts.get(t, 0)}" for t in RL_NAMES if eval_counts.get(t, 0) < eval_per_tier]
        if short:
            out.append(f"the eval split has fewer positions than eval.positions_per_tier={eval_per_tier} in some tiers "
                       f"({', '.join(short)}): those rows of the evaluation table rest on fewer positions")
    for tier in RL_NAMES:
        n = counts.get(tier, 0)
        top = top_tokens.get(tier) or []
        if n >= TOKEN_MIN_POSITIONS and top and top[0][1] / n > TOKEN_SHARE:
            out.append(f"one token, {top[0][0]!r}, is {100 * top[0][1] / n:.0f}% of the {tier} tier: its accuracy "
                       f"measures that token, not the tier (see the examples above)")
    if tier_rule == "quantile" and thresholds[2] - thresholds[0] < NARROW_NATS:
        out.append(f"the quantile boundaries lie within {thresholds[2] - thresholds[0]:.2f} nats "
                   f"({thresholds[0]:.2f}-{thresholds[2]:.2f}): the reference model finds nearly every position "
                   "equally hard, so the tiers barely differ; score with a model that knows this corpus better")
    if median_entropy is not None and median_entropy > UNIFORM_SHARE * max_entropy:
        out.append(f"the median entropy, {median_entropy:.2f} nats, is close to that of a uniform guess over the "
                   f"vocabulary ({max_entropy:.2f}): the reference model barely predicts this corpus; pre-train or "
                   "choose a model that knows it (scoring.reference_model) before mid-training on it")
    return out


def _suggestion(tier_rule: str, suggested: Sequence[float]) -> str:
    if tier_rule == "fixed":
        if len(suggested) == 3 and suggested[0] < suggested[1] < suggested[2]:
            nums = ",".join(f"{x:g}" for x in suggested)
            return (f"try scoring.tier_rule=quantile, or thresholds at this corpus' own quartiles: "
                    f"scoring.thresholds=[{nums}] (then run `rmt score` again: only the tiers are recomputed)")
        return "try scoring.tier_rule=quantile (then run `rmt score` again: only the tiers are recomputed)"
    return "try other scoring.quantiles, or a reference model that knows this corpus better"


def token_tier_counts(ids: np.ndarray, tiers: np.ndarray, vocab: int) -> dict[int, np.ndarray]:
    """Per RL tier id, how often each token id sits at a position of that tier (one sequence)."""
    ids, tiers = np.asarray(ids, dtype=np.int64), np.asarray(tiers)
    return {t: np.bincount(ids[tiers == t], minlength=vocab) for t in RL_TIERS}


def top_tokens(counts: np.ndarray, decode, k: int = TOP_TOKENS) -> list[list]:
    """The ``k`` most frequent tokens of a tier, decoded, with their counts: [[text, count], ...] (ties by token id)."""
    order = np.lexsort((np.arange(counts.size), -counts))[:k]
    return [[decode([int(i)]), int(counts[i])] for i in order if counts[i] > 0]


def show_example(ids: Sequence[int], pos: int, decode, before: int = 12, after: int = 3) -> str:
    """``…text before⟦token⟧text after…`` with newlines and tabs shown as escapes: the token at ``pos`` in context."""
    head = decode(list(ids[max(0, pos - before) : pos]))
    tail = decode(list(ids[pos + 1 : pos + 1 + after]))
    esc = lambda s: s.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")  # noqa: E731
    return f"…{esc(head)}⟦{esc(decode([int(ids[pos])]))}⟧{esc(tail)}…"


def draw_examples(rows, per_tier: int, seed: int) -> dict[str, list[tuple[int, int]]]:
    """Up to ``per_tier`` (row, pos) pairs per RL tier name, drawn uniformly (seeded) from ``rows``: a list of tier
    arrays, one per sequence."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in RL_TIERS:
        hits = [(r, int(p)) for r, tiers in enumerate(rows) for p in np.flatnonzero(np.asarray(tiers) == t)]
        pick = sorted(rng.choice(len(hits), size=min(per_tier, len(hits)), replace=False).tolist()) if hits else []
        out[TIER_NAMES[t]] = [hits[i] for i in pick]
    return out


def format_contents(sanity: dict) -> list[str]:
    """Lines for `rmt score`'s output: what each tier holds (its warnings are printed at the end)."""
    lines = ["what each tier holds (train split; most frequent tokens with counts, then examples: ⟦token⟧ in its context):"]
    for tier in RL_NAMES:
        top = ", ".join(f"{text!r} {n}" for text, n in sanity["top_tokens"].get(tier, [])) or "(empty)"
        lines.append(f"  {tier}: {top}")
        lines += [f"      {ex}" for ex in sanity["examples"].get(tier, [])]
    return lines


def median_from_histogram(counts: np.ndarray, bin_width: float) -> float | None:
    q = histogram_quantiles(counts, bin_width, [0.5])
    return q[0] if q else None


def max_entropy(vocab: int) -> float:
    return math.log(max(2, vocab))


def sanity_report(train_ds, counts: dict[str, int], eval_counts: dict[str, int] | None, tokenizer, vocab: int, *,
                  tier_rule: str, thresholds: Sequence[float], fine: np.ndarray, fine_bin: float, eval_per_tier: int,
                  seed: int = 0, sample_rows: int = 2000) -> dict:
    """Top tokens per tier (over the whole scored training split), decoded examples (from a seeded sample of
    ``sample_rows`` sequences) and the warnings; stored in scores/summary.json as ``sanity``."""
    decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    per_tier = {t: np.zeros(vocab, dtype=np.int64) for t in RL_TIERS}
    for batch in train_ds.select_columns(["input_ids", "tier"]).iter(batch_size=4096):
        if not batch["input_ids"]:
            continue
        ids = np.concatenate([np.asarray(x, dtype=np.int64) for x in batch["input_ids"]])
        tiers = np.concatenate([np.asarray(x, dtype=np.int8) for x in batch["tier"]])
        for t, c in token_tier_counts(ids, tiers, vocab).items():
            per_tier[t] += c[:vocab]
    rows = sorted(np.random.default_rng(seed).choice(len(train_ds), size=min(sample_rows, len(train_ds)), replace=False).tolist())
    sample = train_ds.select(rows) if rows else None
    examples = {name: [] for name in RL_NAMES}
    if sample is not None:
        ids_rows = sample["input_ids"]
        for name, pairs in draw_examples(sample["tier"], EXAMPLES_PER_TIER, seed).items():
            examples[name] = [show_example(ids_rows[r], p, decode) for r, p in pairs]
    tops = {TIER_NAMES[t]: top_tokens(per_tier[t], decode) for t in RL_TIERS}
    suggested = histogram_quantiles(fine, fine_bin, SUGGESTED_QUANTILES)
    warnings = tier_warnings(
        counts, eval_counts, tops, tier_rule=tier_rule, thresholds=thresholds, suggested=suggested,
        median_entropy=median_from_histogram(fine, fine_bin), max_entropy=max_entropy(vocab), eval_per_tier=eval_per_tier,
    )
    return {"top_tokens": tops, "examples": examples, "suggested_thresholds": suggested, "warnings": warnings}
