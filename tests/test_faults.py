"""What the tool guarantees on faults: it never deletes what it did not write, a kill never leaves a half-written final
model that passes for finished, one writer per run folder, interrupted runs exit non-zero after their checkpoint,
evaluation checks its arguments before the work and writes results first, damaged logs do not block a resume, and
the config refuses booleans and non-finite numbers where numbers are meant."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_model, text_corpus
from safetensors.torch import load_file

import rmt.trainer as trainer
from rmt import fileio
from rmt.checkpoint import MANIFEST_FILE, list_checkpoints, model_folder_problem, save_checkpoint
from rmt.config import RMTConfig, load_config
from rmt.data.prepare import prepare_corpus
from rmt.errors import CheckpointError, DataError, Interrupted, ModelError, RMTError
from rmt.run_dir import RunLock, read_metrics
from rmt.scoring import score_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    """Overrides of a prepared and scored corpus (the tiny model, seq_len 32)."""
    overrides = text_corpus(tmp_path_factory.mktemp("corpus"), tiny_model_dir)
    cfg = load_config(None, overrides)
    prepare_corpus(cfg)
    score_corpus(cfg)
    return overrides


def run_cfg(corpus, run: Path, *extra, preset="ntp") -> RMTConfig:
    return load_config(preset, [*corpus, f"output.dir={run}", "train.total_steps=4", "train.sequences_per_step=4",
                                "train.save_every=2", "train.lr=1e-3", *extra])


def dead_pid() -> int:
    """The pid of a process that has ended."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- `rmt prepare` deletes nothing it did not write ---------------------------------------------------------------


def _prepare_cfg(tmp_path, model_dir, src, prepared, *extra):
    return load_config(None, [f"model.path={model_dir}", f"data.path={src}", f"data.prepared_dir={prepared}",
                              "data.seq_len=16", "data.min_tokens=4", *extra])


def _jsonl(path: Path, n: int = 30) -> Path:
    path.write_text("".join(json.dumps({"text": f"document {i}: the cat sat on the mat, {i}+1={i + 1}."}) + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize("overwrite", [False, True])
def test_prepare_refuses_a_folder_it_did_not_write(tmp_path, tiny_model_dir, overwrite):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "ideas.txt").write_text("my notes")
    cfg = _prepare_cfg(tmp_path, tiny_model_dir, _jsonl(tmp_path / "c.jsonl"), notes, f"output.overwrite={overwrite}")
    with pytest.raises(DataError, match="not a corpus prepared by `rmt prepare`"):
        prepare_corpus(cfg)
    assert (notes / "ideas.txt").read_text() == "my notes" and sorted(p.name for p in notes.iterdir()) == ["ideas.txt"]


def test_prepare_refuses_the_corpus_itself_a_folder_inside_it_or_one_holding_it(tmp_path, tiny_model_dir):
    src = _jsonl(tmp_path / "c.jsonl")
    with pytest.raises(DataError, match="is the corpus itself"):
        prepare_corpus(_prepare_cfg(tmp_path, tiny_model_dir, src, src))
    assert src.is_file() and len(src.read_text().splitlines()) == 30

    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.txt").write_text("the cat sat on the mat. " * 20)
    with pytest.raises(DataError, match="inside the corpus"):
        prepare_corpus(_prepare_cfg(tmp_path, tiny_model_dir, texts, texts / "prep"))
    with pytest.raises(DataError, match="is the corpus itself"):
        prepare_corpus(_prepare_cfg(tmp_path, tiny_model_dir, texts, texts))

    # A prepared corpus, then a corpus file put inside it: replacing the folder would delete the corpus.
    prep = tmp_path / "prep"
    prepare_corpus(_prepare_cfg(tmp_path, tiny_model_dir, src, prep))
    inner = shutil.copy(src, prep / "c.jsonl")
    with pytest.raises(DataError, match="lies inside data.prepared_dir"):
        prepare_corpus(_prepare_cfg(tmp_path, tiny_model_dir, inner, prep, "data.seq_len=24", "output.overwrite=true"))
    assert Path(inner).is_file() and (prep / "meta.json").is_file()


def test_prepare_replaces_its_own_corpus_but_never_a_file_it_did_not_write(tmp_path, tiny_model_dir):
    src = _jsonl(tmp_path / "c.jsonl")
    prep = tmp_path / "prep"
    prepare_corpus(_prepare_cfg(tmp_path, tiny_model_dir, src, prep))
    (prep / "notes.md").write_text("mine")
    with pytest.raises(DataError, match=r"did not write \(notes.md\)"):
        prepare_corpus(_prepare_cfg(tmp_path, tiny_model_dir, src, prep, "data.seq_len=24", "output.overwrite=true"))
    assert (prep / "notes.md").read_text() == "mine"
    assert json.loads((prep / "meta.json").read_text())["data"]["seq_len"] == 16  # the old corpus, untouched
    (prep / "notes.md").unlink()
    prepare_corpus(_prepare_cfg(tmp_path, tiny_model_dir, src, prep, "data.seq_len=24", "output.overwrite=true"))
    assert json.loads((prep / "meta.json").read_text())["data"]["seq_len"] == 24
    left = [p.name for p in tmp_path.iterdir() if p.name.startswith(".prep.")]
    assert left == [".prep.lock"], "no temporary or swapped-out folder left (only the lock file jobs sharing it wait on)"


def test_prepare_removes_only_the_leftovers_of_dead_writers(tmp_path, tiny_model_dir):
    host = fileio._HOST
    dead = tmp_path / f".prep.tmp.{dead_pid()}@{host}.abcd1234"
    alive = tmp_path / f".prep.tmp.{os.getppid()}@{host}.abcd1234"
    elsewhere = tmp_path / f".prep.tmp.{dead_pid()}@another-host.abcd1234"
    other_name = tmp_path / f".other.tmp.{dead_pid()}@{host}.abcd1234"
    unnamed = tmp_path / ".prep.tmp-abcd1234"  # not named by temp_prefix: never touched
    for p in (dead, alive, elsewhere, other_name, unnamed):
        p.mkdir()
        (p / "x").write_text("x")
    prepare_corpus(_prepare_cfg(tmp_path, tiny_model_dir, _jsonl(tmp_path / "c.jsonl"), tmp_path / "prep"))
    assert not dead.exists()
    assert alive.exists() and elsewhere.exists() and other_name.exists() and unnamed.exists()


# --- temporary names, orphans, atomic writes, full disks (pure helpers) -------------------------------------------


def test_temp_names_tell_dead_writers_from_live_ones(tmp_path):
    mine = tmp_path / (fileio.temp_prefix("final") + "abc_1234")
    assert fileio.is_orphan(mine) is False  # this process is alive
    gone = tmp_path / f".final.tmp.{dead_pid()}@{fileio._HOST}.abc_1234"
    old = tmp_path / f".step-0000002.old.{dead_pid()}@{fileio._HOST}.zz9"
    assert fileio.is_orphan(gone) and fileio.is_orphan(old)
    for name in ("final", ".final", "final.tmp.1@x", f".final.tmp.x@{fileio._HOST}.a", ".lock"):
        assert not fileio.is_orphan(tmp_path / name)
    for p in (gone, old):
        p.mkdir()
    (tmp_path / f".metrics.jsonl.tmp.{dead_pid()}@{fileio._HOST}.q1").write_text("{")
    removed = fileio.remove_orphans(tmp_path, name="final")
    assert removed == [gone] and old.exists()
    assert len(fileio.remove_orphans(tmp_path)) == 2 and list(tmp_path.iterdir()) == []


def test_atomic_write_names_the_file_on_a_full_disk_and_leaves_nothing(tmp_path, monkeypatch):
    target = tmp_path / "eval.json"
    target.write_text("old")

    class FullFile:
        def __init__(self, fd, *a, **k):
            os.close(fd)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(fileio.os, "fdopen", FullFile)
    with pytest.raises(OSError) as err:
        fileio.atomic_write_text(target, "new")
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(target)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["eval.json"]


def test_a_library_write_failure_on_a_full_disk_is_reported_as_one(tmp_path, monkeypatch, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def failing_save(*a, **k):
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", failing_save)
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: usage._replace(free=1024))
    with pytest.raises(OSError) as err:
        save_checkpoint(tmp_path, 2, model, None, opt, sched, {}, keep_last=2)
    assert err.value.errno == errno.ENOSPC and err.value.filename.endswith("step-0000002")
    assert list((tmp_path / "checkpoints").iterdir()) == []
    monkeypatch.setattr(fileio.shutil, "disk_usage", lambda p: usage._replace(free=1 << 40))
    with pytest.raises(RuntimeError, match="file write failed"):  # room on the disk: the library's own error
        save_checkpoint(tmp_path, 2, model, None, opt, sched, {}, keep_last=2)


# --- the final model: atomic, verified on resume ------------------------------------------------------------------


def test_kill_during_the_final_write_is_repaired_by_the_rerun(corpus, tmp_path):
    """kill -9 while final/ is being written: the rerun does not call the run finished with a partial model; it
    writes final/ again from the last checkpoint and removes the dead writer's temporary folder."""
    cfg = run_cfg(corpus, tmp_path / "run")
    from rmt.config import config_to_yaml

    (tmp_path / "cfg.yaml").write_text(config_to_yaml(cfg))
    script = textwrap.dedent(f"""
        import os, signal
        from pathlib import Path
        from transformers import PreTrainedTokenizerBase
        from rmt.config import load_config
        import rmt.trainer as trainer
        real = PreTrainedTokenizerBase.save_pretrained
        def dying(self, path, *a, **k):
            if "final" in Path(path).name:  # the weights of final/ are written, its tokenizer is not
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, path, *a, **k)
        PreTrainedTokenizerBase.save_pretrained = dying
        trainer.train(load_config({str(tmp_path / 'cfg.yaml')!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = Path(cfg.output.dir)
    assert model_folder_problem(run / "final") is not None
    trainer.train(cfg)
    assert model_folder_problem(run / "final") is None
    assert (run / "final" / "tokenizer.json").is_file()
    final, ckpt = load_file(str(run / "final" / "model.safetensors")), load_file(str(list_checkpoints(run)[-1] / "model" / "model.safetensors"))
    assert final.keys() == ckpt.keys() and all(torch.equal(final[k], ckpt[k]) for k in final)
    assert not [p for p in run.iterdir() if p.name.startswith(".final.")], "the dead writer's temporary folder is removed"


@pytest.mark.parametrize("damage", ["truncated weights", "no manifest"])
def test_a_damaged_final_model_is_rewritten_from_the_last_checkpoint(corpus, tmp_path, caplog, damage):
    cfg = run_cfg(corpus, tmp_path / "run")
    run = trainer.train(cfg)
    weights = run / "final" / "model.safetensors"
    good = weights.read_bytes()
    if damage == "truncated weights":
        weights.write_bytes(good[: len(good) // 2])
    else:
        (run / "final" / MANIFEST_FILE).unlink()  # e.g. a final/ written in place by an older version
    assert model_folder_problem(run / "final") is not None
    with caplog.at_level("WARNING"):
        trainer.train(cfg)
    assert "writing it again" in caplog.text
    assert model_folder_problem(run / "final") is None and weights.read_bytes() == good


# --- one writer per run folder ------------------------------------------------------------------------------------


def test_a_second_trainer_on_a_run_folder_is_refused_with_the_first_ones_pid(corpus, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import time; from rmt.run_dir import RunLock; lock = RunLock({str(run)!r}).acquire(); "
                               "print('ready', flush=True); time.sleep(120)"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
        with pytest.raises(CheckpointError, match=f"in use by another run \\(pid {holder.pid} on "):
            trainer.train(run_cfg(corpus, run))
        assert not (run / "metrics.jsonl").exists() and not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    trainer.train(run_cfg(corpus, run))  # the kernel released the dead holder's lock
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]


def test_the_lock_is_released_when_a_run_fails(corpus, tmp_path, monkeypatch):
    run = tmp_path / "run"

    def boom(*a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(trainer, "train_step", boom)
    with pytest.raises(RuntimeError, match="boom"):
        trainer.train(run_cfg(corpus, run))
    with RunLock(run).acquire():  # free again
        pass


# --- train checks the corpus' tokenizer and the model's context before any work ------------------------------------


def test_train_refuses_a_corpus_tokenized_otherwise_before_loading_the_model(corpus, tmp_path, monkeypatch):
    from conftest import build_tiny_tokenizer

    import rmt.modeling

    other = build_tiny_tokenizer(tmp_path / "tok", texts=["zebra quartz jumps"] * 4, vocab_size=270)
    monkeypatch.setattr(rmt.modeling, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ModelError, match="another tokenizer"):
        trainer.train(run_cfg(corpus, tmp_path / "run"), tokenizer=other)


def test_train_refuses_sequences_longer_than_the_models_context(corpus, tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    short = tmp_path / "short"
    build_tiny_model(short, tok, max_pos=16)
    cfg = run_cfg([f"model.path={short}", *corpus[1:]], tmp_path / "run")
    with pytest.raises(ModelError, match="data.seq_len=32 is longer than the model's context of 16"):
        trainer.train(cfg)


# --- an interrupted run exits non-zero after its checkpoint -------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_raises_after_its_checkpoint_and_resumes(corpus, tmp_path, monkeypatch, sig):
    real = trainer.train_step

    def signalled(cfg, step, *a, **k):
        if step == 1:
            signal.raise_signal(sig)  # arrives during the second step: checkpoint after it, then stop
        return real(cfg, step, *a, **k)

    monkeypatch.setattr(trainer, "train_step", signalled)
    cfg = run_cfg(corpus, tmp_path / "run", "train.save_every=100")
    with pytest.raises(Interrupted) as err:
        trainer.train(cfg)
    assert err.value.exit_code == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
    run = Path(cfg.output.dir)
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002"] and not (run / "final").exists()
    monkeypatch.setattr(trainer, "train_step", real)
    trainer.train(cfg)
    assert model_folder_problem(run / "final") is None


def test_cli_exit_codes(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from rmt.cli import app

    def interrupted(cfg):
        raise Interrupted("interrupted at step 2 of 4; checkpoint saved", signal.SIGTERM)

    monkeypatch.setattr(trainer, "train", interrupted)
    result = CliRunner().invoke(app, ["train", "-c", "ntp"])
    assert result.exit_code == 143 and "checkpoint saved" in result.output
    # Rich markup in a message is printed as it is, not read as markup (a path may hold brackets).
    result = CliRunner().invoke(app, ["report", str(tmp_path / "[red]x[/red]")])
    assert result.exit_code == 1 and "[red]x[/red]" in result.output


def test_posttrain_interrupted_exits_143_and_its_final_model_is_verified(tiny_model_dir, tmp_path, monkeypatch):
    import rmt.posttrain as pt

    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(8)))
    cfg = load_config(None, [f"model.path={tiny_model_dir}", f"posttrain.data={qa}", "posttrain.eval_size=0",
                             "posttrain.verifier=exact", "posttrain.max_response_tokens=4", "posttrain.questions_per_step=2",
                             "rollout.group_size=2", "posttrain.steps=3", f"posttrain.output_dir={tmp_path / 'pt'}"])
    real = pt.collect_groups
    calls = {"n": 0}

    def signalled(*a, **k):
        calls["n"] += 1
        if calls["n"] == 1:
            signal.raise_signal(signal.SIGTERM)
        return real(*a, **k)

    monkeypatch.setattr(pt, "collect_groups", signalled)
    with pytest.raises(Interrupted) as err:
        pt.posttrain(cfg)
    assert err.value.exit_code == 143
    run = tmp_path / "pt"
    assert [p.name for p in list_checkpoints(run)] == ["step-0000001"]
    pt.posttrain(cfg)
    assert model_folder_problem(run / "final") is None
    (run / "final" / "model.safetensors").write_bytes(b"")
    pt.posttrain(cfg)  # finished, but its final model is damaged: made again
    assert model_folder_problem(run / "final") is None


# --- evaluation: arguments checked before the work, results written first -----------------------------------------


def _eval_cfg(corpus, tmp_path, *extra):
    return load_config(None, [*corpus, f"output.dir={tmp_path / 'run'}", "eval.modes=[ntp]", "eval.positions_per_tier=4",
                              *extra])


def test_eval_checks_its_arguments_before_any_model_is_loaded(corpus, tmp_path, monkeypatch, tiny_model_dir):
    import rmt.evaluate as ev
    from rmt.config import ConfigError

    monkeypatch.setattr(ev, "_load", lambda *a, **k: pytest.fail("a model was loaded"))
    models = {"base": str(tiny_model_dir), "rmt": str(tiny_model_dir)}
    with pytest.raises(ConfigError, match="eval.baseline='nobody'"):
        ev.evaluate(_eval_cfg(corpus, tmp_path, "eval.baseline=nobody"), models, tmp_path / "e.json")
    with pytest.raises(ConfigError, match="labelled 'ntr'"):
        ev.evaluate(_eval_cfg(corpus, tmp_path, "eval.modes=[reasoning]"), {"base": str(tiny_model_dir), "ntr": str(tiny_model_dir)},
                    tmp_path / "e.json")
    (tmp_path / "afile").write_text("")
    with pytest.raises(RMTError, match="cannot write evaluation output"):
        ev.evaluate(_eval_cfg(corpus, tmp_path), models, tmp_path / "afile" / "e.json")
    with pytest.raises(ModelError, match="no such folder"):
        ev.evaluate(_eval_cfg(corpus, tmp_path), {**models, "gone": str(tmp_path / "gone")}, tmp_path / "e.json")


def test_an_evaluation_never_writes_over_a_file_it_did_not_write(corpus, tmp_path, monkeypatch, tiny_model_dir):
    """`rmt eval --out` named at the corpus (or beside a markdown file of the user's) used to replace it with the
    results; now a file there must be an evaluation (and a table) the tool wrote, checked before any model loads."""
    import rmt.evaluate as ev

    data = Path(next(o for o in corpus if o.startswith("data.path=")).split("=", 1)[1])
    before = data.read_bytes()
    real_load = ev._load
    monkeypatch.setattr(ev, "_load", lambda *a, **k: pytest.fail("a model was loaded"))
    models = {"base": str(tiny_model_dir)}
    with pytest.raises(RMTError, match=rf"evaluation output {data} exists and is not a file rmt wrote"):
        ev.evaluate(_eval_cfg(corpus, tmp_path), models, data)
    assert data.read_bytes() == before
    notes = tmp_path / "e.md"
    notes.write_text("my notes\n")
    with pytest.raises(RMTError, match="evaluation table .*e.md exists and is not a file rmt wrote"):
        ev.evaluate(_eval_cfg(corpus, tmp_path), models, tmp_path / "e.json")
    assert notes.read_text() == "my notes\n"
    from rmt.config import ConfigError

    with pytest.raises(ConfigError, match="ends in .md: name the results' JSON file"):
        ev.evaluate(_eval_cfg(corpus, tmp_path), models, tmp_path / "f.md")
    # its own results are replaced by a rerun
    notes.unlink()
    monkeypatch.setattr(ev, "_load", real_load)
    ev.evaluate(_eval_cfg(corpus, tmp_path), models, tmp_path / "e.json")
    ev.evaluate(_eval_cfg(corpus, tmp_path), models, tmp_path / "e.json")
    assert notes.read_text().startswith(ev.TABLE_TITLE)


def test_posttrain_eval_only_never_writes_over_its_question_file(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from rmt.cli import app

    qa = tmp_path / "qa.jsonl"
    qa.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(6)))
    before = qa.read_bytes()
    args = ["posttrain", "--eval-only", f"model.path={tiny_model_dir}", f"posttrain.data={qa}", "posttrain.eval_size=3",
            "posttrain.verifier=exact", "posttrain.max_response_tokens=4", "--out"]
    result = CliRunner().invoke(app, [*args, str(qa)])
    assert result.exit_code == 1 and "exists and is not a file rmt wrote" in result.output
    assert qa.read_bytes() == before
    out = tmp_path / "r.json"
    for _ in range(2):  # written, then replaced by the rerun
        assert CliRunner().invoke(app, [*args, str(out)]).exit_code == 0
    assert json.loads(out.read_text())["n"] == 3


def test_only_a_small_json_object_with_the_keys_counts_as_the_tools_own(tmp_path):
    path = tmp_path / "x.json"
    for text, ours in (('{"results": 1, "eval_set": 2}', True), ('{"results": 1}', False), ("[1, 2]", False),
                       ('{"results": 1, "eval_set": 2}\n{"results": 1, "eval_set": 2}\n', False), ("\xff", False)):
        path.write_bytes(text.encode("latin-1"))
        check = lambda: fileio.check_replaceable(path, "output", lambda t: fileio.json_object_with(t, "results", "eval_set"))  # noqa: E731
        if ours:
            check()
        else:
            with pytest.raises(RMTError, match="not a file rmt wrote"):
                check()
    fileio.check_replaceable(tmp_path / "missing.json", "output", lambda t: False)  # nothing there: nothing to lose


@pytest.mark.parametrize("damage", ["truncated weights", "no weights", "a file"])
def test_a_damaged_model_is_found_before_any_model_is_evaluated(corpus, tmp_path, monkeypatch, tiny_model_dir, damage):
    """`rmt eval` evaluated the good model first, then failed to load the damaged one and wrote nothing: the good
    model's results were lost. Each local folder's weights are read (headers only) before any work."""
    import rmt.evaluate as ev

    bad = tmp_path / "bad"
    shutil.copytree(tiny_model_dir, bad)
    weights = bad / "model.safetensors"
    if damage == "truncated weights":
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "no weights":
        weights.unlink()
    else:
        shutil.rmtree(bad)
        bad.write_text("not a model")
    monkeypatch.setattr(ev, "_load", lambda *a, **k: pytest.fail("a model was loaded"))
    expected = {"truncated weights": "model.safetensors is unreadable", "no weights": "holds no weights",
                "a file": "is a file, not a model folder"}[damage]
    with pytest.raises(ModelError, match=expected):
        ev.evaluate(_eval_cfg(corpus, tmp_path), {"good": str(tiny_model_dir), "bad": str(bad)}, tmp_path / "e.json")


def test_a_damaged_scores_summary_is_named(corpus, tmp_path):
    import rmt.evaluate as ev

    prepared = tmp_path / "prepared"
    shutil.copytree(Path(next(o for o in corpus if o.startswith("data.prepared_dir=")).split("=", 1)[1]), prepared)
    (prepared / "scores" / "summary.json").write_text('{"thresholds": [0.5,')
    cfg = load_config(None, [*corpus, f"data.prepared_dir={prepared}"])
    with pytest.raises(DataError, match=r"summary.json is damaged .*run `rmt score` again"):
        ev.eval_set_identity(cfg, [])


def test_eval_writes_its_results_before_anything_else_can_fail(corpus, tmp_path, monkeypatch, tiny_model_dir):
    import rmt.evaluate as ev

    def broken_table(*a, **k):
        raise RuntimeError("table failed")

    monkeypatch.setattr(ev, "format_table", broken_table)
    out = tmp_path / "e.json"
    with pytest.raises(RuntimeError, match="table failed"):
        ev.evaluate(_eval_cfg(corpus, tmp_path), {"base": str(tiny_model_dir)}, out)
    saved = json.loads(out.read_text())
    assert list(saved["results"]) == ["base"] and saved["results"]["base"]["tiers"]["hard"]["n"] > 0


def test_a_damaged_eval_set_is_drawn_again(corpus, tmp_path, tiny_model_dir):
    import rmt.evaluate as ev

    cfg = _eval_cfg(corpus, tmp_path)
    first = ev.load_eval_set(cfg)
    path = Path(cfg.data.prepared_dir) / "eval_set.json"
    path.write_text(path.read_text()[:100])
    assert ev.load_eval_set(cfg) == first and json.loads(path.read_text()) == first


# --- damaged logs do not block a resume ---------------------------------------------------------------------------


def test_a_torn_last_metrics_line_does_not_block_resume(corpus, tmp_path, monkeypatch):
    real = trainer.train_step

    def crash(cfg, step, *a, **k):
        if step == 2:
            raise RuntimeError("crash")
        return real(cfg, step, *a, **k)

    monkeypatch.setattr(trainer, "train_step", crash)
    cfg = run_cfg(corpus, tmp_path / "run")
    with pytest.raises(RuntimeError):
        trainer.train(cfg)
    metrics = Path(cfg.output.dir) / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # the process was killed in the middle of this line
    monkeypatch.setattr(trainer, "train_step", real)
    trainer.train(cfg)
    assert [r["step"] for r in read_metrics(cfg.output.dir)] == [1, 2, 3, 4]


def test_a_damaged_line_inside_the_metrics_is_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 3}\n')
    with pytest.raises(RMTError, match=r"metrics.jsonl:2: damaged line"):
        read_metrics(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2, "lo')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    # a kill can also cut a character of a sample's text in two (samples.jsonl keeps non-ASCII text as it is)
    torn = '{"step": 1}\n{"step": 2, "response": "caf\u00e9'.encode()[:-1]
    (tmp_path / "metrics.jsonl").write_bytes(torn)
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    (tmp_path / "metrics.jsonl").write_bytes(torn + b'"}\n{"step": 3}\n')
    with pytest.raises(RMTError, match=r"metrics.jsonl:2: not a metrics file \(not UTF-8"):
        read_metrics(tmp_path)


# --- the config: no booleans for numbers, no infinities -----------------------------------------------------------


def _numeric_fields(model=RMTConfig, prefix=""):
    import typing

    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from _numeric_fields(ann, f"{prefix}{name}.")
            continue
        kinds = {a for a in (ann, *typing.get_args(ann)) if a in (int, float)}
        if kinds and bool not in typing.get_args(ann) and ann is not bool:
            yield f"{prefix}{name}", kinds


NUMERIC_FIELDS = sorted(_numeric_fields())


@pytest.mark.parametrize(("name", "kinds"), NUMERIC_FIELDS, ids=[n for n, _ in NUMERIC_FIELDS])
def test_every_number_field_refuses_booleans_and_non_finite_values(name, kinds):
    from rmt.config import ConfigError

    bad = ["true", "false"] + (["inf", "-inf", ".nan"] if float in kinds else [])
    for value in bad:
        with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
            load_config(None, [f"{name}={value}"])


def test_number_fields_are_found_and_lists_of_numbers_are_checked_too():
    from rmt.config import ConfigError

    names = {n for n, _ in NUMERIC_FIELDS}
    assert {"train.lr", "train.total_steps", "budget.b0", "budget.gamma", "eval.budget"} <= names
    for override in ("train.adam_betas=[true,0.9]", "curriculum.p_early=[.inf,0,0]", "scoring.thresholds=[0.1,0.5,.nan]"):
        with pytest.raises(ConfigError):
            load_config(None, [override])
    assert load_config(None, ["train.rl=false", "ntp.weight=1"]).train.rl is False  # booleans stay booleans


# --- paths, probes, presets ---------------------------------------------------------------------------------------


def test_local_looking_model_paths_fail_at_once(tmp_path, monkeypatch):
    from rmt.modeling import check_local_path, looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for local in ("./m", "../m", "/abs/m", "~/m", "runs/m", "a/b/c", "has space/m", "m!"):
        assert looks_local(local), local
    for hub in ("gpt2", "Qwen/Qwen2.5-0.5B", "org-x/name_1.5"):
        assert not looks_local(hub), hub
    with pytest.raises(ModelError, match="no such folder: runs/m"):
        check_local_path("runs/m", "model")
    check_local_path("runs", "model")  # exists
    check_local_path("Qwen/Qwen2.5-0.5B", "model")  # left to the hub


def test_probe_loads_safetensors_only(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rmt.embedded.probe import main as probe_main

    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model.config.save_pretrained(str(pickled))
    AutoTokenizer.from_pretrained(str(tiny_model_dir)).save_pretrained(str(pickled))
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    docs = tmp_path / "d.jsonl"
    docs.write_text(json.dumps({"text": "1+2=3\n", "computed_spans": [[4, 5]]}) + "\n")
    with pytest.raises(SystemExit, match="^error: .*pickled"):
        probe_main([str(pickled), str(docs), "2"])
    with pytest.raises(SystemExit, match="no such folder"):
        probe_main([str(tmp_path / "none"), str(docs), "2"])
    text = tmp_path / "notes.txt"  # a corpus that is not JSON Lines: a message naming it, not a JSON traceback
    text.write_text("1+2=3\n")
    with pytest.raises(SystemExit, match="notes.txt is not a JSON Lines file"):
        probe_main([str(tiny_model_dir), str(text), "2", "--forms"])


def test_presets_name_only_options_that_exist():
    import re

    from typer.testing import CliRunner

    from rmt.cli import app
    from rmt.config import PRESET_DIR

    help_text = CliRunner().invoke(app, ["config", "--help"]).output
    for preset in PRESET_DIR.rglob("*.yaml"):
        for option in re.findall(r"rmt config (--[a-z-]+)", preset.read_text()):
            assert option in help_text, (preset.name, option)


def test_a_tokenizer_folder_without_tokenizer_files_is_named_in_one_line(tmp_path, tiny_model_dir):
    from rmt.modeling import load_tokenizer

    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"cannot load a tokenizer from '.*empty': the folder holds none of tokenizer.json"):
        load_tokenizer(str(tmp_path / "empty"))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot load a tokenizer from") as caught:
        load_tokenizer(str(broken))
    assert "\n" not in str(caught.value)
    assert load_tokenizer(str(tiny_model_dir)).pad_token_id is not None
