"""rollout.filter_groups on vs off: reward signal per generated token on the embedded default.

A group whose G rewards are all equal has zero advantage and teaches nothing (docs/dynamic_sampling.md). This runs
one preset (default ``rmt``) twice from the same base model, corpus and seed, with the filter off and on, at the
sizes of ``presets/demo/default.yaml``, and reads each run's ``metrics.jsonl``:

- generated tokens (every response generated, dropped groups included), informative groups (groups with unequal
  rewards that the loss trained on), and their ratio: informative groups per 1,000 generated tokens;
- the filter's drawn / dropped / kept groups, the tier mix kept beside the curriculum's p_t, rollout accuracy,
  training FLOPs and time.

Needs a finished embedded base model: ``--entry`` (a cache entry folder: corpus/ and a finished base-*/), else the
default cache entry ($RMT_CACHE or ~/.cache/rmt, built by ``rmt pretrain``). The runs are sequential, so times carry
the machine's load of the moment; the counts do not.

    python benchmarks/bench_filter_groups.py --steps 20 --out runs/bench_filter
    python benchmarks/bench_filter_groups.py --preset rlp --steps 20 --out runs/bench_filter_rlp
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

LAYER = Path(__file__).resolve().parents[1] / "src" / "rmt" / "presets" / "demo" / "default.yaml"


def material(entry: str | None) -> list[str]:
    """Overrides that point at the embedded corpus and a finished base model."""
    if entry is None:
        from rmt.config import load_config
        from rmt.embedded import embedded_paths

        entry = embedded_paths(load_config("rmt", layers=[LAYER])).root
    entry = Path(entry)
    bases = [d for d in sorted(entry.glob("base-*")) if (d / "pretrain_done.json").is_file()]
    if len(bases) != 1:
        sys.exit(f"{entry}: expected one finished base-*/ folder (run `rmt pretrain`), found {[d.name for d in bases]}")
    return [f"model.path={bases[0]}", f"data.path={entry / 'corpus' / 'midtrain.jsonl'}",
            f"data.eval_path={entry / 'corpus' / 'eval.jsonl'}"]


def summary(rows: list[dict]) -> dict:
    total = lambda k: float(sum(r.get(k, 0) for r in rows))  # noqa: E731
    mean = lambda k: float(np.mean([r[k] for r in rows if k in r])) if any(k in r for r in rows) else None  # noqa: E731
    out = {
        "steps": len(rows),
        "generated_tokens": total("generated_tokens"),
        "informative_groups": total("informative_groups"),
        "rl_groups": total("rl_positions"),
        "informative_per_1k_tokens": 1000 * total("informative_groups") / max(total("generated_tokens"), 1),
        "rollout_accuracy": mean("rollout_accuracy"),
        "mixed_groups_frac": mean("mixed_groups_frac"),
        "flops_total": rows[-1]["flops_total"] if rows else None,
        "time_s": total("time_step_s"),
    }
    if any("filter_drawn" in r for r in rows):
        out.update({k: total(k) for k in ("filter_drawn", "filter_dropped", "filter_kept", "filter_rounds")})
    kept = np.array([total(f"tier_{t}") for t in ("easy", "medium", "hard")])
    out["kept_mix"] = (kept / max(kept.sum(), 1)).round(3).tolist()
    out["p_t_mean"] = [round(mean(f"p_{t}") or 0, 3) for t in ("easy", "medium", "hard")]
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="rmt")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-extra", type=float, default=1.0, help="rollout.filter_max_extra of the run with the filter")
    ap.add_argument("--entry", default=None, help="an embedded cache entry folder (default: the default one)")
    ap.add_argument("--out", default="runs/bench_filter")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("overrides", nargs="*", help="dotted config overrides for both runs")
    args = ap.parse_args(argv)

    import torch

    from rmt.config import load_config
    from rmt.data.prepare import prepare_corpus
    from rmt.run_dir import read_metrics
    from rmt.scoring import score_corpus
    from rmt.trainer import train

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    common = [*material(args.entry), f"data.prepared_dir={out / 'corpus'}", f"train.total_steps={args.steps}",
              f"train.seed={args.seed}", *args.overrides]
    first = load_config(args.preset, common, layers=[LAYER])
    if not (out / "corpus" / "scored").exists():
        prepare_corpus(first)
        score_corpus(first)
    results = {}
    for name, flag in (("off", []), ("on", ["rollout.filter_groups=true", f"rollout.filter_max_extra={args.max_extra}"])):
        cfg = load_config(args.preset, [*common, f"output.dir={out / f'{args.preset}-filter-{name}'}", *flag], layers=[LAYER])
        results[name] = summary(read_metrics(train(cfg)))
    report = {"preset": args.preset, "steps": args.steps, "seed": args.seed, "max_extra": args.max_extra,
              "overrides": args.overrides, "results": results}
    (out / f"filter_groups_{args.preset}.json").write_text(json.dumps(report, indent=2) + "\n")
    keys = [k for k in results["on"] if k in results["off"]] + [k for k in results["on"] if k not in results["off"]]
    print(f"| {args.preset}, {args.steps} steps | filter off | filter on |\n|---|---|---|")
    for k in keys:
        fmt = lambda v: "–" if v is None else (f"{v:.4g}" if isinstance(v, float) else str(v))  # noqa: E731
        print(f"| {k} | {fmt(results['off'].get(k))} | {fmt(results['on'].get(k))} |")


if __name__ == "__main__":
    main()
