"""The paper's two tables at small scale, on the embedded default, with paired comparisons (docs/results.md).

1. **Main table** (SPEC section 4; the paper's language-modelling table and its ablations). Mid-train NTP, RPT, RLP
   (the information-gain reward, docs/rlp.md), RMT and the ablations rmt-no-dtb, rmt-no-cas, rmt-no-ntp from the same base model at equal steps x sequences, plus
   NTP given the same training FLOPs as RMT (``ntp-flops``: more steps, counted with ``rmt.flops``), for each seed;
   evaluate every model on the same fixed, seeded held-out positions: the base model in NTP mode, NTR (the base
   model reasoning), every mid-trained model in reasoning mode and in NTP mode. Accuracy per tier, on the positions
   inside computed values (the tokens reasoning can win; split into a value's first and later characters) and on
   random ones, reasoning length, training FLOPs.
2. **Paired comparisons**: the difference between two rows on the same positions, with a 95% bootstrap interval
   over seeds and positions (``rmt.stats.paired_bootstrap``): NTR vs the base model, RMT vs NTP (its better
   mode), RMT vs RPT, RMT and RPT vs RLP, RMT vs NTP at equal FLOPs, each ablation vs RMT; and RMT's reasoning length
   vs RPT's.
3. **Post-training table** (the paper's transfer table). GRPO post-training (``rmt.posttrain``) from the base, NTP,
   RPT, RLP and RMT checkpoints of every seed for the same number of steps, on a mix of two tasks: the embedded
   post-training split's regular problems (chain_sum, 3-4 one-digit terms) and problems with ``TRANSFER_TERMS``
   terms (the corpus' long problems when ``embedded.long_terms`` is 5: mid-training text holds them plain, the
   base corpus rarely; generated here otherwise). Greedy accuracy on held-out questions of each task before and after,
   each run's own accuracy-vs-step curves on both held-out sets, and paired comparisons of the starts after
   post-training and at the curves' steps in between. ``--posttrain-set KEY=VALUE`` overrides a setting for
   post-training only (e.g. mid-training with ``grpo.kl_beta=0.1``, post-training with ``grpo.kl_beta=0``).

Sizes: ``presets/demo/paper.yaml``; ``--steps`` and ``--posttrain-steps`` on top; ``--quick`` is a minutes-long
smoke version of the same pipeline. ``--threads``: torch threads (on a CPU shared with other jobs use 1). Every
stage reuses what a previous call finished (training and post-training resume from their run folders, evaluations
are cached as JSON), so a stopped run goes on where it stopped when called again with the same arguments.

    python benchmarks/paper_tables.py --quick
    python benchmarks/paper_tables.py --out runs/paper --seeds 0 1 2 --write-doc docs/results.md
    python benchmarks/paper_tables.py ... --embedded-entry $RMT_CACHE/embedded/<key>   # an existing cache entry

Outputs in ``--out``: ``results.json`` (everything, per seed), ``results.md`` (the tables) and
``posttrain_curves.png``. ``--write-doc FILE`` also replaces the part of FILE between the markers
``<!-- paper_tables:begin -->`` and ``<!-- paper_tables:end -->`` with the tables (and copies the figure beside it);
with ``--doc-section NAME`` the markers ``<!-- paper_tables:NAME:begin/end -->`` and ``posttrain_curves-NAME.png``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from rmt.config import PRESET_DIR, RMTConfig, load_config
from rmt.fileio import atomic_write_text

log = logging.getLogger("paper_tables")

METHODS = ("ntp", "rpt", "rlp", "rmt", "rmt-no-dtb", "rmt-no-cas", "rmt-no-ntp")
NTP_FLOPS = "ntp-flops"  # NTP trained for as many FLOPs as RMT (derived, not a preset)
POSTTRAIN_STARTS = ("base", "ntp", "rpt", "rlp", "rmt")
LAYERS = [PRESET_DIR / "demo" / "paper.yaml"]  # self-contained sizes, independent of the demo's
TIERS = ("easy", "medium", "hard")
TRANSFER_TERMS = 5  # chain_sum terms of the transfer task (the base corpus holds 3-4)
TRANSFER_SEED = 20_250_924  # reasoning-gym seed of generated transfer questions
# Two-sided 95% Student t quantiles for 1..9 degrees of freedom (seed-to-seed intervals with few seeds).
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}
BEGIN, END = "<!-- paper_tables:begin -->", "<!-- paper_tables:end -->"

QUICK = {  # the smoke version: every stage runs, on a handful of steps and questions
    "steps": 2, "posttrain_steps": 2,
    "overrides": ["train.sequences_per_step=4", "eval.positions_per_tier=8", "posttrain.questions_per_step=4",
                  "posttrain.eval_every=1"],
    "qa_train": 64, "qa_eval": 16,
}
FULL = {"qa_train": 800, "qa_eval": 200}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="output folder (default runs/paper, or runs/paper-quick with --quick)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="train.seed of the mid-training runs")
    p.add_argument("--posttrain-seeds", type=int, nargs="*", default=None,
                   help="seeds whose checkpoints are post-trained (default: all of --seeds)")
    p.add_argument("--steps", type=int, default=None, help="mid-training steps T for every method (default: paper.yaml)")
    p.add_argument("--posttrain-steps", type=int, default=None, help="post-training steps (default: paper.yaml)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--no-ntp-flops", action="store_true", help="skip the NTP run at RMT's training FLOPs")
    p.add_argument("--embedded-entry", default=None,
                   help="an existing embedded cache entry (folder with corpus/ and a finished base-*/) instead of ensure_embedded")
    p.add_argument("--quick", action="store_true", help="minutes-long smoke version")
    p.add_argument("--posttrain-starts", nargs="+", default=list(POSTTRAIN_STARTS), choices=POSTTRAIN_STARTS,
                   help="checkpoints post-trained (default: all of them that were mid-trained, and the base model)")
    p.add_argument("--skip-posttrain", action="store_true")
    p.add_argument("--posttrain-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for post-training only, after the others (repeatable); e.g. mid-training with "
                        "grpo.kl_beta=0.1 and post-training as every other section does, --posttrain-set grpo.kl_beta=0")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--bootstrap", type=int, default=10_000, help="bootstrap samples of each paired comparison")
    p.add_argument("--write-doc", default=None, help="a markdown file whose generated section gets the tables")
    p.add_argument("--doc-section", default=None,
                   help="name of the generated section to replace (markers <!-- paper_tables:NAME:begin/end -->), so "
                        "one page can hold several runs' tables (e.g. the ablations); default: the unnamed section")
    p.add_argument("overrides", nargs="*", help="extra dotted config overrides for every stage (e.g. train.lr=5e-5)")
    args = p.parse_args(argv)
    size = QUICK if args.quick else {}
    args.out = Path(args.out or ("runs/paper-quick" if args.quick else "runs/paper"))
    args.steps = args.steps or size.get("steps")
    args.posttrain_steps = args.posttrain_steps or size.get("posttrain_steps")
    args.size_overrides = size.get("overrides", [])
    args.qa_train = (QUICK if args.quick else FULL)["qa_train"]
    args.qa_eval = (QUICK if args.quick else FULL)["qa_eval"]
    args.posttrain_seeds = args.seeds if args.posttrain_seeds is None else args.posttrain_seeds
    args.ntp_flops = not args.no_ntp_flops and {"ntp", "rmt"} <= set(args.methods)
    return args


# --- configs and the base model ---------------------------------------------------------------------------------


def config(method: str, args, extra: list[str]) -> RMTConfig:
    """A method's preset + the paper sizes + this run's base, data and sizes."""
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
    else:
        from rmt.embedded import ensure_embedded

        arts = ensure_embedded(load_config("rmt", list(args.overrides), layers=LAYERS))
        base = {"model": str(arts.base_model_dir), "midtrain": str(arts.midtrain_path), "eval": str(arts.eval_path),
                "posttrain": str(arts.posttrain_path)}
    base["manifest"] = json.loads((Path(base["midtrain"]).parent / "manifest.json").read_text())
    probe = Path(base["model"]) / "probe.json"
    base["probe"] = json.loads(probe.read_text()) if probe.is_file() else None
    # Every stage names the base model and the corpus files explicitly, so no stage rebuilds or resolves anything.
    args.base_overrides = [f"model.path={base['model']}", f"data.path={base['midtrain']}", f"data.eval_path={base['eval']}",
                           f"data.prepared_dir={args.out / 'corpus'}"]
    return base


# --- 1. mid-training and evaluation -----------------------------------------------------------------------------


def run_dir(args, seed: int, method: str) -> Path:
    return args.out / f"seed{seed}" / method


def read_rows(folder: Path) -> list[dict]:
    rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in rows if "time_step_s" in r]


def train_summary(folder: Path) -> dict:
    """Wall time, FLOPs and rollout statistics of a finished run, read back from its metrics.jsonl."""
    rows = read_rows(folder)
    mean = lambda key: float(np.mean([r[key] for r in rows if key in r])) if any(key in r for r in rows) else None  # noqa: E731
    last = rows[-1] if rows else {}
    b0 = folder / "budget_b0.json"
    return {
        "steps": len(rows), "train_s": float(sum(r["time_step_s"] for r in rows)), "step_s_mean": mean("time_step_s"),
        "flops_total": last.get("flops_total"), "rl_positions_per_step": mean("rl_positions"),
        "response_len_mean": mean("response_len_mean"), "think_len_mean": mean("think_len_mean"),
        "rollout_accuracy": mean("rollout_accuracy"), "ntp_loss_last": last.get("ntp_loss"), "budget_first": rows[0].get("budget") if rows else None,
        "budget_last": last.get("budget"), "think_len_last": last.get("think_len_mean"),
        "rollout_accuracy_last": last.get("rollout_accuracy"), "b0_auto": json.loads(b0.read_text()) if b0.is_file() else None,
        # Where the budget stops binding and starts cutting: rollout accuracy on computed positions and the share of
        # rollouts cut by the cap (2B + answer allowance), over the first and the last fifth of the run.
        **{f"{key}_{part}": window_mean(rows, key, part) for key in ("rollout_accuracy_computed", "truncated_frac")
           for part in ("first", "last")},
    }


def window_mean(rows: list[dict], key: str, part: str) -> float | None:
    """Mean of ``key`` over the first or the last fifth of a run's steps (None when no step has it)."""
    n = max(1, len(rows) // 5)
    values = [r[key] for r in (rows[:n] if part == "first" else rows[-n:]) if key in r]
    return float(np.mean(values)) if values else None


def midtrain(args, seed: int) -> dict:
    from rmt.trainer import train

    out = {}
    for method in args.methods:
        cfg = config(method, args, [f"train.seed={seed}", f"output.dir={run_dir(args, seed, method)}"])
        stamp(f"seed {seed}: mid-train {method} ({cfg.train.total_steps} steps x {cfg.train.sequences_per_step} sequences)")
        train(cfg)
        out[method] = train_summary(run_dir(args, seed, method))
    if args.ntp_flops:
        # NTP's FLOPs per step are the same at every step (same sequence lengths): as many steps as buy RMT's FLOPs.
        per_step = out["ntp"]["flops_total"] / out["ntp"]["steps"]
        steps = max(1, round(out["rmt"]["flops_total"] / per_step))
        cfg = config("ntp", args, [f"train.seed={seed}", f"output.dir={run_dir(args, seed, NTP_FLOPS)}", f"train.total_steps={steps}"])
        stamp(f"seed {seed}: mid-train ntp at RMT's FLOPs ({steps} steps)")
        train(cfg)
        out[NTP_FLOPS] = train_summary(run_dir(args, seed, NTP_FLOPS))
    return out


def trained_methods(args) -> list[str]:
    return [*args.methods, *([NTP_FLOPS] if args.ntp_flops else [])]


def evaluate_main(args, seed: int) -> dict:
    """Every model in NTP and reasoning mode on the fixed eval set (cached in seed<N>/eval.json)."""
    from rmt.evaluate import evaluate

    path = args.out / f"seed{seed}" / "eval.json"
    models = {"base": args.base["model"], **{m: str(run_dir(args, seed, m) / "final") for m in trained_methods(args)}}
    if path.is_file():
        cached = json.loads(path.read_text())
        if {r["model"]: r["path"] for r in cached["results"].values()} == models and all("per_item" in r for r in cached["results"].values()):
            return cached
    stamp(f"seed {seed}: evaluate {', '.join(models)} (NTP and reasoning mode)")
    return evaluate(config("rmt", args, [f"output.dir={args.out / f'seed{seed}'}", "eval.baseline=base"]), models=models, out=path)


# --- 2. paired comparisons --------------------------------------------------------------------------------------


def position_groups(args, eval_set: dict) -> dict[str, np.ndarray]:
    """Masks over the evaluation set's items: all, computed (any character of a computed value), its first and later
    characters, and the rest (random operands, operators, '=')."""
    from rmt.scoring import load_scored

    items = eval_set["items"]
    computed = np.array([it["computed"] == 1 for it in items])
    flags = load_scored(str(args.out / "corpus"), "eval").select_columns(["computed"])
    rows = {r: flags[r]["computed"] for r in {it["row"] for it in items}}
    later = np.array([it["computed"] == 1 and it["pos"] > 0 and rows[it["row"]][it["pos"] - 1] == 1 for it in items])
    return {"all": np.ones(len(items), dtype=bool), "computed": computed, "computed first": computed & ~later,
            "computed later": later, "random": ~computed}


def scores(evals: dict, label: str, key: str = "exact") -> np.ndarray:
    """(seeds, items) per-position scores of one row."""
    return np.array([e["results"][label]["per_item"][key] for e in evals.values()], dtype=np.float64)


def better_mode(evals: dict, model: str, mask: np.ndarray) -> str:
    """The row of ``model`` (NTP or reasoning mode) with the higher mean accuracy on ``mask``."""
    rows = [f"{model}/ntp", f"{model}/reasoning"]
    return max(rows, key=lambda r: scores(evals, r)[:, mask].mean())


def comparisons(args, evals: dict, groups: dict[str, np.ndarray]) -> list[dict]:
    """Paired differences (points) between rows on the same positions, with bootstrap intervals."""
    from rmt.stats import paired_bootstrap

    methods = trained_methods(args)
    pairs = [("NTR vs base (NTP mode)", "ntr", "base/ntp", ("computed", "computed later", "random"))]
    if "ntp" in methods and "rmt" in methods:
        best = better_mode(evals, "ntp", groups["computed"])
        pairs.append((f"RMT vs NTP ({best.split('/')[1]} mode, its better one)", "rmt/reasoning", best, ("computed", "all")))
    if "rpt" in methods and "rmt" in methods:
        pairs.append(("RMT vs RPT", "rmt/reasoning", "rpt/reasoning", ("computed", "all")))
    for other in ("rmt", "rpt"):
        if "rlp" in methods and other in methods:
            pairs.append((f"{LABELS[other]} vs RLP", f"{other}/reasoning", "rlp/reasoning", ("computed", "all")))
    if NTP_FLOPS in methods:
        best = better_mode(evals, NTP_FLOPS, groups["computed"])
        pairs.append((f"RMT vs NTP at RMT's FLOPs ({best.split('/')[1]} mode)", "rmt/reasoning", best, ("computed", "all")))
    for ablation in ("rmt-no-dtb", "rmt-no-cas", "rmt-no-ntp"):
        if ablation in methods and "rmt" in methods:
            pairs.append((f"{ablation} vs RMT", f"{ablation}/reasoning", "rmt/reasoning", ("computed", "all")))
    out = []
    for name, a, b, where in pairs:
        for group in where:
            mask = groups[group]
            if not mask.any():
                continue
            res = paired_bootstrap(scores(evals, a)[:, mask], scores(evals, b)[:, mask], n_boot=args.bootstrap, seed=0)
            out.append({"comparison": name, "a": a, "b": b, "positions": group, **res})
    return out


def think_lengths(evals: dict, groups: dict[str, np.ndarray], label: str) -> dict[str, float]:
    """Mean thinking length of a reasoning row on each group of positions (over seeds)."""
    think = scores(evals, label, "think")
    return {g: float(think[:, m].mean()) for g, m in groups.items() if m.any()}


# --- 3. post-training -------------------------------------------------------------------------------------------


def compact(expression: str) -> str:
    return "".join(expression.split())


def posttrain_data(args) -> dict[str, Path]:
    """Question/answer JSONL files: a training mix of the two tasks and one held-out set per task.

    In-distribution: the post-training split's regular problems. Transfer: its novel problems when the corpus has
    them (embedded.long_terms), topped up with generated ones that are in no corpus split."""
    import reasoning_gym

    folder = args.out / "posttrain_data"
    files = {name: folder / f"{name}.jsonl" for name in ("train", "eval_indist", "eval_transfer", "eval_curve")}
    if all(f.is_file() for f in files.values()):
        return files
    n_train, n_eval = args.qa_train, args.qa_eval
    records = [json.loads(line) for line in Path(args.base["posttrain"]).read_text().splitlines() if line.strip()]
    from rmt.embedded.corpus import QUESTION_PREFIX, question_text

    indist = [{"question": question_text(r), "answer": r["answer"], "task": "regular"} for r in records if r.get("terms", 0) != TRANSFER_TERMS]
    transfer = [{"question": question_text(r), "answer": r["answer"], "task": "transfer"} for r in records if r.get("terms", 0) == TRANSFER_TERMS]
    # With long problems in the corpus (embedded.long_terms) fewer regular questions are left: train on the rest.
    n_train = min(n_train, len(indist) - n_eval)
    if n_train < 1:
        sys.exit(f"the post-training split has {len(indist)} regular questions, too few for {n_eval} held out and any to train on")
    seen = {compact(q["question"])[:-1] for q in transfer}
    for split in ("midtrain", "eval"):  # generated questions must not be corpus problems
        for line in Path(args.base[split]).read_text().splitlines():
            seen.update(ln.split("=")[0] for ln in json.loads(line)["text"].split("\n"))
    ds = reasoning_gym.create_dataset("chain_sum", min_terms=TRANSFER_TERMS, max_terms=TRANSFER_TERMS, min_digits=1,
                                      max_digits=1, seed=TRANSFER_SEED, size=8 * (n_train + n_eval))
    for entry in ds:
        if len(transfer) >= n_train + n_eval:
            break
        expr = compact(entry["metadata"]["expression"])
        if expr not in seen:
            seen.add(expr)
            transfer.append({"question": QUESTION_PREFIX + expr + "=", "answer": entry["answer"], "task": "transfer"})
    train_mix = [q for pair in zip(indist[:n_train], transfer[n_eval : n_eval + n_train]) for q in pair]
    folder.mkdir(parents=True, exist_ok=True)
    curve = indist[-n_eval:] + transfer[:n_eval]  # both held-out sets: the runs' own curves, per task
    for name, rows in (("train", train_mix), ("eval_indist", indist[-n_eval:]), ("eval_transfer", transfer[:n_eval]),
                       ("eval_curve", curve)):
        # atomic, under a name of its own: seeds run side by side write the same files
        atomic_write_text(files[name], "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    return files


def questions_per_task(path: Path) -> int:
    """Training questions per task in the post-training mix (it alternates the two tasks)."""
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return sum(r["task"] == "regular" for r in rows)


def posttrain_stage(args, seed: int, files: dict[str, Path]) -> dict:
    """Post-train each start checkpoint; greedy accuracy (per question) on both held-out sets before and after,
    and the run's own curve on the transfer set (cached)."""
    from rmt.modeling import load_model, load_tokenizer
    from rmt.posttrain import answer_questions, posttrain, read_questions, summarize

    folder = args.out / f"seed{seed}" / "posttrain"
    cache_path = folder / "qa_eval.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() else {}
    sets = {name: read_questions(files[name]) for name in ("eval_indist", "eval_transfer")}
    starts = {"base": args.base["model"], **{m: str(run_dir(args, seed, m) / "final") for m in POSTTRAIN_STARTS if m != "base"}}
    starts = {k: v for k, v in starts.items() if k in args.posttrain_starts and (k == "base" or k in args.methods)}
    out = {}
    for start, path in starts.items():
        cfg = config("rmt", args, [f"model.path={path}", f"train.seed={seed}", f"posttrain.data={files['train']}",
                                   f"posttrain.eval_data={files['eval_curve']}", f"posttrain.output_dir={folder / start}",
                                   *args.posttrain_set])
        stamp(f"seed {seed}: post-train from {start} ({cfg.posttrain.steps} steps x {cfg.posttrain.questions_per_step} questions)")
        posttrain(cfg)
        row = {"path": path, "steps": cfg.posttrain.steps, "train_s": train_summary(folder / start)["train_s"]}
        for when, model_path in (("before", path), ("after", str(folder / start / "final"))):
            missing = [name for name in sets if f"{start}|{when}|{name}" not in cache]
            if missing:
                tok, model = load_tokenizer(model_path), load_model(model_path, cfg)
                for name in missing:
                    answers = answer_questions(model, tok, sets[name], cfg)
                    cache[f"{start}|{when}|{name}"] = {**summarize(answers), "correct": [int(a["correct"]) for a in answers]}
                    folder.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(cache_path, json.dumps(cache))
            for name in sets:
                row[f"{name}_{when}"] = cache[f"{start}|{when}|{name}"]
        row.update(run_curves(json.loads((folder / start / "eval.json").read_text()).get("curve", {})))
        out[start] = row
    return out


def run_curves(curve: dict) -> dict:
    """A post-training run's own evaluations by step: "curve" = transfer-task accuracy by step, and, when the run
    evaluated both held-out sets (eval_curve, a summary per task), "curve_indist" and the per-question results of
    each set by step ("curve_correct"). A run that evaluated the transfer set alone (before eval_curve) gives its
    overall accuracy as "curve"."""
    steps = {int(k): v for k, v in curve.items()}
    if not all("by_task" in v for v in steps.values()) or not steps:
        return {"curve": {k: v["accuracy"] for k, v in steps.items()}}
    correct = {"eval_indist": {}, "eval_transfer": {}}
    for k, v in steps.items():
        n_indist = v["by_task"]["regular"]["n"]  # eval_curve holds the in-distribution questions first
        correct["eval_indist"][k], correct["eval_transfer"][k] = v["correct"][:n_indist], v["correct"][n_indist:]
    return {"curve": {k: v["by_task"]["transfer"]["accuracy"] for k, v in steps.items()},
            "curve_indist": {k: v["by_task"]["regular"]["accuracy"] for k, v in steps.items()},
            "curve_correct": correct}


START_PAIRS = (("rmt", "ntp"), ("rmt", "base"), ("rmt", "rpt"), ("rmt", "rlp"), ("ntp", "base"))


def posttrain_comparisons(args, post: dict) -> list[dict]:
    """Paired differences between starts after post-training, per task, over seeds and questions."""
    from rmt.stats import paired_bootstrap

    seeds = list(post)
    starts = list(next(iter(post.values())))
    out = []
    for a, b in START_PAIRS:
        if a not in starts or b not in starts:
            continue
        for task in ("eval_transfer", "eval_indist"):
            sa = np.array([post[s][a][f"{task}_after"]["correct"] for s in seeds], dtype=np.float64)
            sb = np.array([post[s][b][f"{task}_after"]["correct"] for s in seeds], dtype=np.float64)
            out.append({"comparison": f"{a} start vs {b} start", "task": task, **paired_bootstrap(sa, sb, n_boot=args.bootstrap)})
    return out


def curve_steps(post: dict) -> list[int]:
    """The steps every run of ``post`` evaluated both held-out sets at (empty when one did not: an older run)."""
    rows = [r for by_start in post.values() for r in by_start.values()]
    if not rows or not all("curve_correct" in r for r in rows):
        return []
    return sorted(set.intersection(*(set(r["curve_correct"]["eval_indist"]) for r in rows)))


def curve_comparisons(args, post: dict) -> list[dict]:
    """Paired differences between starts *during* post-training: at each step strictly between the first and the
    last of the runs' own curves, per task (the runs' evaluations at those steps, on the same questions)."""
    from rmt.stats import paired_bootstrap

    seeds, steps = list(post), curve_steps(post)
    starts = list(next(iter(post.values()))) if post else []
    out = []
    for step in steps[1:-1]:
        for a, b in START_PAIRS:
            if a not in starts or b not in starts:
                continue
            for task in ("eval_transfer", "eval_indist"):
                sa, sb = (np.array([post[s][x]["curve_correct"][task][step] for s in seeds], dtype=np.float64) for x in (a, b))
                out.append({"comparison": f"{a} start vs {b} start", "task": task, "step": step,
                            **paired_bootstrap(sa, sb, n_boot=args.bootstrap)})
    return out


def plot_curves(args, post: dict) -> Path | None:
    """Transfer-task accuracy vs post-training step for each start (mean over seeds, with each seed faint)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    starts = list(next(iter(post.values())))
    panels = [("curve", f"accuracy, {TRANSFER_TERMS}-term questions")]
    if curve_steps(post):  # the runs evaluated both held-out sets: the in-distribution curve first
        panels.insert(0, ("curve_indist", "accuracy, 3-4 term questions"))
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 if len(panels) == 1 else 10.4, 3.6), squeeze=False)
    for ax, (key, ylabel) in zip(axes[0], panels):
        for i, start in enumerate(starts):
            color = f"C{i}"
            curves = [{int(k): v for k, v in post[s][start][key].items()} for s in post]
            steps = sorted(set.intersection(*(set(c) for c in curves)))
            if not steps:
                continue
            for c in curves:
                ax.plot(steps, [c[k] for k in steps], color=color, alpha=0.25, lw=0.8)
            ax.plot(steps, [np.mean([c[k] for c in curves]) for k in steps], color=color, lw=2, label=f"from {start}")
        ax.set_xlabel("post-training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    path = args.out / "posttrain_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# --- tables -----------------------------------------------------------------------------------------------------


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def seed_cell(values: list[float | None]) -> str:
    """One seed: the value. Several: mean ± the 95% t half-width over seeds (the eval set is the same)."""
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return pct(values[0])
    half = T975.get(len(values) - 1, 1.96) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return f"{pct(float(np.mean(values)))} ± {pct(half)}"


def fmt1(x) -> str:
    return "–" if x is None else f"{x:.1f}"


def mean_or_none(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


LABELS = {"ntp": "NTP", "rpt": "RPT", "rlp": "RLP", "rmt": "RMT", NTP_FLOPS: "NTP at RMT's FLOPs"}


def main_rows(args) -> list[tuple[str, str]]:
    """(label in the table, row label in eval.json) in table order."""
    rows = [("base (NTP mode)", "base/ntp"), ("NTR (base, reasoning)", "ntr")]
    for m in trained_methods(args):
        name = LABELS.get(m, m)
        if m in ("ntp", NTP_FLOPS):
            rows += [(f"{name} (NTP mode)", f"{m}/ntp"), (f"{name} (reasoning)", f"{m}/reasoning")]
        else:
            rows.append((name, f"{m}/reasoning"))
    return rows


def main_table(args, evals: dict, groups: dict, trained: dict) -> str:
    seeds = list(evals)
    lines = ["| Method | Easy | Medium | Hard | Average | Computed | Computed, later chars | Random | Think len (computed / all) | "
             "Train TFLOPs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, label in main_rows(args):
        rows = [evals[s]["results"][label] for s in seeds]
        cells = [seed_cell([r["tiers"][t]["accuracy"] for r in rows]) for t in TIERS]
        cells.append(seed_cell([r["average"] for r in rows]))
        per = scores(evals, label)
        cells += [seed_cell(list(per[:, groups[g]].mean(axis=1))) if groups[g].any() else "–" for g in ("computed", "computed later", "random")]
        if "think" in rows[0]["per_item"]:
            think = think_lengths(evals, groups, label)
            cells.append(f"{fmt1(think.get('computed'))} / {fmt1(think['all'])}")
        else:
            cells.append("–")
        method = label.split("/")[0]
        flops = mean_or_none([trained[s][method]["flops_total"] for s in seeds]) if method in trained[seeds[0]] else None
        cells.append("–" if flops is None else f"{flops / 1e12:.3g}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_table(rows: list[dict]) -> str:
    lines = ["| Comparison | Positions | n (seeds x positions) | Difference (points) | 95% bootstrap interval | Excludes 0 |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lo, hi = r["ci"]
        excl = "yes, above" if lo > 0 else "yes, below" if hi < 0 else "no"
        lines.append(f"| {r['comparison']} | {r['positions']} | {r['n']} | {100 * r['diff']:+.1f} | "
                     f"[{100 * lo:+.1f}, {100 * hi:+.1f}] | {excl} |")
    return "\n".join(lines)


def training_table(args, trained: dict) -> str:
    seeds = list(trained)
    lines = ["| Method | Steps | Train TFLOPs | Train s | s/step | RL positions/step | Budget first / last | Think len, last step | "
             "Rollout acc, mean | Rollout acc on computed, first / last fifth | Cut by the cap, first / last fifth | "
             "NTP loss, last step |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for m in trained_methods(args):
        rows = [trained[s][m] for s in seeds]
        f = lambda key, fmt="{:.1f}": (lambda v: "–" if v is None else fmt.format(v))(mean_or_none([r.get(key) for r in rows]))  # noqa: E731
        flops = mean_or_none([r.get("flops_total") for r in rows])
        budget = "–" if rows[0].get("budget_first") is None or m in ("rpt", "rlp", "ntp", NTP_FLOPS) else f"{f('budget_first', '{:.0f}')} / {f('budget_last', '{:.0f}')}"
        lines.append(f"| {LABELS.get(m, m)} | {f('steps', '{:.0f}')} | {'–' if flops is None else f'{flops / 1e12:.3g}'} | {f('train_s', '{:.0f}')} | "
                     f"{f('step_s_mean')} | {f('rl_positions_per_step', '{:.0f}')} | {budget} | {f('think_len_last')} | "
                     f"{f('rollout_accuracy', '{:.3f}')} | {f('rollout_accuracy_computed_first', '{:.2f}')} / "
                     f"{f('rollout_accuracy_computed_last', '{:.2f}')} | {f('truncated_frac_first', '{:.2f}')} / "
                     f"{f('truncated_frac_last', '{:.2f}')} | {f('ntp_loss_last', '{:.3f}')} |")
    return "\n".join(lines)


def posttrain_table(post: dict) -> str:
    seeds = list(post)
    starts = list(next(iter(post.values())))
    lines = [f"| Start | 3-4 terms before | 3-4 terms after | {TRANSFER_TERMS} terms before | {TRANSFER_TERMS} terms after | "
             f"Think len after (3-4 / {TRANSFER_TERMS}) | Post-train s |", "|---|---|---|---|---|---|---|"]
    for start in starts:
        rows = [post[s][start] for s in seeds]
        acc = lambda key: seed_cell([r[key]["accuracy"] for r in rows])  # noqa: E731
        think = [mean_or_none([r[f"{k}_after"]["mean_think_tokens"] for r in rows]) for k in ("eval_indist", "eval_transfer")]
        lines.append(f"| {start} | {acc('eval_indist_before')} | {acc('eval_indist_after')} | {acc('eval_transfer_before')} | "
                     f"{acc('eval_transfer_after')} | {think[0]:.1f} / {think[1]:.1f} | {mean_or_none([r['train_s'] for r in rows]):.0f} |")
    return "\n".join(lines)


def posttrain_comparison_table(rows: list[dict]) -> str:
    """The paired comparisons of starts, after post-training or (rows with a "step") during it."""
    during = any("step" in r for r in rows)
    lines = [f"| Comparison | Task |{' Step |' if during else ''} n (seeds x questions) | Difference (points) | 95% bootstrap "
             f"interval | Excludes 0 |", "|---|---|" + ("---|" if during else "") + "---|---|---|---|"]
    for r in rows:
        lo, hi = r["ci"]
        excl = "yes, above" if lo > 0 else "yes, below" if hi < 0 else "no"
        task = f"{TRANSFER_TERMS} terms" if r["task"] == "eval_transfer" else "3-4 terms"
        step = f" {r['step']} |" if during else ""
        lines.append(f"| {r['comparison']} | {task} |{step} {r['n']} | {100 * r['diff']:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] | {excl} |")
    return "\n".join(lines)


def curve_table(post: dict) -> str:
    """Greedy accuracy (%) of each start on each held-out set at each step of the runs' own curves (mean ± 95% t
    half-width over seeds)."""
    steps = curve_steps(post)
    seeds, starts = list(post), list(next(iter(post.values())))
    lines = ["| Start | Task | " + " | ".join(f"step {k}" for k in steps) + " |", "|---|---|" + "---|" * len(steps)]
    for task, label in (("eval_indist", "3-4 terms"), ("eval_transfer", f"{TRANSFER_TERMS} terms")):
        for start in starts:
            cells = [seed_cell([float(np.mean(post[s][start]["curve_correct"][task][k])) for s in seeds]) for k in steps]
            lines.append(f"| {start} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_markdown(args, results: dict) -> str:
    evals = {int(s): e for s, e in results["eval"].items()}
    trained = {int(s): t for s, t in results["train"].items()}
    first = next(iter(evals.values()))
    n = first["eval_set"]["counts"]
    groups = {k: np.asarray(v, dtype=bool) for k, v in results["groups"].items()}
    ci = f"mean ± 95% t half-width over {len(evals)} seeds" if len(evals) > 1 else "one seed"
    s = results["settings"]
    also = " (and NTP at RMT's FLOPs)" if NTP_FLOPS in s["methods"] else ""
    md = [
        f"Command: `{results['command']}`", "",
        f"Seeds (train.seed): {', '.join(map(str, evals))}. Mid-training: {s['steps']} steps x {s['sequences_per_step']} "
        f"sequences for every method{also}; eval positions per tier: "
        + ", ".join(f"{t} {n[t]}" for t in TIERS) + f" ({int(groups['computed'].sum())} inside computed values, "
        f"{int(groups['computed later'].sum())} of them after a value's first character); reasoning mode greedy with one cap "
        f"of {first['settings'].get('cap')} tokens for every model. Scoring: {first['settings'].get('match_rule', 'exact match')}",
        f"Base model: `{Path(results['base']['model']).name}` (embedded corpus format {results['base']['manifest'].get('format', 1)}, "
        f"reasoning-gym {results['base']['manifest'].get('reasoning_gym', '?')}). Wall time: {results['wall_s_total'] / 60:.1f} min "
        f"over {results['calls']} call(s), {s['machine']['threads']} torch thread(s).", "",
        f"### Next-token accuracy (%) by tier and by kind of position ({ci})", "", main_table(args, evals, groups, trained), "",
        "Average = mean of the three tiers. Computed = positions inside a value the text computes (the answers), the tokens "
        "reasoning can win; later chars = after the value's first character; random = the rest (operands, operators, '='). "
        "Think len = mean tokens inside <think></think> on the computed positions / on all positions. Train TFLOPs = "
        "forward + backward + generation FLOPs of the mid-training run, counted (rmt.flops).", "",
        "### Paired comparisons (same positions, bootstrap over seeds and positions)", "", comparison_table(results["comparisons"]), "",
        "### Reasoning length", "",
        "| Row | Think len, computed | Think len, all | vs RPT (computed / all) |", "|---|---|---|---|",
    ]
    rpt = results["think"].get("rpt/reasoning")
    for label, t in results["think"].items():
        ratio = "–" if not rpt or label == "rpt/reasoning" else (
            f"{t['computed'] / rpt['computed']:.2f}x / {t['all'] / rpt['all']:.2f}x" if rpt.get("computed") and rpt.get("all") else "–")
        md.append(f"| {label} | {fmt1(t.get('computed'))} | {fmt1(t['all'])} | {ratio} |")
    md += ["", "### Mid-training runs (mean over seeds)", "", training_table(args, trained), ""]
    if results.get("posttrain"):
        post = {int(k): v for k, v in results["posttrain"].items()}
        md += [f"### Post-training: greedy accuracy (%) ({s['posttrain_steps']} GRPO steps from each start; {s['qa_eval']} held-out "
               f"questions per task; {'mean ± 95% t half-width over ' + str(len(post)) + ' seeds' if len(post) > 1 else 'one seed'})", "",
               posttrain_table(post), "", posttrain_comparison_table(results["posttrain_comparisons"]), ""]
        if results.get("curve_comparisons"):
            md += ["### During post-training: greedy accuracy (%) at each evaluation of the runs' own curves, and paired "
                   "comparisons of the starts at the steps between the first and the last", "", curve_table(post), "",
                   posttrain_comparison_table(results["curve_comparisons"]), ""]
        if results.get("curves_png"):
            md += [f"![post-training curves]({Path(results['curves_png']).name})", ""]
    return "\n".join(md)


def section_markers(name: str | None) -> tuple[str, str]:
    """The markers around a generated section: the unnamed one, or ``<!-- paper_tables:NAME:begin -->`` ..."""
    return (BEGIN, END) if name is None else (f"<!-- paper_tables:{name}:begin -->", f"<!-- paper_tables:{name}:end -->")


def write_doc(path: Path, body: str, figure: str | None, section: str | None = None) -> None:
    """Replace the generated section of ``path`` (between its markers) with ``body``; copy the figure beside it (a
    named section's figure under its own name, ``posttrain_curves-<section>.png``, so sections never share one)."""
    begin, end = section_markers(section)
    if figure:
        fig = Path(figure)
        fig_name = f"{fig.stem}-{section}{fig.suffix}" if section else fig.name
        body = body.replace(f"]({fig.name})", f"]({fig_name})")
    text = path.read_text() if path.is_file() else f"{begin}\n{end}\n"
    if begin not in text or end not in text:
        sys.exit(f"{path} has no {begin} ... {end} section to replace")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    atomic_write_text(path, f"{head}{begin}\n{body}\n{end}{tail}")
    if figure:
        shutil.copy(figure, path.parent / fig_name)


# --- main -------------------------------------------------------------------------------------------------------

T0 = time.perf_counter()


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def stamp(text: str) -> None:
    log.info("[%5.1f min] %s", (time.perf_counter() - T0) / 60, text)


def earlier_calls(path: Path) -> dict:
    """What the earlier calls on this ``--out`` recorded (their count and wall time); {} if none or unreadable."""
    try:
        earlier = json.loads(path.read_text()) if path.is_file() else {}
    except (ValueError, UnicodeDecodeError):
        earlier = None
    if not (isinstance(earlier, dict) and all(isinstance(earlier.get(k, 0), (int, float)) for k in ("calls", "wall_s_total"))):
        log.warning("%s is not readable JSON; the wall time counts from this call", path)
        return {}
    return earlier


def main(argv=None) -> dict:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    args = parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp(f"output: {args.out}; load average {[round(x, 2) for x in os.getloadavg()]}")
    args.base = resolve_base(args)
    stamp(f"base model: {args.base['model']}")

    from rmt.data.prepare import prepare_corpus
    from rmt.scoring import score_corpus

    first = config("rmt", args, [])
    prepare_corpus(first)
    score_corpus(first)
    stamp("corpus prepared and scored")

    results = {
        "command": " ".join(["python benchmarks/paper_tables.py", *(argv if argv is not None else sys.argv[1:])]),
        "base": args.base,
        "settings": {"methods": trained_methods(args), "seeds": args.seeds, "steps": first.train.total_steps,
                     "sequences_per_step": first.train.sequences_per_step, "posttrain_steps": first.posttrain.steps,
                     "posttrain_questions_per_step": first.posttrain.questions_per_step, "qa_train": args.qa_train,
                     "qa_eval": args.qa_eval, "overrides": args.base_overrides + args.size_overrides + args.overrides,
                     "machine": {"cpus": os.cpu_count(), "threads": torch_threads(), "python": platform.python_version()}},
        "train": {}, "eval": {}, "posttrain": {},
    }
    # A stopped run goes on where it stopped; its earlier calls' time counts towards the total.
    earlier = earlier_calls(args.out / "results.json")
    earlier_s = float(earlier.get("wall_s_total", 0.0))
    results["calls"] = int(earlier.get("calls", 0)) + 1

    def save() -> None:
        results["wall_s"] = time.perf_counter() - T0
        results["wall_s_total"] = earlier_s + results["wall_s"]
        if results["eval"]:
            evals = {int(s): e for s, e in results["eval"].items()}
            groups = position_groups(args, results["eval_set"])
            results["groups"] = {k: v.tolist() for k, v in groups.items()}
            results["comparisons"] = comparisons(args, evals, groups)
            results["think"] = {label: think_lengths(evals, groups, label) for _, label in main_rows(args)
                                if "think" in next(iter(evals.values()))["results"][label]["per_item"]}
        if results["posttrain"]:
            post = {int(k): v for k, v in results["posttrain"].items()}
            results["posttrain_comparisons"] = posttrain_comparisons(args, post)
            results["curve_comparisons"] = curve_comparisons(args, post)
            results["curves_png"] = str(plot_curves(args, post))
        # atomic: seeds run side by side on one --out each write it (the last call writes the complete one)
        atomic_write_text(args.out / "results.json", json.dumps(results, default=str))
        if results["eval"]:
            atomic_write_text(args.out / "results.md", write_markdown(args, results) + "\n")

    for seed in args.seeds:
        results["train"][seed] = midtrain(args, seed)
        results["eval"][seed] = evaluate_main(args, seed)
        results["eval_set"] = json.loads(Path(results["eval"][seed]["eval_set"]["path"]).read_text())
        save()
    if not args.skip_posttrain:
        files = posttrain_data(args)
        results["settings"]["qa_train"] = questions_per_task(files["train"])  # fewer than asked when long problems take a share
        for seed in args.posttrain_seeds:
            results["posttrain"][seed] = posttrain_stage(args, seed, files)
            save()
    save()
    if args.write_doc:
        write_doc(Path(args.write_doc), (args.out / "results.md").read_text(), results.get("curves_png"), args.doc_section)
    stamp(f"done: {args.out / 'results.md'}")
    print((args.out / "results.md").read_text())
    return results


if __name__ == "__main__":
    main()
