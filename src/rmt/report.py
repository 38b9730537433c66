"""`rmt report`: a markdown report with plots from one or more run folders (and an evaluation JSON).

Plots (PNG, matplotlib): budget B_t against the actual reasoning length, the curriculum mix p_t against the
realised tier counts, reward terms, rollout accuracy, the loss terms, and accuracy by tier from ``rmt eval``.
"""

from __future__ import annotations

import json
from pathlib import Path

from rmt.errors import RMTError
from rmt.fileio import atomic_write_text, check_replaceable
from rmt.run_dir import read_metrics

TIERS = ("easy", "medium", "hard")
REPORT_TITLE = "# RMT report"  # the first line of every report.md written here


def _series(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _legend_outside(fig, ax_or_handles, labels=None, ncol: int = 1):
    """The legend to the right of the plot, never over the data."""
    if labels is None:
        return ax_or_handles.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, ncol=ncol)
    return fig.legend(ax_or_handles, labels, fontsize=7, loc="outside right upper", ncol=ncol)


def line_figure(title: str, runs: dict[str, list[dict]], keys: list[tuple[str, str]], ylabel: str):
    """One figure; a line per (run, key) the run has, the legend beside the plot. None when no run has any key."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.6, 3.6), layout="constrained")
    drawn = False
    for name, rows in runs.items():
        for key, label in keys:
            x, y = _series(rows, key)
            if x:
                style = "--" if key in ("budget",) or key.startswith("p_") else "-"
                ax.plot(x, y, style, label=f"{name}: {label}" if len(runs) > 1 else label)
                drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    _legend_outside(fig, ax)
    return fig


TIER_COLORS = {"easy": "tab:green", "medium": "tab:orange", "hard": "tab:red"}


def curriculum_figure(runs: dict[str, list[dict]]):
    """One panel per run with RL positions: p_t per tier (dashed) and the realised share (solid), the same colour
    per tier; one legend of six entries for all panels. None when no run has a tier mix."""
    plt = _pyplot()
    with_mix = {name: rows for name, rows in runs.items() if any(f"p_{t}" in r for r in rows for t in TIERS)}
    if not with_mix:
        return None
    fig, axes = plt.subplots(1, len(with_mix), figsize=(3.2 * len(with_mix) + 1.8, 3.4), sharey=True, squeeze=False,
                             layout="constrained")
    handles = {}
    for ax, (name, rows) in zip(axes[0], with_mix.items()):
        for tier in TIERS:
            for key, style, what in ((f"p_{tier}", "--", "p_t"), (f"frac_{tier}", "-", "realised")):
                x, y = _series(rows, key)
                if x:
                    (line,) = ax.plot(x, y, style, color=TIER_COLORS[tier])
                    handles[f"{tier}: {what}"] = line
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("share of RL positions")
    fig.suptitle("Curriculum: p_t (dashed) and realised RL positions (solid)", fontsize=10)
    _legend_outside(fig, list(handles.values()), list(handles))
    return fig


def _save(fig, path: Path) -> bool:
    if fig is None:
        return False
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return True


def accuracy_figure(evaluation: dict):
    """Grouped bars per tier and the average, one colour per row of the table, the legend beside the plot."""
    import numpy as np

    rows = [(name, res) for name, res in evaluation.get("results", {}).items()]
    if not rows:
        return None
    plt = _pyplot()
    groups = [*TIERS, "average"]
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(8.4, 3.8), layout="constrained")
    for i, (name, res) in enumerate(rows):
        # `rmt eval` writes None for a tier without positions (and its interval): drawn as a gap.
        nan = float("nan")
        stats = [res["tiers"].get(g) or {} for g in TIERS]
        acc = [nan if s.get("accuracy") is None else s["accuracy"] for s in stats]
        acc.append(nan if res.get("average") is None else res["average"])
        lo = [(s.get("ci95") or [a, a])[0] for s, a in zip(stats, acc)] + [acc[-1]]
        hi = [(s.get("ci95") or [a, a])[1] for s, a in zip(stats, acc)] + [acc[-1]]
        x = np.arange(len(groups)) + i * width
        ax.bar(x, acc, width, label=name, yerr=[np.subtract(acc, lo), np.subtract(hi, acc)], capsize=2)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
    ax.set_ylabel("next-token accuracy")
    ax.set_ylim(0, 1)
    _legend_outside(fig, ax)
    ax.grid(axis="y", alpha=0.3)
    return fig


PLOTS = [
    ("budget.png", "Thinking budget and reasoning length", [("budget", "budget B_t"), ("think_len_mean", "mean reasoning length"), ("think_len_p90", "p90 reasoning length")], "tokens"),
    ("reward.png", "Reward", [("reward", "total"), ("reward_match", "match"), ("reward_length", "length")], "mean reward"),
    ("accuracy.png", "Rollout accuracy and malformed responses", [("rollout_accuracy", "rollout accuracy"), ("malformed_frac", "malformed share")], "share"),
    ("loss.png", "Loss terms", [("ntp_loss", "NTP loss"), ("rl_loss", "RL loss"), ("kl", "KL")], "loss"),
]


def read_runs(run_dirs: list[str | Path]) -> dict[str, list[dict]]:
    """{folder name: metrics rows} of each run folder; RMTError for a missing folder, a folder without metrics,
    rows without a step, or two folders of the same name (their plots would merge)."""
    runs = {}
    for d in run_dirs:
        d = Path(d)
        if not d.is_dir():
            raise RMTError(f"run folder not found: {d}")
        rows = read_metrics(d)
        if not rows:
            raise RMTError(f"{d} has no metrics.jsonl (is it a run folder of `rmt train`?)")
        if not all(isinstance(r.get("step"), int) for r in rows):
            raise RMTError(f"{d / 'metrics.jsonl'}: a row without an integer step; not a metrics file of `rmt train`")
        if d.name in runs:
            raise RMTError(f"two run folders are named {d.name!r}; their lines would merge in the plots")
        absent = absent_keys(d)
        runs[d.name] = [{k: v for k, v in r.items() if k not in absent} for r in rows] if absent else rows
    return runs


def absent_keys(run_dir: Path) -> set[str]:
    """Metrics a run's method does not have, by its config.yaml: no budget without RL or with budget.enabled off
    (rpt, ntp), no tier mix without RL (ntp). Runs written before the trainer left them out logged them anyway."""
    import yaml

    try:
        cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, ValueError, yaml.YAMLError):
        return set()
    if not isinstance(cfg, dict):
        return set()
    rl = (cfg.get("train") or {}).get("rl", True)
    budget = (cfg.get("budget") or {}).get("enabled", True)
    absent = set() if rl and budget else {"budget"}
    return absent if rl else absent | {f"p_{t}" for t in TIERS}


def read_evaluation(path: str | Path) -> dict:
    """The JSON of `rmt eval`, checked for what the report reads: ``results`` rows with ``tiers``."""
    path = Path(path)
    if not path.is_file():
        raise RMTError(f"evaluation file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise RMTError(f"{path} is not an evaluation JSON of `rmt eval` (not UTF-8: {e.reason})") from None
    except ValueError as e:
        raise RMTError(f"{path} is not valid JSON ({e}); give the JSON that `rmt eval` wrote") from None
    results = data.get("results") if isinstance(data, dict) else None
    if not isinstance(results, dict) or not all(
        isinstance(r, dict) and isinstance(r.get("tiers"), dict) and all(isinstance(t, dict) for t in r["tiers"].values())
        for r in results.values()
    ):
        raise RMTError(f"{path} is not an evaluation of `rmt eval` (no `results` with per-tier rows)")
    if not isinstance(data.get("table_markdown", ""), str):
        raise RMTError(f"{path}: `table_markdown` is not text")
    for name, res in results.items():
        _check_number(path, f"results.{name}.average", res.get("average"))
        for tier in TIERS:
            stats = res["tiers"].get(tier) or {}
            _check_number(path, f"results.{name}.tiers.{tier}.accuracy", stats.get("accuracy"))
            ci = stats.get("ci95")
            if ci is not None and not (isinstance(ci, list) and len(ci) == 2 and all(map(_is_number, ci))):
                raise RMTError(f"{path}: `results.{name}.tiers.{tier}.ci95` is {ci!r}, not a pair of numbers [low, high]")
    return data


def _is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_number(path: Path, field: str, value) -> None:
    """A number or None (`rmt eval` writes None for a tier without positions)."""
    if value is not None and not _is_number(value):
        raise RMTError(f"{path}: `{field}` is {value!r}, not a number")


def write_report(run_dirs: list[str | Path], out_dir: str | Path, evaluation: str | Path | None = None) -> Path:
    """Write ``report.md`` and its PNG plots into ``out_dir``; returns the report's path.

    Every input is read and checked before anything is written."""
    out = Path(out_dir)
    runs = read_runs(run_dirs)
    eval_data = read_evaluation(evaluation) if evaluation else None
    if out.exists() and not out.is_dir():
        raise RMTError(f"--out {out} is a file; give a folder for the report")
    # a rerun replaces its own report; a report.md of the user's in that folder is never written over
    check_replaceable(out / "report.md", "report", lambda text: text.startswith(REPORT_TITLE + "\n"))
    out.mkdir(parents=True, exist_ok=True)
    lines = [REPORT_TITLE, "", "Runs: " + ", ".join(f"`{d}`" for d in run_dirs), ""]
    if eval_data:
        lines += ["## Next-token accuracy by tier", "", eval_data.get("table_markdown", ""), ""]
        if _save(accuracy_figure(eval_data), out / "accuracy_by_tier.png"):
            lines += ["![accuracy by tier](accuracy_by_tier.png)", ""]
    lines += ["## Training", ""]
    for fname, title, keys, ylabel in PLOTS:
        if _save(line_figure(title, runs, keys, ylabel), out / fname):
            lines += [f"### {title}", "", f"![{title}]({fname})", ""]
        if fname == "budget.png" and _save(curriculum_figure(runs), out / "curriculum.png"):
            title = "Curriculum: p_t and realised RL positions"
            lines += [f"### {title}", "", f"![{title}](curriculum.png)", ""]
    lines += ["## Final metrics", "", "| run | steps | " + " | ".join(k for k in _SUMMARY_KEYS) + " | pre-flight well-formed |",
              "|---|---|" + "---|" * (len(_SUMMARY_KEYS) + 1)]
    for name, rows in runs.items():
        last = rows[-1]
        vals = [f"{last[k]:.4g}" if isinstance(last.get(k), int | float) else "–" for k in _SUMMARY_KEYS]
        # measured before the first RL step (rmt.preflight), logged in the first row written
        pre = next((r["preflight_wellformed_frac"] for r in rows if r.get("preflight_wellformed_frac") is not None), None)
        vals.append("–" if pre is None else f"{100 * pre:.0f}%")
        lines.append(f"| {name} | {last['step']} | " + " | ".join(vals) + " |")
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


_SUMMARY_KEYS = ("loss", "ntp_loss", "reward", "rollout_accuracy", "think_len_mean", "budget")
