"""`rmt posttrain`: question files and their errors, prompts and answer lines, evaluation statistics, a tiny run
that learns, user verifiers in a run, start-up checks and exact resume."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import LR_WARMUP2_T6
from rmt.config import load_config
from rmt.errors import DataError
from rmt.posttrain import (
    answer_line_end,
    evaluate_questions,
    load_question_sets,
    posttrain,
    prompt_ids,
    read_questions,
)
from rmt.stats import wilson_interval
from rmt.run_dir import read_metrics
from rmt.verifiers import VerifierError

ANSWER = "7"  # the synthetic task: whatever the question, the answer is this one token


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run many small ops: one thread is fastest, and far faster than two on shared, busy cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --- data ---------------------------------------------------------------------------------------------------------


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_reads_jsonl_and_parquet_with_configured_fields(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    recs = [{"q": "1+1=", "a": 2, "extra": "x"}, {"q": "2+2=", "a": "4", "extra": "y"}]
    jsonl = _write_jsonl(tmp_path / "qa.jsonl", recs)
    parquet = tmp_path / "qa.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "a": str(r["a"])} for r in recs]), parquet)
    for path in (jsonl, parquet):
        qs = read_questions(path, question_field="q", answer_field="a")
        assert [(q.question, q.answer) for q in qs] == [("1+1=", "2"), ("2+2=", "4")]
        assert qs[1].record["extra"] == "y"


def test_missing_answer_field_names_file_and_line(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "a", "answer": "1"}, {"question": "b", "solution": "2"}])
    with pytest.raises(DataError, match=r"qa\.jsonl:2: no answer field 'answer'.*posttrain\.answer_field"):
        read_questions(path)
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "a", "answer": "1"}, {"question": "b", "answer": " "}])
    with pytest.raises(DataError, match=r"qa\.jsonl:2: field 'answer' is empty: no response could ever be rewarded"):
        read_questions(path)


def test_missing_empty_and_broken_files_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_questions(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="empty"):
        read_questions(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"question": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        read_questions(tmp_path / "bad.jsonl")


def test_eval_questions_are_held_out_of_training(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"question": f"{i}=", "answer": str(i)} for i in range(10)])
    cfg = load_config(None, [f"posttrain.data={path}", "posttrain.eval_size=3"])
    train, held = load_question_sets(cfg)
    assert [q.answer for q in train] == [str(i) for i in range(7)] and [q.answer for q in held] == ["7", "8", "9"]
    with pytest.raises(DataError, match="eval_size"):
        load_question_sets(load_config(None, [f"posttrain.data={path}", "posttrain.eval_size=10"]))


# --- prompts, answers, statistics ---------------------------------------------------------------------------------


def test_raw_prompt_is_question_then_think(tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    cfg = load_config()
    ids = prompt_ids("3+4=", tok, cfg)
    assert ids[0] == tok.bos_token_id and tok.decode(ids[1:]) == "3+4=<think>"
    assert ids[-1] == tok.convert_tokens_to_ids("<think>")


def test_answer_line_ends_at_the_newline_after_think_close():
    pieces = ["5", "-", "1", "</think>", "\n", "4", "\n", "3", "+"]
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    ids = list(range(len(pieces)))
    assert answer_line_end(ids, decode, "</think>") == 7  # a newline right after </think> does not end it
    assert answer_line_end(ids[:6], decode, "</think>") is None
    assert answer_line_end([0, 4, 5, 6], decode, "</think>") is None  # no </think>: never an answer line


def test_an_evaluation_keeps_each_answer_in_order_and_a_summary_per_named_task():
    from rmt.posttrain import summarize_eval

    answers = [{"correct": c, "score": float(c), "status": "ok", "response_tokens": n, "think_tokens": n - 1}
               for c, n in ((True, 4), (False, 6), (True, 8), (True, 2))]
    out = summarize_eval(answers, ["a", "b", None, "a"])
    assert out["correct"] == [1, 0, 1, 1]
    assert out["n"] == 4 and out["accuracy"] == 0.75  # every answer, a record without a task included
    assert sorted(out["by_task"]) == ["a", "b"]
    assert out["by_task"]["a"]["n"] == 2 and out["by_task"]["a"]["accuracy"] == 1.0
    assert out["by_task"]["a"]["mean_response_tokens"] == 3.0
    assert out["by_task"]["b"]["accuracy"] == 0.0
    assert "by_task" not in summarize_eval(answers, [None, 3, None, None])  # no task named as a string


def test_summary_intervals_are_wilson_and_empty_is_uninformative():
    from rmt.posttrain import summarize

    row = {"correct": True, "score": 1.0, "response_tokens": 3, "think_tokens": 1, "status": "ok"}
    got = summarize([row] * 8 + [{**row, "correct": False, "score": 0.0}] * 2)
    assert got["accuracy"] == 0.8 and got["accuracy_ci95"] == list(wilson_interval(8, 10))
    assert summarize([])["accuracy_ci95"] == [0.0, 1.0]


# --- the synthetic task and its warm-started tiny model -----------------------------------------------------------


def _questions(n, seed):
    rng = random.Random(seed)
    return [{"question": f"{rng.randint(0, 9)}+{rng.randint(0, 9)}=", "answer": ANSWER, "id": i} for i in range(n)]


@pytest.fixture(scope="module")
def warm_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny random Llama taught the format by a few seconds of NTP: `Q<think>00</think>D` + EOS with D a random
    digit. It answers well-formed, right about 1 time in 10 on the synthetic task: room for GRPO to show."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    rng = random.Random(0)
    docs = [
        [tok.bos_token_id] + tok.encode(f"{q['question']}<think>00</think>{rng.randint(0, 9)}") + [tok.eos_token_id]
        for q in _questions(512, 1)
    ]
    width = max(len(d) for d in docs)
    ids = torch.tensor([d + [tok.pad_token_id] * (width - len(d)) for d in docs])
    labels = ids.masked_fill(ids == tok.pad_token_id, -100)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for step in range(120):
        rows = torch.randint(0, len(docs), (64,), generator=torch.Generator().manual_seed(step))
        loss = model(input_ids=ids[rows], labels=labels[rows]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = tmp_path_factory.mktemp("warm_model")
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def _cfg(model_dir, data, out, *extra):
    return load_config(None, [
        f"model.path={model_dir}", f"posttrain.data={data}", "posttrain.eval_size=0", "posttrain.verifier=exact",
        "posttrain.max_response_tokens=12", "posttrain.questions_per_step=8", "rollout.group_size=8",
        "rollout.positions_per_batch=8", "rollout.temperature=1.0", f"posttrain.output_dir={out}", "train.seed=0",
        *extra,
    ])


@pytest.mark.slow
def test_a_few_steps_raise_the_reward_on_an_easy_task(warm_model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "train.jsonl", _questions(64, 2))
    held = _write_jsonl(tmp_path / "held.jsonl", [{**q, "task": "ab"[i % 2]} for i, q in enumerate(_questions(32, 3))])
    cfg = _cfg(warm_model_dir, data, tmp_path / "run", "posttrain.steps=30", "posttrain.lr=3e-3", f"posttrain.eval_data={held}",
               "train.save_every=100", "posttrain.eval_every=10")
    run = posttrain(cfg)
    rows = [r for r in read_metrics(run) if "reward" in r]
    assert [r["step"] for r in rows] == list(range(1, 31))
    first = sum(r["reward"] for r in rows[:5]) / 5
    last = sum(r["reward"] for r in rows[-5:]) / 5
    assert last > first + 0.3, (first, last)
    evals = json.loads((run / "eval.json").read_text())
    assert evals["after"]["accuracy"] > evals["before"]["accuracy"]
    assert evals["after"]["accuracy_ci95"][0] <= evals["after"]["accuracy"] <= evals["after"]["accuracy_ci95"][1]
    # the accuracy-vs-step curve: steps 0, 10, 20 and 30, the ends being "before" and "after"
    assert list(evals["curve"]) == ["0", "10", "20", "30"]
    assert evals["curve"]["0"] == evals["before"] and evals["curve"]["30"] == evals["after"]
    assert [r["step"] for r in read_metrics(run) if "eval_accuracy" in r] == [0, 10, 20, 30]
    # each evaluation per task (the held-out records name one) and per question, in the file's order
    after = evals["after"]
    assert {t: v["n"] for t, v in after["by_task"].items()} == {"a": 16, "b": 16}
    assert after["accuracy"] == sum(after["correct"]) / 32 == (after["by_task"]["a"]["accuracy"] + after["by_task"]["b"]["accuracy"]) / 2
    assert [r["eval_accuracy_a"] for r in read_metrics(run) if "eval_accuracy_a" in r] == [
        evals["curve"][k]["by_task"]["a"]["accuracy"] for k in ("0", "10", "20", "30")]
    assert (run / "final" / "model.safetensors").is_file()


# --- a user verifier in a run; start-up checks; resume ------------------------------------------------------------

CALLS: list[tuple] = []


def recording_verifier(prediction, answer, record):
    CALLS.append((prediction, answer, record))
    return float(prediction == answer)


def wrong_signature(prediction, answer, record, extra_required):
    return 0.0


def test_a_verifier_with_a_bad_signature_is_rejected_before_any_work(warm_model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "train.jsonl", _questions(8, 2))
    cfg = _cfg(warm_model_dir, data, tmp_path / "run", f"posttrain.verifier={__name__}:wrong_signature")
    with pytest.raises(VerifierError, match="has signature"):
        posttrain(cfg)
    assert not (tmp_path / "run").exists()


def test_reasoning_gym_verifier_needs_reasoning_gym_records(warm_model_dir, tmp_path):
    data = _write_jsonl(tmp_path / "train.jsonl", _questions(8, 2))
    cfg = _cfg(warm_model_dir, data, tmp_path / "run", "posttrain.verifier=reasoning_gym")
    with pytest.raises(DataError, match=r"train\.jsonl:1: .*reasoning-gym records"):
        posttrain(cfg)


@pytest.mark.slow
def test_resume_continues_the_step_count_and_matches_an_uninterrupted_run(warm_model_dir, tmp_path):
    from safetensors.torch import load_file

    data = _write_jsonl(tmp_path / "train.jsonl", _questions(32, 2))
    opts = ("posttrain.steps=4", "posttrain.lr=3e-3", "train.save_every=100", f"posttrain.verifier={__name__}:recording_verifier")
    CALLS.clear()
    whole = posttrain(_cfg(warm_model_dir, data, tmp_path / "whole", *opts))
    # the user verifier saw (prediction: str | None, answer: str, record: dict) with the record as read from the file
    assert len(CALLS) == 4 * 8 * 8
    assert all((p is None or isinstance(p, str)) and a == ANSWER and isinstance(r, dict) and "id" in r for p, a, r in CALLS)
    assert any(p is not None for p, _, _ in CALLS)

    part = tmp_path / "part"
    posttrain(_cfg(warm_model_dir, data, part, *opts), stop_at=2)
    assert [p.name for p in (part / "checkpoints").iterdir()] == ["step-0000002"]
    assert not (part / "final").exists()
    posttrain(_cfg(warm_model_dir, data, part, *opts))
    assert [r["step"] for r in read_metrics(part)] == [1, 2, 3, 4]
    assert [r["reward"] for r in read_metrics(part)] == [r["reward"] for r in read_metrics(whole)]
    a, b = load_file(str(whole / "final" / "model.safetensors")), load_file(str(part / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("change", "refused"), [
    ("posttrain.lr=5e-2", "posttrain.lr"),  # was resumed silently, its config.yaml then naming an lr it never ran with
    ("posttrain.steps=6", "posttrain.steps"),  # the schedule's horizon
    ("posttrain.data=OTHER", "posttrain.data"),
    ("posttrain.eval_size=4", "posttrain.eval_size"),  # moves questions between training and evaluation
    ("grpo.clip_eps_high=0.3", "grpo.clip_eps_high"),
    ("posttrain.eval_every=1", None),  # evaluation only
    ("budget.gamma=0.9", None),  # a mid-training setting post-training never reads
    ("data.path=elsewhere.jsonl", None),
    ("train.lr=0.5", None),  # mid-training's: post-training has posttrain.lr
    ("train.total_steps=7", None),
    ("posttrain.task_field=kind", None),
])
def test_a_post_training_run_resumes_only_with_the_settings_it_was_made_with(warm_model_dir, tmp_path, change, refused):
    from rmt.errors import CheckpointError

    data = _write_jsonl(tmp_path / "train.jsonl", _questions(16, 2))
    other = _write_jsonl(tmp_path / "other.jsonl", _questions(16, 5))
    opts = ("posttrain.steps=2", "posttrain.questions_per_step=2", "rollout.group_size=2", "train.save_every=100",
            "posttrain.lr=1e-3")
    run = tmp_path / "run"
    posttrain(_cfg(warm_model_dir, data, run, *opts), stop_at=1)
    resumed = _cfg(warm_model_dir, data, run, *opts, change.replace("OTHER", str(other)))
    if refused:
        with pytest.raises(CheckpointError, match=rf"another config \(differs in {refused}\)"):
            posttrain(resumed)
        assert not (run / "final").exists()  # the earlier run is left as it was
        assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-0000001"]
    else:
        posttrain(resumed)
        assert [r["step"] for r in read_metrics(run) if "reward" in r] == [1, 2]


def test_a_folder_of_the_users_is_refused_as_a_post_training_run_folder(warm_model_dir, tmp_path):
    from rmt.errors import CheckpointError

    data = _write_jsonl(tmp_path / "train.jsonl", _questions(8, 2))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match=r"is not an RMT run folder; choose another posttrain.output_dir"):
        posttrain(_cfg(warm_model_dir, data, mine, "posttrain.steps=1"))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"


def test_another_held_out_file_resumes_a_post_training_run_but_dropping_it_does_not(warm_model_dir, tmp_path):
    """With posttrain.eval_data the training questions are all of posttrain.data, whichever file is held out;
    without it the last posttrain.eval_size questions leave training, so that change is refused."""
    from rmt.errors import CheckpointError

    data = _write_jsonl(tmp_path / "train.jsonl", _questions(16, 2))
    held = [_write_jsonl(tmp_path / f"held{i}.jsonl", _questions(4, 6 + i)) for i in range(2)]
    opts = ("posttrain.steps=2", "posttrain.questions_per_step=2", "rollout.group_size=2", "train.save_every=100")
    run = tmp_path / "run"
    posttrain(_cfg(warm_model_dir, data, run, *opts, f"posttrain.eval_data={held[0]}"), stop_at=1)
    with pytest.raises(CheckpointError, match=r"differs in posttrain.eval_data"):
        posttrain(_cfg(warm_model_dir, data, run, *opts, "posttrain.eval_data=null", "posttrain.eval_size=4"))
    posttrain(_cfg(warm_model_dir, data, run, *opts, f"posttrain.eval_data={held[1]}"))
    assert json.loads((run / "eval.json").read_text())["after"]["n"] == 4


def test_learning_rate_depends_on_the_step_only_and_resumes(warm_model_dir, tmp_path):
    """One scheduler step per post-training step with grpo.num_iterations = 2, across a resume."""
    data = _write_jsonl(tmp_path / "train.jsonl", _questions(16, 2))
    opts = ("posttrain.steps=6", "train.warmup_steps=2", "train.lr_schedule=linear", "grpo.num_iterations=2",
            "posttrain.questions_per_step=2", "rollout.group_size=2", "posttrain.lr=1e-3", "train.save_every=100")
    run = tmp_path / "run"
    posttrain(_cfg(warm_model_dir, data, run, *opts), stop_at=3)
    posttrain(_cfg(warm_model_dir, data, run, *opts))
    lrs = [r["lr"] / 1e-3 for r in read_metrics(run) if "lr" in r]
    assert lrs == pytest.approx(LR_WARMUP2_T6["linear"], abs=1e-6)


def test_evaluate_questions_reports_accuracy_interval_length_and_malformed(warm_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(warm_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(warm_model_dir))
    cfg = load_config(None, ["posttrain.verifier=exact", "posttrain.max_response_tokens=12"])
    out = evaluate_questions(model, tok, _questions(16, 4), cfg)
    assert out["n"] == 16 and 0.0 <= out["accuracy"] <= 1.0
    lo, hi = out["accuracy_ci95"]
    assert lo <= out["accuracy"] <= hi
    assert out["malformed"] < 0.5 and 3 <= out["mean_response_tokens"] <= 12
    assert out["mean_think_tokens"] == pytest.approx(2, abs=1)


def test_cli_eval_only_prints_the_summary_and_reports_bad_data(warm_model_dir, tmp_path):
    from typer.testing import CliRunner

    from rmt.cli import app

    data = _write_jsonl(tmp_path / "qa.jsonl", _questions(12, 5))
    common = [f"model.path={warm_model_dir}", "posttrain.verifier=exact", "posttrain.max_response_tokens=12"]
    result = CliRunner().invoke(app, ["posttrain", "--eval-only", f"posttrain.data={data}", "posttrain.eval_size=4", *common])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["n"] == 4 and summary["verifier"] == "exact" and "accuracy_ci95" in summary
    result = CliRunner().invoke(app, ["posttrain", f"posttrain.data={tmp_path / 'none.jsonl'}", *common])
    assert result.exit_code == 1 and "question file not found" in result.output
