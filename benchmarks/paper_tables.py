"""The paper's two tables at small scale, on the embedded default (results: docs/results.md).

1. **Main table** (SPEC section 4; the paper's language-modelling table and its ablations). Mid-train NTP, RPT, RMT
   and the ablations rmt-no-dtb, rmt-no-cas, rmt-no-ntp from the same base model at equal compute (the same
   ``train.total_steps`` x ``train.sequences_per_step``), then evaluate every model on the same fixed, seeded
   held-out positions: the base model in NTP mode, NTR (the base model reasoning), and every mid-trained model in
   reasoning mode (and in NTP mode). Accuracy per tier with 95% intervals, the relative change against a named
   baseline row, mean reasoning length, and accuracy on computed vs random positions per tier.
2. **Post-training table** (the paper's transfer table). GRPO post-training (``rmt.posttrain.posttrain``) from the
   base, NTP, RPT and RMT checkpoints for the same number of steps, on a mix of two tasks: the embedded
   post-training split (chain_sum, 3-4 one-digit terms, the mid-training distribution) and chain_sum with 5 terms,
   which appears nowhere in the base or mid-training corpus (generated here with reasoning-gym, fixed seed). Greedy
   accuracy on held-out questions of each task before and after, with 95% Wilson intervals, scored with the
   ``exact`` verifier.

Sizes: ``presets/demo/paper.yaml`` (100 mid-training steps x 8 sequences, 200 eval positions per tier, 100
post-training steps, lr 1e-5), ``--steps`` and ``--posttrain-steps`` on top; ``--quick`` is a minute-long smoke
version of the same pipeline. The full run with ``--seeds 0 1`` took 30 minutes on 2 idle CPU cores.
``--threads``: torch threads. On a CPU shared with other jobs use 1: two threads that compete for two busy cores
were measured 5-10x slower than one.
Every stage reuses what a previous call finished (training and post-training resume from their run folders,
evaluations are cached as JSON), so a stopped run goes on where it stopped when called again with the same arguments.

    python benchmarks/paper_tables.py --quick
    python benchmarks/paper_tables.py --out runs/paper --seeds 0 1         # docs/results.md
    python benchmarks/paper_tables.py ... --embedded-entry $RMT_CACHE/embedded/<key>   # an existing cache entry

Outputs in ``--out``: ``results.json`` (everything, per seed) and ``results.md`` (the tables).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from rmt.config import PRESET_DIR, RMTConfig, load_config

log = logging.getLogger("paper_tables")

METHODS = ("ntp", "rpt", "rmt", "rmt-no-dtb", "rmt-no-cas", "rmt-no-ntp")
POSTTRAIN_STARTS = ("base", "ntp", "rpt", "rmt")
LAYERS = [PRESET_DIR / "demo" / "paper.yaml"]  # self-contained sizes, independent of the demo's
TIERS = ("easy", "medium", "hard")
TRANSFER_TERMS = 5  # chain_sum terms of the transfer task (the corpora hold 3-4)
TRANSFER_SEED = 20_250_924  # reasoning-gym seed of the transfer questions
# Two-sided 95% Student t quantiles for 1..9 degrees of freedom (seed-to-seed intervals with few seeds).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}

QUICK = {  # the smoke version: every stage runs, on a handful of steps and questions
    "steps": 2, "posttrain_steps": 2,
    "overrides": ["train.sequences_per_step=4", "eval.positions_per_tier=8", "posttrain.questions_per_step=4"],
    "qa_train": 64, "qa_eval": 16,
}
FULL = {"qa_train": 800, "qa_eval": 200}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default runs/paper, or runs/paper-quick with --quick)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="train.seed of the mid-training runs")
    p.add_argument("--posttrain-seeds", type=int, nargs="*", default=None,
                   help="seeds whose checkpoints are post-trained (default: the first of --seeds)")
    p.add_argument("--steps", type=int, default=None, help="mid-training steps T for every method (default: paper.yaml)")
    p.add_argument("--posttrain-steps", type=int, default=None, help="post-training steps (default: paper.yaml)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--baseline", default="rpt", help="row the relative change is measured against (a method in reasoning mode, or base/ntr)")
    p.add_argument("--embedded-entry", default=None,
                   help="an existing embedded cache entry (folder with corpus/ and a finished base-*/) instead of ensure_embedded")
    p.add_argument("--quick", action="store_true", help="minutes-long smoke version")
    p.add_argument("--skip-posttrain", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("overrides", nargs="*", help="extra dotted config overrides for every stage (e.g. train.lr=5e-5)")
    args = p.parse_args(argv)
    if args.baseline.split("/")[0] not in ("ntr", "base", *args.methods):
        p.error(f"--baseline {args.baseline!r} is not a row of this run: use ntr, base/ntp or one of --methods {args.methods}")
    size = QUICK if args.quick else {}
    args.out = Path(args.out or ("runs/paper-quick" if args.quick else "runs/paper"))
    args.steps = args.steps or size.get("steps")
    args.posttrain_steps = args.posttrain_steps or size.get("posttrain_steps")
    args.size_overrides = size.get("overrides", [])
    args.qa_train = (QUICK if args.quick else FULL)["qa_train"]
    args.qa_eval = (QUICK if args.quick else FULL)["qa_eval"]
    args.posttrain_seeds = args.seeds[:1] if args.posttrain_seeds is None else args.posttrain_seeds
    return args


# --- configs and the base model ---------------------------------------------------------------------------------


def config(method: str, args, extra: list[str]) -> RMTConfig:
    """A method's preset + the demo and paper sizes + this run's base, data and sizes."""
    sized = list(args.size_overrides)
    if args.steps:
        sized.append(f"train.total_steps={args.steps}")
    if args.posttrain_steps:
        sized.append(f"posttrain.steps={args.posttrain_steps}")
    return load_config(method, [*args.base_overrides, *sized, *args.overrides, *extra], layers=LAYERS)


def resolve_base(args) -> dict:
    """The base model and the corpus splits: an existing cache entry, or the embedded default (built if missing)."""
    if args.embedded_entry:
        entry = Path(args.embedded_entry)
        bases = [d for d in sorted(entry.glob("base-*")) if (d / "pretrain_done.json").is_file()]
        if len(bases) != 1:
            sys.exit(f"{entry}: expected one finished base-*/ folder, found {[d.name for d in bases]}")
        corpus = entry / "corpus"
        base = {"model": str(bases[0]), **{s: str(corpus / f"{s}.jsonl") for s in ("midtrain", "eval", "posttrain")}}
        base["manifest"] = json.loads((corpus / "manifest.json").read_text())
    else:
        from rmt.embedded import ensure_embedded

        arts = ensure_embedded(load_config("rmt", list(args.overrides), layers=LAYERS))
        base = {"model": str(arts.base_model_dir), "midtrain": str(arts.midtrain_path), "eval": str(arts.eval_path),
                "posttrain": str(arts.posttrain_path)}
        base["manifest"] = json.loads((Path(arts.midtrain_path).parent / "manifest.json").read_text())
    probe = Path(base["model"]) / "probe.json"
    base["probe"] = json.loads(probe.read_text()) if probe.is_file() else None
    # Every stage names the base model and the corpus files explicitly, so no stage rebuilds or resolves anything.
    args.base_overrides = [f"model.path={base['model']}", f"data.path={base['midtrain']}", f"data.eval_path={base['eval']}",
                           f"data.prepared_dir={args.out / 'corpus'}"]
    return base


# --- 1. mid-training and the main table -------------------------------------------------------------------------


def run_dir(args, seed: int, method: str) -> Path:
    return args.out / f"seed{seed}" / method


def train_summary(folder: Path) -> dict:
    """Wall time and rollout statistics of a finished run, read back from its metrics.jsonl."""
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "time_step_s" in r]
    mean = lambda key: float(np.mean([r[key] for r in rows if key in r])) if any(key in r for r in rows) else None  # noqa: E731
    last = rows[-1] if rows else {}
    return {
        "steps": len(rows), "train_s": float(sum(r["time_step_s"] for r in rows)), "step_s_mean": mean("time_step_s"),
        "rl_positions_per_step": mean("rl_positions"), "response_len_mean": mean("response_len_mean"),
        "think_len_mean": mean("think_len_mean"), "rollout_accuracy": mean("rollout_accuracy"),
        "ntp_loss_last": last.get("ntp_loss"), "budget_last": last.get("budget"),
        "think_len_last": last.get("think_len_mean"), "rollout_accuracy_last": last.get("rollout_accuracy"),
    }


def midtrain(args, seed: int) -> dict:
    from rmt.trainer import train

    out = {}
    for method in args.methods:
        cfg = config(method, args, [f"train.seed={seed}", f"output.dir={run_dir(args, seed, method)}"])
        stamp(f"seed {seed}: mid-train {method} ({cfg.train.total_steps} steps x {cfg.train.sequences_per_step} sequences)")
        train(cfg)
        out[method] = train_summary(run_dir(args, seed, method))
    return out


def evaluate_main(args, seed: int) -> dict:
    """Every model in NTP and reasoning mode on the fixed eval set (cached in seed<N>/eval.json)."""
    from rmt.evaluate import evaluate

    path = args.out / f"seed{seed}" / "eval.json"
    models = {"base": args.base["model"], **{m: str(run_dir(args, seed, m) / "final") for m in args.methods}}
    if path.is_file():
        cached = json.loads(path.read_text())
        if {r["model"]: r["path"] for r in cached["results"].values()} == models:
            return cached
    stamp(f"seed {seed}: evaluate {', '.join(models)} (NTP and reasoning mode)")
    return evaluate(config("rmt", args, [f"output.dir={args.out / f'seed{seed}'}"]), models=models, out=path)


# --- 2. post-training -------------------------------------------------------------------------------------------


def compact(expression: str) -> str:
    return "".join(expression.split())


def posttrain_data(args) -> dict[str, Path]:
    """Question/answer JSONL files: a training mix of the two tasks and one held-out set per task."""
    import reasoning_gym

    folder = args.out / "posttrain_data"
    files = {name: folder / f"{name}.jsonl" for name in ("train", "eval_indist", "eval_transfer")}
    if all(f.is_file() for f in files.values()):
        return files
    n_train, n_eval = args.qa_train, args.qa_eval
    records = [json.loads(line) for line in Path(args.base["posttrain"]).read_text().splitlines() if line.strip()]
    indist = [{"question": r["prompt"], "answer": r["answer"], "task": "chain_sum_3_4"} for r in records]
    if len(indist) < n_train + n_eval:
        sys.exit(f"the post-training split has {len(indist)} questions, fewer than {n_train} + {n_eval}")
    transfer, seen = [], set()
    ds = reasoning_gym.create_dataset("chain_sum", min_terms=TRANSFER_TERMS, max_terms=TRANSFER_TERMS, min_digits=1,
                                      max_digits=1, seed=TRANSFER_SEED, size=4 * (n_train + n_eval))
    for entry in ds:
        expr = compact(entry["metadata"]["expression"])
        if expr not in seen:  # distinct problems, so no eval question is also a training question
            seen.add(expr)
            transfer.append({"question": expr + "=", "answer": entry["answer"], "task": f"chain_sum_{TRANSFER_TERMS}"})
        if len(transfer) == n_train + n_eval:
            break
    train_mix = [q for pair in zip(indist[:n_train], transfer[n_eval:]) for q in pair]
    folder.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train", train_mix), ("eval_indist", indist[-n_eval:]), ("eval_transfer", transfer[:n_eval])):
        tmp = files[name].with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
        tmp.replace(files[name])
    return files


def posttrain_stage(args, seed: int, files: dict[str, Path]) -> dict:
    """Post-train each start checkpoint; greedy accuracy on both held-out sets before and after (cached)."""
    from rmt.modeling import load_model, load_tokenizer
    from rmt.posttrain import evaluate_questions, posttrain

    folder = args.out / f"seed{seed}" / "posttrain"
    cache_path = folder / "qa_eval.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    sets = {name: [json.loads(line) for line in files[name].read_text().splitlines()] for name in ("eval_indist", "eval_transfer")}
    starts = {"base": args.base["model"], **{m: str(run_dir(args, seed, m) / "final") for m in POSTTRAIN_STARTS if m != "base"}}
    starts = {k: v for k, v in starts.items() if k == "base" or k in args.methods}
    out = {}
    for start, path in starts.items():
        cfg = config("rmt", args, [f"model.path={path}", f"train.seed={seed}", f"posttrain.data={files['train']}",
                                   f"posttrain.output_dir={folder / start}"])
        stamp(f"seed {seed}: post-train from {start} ({cfg.posttrain.steps} steps x {cfg.posttrain.questions_per_step} questions)")
        t0 = time.perf_counter()
        posttrain(cfg)
        wall = time.perf_counter() - t0
        row = {"path": path, "steps": cfg.posttrain.steps, "train_s": train_summary(folder / start)["train_s"]}
        for when, model_path in (("before", path), ("after", str(folder / start / "final"))):
            missing = [name for name in sets if f"{start}|{when}|{name}" not in cache]
            if missing:
                tok, model = load_tokenizer(model_path), load_model(model_path, cfg)
                for name in missing:
                    cache[f"{start}|{when}|{name}"] = evaluate_questions(model, tok, sets[name], cfg)
                    cache_path.write_text(json.dumps(cache, indent=2))
            for name in sets:
                row[f"{name}_{when}"] = cache[f"{start}|{when}|{name}"]
        log.info("post-training from %s: %.0f s", start, wall)
        out[start] = row
    return out


# --- tables -----------------------------------------------------------------------------------------------------


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def seed_cell(stats: list[dict], key: str = "accuracy", ci_key: str = "ci95") -> str:
    """One seed: accuracy [Wilson 95%]. Several: mean ± the 95% t half-width over seeds (the eval set is the same)."""
    values = [s[key] for s in stats if s.get(key) is not None]
    if not values:
        return "–"
    if len(stats) == 1:
        ci = stats[0].get(ci_key)
        return f"{pct(values[0])} [{pct(ci[0])}, {pct(ci[1])}]" if ci else pct(values[0])
    half = T975.get(len(values) - 1, 1.96) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return f"{pct(float(np.mean(values)))} ± {pct(half)}"


def mean_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def main_rows(args) -> list[tuple[str, str, str]]:
    """(label in the table, row label in eval.json, mode) in table order."""
    rows = [("base (NTP)", "base/ntp", "ntp"), ("NTR (base, reasoning)", "ntr", "reasoning")]
    if "ntp" in args.methods:
        rows += [("NTP (NTP)", "ntp/ntp", "ntp"), ("NTP (reasoning)", "ntp/reasoning", "reasoning")]
    rows += [(m.upper() if m in ("rpt", "rmt") else m, f"{m}/reasoning", "reasoning") for m in args.methods if m != "ntp"]
    return rows


def baseline_label(args) -> str:
    if args.baseline in ("ntr", "base/ntp") or "/" in args.baseline:
        return args.baseline
    return f"{args.baseline}/reasoning"


def main_table(args, evals: dict[int, dict]) -> str:
    base_label = baseline_label(args)
    seeds = list(evals)
    res = lambda label: [evals[s]["results"][label] for s in seeds]  # noqa: E731
    lines = [f"| Method | Easy | Medium | Hard | Average | vs {base_label} | Think len | Malformed |", "|---|---|---|---|---|---|---|---|"]
    for name, label, mode in main_rows(args):
        rows = res(label)
        cells = [seed_cell([r["tiers"][t] for r in rows]) for t in TIERS]
        avg = seed_cell([{"accuracy": r["average"]} for r in rows])
        base_avg = [evals[s]["results"][base_label]["average"] for s in seeds]
        rel = mean_or_none([(r["average"] - b) / b if b else None for r, b in zip(rows, base_avg)])
        rel_s = "–" if label == base_label or rel is None else f"{'+' if rel >= 0 else ''}{100 * rel:.1f}%"
        think = mean_or_none([r.get("think_len_mean") for r in rows])
        malformed = mean_or_none([r.get("malformed_frac") for r in rows])
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {avg} | {rel_s} | "
                     f"{'–' if think is None else f'{think:.1f}'} | {'–' if malformed is None else pct(malformed) + '%'} |")
    return "\n".join(lines)


def split_table(args, evals: dict[int, dict]) -> str:
    """Computed / random accuracy per tier (mean over seeds), n in brackets."""
    seeds = list(evals)
    lines = ["| Method | Easy | Medium | Hard | All |", "|---|---|---|---|---|"]
    for name, label, _ in main_rows(args):
        rows = [evals[s]["results"][label] for s in seeds]
        cells = []
        for group in [*(lambda r, t=t: r["tiers"][t] for t in TIERS), lambda r: r["overall"]]:
            c = mean_or_none([group(r)["computed"]["accuracy"] for r in rows])
            rnd = mean_or_none([group(r)["random"]["accuracy"] for r in rows])
            g0 = group(rows[0])
            cells.append(f"{pct(c)} ({g0['computed']['n']}) / {pct(rnd)} ({g0['random']['n']})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ntp_mode_table(args, evals: dict[int, dict]) -> str:
    seeds = list(evals)
    lines = ["| Model (NTP mode) | Easy | Medium | Hard | Average |", "|---|---|---|---|---|"]
    for model in ("base", *args.methods):
        rows = [evals[s]["results"][f"{model}/ntp"] for s in seeds]
        lines.append(f"| {model} | " + " | ".join(seed_cell([r["tiers"][t] for r in rows]) for t in TIERS)
                     + f" | {seed_cell([{'accuracy': r['average']} for r in rows])} |")
    return "\n".join(lines)


def training_table(args, trained: dict[int, dict]) -> str:
    seeds = list(trained)
    lines = ["| Method | Steps | Train s (mean over seeds) | s/step | RL positions/step | Response len (rollouts) | "
             "Think len, last step | Rollout acc, mean | NTP loss, last step |", "|---|---|---|---|---|---|---|---|---|"]
    for m in args.methods:
        rows = [trained[s][m] for s in seeds]
        f = lambda key, fmt="{:.1f}": (lambda v: "–" if v is None else fmt.format(v))(mean_or_none([r.get(key) for r in rows]))  # noqa: E731
        lines.append(f"| {m} | {rows[0]['steps']} | {f('train_s', '{:.0f}')} | {f('step_s_mean')} | {f('rl_positions_per_step', '{:.0f}')} | "
                     f"{f('response_len_mean')} | {f('think_len_last')} | {f('rollout_accuracy', '{:.3f}')} | {f('ntp_loss_last', '{:.3f}')} |")
    return "\n".join(lines)


def posttrain_table(post: dict[int, dict]) -> str:
    def cell(s: dict) -> str:
        lo, hi = s["accuracy_ci95"]
        return f"{pct(s['accuracy'])} [{pct(lo)}, {pct(hi)}]"

    lines = [f"| Seed | Start | 3-4 terms before | 3-4 terms after | {TRANSFER_TERMS} terms before | {TRANSFER_TERMS} terms after | "
             "Think len after (3-4 / 5) | Post-train s |", "|---|---|---|---|---|---|---|---|"]
    for seed, rows in post.items():
        for start, r in rows.items():
            lines.append(f"| {seed} | {start} | {cell(r['eval_indist_before'])} | {cell(r['eval_indist_after'])} | "
                         f"{cell(r['eval_transfer_before'])} | {cell(r['eval_transfer_after'])} | "
                         f"{r['eval_indist_after']['mean_think_tokens']:.1f} / {r['eval_transfer_after']['mean_think_tokens']:.1f} | "
                         f"{r['train_s']:.0f} |")
    return "\n".join(lines)


def write_markdown(args, results: dict) -> str:
    evals = {int(s): e for s, e in results["eval"].items()}
    n = {t: next(iter(evals.values()))["eval_set"]["counts"][t] for t in TIERS}
    seeds = ", ".join(map(str, evals))
    ci = "95% Wilson interval" if len(evals) == 1 else f"mean ± 95% t half-width over {len(evals)} seeds"
    s = results["settings"]
    md = [
        f"# The paper's tables at small scale ({'quick run' if args.quick else 'full run'})", "",
        f"Command: `{results['command']}`", "",
        f"Seeds (train.seed): {seeds}. Mid-training: {s['steps']} steps x {s['sequences_per_step']} sequences for every method; "
        f"eval positions per tier: " + ", ".join(f"{t} {n[t]}" for t in TIERS) + f"; reasoning-mode cap {s['eval_cap']} tokens, greedy.",
        f"Base model: `{results['base']['model']}` (embedded corpus format {results['base']['manifest'].get('format', 1)}, "
        f"reasoning-gym {results['base']['manifest'].get('reasoning_gym', '?')}).",
        f"Wall time: {results['wall_s'] / 60:.1f} min in this call, {results['wall_s_total'] / 60:.1f} min over "
        f"{results['calls']} call(s) into this folder, with {s['machine']['threads']} torch thread(s) "
        f"(load average at start {results['loadavg_start']}).", "",
        f"## Main table: next-token accuracy (%) by tier ({ci})", "", main_table(args, evals), "",
        "Average = mean of the three tiers. Think len = mean tokens inside <think></think> on the eval positions; "
        "malformed = no </think> or no answer within the cap.", "",
        "## Computed vs random positions (accuracy %, computed / random, n in brackets; mean over seeds)", "",
        split_table(args, evals), "",
        "## Every model in NTP mode (argmax next token, no reasoning)", "", ntp_mode_table(args, evals), "",
        "## Mid-training runs", "", training_table(args, {int(k): v for k, v in results["train"].items()}), "",
    ]
    if results.get("posttrain"):
        md += [f"## Post-training: greedy accuracy (%) with 95% Wilson intervals ({s['posttrain_steps']} GRPO steps each; "
               f"{s['qa_eval']} held-out questions per task)", "", posttrain_table({int(k): v for k, v in results["posttrain"].items()}), ""]
    return "\n".join(md)


# --- main -------------------------------------------------------------------------------------------------------

T0 = time.perf_counter()


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def stamp(text: str) -> None:
    log.info("[%5.1f min] %s", (time.perf_counter() - T0) / 60, text)


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    loadavg = [round(x, 2) for x in os.getloadavg()]
    stamp(f"output: {args.out}; load average {loadavg}")
    args.base = resolve_base(args)
    stamp(f"base model: {args.base['model']}")

    from rmt.data.prepare import prepare_corpus
    from rmt.schedules import response_cap
    from rmt.scoring import score_corpus

    first = config("rmt", args, [])
    prepare_corpus(first)
    score_corpus(first)
    stamp("corpus prepared and scored")

    results = {
        "command": " ".join(["python benchmarks/paper_tables.py", *(argv if argv is not None else sys.argv[1:])]),
        "loadavg_start": loadavg, "base": args.base,
        "settings": {"methods": args.methods, "seeds": args.seeds, "steps": first.train.total_steps,
                     "sequences_per_step": first.train.sequences_per_step, "posttrain_steps": first.posttrain.steps,
                     "posttrain_questions_per_step": first.posttrain.questions_per_step, "qa_train": args.qa_train,
                     "qa_eval": args.qa_eval, "eval_cap": response_cap(first.eval.budget, first.budget.answer_allowance,
                                                                      first.rollout.max_response_tokens),
                     "overrides": args.base_overrides + args.size_overrides + args.overrides,
                     "machine": {"cpus": os.cpu_count(), "threads": torch_threads(), "python": platform.python_version()}},
        "train": {}, "eval": {}, "posttrain": {},
    }

    # A stopped run goes on where it stopped; its earlier calls' time counts towards the total.
    previous = args.out / "results.json"
    earlier = json.loads(previous.read_text()) if previous.is_file() else {}
    earlier_s = float(earlier.get("wall_s_total", earlier.get("wall_s", 0.0)))
    results["calls"] = int(earlier.get("calls", 1 if earlier else 0)) + 1

    def save() -> None:
        results["wall_s"] = time.perf_counter() - T0
        results["wall_s_total"] = earlier_s + results["wall_s"]
        (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
        if results["eval"]:
            (args.out / "results.md").write_text(write_markdown(args, results) + "\n")

    for seed in args.seeds:
        results["train"][seed] = midtrain(args, seed)
        results["eval"][seed] = evaluate_main(args, seed)
        save()
    if not args.skip_posttrain:
        files = posttrain_data(args)
        for seed in args.posttrain_seeds:
            results["posttrain"][seed] = posttrain_stage(args, seed, files)
            save()
    save()
    stamp(f"done: {args.out / 'results.md'}")
    print((args.out / "results.md").read_text())
    return results


if __name__ == "__main__":
    main()
