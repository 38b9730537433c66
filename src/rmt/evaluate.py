"""`rmt eval`: next-token accuracy by entropy tier on a fixed set of held-out positions (SPEC sections 4 and 8).

**The evaluation set.** ``eval.positions_per_tier`` positions per RL tier (easy, medium, hard), drawn with
``eval.seed`` from the scored eval split's easy/medium/hard positions (never before ``scoring.min_context``, which
scoring makes ntp_only, as for the RL positions). Position ``pos`` of a row
means: predict ``ids[pos]`` from ``ids[:pos]``. The set is stored in ``{data.prepared_dir}/eval_set.json`` with the
identity of what it was drawn from (a digest of the eval split's tokens, tiers and computed flags, the tier rule and
thresholds, the draw settings) and rebuilt only when that identity changes, so every model and every method is
judged on the same positions.

**Modes.**

- ``ntp``: the argmax next token after the prefix; one forward per corpus row, batched, serves all its positions.
  With ``eval.ntp_exclude_markers`` the thinking markers are never the argmax (same rule for every model).
- ``reasoning``: the prompt template with a budget (``eval.budget``, else the run's final B_T), generation with the
  rollout engine (greedy, or ``eval.samples`` samples at ``eval.temperature``), parsing, and two scores: exact match
  (RMT's reward) and RPT's prefix match. The reasoning row of the model named ``base`` is labelled ``ntr`` (the
  paper's no-training baseline: the base model reasons, then predicts).

**Statistics** (pure functions below).

- Accuracy per tier; ``average`` = the mean of the three tier accuracies (the paper's table), not the pooled
  accuracy over all positions.
- 95% confidence interval: the Wilson score interval. With p = k/n and z = 1.96,
  ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``. Unlike the normal approximation p ± z·sqrt(p(1-p)/n),
  it stays inside [0, 1] and does not collapse to a point at p = 0 or 1, which matters for a few hundred positions.
  With ``eval.samples`` > 1 a position counts once, with its mean accuracy over its samples (k = the sum of those
  means, n = positions): samples of one position are not independent trials.
- pass@k: the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)`` for n samples of which c are
  correct, averaged over positions, for k = 1, 2, 4, ... up to n.
- Relative change against the baseline row: ``(acc - acc_baseline) / acc_baseline``.
- Where the corpus marks computed values (the embedded default does), accuracy on computed and on random positions
  separately, per tier (SPEC section 8): only computed values are something reasoning can win.

Output: a JSON (machines; ``results`` keyed by row label, read by ``rmt report``) and a markdown table (people).
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from rmt.config import RMTConfig
from rmt.errors import DataError, ModelError
from rmt.fileio import atomic_write_text, read_json_object, remove_orphans
from rmt.stats import accuracy_stats, mean_of, pass_at_k, pass_ks, relative_change
from rmt.tiers import RL_TIERS, TIER_NAMES

log = logging.getLogger(__name__)

EVAL_SET_FORMAT = 1  # bump when the drawing of the set changes for the same inputs
RESULTS_FORMAT = 1
TABLE_TITLE = "# Next-token accuracy by tier"  # the first line of the markdown table beside the results
TIERS = tuple(TIER_NAMES[t] for t in RL_TIERS)  # ("easy", "medium", "hard")
MODES = ("ntp", "reasoning")
NTR_LABEL = "ntr"
N_EXAMPLES = 3  # sample completions kept per reasoning row


# --- the fixed evaluation set ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class EvalItem:
    """One held-out position: predict ``target`` = ids[pos] of eval-split row ``row`` from ids[:pos]."""

    row: int
    pos: int
    tier: str
    computed: int  # 1 = inside a value the document computes, 0 = random operand / other text
    target: int


def draw_positions(tiers: Sequence[np.ndarray], per_tier: int, seed: int) -> dict[str, list[tuple[int, int]]]:
    """(row, pos) pairs per RL tier, at most ``per_tier`` each, uniformly without replacement, sorted.

    Pure and deterministic: the same tiers, seed and settings give the same positions. Each tier draws from its own
    random stream (seeded by (seed, tier id)), so changing one tier's candidates does not move the others.
    """
    out = {}
    for tier_id in RL_TIERS:
        rows, poss = [], []
        for r, t in enumerate(tiers):
            hit = np.flatnonzero(np.asarray(t) == tier_id)
            rows.append(np.full(hit.size, r, dtype=np.int64))
            poss.append(hit.astype(np.int64))
        rows_a = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        pos_a = np.concatenate(poss) if poss else np.zeros(0, np.int64)
        rng = np.random.default_rng([seed, tier_id])
        take = min(per_tier, rows_a.size)
        chosen = np.sort(rng.choice(rows_a.size, size=take, replace=False)) if take else np.zeros(0, np.int64)
        out[TIER_NAMES[tier_id]] = [(int(rows_a[i]), int(pos_a[i])) for i in chosen]
    return out


def _split_digest(ds) -> str:
    """Digest of the eval split's tokens, tiers and computed flags: the identity of the scores drawn from."""
    h = hashlib.blake2b(digest_size=16)
    for batch in ds.select_columns(["input_ids", "tier", "computed"]).iter(batch_size=1024):
        for ids, tier, comp in zip(batch["input_ids"], batch["tier"], batch["computed"]):
            h.update(np.asarray(ids, dtype=np.int64).tobytes())
            h.update(np.asarray(tier, dtype=np.int8).tobytes())
            h.update(np.asarray(comp, dtype=np.int8).tobytes())
            h.update(b"|")
    return h.hexdigest()


def eval_set_identity(cfg: RMTConfig, ds) -> dict:
    prepared = Path(cfg.data.prepared_dir)
    summary_path = prepared / "scores" / "summary.json"
    summary = read_json_object(summary_path) if summary_path.is_file() else {}
    if summary is None:
        raise DataError(f"{summary_path} is damaged (not a JSON object); run `rmt score` again, which writes it anew")
    return {
        "format": EVAL_SET_FORMAT,
        "positions_per_tier": cfg.eval.positions_per_tier,
        "seed": cfg.eval.seed,
        "min_context": summary.get("min_context"),
        "tier_rule": summary.get("tier_rule"),
        "thresholds": summary.get("thresholds"),
        "rows": len(ds),
        "digest": _split_digest(ds),
    }


def load_eval_set(cfg: RMTConfig, ds=None) -> dict:
    """The fixed evaluation set of ``data.prepared_dir``: read from ``eval_set.json`` when its identity still holds,
    else drawn from the scored eval split and written there (atomically)."""
    from rmt.scoring import load_scored

    ds = load_scored(cfg.data.prepared_dir, "eval") if ds is None else ds
    if len(ds) == 0:
        raise DataError(f"the eval split of {cfg.data.prepared_dir} is empty (raise data.eval_fraction and run `rmt prepare`)")
    identity = eval_set_identity(cfg, ds)
    path = Path(cfg.data.prepared_dir) / "eval_set.json"
    if path.is_file():
        try:
            stored = json.loads(path.read_text(encoding="utf-8"))
        except ValueError as e:  # written atomically, so damaged by something else: it is derived data, draw it again
            log.warning("%s is damaged (%s); drawing it again", path, e)
            stored = {}
        if isinstance(stored, dict) and stored.get("identity") == identity:
            return stored
        log.info("%s was drawn from other scores or settings; drawing it again", path)

    tiers = [np.asarray(t, dtype=np.int8) for t in ds["tier"]]
    drawn = draw_positions(tiers, cfg.eval.positions_per_tier, cfg.eval.seed)
    needed = sorted({r for pairs in drawn.values() for r, _ in pairs})
    picked = ds.select(needed) if needed else None
    rows = {r: (ids, comp) for r, ids, comp in zip(needed, picked["input_ids"], picked["computed"])} if needed else {}
    items = [
        EvalItem(r, p, tier, int(rows[r][1][p]), int(rows[r][0][p]))
        for tier, pairs in drawn.items()
        for r, p in pairs
    ]
    has_computed = any(any(c) for batch in ds.select_columns(["computed"]).iter(batch_size=1024) for c in batch["computed"])
    for tier, pairs in drawn.items():
        if len(pairs) < cfg.eval.positions_per_tier:
            log.warning("eval tier %s has only %d positions (eval.positions_per_tier=%d)", tier, len(pairs), cfg.eval.positions_per_tier)
    data = {
        "identity": identity,
        "counts": {t: len(p) for t, p in drawn.items()},
        "has_computed": bool(has_computed),
        "items": [asdict(it) for it in items],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data))
    return data


def eval_items(eval_set: dict) -> list[EvalItem]:
    return [EvalItem(**it) for it in eval_set["items"]]


# --- predictions ----------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    """The scores of one position's samples (one sample in NTP mode and greedy reasoning)."""

    exact: list[float]
    prefix: list[float] | None = None  # reasoning mode only
    think: list[int] | None = None
    malformed: list[bool] | None = None
    truncated: list[bool] | None = None


@torch.inference_mode()
def ntp_predictions(model, sequences, items: Sequence[EvalItem], batch_size: int, pad_id: int = 0,
                    exclude_ids: Sequence[int] = (), bar=None) -> list[int]:
    """Argmax next token at every item's position; one forward per corpus row serves all of its items.

    The decoder runs over the padded rows; the output head runs only at the positions asked for, so the rows x
    length x vocabulary logits never exist. ``exclude_ids`` are never predicted.
    """
    model.eval()
    device = next(model.parameters()).device
    by_row: dict[int, list[int]] = {}
    for i, it in enumerate(items):
        by_row.setdefault(it.row, []).append(i)
    rows = sorted(by_row, key=lambda r: -len(sequences[r]))  # similar lengths share a batch
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    preds = [0] * len(items)
    for b in range(0, len(rows), batch_size):
        chunk = rows[b : b + batch_size]
        width = max(len(sequences[r]) for r in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, r in enumerate(chunk):
            ids[j, : len(sequences[r])] = torch.as_tensor(list(sequences[r]), dtype=torch.long)
            mask[j, : len(sequences[r])] = 1
        hidden = decoder(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        which = [i for r in chunk for i in by_row[r]]
        batch_rows = torch.tensor([j for j, r in enumerate(chunk) for _ in by_row[r]], device=device)
        before = torch.tensor([items[i].pos - 1 for i in which], device=device)  # hidden[pos - 1] predicts ids[pos]
        logits = head(hidden[batch_rows, before]).float()
        if exclude_ids:
            logits[:, list(exclude_ids)] = -float("inf")
        for i, tok in zip(which, logits.argmax(-1).tolist()):
            preds[i] = tok
        if bar is not None:
            bar.update(len(which))
    return preds


def ntp_outcomes(preds: Sequence[int], items: Sequence[EvalItem], decode=None, strip_leading_space: bool = True) -> list[Outcome]:
    """Exact match of each argmax token by the rule of reasoning mode and the reward (``match_rule``); without
    ``decode`` (token ids to text) by token id alone."""
    from rmt.rewards import exact_match_reward

    if decode is None:
        return [Outcome(exact=[float(p == it.target)]) for p, it in zip(preds, items)]
    return [
        Outcome(exact=[exact_match_reward(decode([p]), decode([it.target]), strip_leading_space, prediction_id=p, target_id=it.target)])
        for p, it in zip(preds, items)
    ]


def match_rule(cfg: RMTConfig) -> str:
    """The one rule by which every row of the table is scored (printed under the table)."""
    rule = "exact = the predicted token is the true next token (the same token id"
    rule += ", or the same text ignoring leading whitespace)" if cfg.reward.strip_leading_space else ", or the same text)"
    if cfg.prompt.style == "raw" and cfg.prompt.raw_answer == "first_token":
        rule += "; reasoning mode reads the first token after </think>"
        if cfg.prompt.skip_restatement:
            rule += ", past a restatement of the part of the current value already written"
    else:
        rule += "; reasoning mode reads the answer by prompt.raw_answer / the last \\boxed{}"
    return rule + "; prefix = RPT's prefix match."


def score_responses(parsed: Sequence, truncated: Sequence[bool], truth, cfg: RMTConfig) -> Outcome:
    """Score a position's parsed responses with exact match (RMT's reward rule) and RPT's prefix match."""
    from rmt import rewards

    strip = cfg.reward.strip_leading_space
    out = Outcome(exact=[], prefix=[], think=[], malformed=[], truncated=[])
    for p, cut in zip(parsed, truncated):
        pred = p.prediction
        out.exact.append(0.0 if pred is None else rewards.MATCH_REWARDS["exact"](pred, p.prediction_id, truth, strip))
        out.prefix.append(0.0 if pred is None else rewards.MATCH_REWARDS["prefix"](pred, p.prediction_id, truth, strip))
        out.think.append(p.think_tokens)
        out.malformed.append(not p.ok)
        out.truncated.append(cut)
    return out


def eval_budget(cfg: RMTConfig) -> int | None:
    """The budget stated in reasoning-mode prompts (only where the template states one): eval.budget, else the
    run's final B_T (None when the budget is off). The generation cap is ``eval_cap``, not this."""
    from rmt.schedules import budget_at

    if cfg.eval.budget is not None:
        return cfg.eval.budget
    if not cfg.budget.enabled or "auto" in (cfg.budget.b0, cfg.budget.b_min):  # auto: measured per run; state one with eval.budget
        return None
    return budget_at(1, 1, cfg.budget)  # t = T: B_T = max(B_min, floor(B_0 * gamma)), or B_0 when not dynamic


def eval_cap(cfg: RMTConfig) -> int:
    """Reasoning mode's generation cap, the same for every model: eval.max_response_tokens, else
    rollout.max_response_tokens (no trained model was allowed more)."""
    return cfg.eval.max_response_tokens or cfg.rollout.max_response_tokens


def reasoning_outcomes(cfg: RMTConfig, engine, tokenizer, sequences, items: Sequence[EvalItem], budget: int | None,
                       max_context: int = 1 << 30, bar=None) -> tuple[list[Outcome], list[dict], int]:
    """Generate, parse and score every item's responses in batches of eval.batch_size prompts, by the rule of the
    training reward (``rmt.collect.roll_out``).

    Returns the outcomes (item order), a few example completions, and how many prompts were cut to fit the context.
    """
    from rmt.collect import roll_out

    for marker in (cfg.prompt.think_open, cfg.prompt.think_close):
        if len(tokenizer.encode(marker, add_special_tokens=False)) != 1:
            raise ModelError(f"reasoning mode needs {marker!r} as a single token of the tokenizer (see prompt.think_open/think_close)")
    samples = cfg.eval.samples
    temperature = 0.0 if samples == 1 else cfg.eval.temperature
    generator = torch.Generator().manual_seed(cfg.eval.seed) if samples > 1 else None
    order = sorted(range(len(items)), key=lambda i: (items[i].row, items[i].pos))  # similar prefixes share a batch
    outcomes: list[Outcome | None] = [None] * len(items)
    examples, example_tiers, n_cut = [], set(), 0
    decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    step = cfg.eval.batch_size
    for b in range(0, len(order), step):
        idx = order[b : b + step]
        out = roll_out(
            cfg, engine, tokenizer, sequences, [(items[i].row, items[i].pos) for i in idx], budget, eval_cap(cfg),
            group_size=samples, temperature=temperature, generator=generator, batch_size=step, max_context=max_context,
        )
        n_cut += out.prompts_cut
        for i, group, parsed, truth in zip(idx, out.groups, out.parsed, out.truths):
            it = items[i]
            outcomes[i] = score_responses(parsed, [r.truncated for r in group.responses], truth, cfg)
            if len(examples) < N_EXAMPLES and it.tier not in example_tiers:
                example_tiers.add(it.tier)
                seq = sequences[it.row]
                examples.append({
                    "tier": it.tier, "computed": it.computed,
                    "prefix_tail": decode(list(seq[max(0, it.pos - 32) : it.pos])),
                    "target": decode([it.target]),
                    "response": decode(group.responses[0].token_ids),
                    "status": parsed[0].status, "prediction": parsed[0].prediction,
                    "exact": outcomes[i].exact[0], "prefix": outcomes[i].prefix[0],
                })
        if bar is not None:
            bar.update(len(idx))
    return outcomes, examples, n_cut


# --- summaries, labels, tables: pure functions ----------------------------------------------------------------


def summarize(items: Sequence[EvalItem], outcomes: Sequence[Outcome], has_computed: bool) -> dict:
    """Accuracy per tier (exact; prefix and pass@k where present; computed vs random), average, lengths."""
    reasoning = bool(outcomes) and outcomes[0].prefix is not None
    samples = max((len(o.exact) for o in outcomes), default=1)

    def group_stats(sel: list[int]) -> dict:
        stats = accuracy_stats([outcomes[i].exact for i in sel])
        if reasoning:
            pre = accuracy_stats([outcomes[i].prefix for i in sel])
            stats["prefix_accuracy"], stats["prefix_ci95"] = pre["accuracy"], pre["ci95"]
        if samples > 1 and sel:
            stats["pass_at_k"] = {
                str(k): float(np.mean([pass_at_k(len(outcomes[i].exact), int(sum(outcomes[i].exact)), k) for i in sel]))
                for k in pass_ks(samples)
            }
        return stats

    def with_kinds(sel: list[int]) -> dict:
        stats = group_stats(sel)
        if has_computed:
            for name, flag in (("computed", 1), ("random", 0)):
                stats[name] = group_stats([i for i in sel if items[i].computed == flag])
        return stats

    result = {"tiers": {t: with_kinds([i for i, it in enumerate(items) if it.tier == t]) for t in TIERS}}
    result["average"] = mean_of([result["tiers"][t]["accuracy"] for t in TIERS])
    if reasoning:
        result["average_prefix"] = mean_of([result["tiers"][t]["prefix_accuracy"] for t in TIERS])
    if samples > 1:
        result["average_pass_at_k"] = {
            k: mean_of([result["tiers"][t].get("pass_at_k", {}).get(k) for t in TIERS]) for k in map(str, pass_ks(samples))
        }
    result["overall"] = with_kinds(list(range(len(items))))
    if reasoning:
        think = np.array([x for o in outcomes for x in o.think], dtype=np.float64)
        result["think_len_mean"] = float(think.mean()) if think.size else None
        result["think_len_p90"] = float(np.percentile(think, 90)) if think.size else None
        result["malformed_frac"] = float(np.mean([x for o in outcomes for x in o.malformed])) if think.size else None
        result["truncated_frac"] = float(np.mean([x for o in outcomes for x in o.truncated])) if think.size else None
        result["responses"] = int(think.size)
    return result


def row_label(name: str, mode: str, modes: Sequence[str]) -> str:
    """The table row of a (model, mode): ``ntr`` for the base model reasoning; ``name/mode`` when both modes run."""
    if mode == "reasoning" and name == "base":
        return NTR_LABEL
    return name if len(modes) == 1 else f"{name}/{mode}"


def resolve_baseline(results: dict, baseline: str | None) -> str:
    """The baseline row: a row label, or a model name (its first row), or the first row when None."""
    if not results:
        raise ValueError("no results to compare")
    if baseline is None:
        return next(iter(results))
    if baseline in results:
        return baseline
    for label, res in results.items():
        if res.get("model") == baseline:
            return label
    raise ValueError(f"eval.baseline={baseline!r} is neither a row ({', '.join(results)}) nor a model name")


def add_relative_changes(results: dict, baseline_label: str) -> None:
    """Each row's relative change against the baseline row, per tier and on the average (in place)."""
    base = results[baseline_label]
    for res in results.values():
        change = {t: relative_change(res["tiers"][t]["accuracy"], base["tiers"][t]["accuracy"]) for t in TIERS}
        change["average"] = relative_change(res["average"], base["average"])
        res["relative_change"] = change


def _pct(x: float | None, digits: int = 1) -> str:
    return "–" if x is None else f"{100 * x:.{digits}f}"


def _cell(stats: dict, acc_key: str = "accuracy", ci_key: str = "ci95") -> str:
    acc, ci = stats.get(acc_key), stats.get(ci_key)
    if acc is None:
        return "–"
    return f"{_pct(acc)} [{_pct(ci[0])}, {_pct(ci[1])}]" if ci else _pct(acc)


def _signed(x: float | None, baseline: str) -> str:
    return "" if x is None else f" ({'+' if x >= 0 else ''}{100 * x:.1f}% vs {baseline})"


def format_table(results: dict, baseline_label: str, rule: str | None = None) -> str:
    """The paper's table: Method | Easy | Medium | Hard | Average (+x% vs baseline) | think length, in percent with
    95% Wilson intervals; then prefix match, pass@k and computed-vs-random tables where they apply."""
    computed = any("computed" in r["overall"] for r in results.values())
    head = "| Method | Mode | Easy | Medium | Hard | Average |" + (" Computed |" if computed else "")
    head += " Think len (mean / p90) | Malformed | Cut by cap |"
    lines = [head, "|---|---|---|---|---|---|" + ("---|" if computed else "") + "---|---|---|"]
    for label, res in results.items():
        avg = _pct(res["average"])
        if label != baseline_label and res["average"] is not None:
            avg += _signed(res.get("relative_change", {}).get("average"), baseline_label)
        think = "–" if res.get("think_len_mean") is None else f"{res['think_len_mean']:.1f} / {res['think_len_p90']:.0f}"
        malformed = "–" if res.get("malformed_frac") is None else f"{_pct(res['malformed_frac'])}%"
        cut = "–" if res.get("truncated_frac") is None else f"{_pct(res['truncated_frac'])}%"
        cells = [_cell(res["tiers"][t]) for t in TIERS] + [avg]
        if computed:
            cells.append(_cell(res["overall"].get("computed", {})))
        lines.append(f"| {label} | {res.get('mode', '')} | " + " | ".join(cells) + f" | {think} | {malformed} | {cut} |")
    n = {t: max(r["tiers"][t]["n"] for r in results.values()) for t in TIERS}
    caps = sorted({r["cap"] for r in results.values() if r.get("cap")})
    lines += ["", "Next-token accuracy (%) with 95% Wilson intervals; positions per tier: "
              + ", ".join(f"{t} {n[t]}" for t in TIERS) + f". Average = mean of the three tiers; baseline: {baseline_label}."
              + (" Computed = all positions (any tier) inside a value the text computes, the tokens reasoning can win." if computed else "")
              + (f" Reasoning mode: one generation cap for every model, {', '.join(map(str, caps))} tokens." if caps else "")
              + (f" Scoring: {rule}" if rule else "")]

    checked = {k: r["preflight"] for k, r in results.items() if r.get("preflight", {}).get("measured")}
    if checked:
        n_checked = max(c["measured"] for c in checked.values())
        lines += ["", f"Pre-flight check of the reasoning format ({n_checked} positions, before the evaluation): well-formed "
                  "responses (closed thinking block and a parsable answer) "
                  + ", ".join(f"{k} {_pct(c['wellformed_frac'], 0)}%" + ("" if c.get("passed", True) else " (below the threshold)")
                              for k, c in checked.items()) + "."]
    reasoning = {k: r for k, r in results.items() if r.get("average_prefix") is not None}
    if reasoning:
        lines += ["", "Prefix match (RPT's reward: the prediction is any whole number of the true next tokens):", "",
                  "| Method | Easy | Medium | Hard | Average |", "|---|---|---|---|---|"]
        for label, res in reasoning.items():
            cells = [_cell(res["tiers"][t], "prefix_accuracy", "prefix_ci95") for t in TIERS]
            lines.append(f"| {label} | " + " | ".join(cells) + f" | {_pct(res['average_prefix'])} |")
    sampled = {k: r for k, r in results.items() if r.get("average_pass_at_k")}
    if sampled:
        ks = list(next(iter(sampled.values()))["average_pass_at_k"])
        lines += ["", "pass@k (average over tiers; pass@1 = mean accuracy of the samples):", "",
                  "| Method | " + " | ".join(f"pass@{k}" for k in ks) + " |", "|---|" + "---|" * len(ks)]
        for label, res in sampled.items():
            lines.append(f"| {label} | " + " | ".join(_pct(res["average_pass_at_k"].get(k)) for k in ks) + " |")
    if any("computed" in r["overall"] for r in results.values()):
        lines += ["", "Computed vs random positions (accuracy %, computed / random; n in brackets): only computed values "
                  "can be won by reasoning.", "",
                  "| Method | Easy | Medium | Hard | All |", "|---|---|---|---|---|"]
        for label, res in results.items():
            groups = [res["tiers"][t] for t in TIERS] + [res["overall"]]
            cells = [f"{_pct(g['computed']['accuracy'])} ({g['computed']['n']}) / {_pct(g['random']['accuracy'])} ({g['random']['n']})"
                     for g in groups]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# --- the stage ------------------------------------------------------------------------------------------------


def parse_model_specs(specs: Sequence[str]) -> dict[str, str]:
    """``NAME=PATH`` pairs (in order) -> {name: path}; names are unique and free of '|' and '/'."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name or not path:
            raise ValueError(f"--model {spec!r} must be NAME=PATH (e.g. base=runs/base or rmt=runs/rmt/final)")
        if any(c in name for c in "|/"):
            raise ValueError(f"model name {name!r} must not contain '|' or '/'")
        if name in models:
            raise ValueError(f"model name {name!r} is given twice")
        models[name] = path
    return models


def default_models(cfg: RMTConfig) -> dict[str, str]:
    """No --model: the base model, and this config's trained run (``output.dir/final``) when it exists."""
    from rmt.embedded import resolve_model_path

    models = {"base": resolve_model_path(cfg)}
    final = Path(cfg.output.dir) / "final"
    if final.is_dir():
        models[cfg.preset if cfg.preset != "base" else "trained"] = str(final)
    return models


def _model_folder(path: str) -> str:
    """A run folder stands for its final model."""
    p = Path(path)
    if p.is_dir() and not (p / "config.json").is_file() and (p / "final" / "config.json").is_file():
        return str(p / "final")
    return path


def _load(name: str, path: str, cfg: RMTConfig, device, fingerprint: str):
    from rmt.embedded import resolve_tokenizer_path
    from rmt.modeling import check_tokenizer_matches_model, load_model, load_tokenizer, tokenizer_fingerprint

    try:
        tokenizer = load_tokenizer(cfg.model.tokenizer or path, cfg.model.trust_remote_code)
    except ModelError:
        tokenizer = load_tokenizer(resolve_tokenizer_path(cfg), cfg.model.trust_remote_code)
    if tokenizer_fingerprint(tokenizer) != fingerprint:
        raise ModelError(f"model {name} ({path}) has another tokenizer than the corpus in {cfg.data.prepared_dir}")
    model = load_model(path, cfg, device).eval()
    check_tokenizer_matches_model(tokenizer, model, where=f"model {name} ({path})")
    return model, tokenizer


def evaluate_model(cfg: RMTConfig, name: str, model, tokenizer, eval_set: dict, sequences, mode: str,
                   engine=None, budget: int | None = None) -> dict:
    """One row of the table: ``model`` evaluated in ``mode`` on the evaluation set (rows of ``sequences``)."""
    from tqdm.auto import tqdm

    from rmt.collect import context_length, make_engine

    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    items = eval_items(eval_set)
    t0 = time.perf_counter()
    row: dict = {"model": name, "mode": mode}
    with tqdm(total=len(items), desc=f"eval {name} {mode}", unit="pos") as bar:
        if mode == "ntp":
            exclude = []
            if cfg.eval.ntp_exclude_markers:
                for marker in (cfg.prompt.think_open, cfg.prompt.think_close):
                    ids = tokenizer.encode(marker, add_special_tokens=False)
                    exclude += ids if len(ids) == 1 else []
            preds = ntp_predictions(model, sequences, items, cfg.eval.batch_size, tokenizer.pad_token_id or 0, exclude, bar)
            decode = lambda ids: tokenizer.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
            outcomes, examples, n_cut = ntp_outcomes(preds, items, decode, cfg.reward.strip_leading_space), [], 0
        else:
            engine = engine or make_engine(cfg, model, tokenizer)
            outcomes, examples, n_cut = reasoning_outcomes(cfg, engine, tokenizer, sequences, items, budget, context_length(model), bar)
            row.update(budget=budget, cap=eval_cap(cfg), samples=cfg.eval.samples, prompts_truncated=n_cut)
    row.update(summarize(items, outcomes, eval_set.get("has_computed", False)))
    # Per position, in the order of the evaluation set: what paired comparisons between rows resample.
    row["per_item"] = {"exact": [round(float(np.mean(o.exact)), 6) for o in outcomes]}
    if outcomes and outcomes[0].think is not None:
        row["per_item"]["think"] = [round(float(np.mean(o.think)), 3) for o in outcomes]
    row["seconds"] = time.perf_counter() - t0
    if examples:
        row["examples"] = examples
    return row


def evaluate(cfg: RMTConfig, models: dict[str, str] | None = None, out: str | Path | None = None) -> dict:
    """Evaluate every model in every mode of ``eval.modes`` on the fixed set; write JSON and markdown.

    ``models``: {name: path} in table order (None = ``default_models``). ``out``: the JSON path (default
    ``output.dir/eval.json``); the markdown table goes beside it with the suffix ``.md``.

    Everything that can be checked before the work is (models, row labels, baseline, output files), and the
    results are written as soon as they exist, so a bad argument never costs a finished evaluation.
    """
    from rmt.data.prepare import load_meta
    from rmt.modeling import pick_device
    from rmt.scoring import load_scored

    meta = load_meta(cfg.data.prepared_dir)
    models = dict(models) if models else default_models(cfg)
    out_path = Path(out) if out is not None else Path(cfg.output.dir) / "eval.json"
    check_evaluation_plan(cfg, models, out_path)
    remove_orphans(cfg.data.prepared_dir)  # eval_set.json writes that a kill interrupted
    ds = load_scored(cfg.data.prepared_dir, "eval")
    eval_set = load_eval_set(cfg, ds)
    items = eval_items(eval_set)
    if not items:
        raise DataError(f"the eval split of {cfg.data.prepared_dir} has no easy, medium or hard position (see scoring.min_context)")
    needed = sorted({it.row for it in items})
    sequences = dict(zip(needed, ds.select(needed)["input_ids"]))

    modes = [m for m in MODES if m in cfg.eval.modes]
    budget = eval_budget(cfg) if "reasoning" in modes else None
    device = pick_device()
    checks = check_reasoning_format(cfg, models, items, sequences, budget, device, meta["tokenizer_fingerprint"]) if "reasoning" in modes else {}
    results: dict[str, dict] = {}
    for name, path in models.items():
        path = _model_folder(path)
        model, tokenizer = _load(name, path, cfg, device, meta["tokenizer_fingerprint"])
        for mode in modes:
            label = row_label(name, mode, modes)
            if label in results:
                raise ValueError(f"two rows are labelled {label!r}: rename a model")
            results[label] = {"path": path, **evaluate_model(cfg, name, model, tokenizer, eval_set, sequences, mode, budget=budget)}
            if mode == "reasoning" and name in checks:
                results[label]["preflight"] = checks[name]
        del model
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    baseline = resolve_baseline(results, cfg.eval.baseline)
    evaluation = {
        "format": RESULTS_FORMAT,
        "eval_set": {
            "path": str(Path(cfg.data.prepared_dir) / "eval_set.json"),
            "counts": eval_set["counts"],
            "seed": cfg.eval.seed,
            "digest": eval_set["identity"]["digest"],
            "has_computed": eval_set.get("has_computed", False),
        },
        "settings": {
            "modes": modes,
            "budget": budget,
            "cap": eval_cap(cfg) if "reasoning" in modes else None,
            "match_rule": match_rule(cfg),
            "samples": cfg.eval.samples,
            "temperature": cfg.eval.temperature if cfg.eval.samples > 1 else 0.0,
            "prompt_style": cfg.prompt.style,
            "preset": cfg.preset,
        },
        "baseline": baseline,
        "results": results,
        "table_markdown": None,
    }
    atomic_write_text(out_path, json.dumps(evaluation, indent=2, ensure_ascii=False))  # the results, first
    add_relative_changes(results, baseline)
    evaluation["table_markdown"] = table = format_table(results, baseline, match_rule(cfg))
    atomic_write_text(out_path, json.dumps(evaluation, indent=2, ensure_ascii=False))
    atomic_write_text(out_path.with_suffix(".md"), TABLE_TITLE + "\n\n" + table + "\n")
    log.info("evaluation written to %s and %s", out_path, out_path.with_suffix(".md"))
    return evaluation


def check_reasoning_format(cfg: RMTConfig, models: dict[str, str], items: Sequence[EvalItem], sequences, budget: int | None,
                           device, fingerprint: str) -> dict[str, dict]:
    """The pre-flight check of reasoning mode (rmt.preflight), for every model before any is evaluated: prompted as
    reasoning mode prompts it, at preflight.positions items of the evaluation set, does it close its thinking block
    and give a parsable answer? Stops (ModelError) when one does not and preflight.on_fail is stop. Returns
    {model name: measurement}."""
    from rmt import preflight
    from rmt.collect import context_length, make_engine

    if cfg.preflight.positions == 0:
        return {}
    picked = [items[i] for i in preflight.eval_positions(items, cfg.preflight.positions, cfg.eval.seed)]
    temperature = 0.0 if cfg.eval.samples == 1 else cfg.eval.temperature
    checks: dict[str, dict] = {}
    for name, path in models.items():
        model, tokenizer = _load(name, _model_folder(path), cfg, device, fingerprint)
        record = preflight.measure(cfg, make_engine(cfg, model, tokenizer), tokenizer, sequences,
                                   [(it.row, it.pos) for it in picked], budget, eval_cap(cfg), temperature, cfg.eval.seed,
                                   context_length(model))
        record.update(min_wellformed=cfg.preflight.min_wellformed, passed=preflight.passes(record, cfg.preflight.min_wellformed))
        checks[name] = record
        del model
        gc.collect()
    failed = [n for n, r in checks.items() if not r["passed"]]
    for name, record in checks.items():
        others = [f"{n} {100 * checks[n]['wellformed_frac']:.0f}%" for n in failed if n != name]
        preflight.decide(
            cfg, f"reasoning-mode evaluation of model {name} ({models[name]})"
            + (f" (also below the threshold: {', '.join(others)})" if others else ""), record,
            also="or evaluate NTP mode only (--mode ntp)",
        )
    return checks


def check_evaluation_plan(cfg: RMTConfig, models: dict[str, str], out_path: Path) -> None:
    """Before any model is evaluated: every model folder exists, the row labels are distinct, eval.baseline names a
    row or a model, and the output files can be written."""
    from rmt.config import ConfigError
    from rmt.checkpoint import weights_problem
    from rmt.fileio import check_replaceable, check_writable, json_object_with
    from rmt.modeling import check_local_path

    for name, path in models.items():
        folder = _model_folder(path)
        check_local_path(folder, f"model {name}")
        problem = weights_problem(folder)
        if problem:  # found now, not after the models before it were evaluated and their results lost
            raise ModelError(f"model {name} ({folder}): {problem}; nothing was evaluated")
    modes = [m for m in MODES if m in cfg.eval.modes]
    planned: dict[str, dict] = {}
    for name in models:
        for mode in modes:
            label = row_label(name, mode, modes)
            if label in planned:
                raise ConfigError(f"two rows of the table would be labelled {label!r}: rename model {name!r}")
            planned[label] = {"model": name}
    try:
        resolve_baseline(planned, cfg.eval.baseline)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if out_path.suffix.lower() == ".md":
        raise ConfigError(f"the evaluation output {out_path} ends in .md: name the results' JSON file; the table is written beside it as .md")
    check_writable(out_path, "evaluation output")
    check_writable(out_path.with_suffix(".md"), "evaluation table")
    # a rerun replaces its own results; a corpus or any other file of the user's named by mistake is refused
    check_replaceable(out_path, "evaluation output", lambda text: json_object_with(text, "results", "eval_set"))
    check_replaceable(out_path.with_suffix(".md"), "evaluation table", lambda text: text.startswith(TABLE_TITLE))
