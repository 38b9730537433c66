"""Every user or environment error is a one-line message, never a traceback.

Each case runs the real command line (``python -m rmt.cli``) in a subprocess on one class of bad input and checks a
non-zero exit, a message that names the problem, and no "Traceback" anywhere in stdout and stderr. The inputs are
tiny (the test model and corpus of conftest.py), and most cases fail before any work, so the file runs in seconds
per case; the cases that have to start a training run are marked slow.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import build_tiny_model, build_tiny_tokenizer, text_corpus

from rmt.config import load_config
from rmt.data.prepare import prepare_corpus
from rmt.scoring import score_corpus

FAST_TRAIN = ["train.total_steps=4", "train.sequences_per_step=4", "train.save_every=2", "train.lr=1e-3"]


def run_cli(args: list[str], cwd: Path, patch: str = "", timeout: int = 240) -> subprocess.CompletedProcess:
    """``python -m rmt.cli ARGS`` (after ``patch``, Python run first in the same process, when given)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "RMT_CACHE": str(cwd / "cache"), "COLUMNS": "200"}
    if patch:
        script = textwrap.dedent(patch) + "\nimport sys\nfrom rmt.cli import app\nsys.argv = ['rmt', *sys.argv[1:]]\napp()\n"
        cmd = [sys.executable, "-c", script, *args]
    else:
        cmd = [sys.executable, "-m", "rmt.cli", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    """A prepared and scored corpus: (its root, the overrides that point a config at it and the tiny model)."""
    root = tmp_path_factory.mktemp("corpus")
    overrides = text_corpus(root, tiny_model_dir)
    cfg = load_config(None, overrides)
    prepare_corpus(cfg)
    score_corpus(cfg)
    return root, overrides


@pytest.fixture(scope="module")
def unfinished_run(corpus, tmp_path_factory):
    """A `rmt train -c ntp` run stopped by a crash after its checkpoint at step 2 of 4: (run folder, its overrides)."""
    import rmt.trainer as trainer

    _, overrides = corpus
    run = tmp_path_factory.mktemp("runs") / "ntp"
    args = [*overrides, f"output.dir={run}", *FAST_TRAIN]
    real = trainer.train_step

    def crash_on_third_step(cfg, step, *rest, **kw):
        if step == 2:
            raise RuntimeError("simulated crash")
        return real(cfg, step, *rest, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "train_step", crash_on_third_step)
        with pytest.raises(RuntimeError, match="simulated crash"):
            trainer.train(load_config("ntp", args))
    return run, args


def _copy_corpus(corpus, tmp_path) -> list[str]:
    root, overrides = corpus
    shutil.copytree(root / "prep", tmp_path / "prep")
    return [o if not o.startswith("data.prepared_dir=") else f"data.prepared_dir={tmp_path / 'prep'}" for o in overrides]


def _cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


# --- the cases: each returns (command-line arguments, fragments the message must hold, allowed exit codes) ------


def case_non_utf8_config(tmp_path, corpus, unfinished_run):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"train:\n  lr: 1e-3 \xff\xfe\n")
    return ["config", "-c", str(bad)], ["bad.yaml", "not UTF-8"], {2}


def case_non_finite_number(tmp_path, corpus, unfinished_run):
    return ["config", "train.lr=inf"], ["train.lr", "finite"], {2}


def case_boolean_for_an_integer(tmp_path, corpus, unfinished_run):
    return ["config", "train.total_steps=true"], ["train.total_steps", "boolean"], {2}


def case_unwritable_output_folder(tmp_path, corpus, unfinished_run):
    (tmp_path / "afile").write_text("not a folder")
    args = ["train", "-c", "ntp", *corpus[1], f"output.dir={tmp_path / 'afile' / 'run'}", *FAST_TRAIN]
    return args, ["afile"], {1}


def case_truncated_arrow_shard(tmp_path, corpus, unfinished_run):
    overrides = _copy_corpus(corpus, tmp_path)
    for shard in (tmp_path / "prep" / "scored" / "train").glob("*.arrow"):
        _cut(shard, 0.3)
    args = ["train", "-c", "ntp", *overrides, f"output.dir={tmp_path / 'run'}", *FAST_TRAIN]
    return args, ["damaged", str(Path("scored") / "train")], {1}


def case_truncated_meta_json(tmp_path, corpus, unfinished_run):
    overrides = _copy_corpus(corpus, tmp_path)
    _cut(tmp_path / "prep" / "meta.json")
    model = overrides[0].split("=", 1)[1]
    args = ["eval", *overrides, "--model", f"m={model}", "--out", str(tmp_path / "eval.json"), "--mode", "ntp",
            "eval.positions_per_tier=4"]
    return args, ["meta.json", "damaged"], {1}


def case_trainer_state_without_rng(tmp_path, corpus, unfinished_run):
    run, args = unfinished_run
    shutil.copytree(run, tmp_path / "ntp")
    state = tmp_path / "ntp" / "checkpoints" / "step-0000002" / "trainer_state.json"
    state.write_text(json.dumps({"preset": "ntp", "step": 2}))  # cut short: no RNG state
    args = [a if not a.startswith("output.dir=") else f"output.dir={tmp_path / 'ntp'}" for a in args]
    return ["train", "-c", "ntp", *args], ["corrupt or partial", "trainer_state.json"], {1}


def case_disk_full(tmp_path, corpus, unfinished_run):
    """`rmt report` on a full disk (a write that fails with ENOSPC and says no file, as write(2) does)."""
    patch = """
        import errno, io, os

        real = io.open

        class Full:
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *exc): self.f.close()
            def write(self, text): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def full_open(file, mode="r", *a, **k):  # report.md, or the temporary file that is renamed to it
            f = real(file, mode, *a, **k)
            name = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else str(file)
            return Full(f) if "report.md" in os.path.basename(name) and "w" in mode else f

        io.open = full_open
    """
    return (["report", str(unfinished_run[0]), "-o", str(tmp_path / "rep")], patch), ["No space left on device", "report.md"], {1}


def case_disk_full_during_training(tmp_path, corpus, unfinished_run):
    patch = """
        import builtins, errno, os
        import rmt.run_dir

        class Full:
            def __init__(self, f): self.f = f
            def __enter__(self): return self
            def __exit__(self, *exc): self.f.close()
            def write(self, text): raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def full_open(path, mode="r", *a, **k):
            f = builtins.open(path, mode, *a, **k)
            return Full(f) if str(path).endswith("metrics.jsonl") and "a" in mode else f

        rmt.run_dir.open = full_open
    """
    args = ["train", "-c", "ntp", *corpus[1], f"output.dir={tmp_path / 'run'}", *FAST_TRAIN]
    return (args, patch), ["No space left on device", "metrics.jsonl"], {1}


def case_non_finite_loss(tmp_path, corpus, unfinished_run):
    args = ["train", "-c", "ntp", *corpus[1], f"output.dir={tmp_path / 'run'}", "train.total_steps=6",
            "train.sequences_per_step=4", "train.lr=1e30", "train.grad_clip=0", "train.max_nonfinite=1"]
    return args, ["non-finite", "train.max_nonfinite"], {1}


def case_seq_len_beyond_the_context(tmp_path, corpus, unfinished_run):
    root, overrides = corpus
    args = ["prepare", *overrides, f"data.prepared_dir={tmp_path / 'long'}", "data.seq_len=1024"]
    return args, ["data.seq_len=1024", "context of 512"], {1}


def case_report_of_a_file_that_is_no_evaluation(tmp_path, corpus, unfinished_run):
    (tmp_path / "e.json").write_text(json.dumps([1, 2, 3]))
    return ["report", "--eval", str(tmp_path / "e.json"), "-o", str(tmp_path / "rep")], ["e.json", "not an evaluation"], {1}


def case_report_of_an_evaluation_with_a_text_accuracy(tmp_path, corpus, unfinished_run):
    hard = {"n": 4, "correct": 2, "accuracy": "0.5", "ci95": [0.15, 0.85]}
    (tmp_path / "e.json").write_text(json.dumps({"results": {"m": {"tiers": {"hard": hard}, "average": 0.5}}}))
    return ["report", "--eval", str(tmp_path / "e.json"), "-o", str(tmp_path / "rep")], ["e.json", "results.m.tiers.hard.accuracy"], {1}


def case_config_base_that_is_not_a_string(tmp_path, corpus, unfinished_run):
    (tmp_path / "bad.yaml").write_text("base: 5\n")
    return ["config", "-c", str(tmp_path / "bad.yaml")], ["bad.yaml", "`base` must be a preset name or a path"], {2}


def case_jsonl_line_with_a_lone_surrogate(tmp_path, corpus, unfinished_run):
    (tmp_path / "c.jsonl").write_text('{"text": "fine text"}\n{"text": "bad \\ud800 x"}\n')
    overrides = [o for o in corpus[1] if not o.startswith(("data.path=", "data.prepared_dir="))]
    args = ["prepare", *overrides, f"data.path={tmp_path / 'c.jsonl'}", f"data.prepared_dir={tmp_path / 'p'}"]
    return args, ["c.jsonl:2", "lone surrogate"], {1}


def case_damaged_scorer_json(tmp_path, corpus, unfinished_run):
    overrides = _copy_corpus(corpus, tmp_path)
    (tmp_path / "prep" / "scores" / "scorer.json").write_text("")  # cut short: which scorer made the shards is unknown
    (tmp_path / "prep" / "scores" / "tiers.json").unlink()
    return ["score", *overrides], ["scorer.json is damaged", "output.overwrite=true"], {1}


def case_report_of_a_missing_evaluation(tmp_path, corpus, unfinished_run):
    return ["report", "--eval", str(tmp_path / "none.json"), "-o", str(tmp_path / "rep")], ["none.json", "not found"], {1}


def case_demo_without_methods(tmp_path, corpus, unfinished_run):
    return ["demo", "--methods", ",", "--size", "tiny", "--out", str(tmp_path / "demo")], ["--methods", "empty"], {2}


def case_demo_method_that_is_a_path(tmp_path, corpus, unfinished_run):
    return ["demo", "--methods", "../rpt", "--size", "tiny", "--out", str(tmp_path / "demo")], ["'../rpt'", "not a preset"], {2}


def case_missing_local_model(tmp_path, corpus, unfinished_run):
    (tmp_path / "models").mkdir()
    _, overrides = corpus
    args = ["prepare", "model.path=models/nope", *overrides[1:], f"data.prepared_dir={tmp_path / 'p'}"]
    return args, ["no such folder", "models/nope"], {1}


def case_tokenizer_of_another_corpus(tmp_path, corpus, unfinished_run):
    other = tmp_path / "other_model"
    tok = build_tiny_tokenizer(other, texts=["completely different words, zebra quartz!"] * 3, vocab_size=280)
    build_tiny_model(other, tok)
    _, overrides = corpus
    args = ["train", "-c", "ntp", f"model.path={other}", *overrides[1:], f"output.dir={tmp_path / 'run'}", *FAST_TRAIN]
    return args, ["another tokenizer"], {1}


def case_eval_baseline_that_names_no_row(tmp_path, corpus, unfinished_run):
    _, overrides = corpus
    model = overrides[0].split("=", 1)[1]
    args = ["eval", *overrides, "--model", f"m={model}", "--baseline", "nobody", "--out", str(tmp_path / "eval.json"),
            "--mode", "ntp", "eval.positions_per_tier=4"]
    return args, ["eval.baseline='nobody'"], {2}


def case_eval_rows_with_one_label(tmp_path, corpus, unfinished_run):
    _, overrides = corpus
    model = overrides[0].split("=", 1)[1]
    args = ["eval", *overrides, "--model", f"base={model}", "--model", f"ntr={model}", "--mode", "reasoning",
            "--out", str(tmp_path / "eval.json"), "eval.positions_per_tier=4"]
    return args, ["'ntr'", "rename"], {2}


def case_posttrain_eval_output_unwritable(tmp_path, corpus, unfinished_run):
    (tmp_path / "afile").write_text("not a folder")
    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(6)))
    model = corpus[1][0].split("=", 1)[1]
    args = ["posttrain", "--eval-only", f"model.path={model}", f"posttrain.data={qa}", "posttrain.eval_size=3",
            "posttrain.verifier=exact", "--out", str(tmp_path / "afile" / "r.json")]
    return args, ["cannot write --out", "afile"], {1}


def case_run_folder_in_use(tmp_path, corpus, unfinished_run):
    patch = f"""
        from pathlib import Path
        from rmt.run_dir import RunLock

        run = Path({str(tmp_path / 'run')!r})
        run.mkdir()
        holder = RunLock(run)
        holder.acquire()  # held while the command below opens the folder again, as a second writer would
    """
    args = ["train", "-c", "ntp", *corpus[1], f"output.dir={tmp_path / 'run'}", *FAST_TRAIN]
    return (args, patch), ["in use by another run", "pid"], {1}


CASES = {name[len("case_"):]: fn for name, fn in globals().items() if name.startswith("case_")}
# Slow: they train a step or two first, or start a whole training run to reach their check (each class is also
# tested in-process in test_faults.py or test_trainer.py).
SLOW = {"disk_full_during_training", "non_finite_loss", "trainer_state_without_rng", "tokenizer_of_another_corpus",
        "run_folder_in_use"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(CASES)])
def test_user_error_is_a_message_not_a_traceback(name, tmp_path, corpus, unfinished_run):
    spec, fragments, codes = CASES[name](tmp_path, corpus, unfinished_run)
    args, patch = spec if isinstance(spec, tuple) else (spec, "")
    proc = run_cli(args, tmp_path, patch)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output[-3000:]
    assert proc.returncode in codes, (proc.returncode, output[-3000:])
    assert output.count("error:") == 1, output[-3000:]
    for fragment in fragments:
        assert fragment in output, (fragment, output[-3000:])
