"""`rmt demo`: the whole pipeline on the embedded default, end to end.

base model (built once, cached) -> prepare -> score -> mid-train RMT and the baselines at equal training budget
-> evaluate base (NTP and NTR), NTP, RPT and RMT on the same held-out positions -> report.

The demo's sizes live in ``presets/demo/<size>.yaml`` and are merged over each method's preset, so the methods
differ only where their presets say. Every stage reuses what a previous run already made.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rich.console import Console

from rmt.config import PRESET_DIR, ConfigError, RMTConfig, load_config

log = logging.getLogger(__name__)
DEMO_SIZES = PRESET_DIR / "demo"
DEFAULT_METHODS = ("rmt", "ntp", "rpt")


def parse_methods(text: str) -> list[str]:
    """``--methods rmt,ntp,rpt`` -> the preset names, in order, each once; ConfigError for an empty list or a name
    that is not a preset (a path is not: each method's run folder is ``out/<name>``)."""
    return check_methods(text.split(","))


def check_methods(methods) -> list[str]:
    names = list(dict.fromkeys(m.strip() for m in methods if m.strip()))
    presets = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    if not names:
        raise ConfigError(f"--methods is empty: give presets separated by commas, e.g. rmt,ntp,rpt (presets: {', '.join(presets)})")
    for name in names:
        if name not in presets:
            raise ConfigError(f"--methods: {name!r} is not a preset; presets: {', '.join(presets)}")
    return names


def demo_config(method: str, size: str, out: Path, overrides: list[str]) -> RMTConfig:
    layer = DEMO_SIZES / f"{size}.yaml"
    if not layer.is_file():
        sizes = ", ".join(sorted(p.stem for p in DEMO_SIZES.glob("*.yaml")))
        raise ConfigError(f"unknown demo size {size!r}; sizes: {sizes}")
    return load_config(
        method,
        [f"data.prepared_dir={out / 'corpus'}", f"output.dir={out / method}", *overrides],
        layers=[layer],
    )


def run_demo(size: str = "default", out: str | Path = "runs/demo", methods=DEFAULT_METHODS,
             overrides: list[str] | None = None, console: Console | None = None) -> dict:
    """Run every stage; returns the evaluation dict (also written to ``out/eval.json``)."""
    from rmt.embedded import ensure_embedded
    from rmt.data.prepare import prepare_corpus
    from rmt.evaluate import evaluate
    from rmt.report import write_report
    from rmt.scoring import format_summary, score_corpus
    from rmt.trainer import train

    console = console or Console(stderr=True)
    out = Path(out)
    methods = check_methods(methods)
    overrides = list(overrides or [])
    # Validate every config before any work starts.
    configs = {m: demo_config(m, size, out, overrides) for m in methods}
    first = next(iter(configs.values()))
    t_start = time.perf_counter()
    n = 5

    def stage(i: int, text: str) -> None:
        console.rule(f"[bold]{i}/{n} {text}[/bold]  ({time.perf_counter() - t_start:.0f} s)")

    stage(1, "embedded default: corpus, tokenizer, base model (cached after the first run)")
    arts = ensure_embedded(first)
    console.print(f"base model: {arts.base_model_dir}")

    stage(2, "prepare and score the mid-training corpus")
    prepare_corpus(first)
    summary = score_corpus(first)
    if summary:
        console.print(format_summary(summary))

    stage(3, f"mid-train {', '.join(methods)} ({first.train.total_steps} steps of {first.train.sequences_per_step} sequences each)")
    for method, cfg in configs.items():
        console.print(f"[bold]{method}[/bold] -> {cfg.output.dir}")
        train(cfg)

    stage(4, "evaluate next-token accuracy by tier (NTP mode and reasoning mode)")
    models = {"base": str(arts.base_model_dir), **{m: str(Path(c.output.dir) / "final") for m, c in configs.items()}}
    eval_cfg = demo_config("rmt", size, out, ["eval.baseline=base", *overrides])
    evaluation = evaluate(eval_cfg, models=models, out=out / "eval.json")

    stage(5, "report")
    rl_runs = [c.output.dir for c in configs.values()]
    report = write_report(rl_runs, out / "report", evaluation=out / "eval.json")
    console.rule(f"done in {time.perf_counter() - t_start:.0f} s")
    print(evaluation["table_markdown"])
    console.print(f"\nreport: {report}\nresults: {out / 'eval.json'}")
    return evaluation
