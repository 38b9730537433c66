"""`rmt` command line: thin wrappers that build the config and call a stage.

Every command takes ``--config PRESET_OR_YAML`` and any number of dotted overrides
(``rmt train --config rmt budget.gamma=0.3 train.total_steps=100``).

Errors in what the user gave (config, paths, files, models) or in the environment (disk full, unwritable folder)
are one line on stderr, never a traceback. Exit codes: 0 done; 1 a stage refused or failed on its input or the
environment; 2 the command line or the config is invalid; 130 / 143 interrupted by SIGINT / SIGTERM (a run then
saved a checkpoint first, and the same command resumes it).
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from rmt.config import ConfigError, RMTConfig, config_to_yaml, describe_fields, load_config
from rmt.errors import Interrupted, RMTError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Reinforcement Mid-Training of causal language models.")
console = Console(stderr=True, soft_wrap=True)

ConfigOpt = typer.Option(None, "--config", "-c", help="Preset name (rmt, rpt, ntp, rmt-no-dtb, ...) or a YAML file.")
OverridesArg = typer.Argument(None, help="Dotted overrides, e.g. budget.gamma=0.3 data.path=corpus.jsonl")


@app.callback()
def _setup() -> None:
    """Quiet the libraries' own per-file progress bars; our stages show their own."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Read by datasets and huggingface_hub (hence transformers) when they are first imported, so that a command
    # that never loads them does not pay seconds for importing them here.
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "datasets" in sys.modules:
        sys.modules["datasets"].disable_progress_bars()
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()


def _fail(message: str, code: int) -> None:
    console.print(f"[red]error:[/red] {escape(message)}")
    raise typer.Exit(code)


def os_error_message(e: OSError) -> str:
    """``No space left on device: runs/rmt/metrics.jsonl`` rather than ``[Errno 28] ...``."""
    what = e.strerror or str(e)
    files = [f for f in (e.filename, getattr(e, "filename2", None)) if f is not None]
    return f"{what}: {' -> '.join(map(str, files))}" if files else what


def _errors(command):
    """Run a command; the errors of its input and environment become one line on stderr and an exit code."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except ConfigError as e:
            _fail(str(e), 2)
        except Interrupted as e:
            console.print(f"[yellow]{escape(str(e))}[/yellow]")
            raise typer.Exit(e.exit_code) from None
        except RMTError as e:
            _fail(str(e), 1)
        except OSError as e:
            _fail(os_error_message(e), 1)
        except KeyboardInterrupt:
            console.print("[yellow]interrupted[/yellow]")
            raise typer.Exit(130) from None

    return wrapper


def _config(config: Optional[str], overrides: Optional[list[str]]) -> RMTConfig:
    return load_config(config, overrides or [])


def _run(fn, *args, **kwargs):
    """Call a stage (its errors are turned into messages by the command's ``_errors``)."""
    return fn(*args, **kwargs)


@app.command("config")
@_errors
def config_cmd(
    config: Optional[str] = ConfigOpt,
    overrides: Optional[list[str]] = OverridesArg,
    fields: bool = typer.Option(False, "--fields", help="List every field with its default and description."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the field reference as markdown (docs/config.md)."),
) -> None:
    """Validate a config and print it as YAML (or list every field)."""
    if markdown:
        from rmt.config import fields_markdown

        sys.stdout.write(fields_markdown())
        return
    if fields:
        for name, default, desc in describe_fields():
            sys.stdout.write(f"{name} = {default}\n    {desc}\n")
        return
    cfg = _config(config, overrides)
    sys.stdout.write(config_to_yaml(cfg))


@app.command()
@_errors
def prepare(config: Optional[str] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Tokenize a corpus into fixed-length sequences with a seeded train/eval split by document."""
    from rmt.data.prepare import prepare_corpus

    cfg = _config(config, overrides)
    _run(prepare_corpus, cfg)


@app.command()
@_errors
def score(config: Optional[str] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Score the entropy of every position with a reference model and assign tiers (resumable)."""
    from rmt.scoring import format_summary, score_corpus

    cfg = _config(config, overrides)
    summary = _run(score_corpus, cfg)
    if summary:
        sys.stdout.write(format_summary(summary) + "\n")
        sys.stdout.write(f"saved {cfg.data.prepared_dir}/scores/summary.json\n")


@app.command()
@_errors
def pretrain(config: Optional[str] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Train a small Llama from scratch: the embedded default's base model, or one on pretrain.corpus (resumable).

    A model pre-trained on your own corpus will not reason in RMT's template unless the corpus shows the
    <think>...</think> format: rmt train and rmt eval (reasoning mode) then stop at their pre-flight check.
    pretrain.think_blocks=0.1 puts empty thinking blocks into pre-training so that the model closes them
    (docs/own-corpus.md)."""
    import json

    from rmt.embedded import base_model_summary
    from rmt.pretrain import train_base_model

    cfg = _config(config, overrides)
    if cfg.pretrain.corpus is None:
        summary = _run(base_model_summary, cfg)
    else:
        summary = {"output_dir": cfg.pretrain.output_dir, **_run(train_base_model, cfg, cfg.pretrain.corpus, cfg.pretrain.output_dir)}
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")


@app.command()
@_errors
def train(config: Optional[str] = ConfigOpt, overrides: Optional[list[str]] = OverridesArg) -> None:
    """Mid-train with the configured method (rmt, rpt, ntp or an ablation); resumes from the newest checkpoint."""
    from rmt.trainer import train as run_train

    cfg = _config(config, overrides)
    run_dir = _run(run_train, cfg)
    sys.stdout.write(f"run folder: {run_dir}\n")


@app.command("eval")
@_errors
def eval_cmd(
    config: Optional[str] = ConfigOpt,
    overrides: Optional[list[str]] = OverridesArg,
    model: Optional[list[str]] = typer.Option(
        None, "--model", "-m",
        help="NAME=PATH, repeatable, in table order (a run folder stands for its final model). "
        "Default: base = model.path, plus output.dir/final when it exists. The reasoning row of `base` is `ntr`.",
    ),
    mode: Optional[list[str]] = typer.Option(None, "--mode", help="ntp, reasoning or both (repeatable); sets eval.modes."),
    baseline: Optional[str] = typer.Option(None, "--baseline", help="Row or model name the relative change is against (eval.baseline)."),
    budget: Optional[int] = typer.Option(None, "--budget", help="Thinking budget in reasoning mode (eval.budget); default: the final B_T."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="JSON output (default output.dir/eval.json); the table goes beside it as .md."),
) -> None:
    """Next-token accuracy by entropy tier on the fixed held-out set, one comparison table for all models."""
    from rmt.evaluate import evaluate, parse_model_specs

    extra = list(overrides or [])
    if mode:
        modes = [m for x in mode for m in (("ntp", "reasoning") if x == "both" else (x,))]
        extra.append(f"eval.modes=[{','.join(dict.fromkeys(modes))}]")
    if budget is not None:
        extra.append(f"eval.budget={budget}")
    cfg = _config(config, extra)
    if baseline is not None:
        cfg.eval.baseline = baseline  # a name, kept as text (an override would read "1" as a number)
    try:
        models = parse_model_specs(model or [])
    except ValueError as e:
        _fail(str(e), 2)
    result = _run(evaluate, cfg, models or None, out)
    sys.stdout.write(result["table_markdown"] + "\n")


@app.command()
@_errors
def report(
    runs: Optional[list[str]] = typer.Argument(None, help="Run folders of `rmt train` (metrics.jsonl) to plot."),
    evaluation: Optional[str] = typer.Option(None, "--eval", "-e", help="Evaluation JSON of `rmt eval` to include."),
    out: str = typer.Option("runs/report", "--out", "-o", help="Folder for report.md and its plots."),
) -> None:
    """A markdown report with plots from run folders and an evaluation JSON."""
    from rmt.report import write_report

    if not runs and not evaluation:
        _fail("give at least one run folder or --eval FILE", 2)
    path = _run(write_report, runs or [], out, evaluation)
    sys.stdout.write(f"report: {path}\n")


@app.command()
@_errors
def posttrain(
    config: Optional[str] = ConfigOpt,
    overrides: Optional[list[str]] = OverridesArg,
    eval_only: bool = typer.Option(
        False, "--eval-only", help="Only evaluate model.path (default: the embedded base model) on the held-out questions."
    ),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="With --eval-only: also write the result JSON here."),
) -> None:
    """GRPO with a verifiable reward on question/answer pairs from a base or mid-trained model (resumable)."""
    import json

    from rmt import posttrain as stage

    cfg = _config(config, overrides)
    if eval_only:
        from rmt.fileio import atomic_write_text, check_replaceable, check_writable, json_object_with

        if out:
            check_writable(out, "--out")  # before the work, not after it
            check_replaceable(out, "--out", lambda text: json_object_with(text, "model", "verifier", "accuracy"))
        result = _run(stage.evaluate, cfg)
        text = json.dumps(result, indent=2) + "\n"
        sys.stdout.write(text)  # the results are out before anything else can fail
        if out:
            atomic_write_text(out, text)
        return
    run_dir = _run(stage.posttrain, cfg)
    sys.stdout.write(f"run folder: {run_dir}\n")


@app.command()
@_errors
def demo(
    overrides: Optional[list[str]] = OverridesArg,
    size: str = typer.Option("default", help="Demo scale: default (minutes on 2 CPU cores) or tiny (seconds, for tests)."),
    out: str = typer.Option("runs/demo", help="Folder for the corpus, the runs, the evaluation and the report."),
    methods: str = typer.Option("rmt,ntp,rpt", help="Comma-separated presets to mid-train and compare."),
) -> None:
    """The whole pipeline on the embedded default: base model, score, mid-train, evaluate, report."""
    from rmt.demo import run_demo

    from rmt.demo import parse_methods

    _run(run_demo, size=size, out=out, methods=parse_methods(methods), overrides=overrides or [])


def main() -> None:  # pragma: no cover - entry point
    app()


if __name__ == "__main__":  # `python -m rmt.cli ...`, e.g. under torchrun
    app()
