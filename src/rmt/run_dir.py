"""Run directories: the config a run was made with, refusal to mix runs, metrics files, trackers."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import yaml

from rmt.config import RMTConfig, config_to_yaml
from rmt.errors import CheckpointError, RMTError
from rmt.fileio import atomic_write_text, is_orphan, naming_errors, remove_orphans

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
# Files the tools may put in a run folder before a run starts there (`rmt eval` writes its results to output.dir).
TOOL_FILES = {LOCK_FILE, "eval.json", "eval.md"}
# What a run writes into its folder (deleted when output.overwrite restarts a folder made with another config).
RUN_OUTPUTS = ("checkpoints", "final", "metrics.jsonl", "samples.jsonl", "done.json", "preflight.json")

# Sections that do not affect what a stage computes, by stage: `rmt train` (mid-training) never reads the evaluation
# or the other stages; `rmt posttrain` never reads the mid-training corpus, its scoring, budget, curriculum, reward
# or NTP loss, nor the evaluation or pre-training. Everything else must match for a run folder to be resumed.
RESUMABLE_SECTIONS = {
    "train": {"eval", "posttrain", "preflight"},
    "posttrain": {"data", "scoring", "budget", "curriculum", "reward", "ntp", "eval", "preflight", "pretrain"},
}
# Fields that may change between a run and its resumption without changing what the run computes (by stage:
# post-training has its own learning rate and step count, and evaluates as it goes).
RESUMABLE_CHANGES = {("output", "overwrite"), ("output", "dir"), ("train", "tracker"), ("train", "log_every"), ("train", "sample_every"),
                     ("train", "save_every"), ("train", "keep_last")}
RESUMABLE_IN_STAGE = {
    "train": set(),
    "posttrain": {("train", "lr"), ("train", "total_steps"), ("train", "epochs"), ("posttrain", "eval_every"),
                  ("posttrain", "eval_batch_size"), ("posttrain", "task_field")},
}


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


def check_run_dir_path(run_dir: Path, what: str = "output.dir") -> None:
    """Before any work (and before the libraries load): the run folder can exist and be written where it is asked
    for: neither it nor a folder above it is a file, and the nearest existing folder above it is writable."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{what}={run_dir} is a file, not a folder; choose another {what}")
    above = run_dir.absolute()
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise CheckpointError(f"{what}={run_dir} cannot be made: {above} is a file, not a folder")
    if not run_dir.exists() and not os.access(above, os.W_OK | os.X_OK):
        raise CheckpointError(f"{what}={run_dir} cannot be made: {above} is not writable")


def open_run_dir_on_main(cfg: RMTConfig, run_dir: Path, accelerator, stage: str = "train"):
    """``open_run_dir`` on the main process, which holds the run's lock; every process waits until the folder is
    ready. Returns a context manager that releases the lock (a no-op on the other processes)."""
    lock = open_run_dir(cfg, run_dir, stage) if accelerator.is_main_process else contextlib.nullcontext()
    accelerator.wait_for_everyone()
    return lock


class RunLock:
    """An exclusive lock on a run folder (``flock`` on ``run_dir/.lock``): one writer per run folder.

    The lock file names its holder (pid, host, start time, command) so that a second run is refused with a message
    that says which. The kernel releases the lock when the holder ends, however it ends (kill -9 included).
    """

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fh = None

    def acquire(self) -> "RunLock":
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip()
            fh.close()
            raise CheckpointError(
                f"{self.path.parent} is in use by another run ({_describe_holder(holder)}); wait for it to end, "
                "or choose another output.dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}) + "\n")
        fh.flush()
        self._fh = fh
        return self

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh, fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _describe_holder(text: str) -> str:
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (ValueError, KeyError, TypeError):
        return "a process that is still running"


def _foreign_entries(run_dir: Path) -> list[str]:
    """Entries of ``run_dir`` that are neither its lock nor temporary leftovers of our own writes."""
    return sorted(p.name for p in run_dir.iterdir() if p.name not in TOOL_FILES and not is_orphan(p))


def open_run_dir(cfg: RMTConfig, run_dir: Path, stage: str = "train") -> RunLock:
    """Create ``run_dir`` or check that the existing one belongs to this config; returns its lock, held.

    A folder made with another config (in what ``stage``, "train" or "posttrain", computes) is refused unless
    ``output.overwrite`` is set: mixing two runs' checkpoints would silently corrupt both (a folder whose run wrote
    nothing yet takes the new config). A folder that is not a run folder is refused: nothing the tool did not write
    is ever deleted. Leftovers of writes interrupted by a kill are removed.
    """
    run_dir = Path(run_dir)
    cfg_file = run_dir / "config.yaml"
    where = "posttrain.output_dir" if stage == "posttrain" else "output.dir"
    if run_dir.exists() and not run_dir.is_dir():
        raise CheckpointError(f"{where}={run_dir} is a file, not a folder; choose another {where}")
    if run_dir.is_dir() and not cfg_file.is_file() and _foreign_entries(run_dir) and not cfg.output.overwrite:
        raise CheckpointError(f"{run_dir} exists and is not an RMT run folder; choose another {where}")
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = RunLock(run_dir).acquire()
    try:
        remove_orphans(run_dir)
        remove_orphans(run_dir / "checkpoints")
        _check_or_reset(cfg, run_dir, cfg_file, stage)
        atomic_write_text(cfg_file, config_to_yaml(cfg))
    except BaseException:
        lock.release()
        raise
    return lock


def resumable(old: dict, new: dict, path: tuple, stage: str) -> bool:
    """Whether a config field at ``path`` may differ between a run and its resumption in ``stage``."""
    if path in RESUMABLE_CHANGES or path in RESUMABLE_IN_STAGE[stage] or path[0] in RESUMABLE_SECTIONS[stage]:
        return True
    if stage == "posttrain" and path == ("posttrain", "eval_data"):
        # another held-out file leaves the training questions as they were (all of posttrain.data) as long as
        # there is one before and after; without one, the last posttrain.eval_size questions are held out of training
        return all((c.get("posttrain") or {}).get("eval_data") is not None for c in (old, new))
    return False


def _check_or_reset(cfg: RMTConfig, run_dir: Path, cfg_file: Path, stage: str = "train") -> None:
    if not cfg_file.is_file():
        return
    try:
        old = yaml.safe_load(cfg_file.read_text(encoding="utf-8"))
        if not isinstance(old, dict):
            raise ValueError("not a mapping")
    except (ValueError, yaml.YAMLError) as e:
        raise CheckpointError(f"{cfg_file} is damaged ({str(e).splitlines()[0]}); restore it or choose another output.dir") from None
    new = cfg.model_dump(mode="json")
    try:  # a folder written by an older version: fields added since then read as their defaults
        old = type(cfg).model_validate(old).model_dump(mode="json")
    except ValueError:
        pass  # a field renamed or removed since: compare what was written
    changed = [d for d in _diff(old, new) if not resumable(old, new, d, stage)]
    if changed and not any((run_dir / sub).exists() for sub in RUN_OUTPUTS):
        # a start that failed before its first step (a wrong model path, say) left only its config: nothing to mix
        log.info("%s holds no results of the run it was made for; starting there with this config", run_dir)
        return
    if changed and not cfg.output.overwrite:
        names = ", ".join(".".join(d) for d in changed[:6])
        where = "posttrain.output_dir" if stage == "posttrain" else "output.dir"
        raise CheckpointError(
            f"{run_dir} holds a run made with another config (differs in {names}); "
            f"use another {where}, or output.overwrite=true to start that folder afresh"
        )
    if changed:
        for sub in RUN_OUTPUTS:
            p = run_dir / sub
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()


class MetricsLog:
    """Append-only JSONL metrics (one line per logged step) plus an optional Accelerate tracker."""

    def __init__(self, run_dir: Path, accelerator=None, enabled: bool = True):
        self.path = run_dir / "metrics.jsonl"
        self.samples_path = run_dir / "samples.jsonl"
        self.accelerator = accelerator
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint (metrics and samples) so each step appears once.

        A torn last line (the process was killed while appending it) is dropped too."""
        if not self.enabled:
            return
        for path in (self.path, self.samples_path):
            if path.exists():
                rows = read_jsonl_rows(path, what="run log")
                atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows if r.get("step", 0) <= step))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        row = {"step": step, "time": round(time.time(), 3), **metrics}
        with naming_errors(self.path), open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in metrics.items() if isinstance(v, int | float)}, step=step)

    def samples(self, step: int, samples: list[dict]) -> None:
        if not self.enabled or not samples:
            return
        with naming_errors(self.samples_path), open(self.samples_path, "a", encoding="utf-8") as f:
            for s in samples:
                f.write(json.dumps({"step": step, **s}, ensure_ascii=False) + "\n")
        if self.accelerator is not None and self.accelerator.trackers:
            text = "\n\n".join(f"[{s.get('reward', 0):.2f}] {s.get('prompt_tail', '')!r} -> {s.get('response', '')!r}" for s in samples)
            for tracker in self.accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_text("samples", text, step)


def read_jsonl_rows(path: Path, what: str = "metrics file") -> list[dict]:
    """The JSON objects of a JSONL log, one a line. A torn last line (a kill while appending) is skipped with a
    warning; a damaged line anywhere else is an error naming the file and line."""
    lines = Path(path).read_bytes().splitlines()  # each line decoded alone: a kill can cut a character in two
    rows = []
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
            if not isinstance(row, dict):
                raise ValueError(f"a JSON {type(row).__name__}, not an object")
        except UnicodeDecodeError as e:
            if all(not rest.strip() for rest in lines[lineno:]):
                log.warning("%s:%d: skipping a torn last line (the run was killed while writing it)", path, lineno)
                break
            raise RMTError(f"{path}:{lineno}: not a {what} (not UTF-8: {e.reason} at byte {e.start} of the line)") from None
        except ValueError as e:
            if all(not rest.strip() for rest in lines[lineno:]):
                log.warning("%s:%d: skipping a torn last line (the run was killed while writing it)", path, lineno)
                break
            raise RMTError(f"{path}:{lineno}: damaged line in the {what} ({e}); delete that line to go on") from None
        rows.append(row)
    return rows


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return read_jsonl_rows(path)
