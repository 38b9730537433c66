"""Run directories: the config a run was made with, refusal to mix runs, metrics files, trackers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from rmt.config import RMTConfig, config_to_yaml
from rmt.errors import CheckpointError

# Sections that do not affect what `rmt train` computes (evaluation, other stages).
RESUMABLE_SECTIONS = {"eval", "posttrain"}
# Fields that may change between a run and its resumption without changing what the run computes.
RESUMABLE_CHANGES = {("output", "overwrite"), ("train", "tracker"), ("train", "log_every"), ("train", "sample_every"),
                     ("train", "save_every"), ("train", "keep_last")}


def _diff(a: dict, b: dict, prefix=()) -> list[tuple]:
    keys = set(a) | set(b)
    out = []
    for k in sorted(keys):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += _diff(va, vb, prefix + (k,))
        elif va != vb:
            out.append(prefix + (k,))
    return out


def make_accelerator(cfg: RMTConfig, run_dir: Path):
    """The Accelerator of `rmt train` and `rmt posttrain`: mixed precision, tracker and device from the config."""
    import torch
    from accelerate import Accelerator

    return Accelerator(
        mixed_precision=cfg.train.mixed_precision,
        log_with=None if cfg.train.tracker == "none" else cfg.train.tracker,
        project_dir=str(run_dir),
        cpu=not torch.cuda.is_available(),
    )


def open_run_dir_on_main(cfg: RMTConfig, run_dir: Path, accelerator) -> None:
    """``open_run_dir`` on the main process; every process waits until the folder is ready."""
    if accelerator.is_main_process:
        open_run_dir(cfg, run_dir)
    accelerator.wait_for_everyone()


def open_run_dir(cfg: RMTConfig, run_dir: Path) -> None:
    """Create ``run_dir`` or check that the existing one belongs to this config.

    A folder made with another config is refused unless ``output.overwrite`` is set: mixing two runs'
    checkpoints would silently corrupt both.
    """
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        old = yaml.safe_load(cfg_file.read_text())
        new = cfg.model_dump(mode="json")
        changed = [d for d in _diff(old, new) if d not in RESUMABLE_CHANGES and d[0] not in RESUMABLE_SECTIONS]
        if changed and not cfg.output.overwrite:
            names = ", ".join(".".join(d) for d in changed[:6])
            raise CheckpointError(
                f"{run_dir} holds a run made with another config (differs in {names}); "
                "use another output.dir, or output.overwrite=true to start that folder afresh"
            )
        if changed:
            import shutil

            for sub in ("checkpoints", "final", "metrics.jsonl", "samples.jsonl", "done.json"):
                p = run_dir / sub
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
    elif run_dir.exists() and any(run_dir.iterdir()) and not cfg.output.overwrite:
        raise CheckpointError(f"{run_dir} exists and is not an RMT run folder; choose another output.dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_file.write_text(config_to_yaml(cfg))


class MetricsLog:
    """Append-only JSONL metrics (one line per logged step) plus an optional Accelerate tracker."""

    def __init__(self, run_dir: Path, accelerator=None, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self.accelerator = accelerator
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (metrics and samples) so each step appears once."""
        if not self.enabled:
            return
        for path in (self.path, self.samples_path):
            if path.exists():
                lines = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= step]
                tmp = path.with_name(path.name + ".tmp")
                tmp.write_text("".join(ln + "\n" for ln in lines))
                tmp.replace(path)

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=step)

    def samples(self, step: int, samples: list[dict]) -> None:
        if not self.enabled or not samples:
            return
        with open(self.samples_path, "a") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            text = "\n\n".join(f"[{s.get('reward', 0):.2f}] {s.get('prompt_tail', '')!r} -> {s.get('response', '')!r}" for s in samples)
            for tracker in self.accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_text("samples", text, step)


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
