"""Benchmark 4: the RMT and RPT presets over a short real run: time per step and mean reasoning length.

The paper reports RMT's reasoning at about 0.21x RPT's length, the source of its speed: the budget B_t states the
target in the prompt, caps generation at 2*B_t + the answer allowance, and the length reward pulls towards it, while
RPT thinks without a limit (up to ``rollout.max_response_tokens``). Both presets run ``rmt.trainer.train`` on the
same prepared and scored corpus, with the same model, steps, batch and group size; the script reads their
``metrics.jsonl`` (``think_len_mean``, ``response_len_mean``, ``time_step_s``, ``time_rollout_s``).

Model and corpus: the embedded default (its ~3M Llama, which thinks in ``<think>`` before answering, and its
mid-training split) when it is already built in the cache ($RMT_CACHE or ~/.cache/rmt; build it with
``rmt pretrain``), or ``--model``/``--corpus``; otherwise a tiny random Llama on a small text corpus, where reasoning never closes and the lengths
only show the caps. The two runs are sequential (a run is one process's whole loop), so on a shared machine the
times per step carry the load of the moment; the lengths do not.

    python benchmarks/bench_rmt_vs_rpt.py --steps 10 --out bench_rmt_vs_rpt.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch


def embedded_ready() -> bool:
    from rmt.config import load_config
    from rmt.embedded import embedded_paths

    return embedded_paths(load_config()).base_model_dir.is_dir()


def tiny_material(root: Path) -> list[str]:
    """A small text corpus and a random 2-layer Llama with <think>/</think> tokens (the tests' fixtures)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import build_tiny_model, build_tiny_tokenizer

    texts = [f"line {i}: the cat sat on the mat, 12+{i}={12 + i}; a fox ran far away. " * (2 + i % 3) for i in range(200)]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    tok = build_tiny_tokenizer(root / "model", texts=texts)
    build_tiny_model(root / "model", tok, hidden=64, layers=2, heads=2)
    return [f"model.path={root / 'model'}", f"data.path={corpus}", "data.seq_len=64"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--sequences-per-step", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--b0", type=int, default=24, help="RMT's initial budget (decays by gamma 0.2 over the run)")
    ap.add_argument("--max-response", type=int, default=96, help="rollout.max_response_tokens: RPT's only cap")
    ap.add_argument("--documents", type=int, default=64, help="corpus documents to prepare and score")
    ap.add_argument("--model", help="a model folder (with its tokenizer) instead of the embedded default's base model")
    ap.add_argument("--corpus", help="a corpus (data.path) instead of the embedded default's mid-training split")
    ap.add_argument("--tiny", action="store_true", help="use the tiny random model even if the embedded one exists")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    from rmt import trainer
    from rmt.config import load_config
    from rmt.data.prepare import prepare_corpus
    from rmt.run_dir import read_metrics
    from rmt.scoring import score_corpus

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if a.model:
            name = a.model
            base = [f"model.path={a.model}"] + ([f"data.path={a.corpus}"] if a.corpus else [])
        elif embedded_ready() and not a.tiny:
            name, base = "embedded default", []
        else:
            name, base = "tiny random Llama (h64, 2 layers)", tiny_material(tmp)
        base += [
            f"data.prepared_dir={tmp / 'prepared'}", f"data.max_documents={a.documents}", "scoring.tier_rule=quantile",
            f"train.total_steps={a.steps}", f"train.sequences_per_step={a.sequences_per_step}",
            f"rollout.group_size={a.group_size}", "rollout.positions_per_batch=8",
            f"rollout.max_response_tokens={a.max_response}", f"budget.b0={a.b0}", "budget.answer_allowance=2",
            "train.lr=1e-4", f"train.save_every={a.steps}", "train.log_every=1",
        ]
        t0 = time.perf_counter()
        prepare_corpus(load_config(None, base))
        score_corpus(load_config(None, base))
        setup_s = time.perf_counter() - t0

        result = {"model": name, "setup_s": setup_s,
                  "steps": a.steps, "sequences_per_step": a.sequences_per_step, "group_size": a.group_size,
                  "b0": a.b0, "max_response_tokens": a.max_response, "presets": {}}
        for preset in ("rmt", "rpt"):
            cfg = load_config(preset, [*base, f"output.dir={tmp / preset}"])
            t0 = time.perf_counter()
            rows = read_metrics(trainer.train(cfg))
            wall = time.perf_counter() - t0
            result["presets"][preset] = {
                "wall_s": wall,
                "median_step_s": statistics.median(r["time_step_s"] for r in rows),
                "mean_step_s": statistics.fmean(r["time_step_s"] for r in rows),
                "median_rollout_s": statistics.median(r.get("time_rollout_s", 0.0) for r in rows),
                "mean_think_len": statistics.fmean(r.get("think_len_mean", 0.0) for r in rows),
                "per_step": [
                    {k: round(r[k], 3) for k in ("step", "budget", "response_cap", "think_len_mean", "response_len_mean",
                                                  "reward", "rollout_accuracy", "time_step_s") if k in r}
                    for r in rows
                ],
            }
        rmt, rpt = result["presets"]["rmt"], result["presets"]["rpt"]
        result["think_len_ratio_rmt_over_rpt"] = rmt["mean_think_len"] / max(rpt["mean_think_len"], 1e-9)
        result["step_time_ratio_rmt_over_rpt"] = rmt["median_step_s"] / rpt["median_step_s"]

    for preset, r in result["presets"].items():
        print(f"{preset}: median step {r['median_step_s']:.2f} s, mean {r['mean_step_s']:.2f} s "
              f"(median rollout {r['median_rollout_s']:.2f} s), "
              f"mean think length {r['mean_think_len']:.1f}")
        for s in r["per_step"]:
            print("   ", s)
    print(f"think length RMT/RPT = {result['think_len_ratio_rmt_over_rpt']:.2f}, "
          f"step time RMT/RPT = {result['step_time_ratio_rmt_over_rpt']:.2f}")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
