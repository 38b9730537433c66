"""Several CPU processes on the gloo backend, launched with torchrun (as users launch on GPUs)."""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from conftest import LR_WARMUP2_T6, LR_WARMUP2_T6_ARGS, text_corpus
from safetensors.torch import load_file

from rmt.checkpoint import list_checkpoints
from rmt.config import load_config
from rmt.data.prepare import prepare_corpus
from rmt.run_dir import read_metrics

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "rmt.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
               "-m", "rmt.cli", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("dist")
    base = [*text_corpus(root, tiny_model_dir), "scoring.tier_rule=quantile", "scoring.shard_sequences=10"]
    prepare_corpus(load_config(None, base))
    return base, root


def test_scoring_shards_over_processes_without_gaps_or_duplicates(corpus, tmp_path):
    base, root = corpus
    launch(2, "score", *base)
    two = json.loads((root / "prep" / "scores" / "summary.json").read_text())
    shutil.rmtree(root / "prep" / "scores")
    launch(1, "score", *base)
    one = json.loads((root / "prep" / "scores" / "summary.json").read_text())
    assert two["splits"] == one["splits"]
    assert two["histogram"] == one["histogram"]


def run_args(base, out, preset, *extra):
    return ["train", "-c", preset, *base, f"output.dir={out}", "train.total_steps=4", "train.sequences_per_step=4",
            "rollout.group_size=2", "budget.b0=4", "train.lr=1e-3", "train.save_every=2", *extra]


@pytest.mark.parametrize("preset", ["ntp", "rmt", "rlp"])
def test_two_processes_match_one_process(corpus, tmp_path, preset):
    base, root = corpus
    if not (root / "prep" / "scored").exists():
        launch(1, "score", *base)
    launch(1, *run_args(base, tmp_path / "one", preset))
    launch(2, *run_args(base, tmp_path / "two", preset))
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in two] == [1, 2, 3, 4]
    if preset == "ntp":
        # Same global batch, same global normalisation: the same loss curve and the same weights.
        assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)
        a, b = load_file(str(tmp_path / "one" / "final" / "model.safetensors")), load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
    else:
        # C is drawn over the global batch, so the RL positions are the same; the samples differ per process.
        for r1, r2 in zip(one, two):
            assert (r1["tier_easy"], r1["tier_medium"], r1["tier_hard"]) == (r2["tier_easy"], r2["tier_medium"], r2["tier_hard"])
            assert r2["rl_positions"] == r1["rl_positions"]


def test_two_process_checkpoint_resumes_in_one_process(corpus, tmp_path):
    base, root = corpus
    if not (root / "prep" / "scored").exists():
        launch(1, "score", *base)
    launch(2, *run_args(base, tmp_path / "run", "ntp"))
    run = tmp_path / "run"
    reference = load_file(str(run / "final" / "model.safetensors"))
    shutil.rmtree(run / "final")
    shutil.rmtree(list_checkpoints(run)[-1])  # back to the step-2 checkpoint written by the 2-process run
    launch(1, *run_args(base, run, "ntp"))
    resumed = load_file(str(run / "final" / "model.safetensors"))
    for k in reference:
        torch.testing.assert_close(resumed[k], reference[k], rtol=1e-4, atol=1e-5)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_learning_rate_is_the_same_for_one_and_two_processes(corpus, tmp_path, schedule):
    """Accelerate's prepared scheduler would step once per process: the schedule is stepped once per training step.
    The hand-computed values are those of one process (tests/test_trainer.py); one schedule also runs both here."""
    base, root = corpus
    if not (root / "prep" / "scored").exists():
        launch(1, "score", *base)
    extra = (*LR_WARMUP2_T6_ARGS, f"train.lr_schedule={schedule}", "grpo.num_iterations=2")
    launch(2, *run_args(base, tmp_path / "two", "ntp", *extra))
    two = [r["lr"] / 1e-3 for r in read_metrics(tmp_path / "two")]
    assert two == pytest.approx(LR_WARMUP2_T6[schedule], abs=1e-6)
    if schedule == "cosine":
        launch(1, *run_args(base, tmp_path / "one", "ntp", *extra))
        assert [r["lr"] / 1e-3 for r in read_metrics(tmp_path / "one")] == two


def parity_verifier(prediction, answer, record) -> float:
    """Right exactly on the questions with an even id, whatever the model says: the answers' order shows."""
    return float(record["id"] % 2 == 0)


def test_post_training_evaluation_keeps_the_questions_order_over_processes(tiny_model_dir, tmp_path, monkeypatch):
    """Each process answers every world-th question; the gathered answers are put back in the file's order, so the
    per-question results (and the per-task summaries) of a 2-process run are in the order of the questions."""
    questions = [{"question": f"{i}+1=", "answer": str(i + 1), "id": i, "task": "ab"[i % 3 == 0]} for i in range(12)]
    for name, rows in (("train", questions[:8]), ("held", questions)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(q) + "\n" for q in rows))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")]))
    launch(2, "posttrain", f"model.path={tiny_model_dir}", f"posttrain.data={tmp_path / 'train.jsonl'}",
           f"posttrain.eval_data={tmp_path / 'held.jsonl'}", "posttrain.verifier=test_distributed:parity_verifier",
           "posttrain.steps=1", "posttrain.questions_per_step=2", "rollout.group_size=2", "posttrain.max_response_tokens=4",
           f"posttrain.output_dir={tmp_path / 'run'}")
    before = json.loads((tmp_path / "run" / "eval.json").read_text())["before"]
    assert before["correct"] == [int(i % 2 == 0) for i in range(12)]  # gathered as is: the evens first, then the odds
    for task in "ab":
        ids = [i for i in range(12) if "ab"[i % 3 == 0] == task]
        assert before["by_task"][task]["n"] == len(ids)
        assert before["by_task"][task]["accuracy"] == sum(i % 2 == 0 for i in ids) / len(ids)
