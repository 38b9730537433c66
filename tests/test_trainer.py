import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import LR_WARMUP2_T6, LR_WARMUP2_T6_ARGS, crash_on_third_step, text_corpus
from safetensors.torch import load_file

import rmt.trainer as trainer
from rmt import collect, schedules
from rmt.checkpoint import list_checkpoints
from rmt.config import PRESET_DIR, load_config
from rmt.data.prepare import prepare_corpus
from rmt.errors import CheckpointError
from rmt.run_dir import read_metrics
from rmt.scoring import score_corpus
from rmt.tiers import NTP_ONLY


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    base = [*text_corpus(tmp_path_factory.mktemp("corpus"), tiny_model_dir), "scoring.tier_rule=quantile"]
    cfg = load_config(None, base)
    prepare_corpus(cfg)
    score_corpus(cfg)
    return base


def run_cfg(corpus, tmp_path, preset="rmt", *extra):
    return load_config(preset, [
        *corpus, f"output.dir={tmp_path / preset}", "train.total_steps=4", "train.sequences_per_step=4",
        "rollout.group_size=3", "rollout.positions_per_batch=4", "budget.b0=6", "budget.answer_allowance=2",
        "rollout.max_response_tokens=16", "train.lr=1e-3", "train.save_every=2", *extra,
    ])


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_runs_a_few_steps(corpus, tmp_path, preset):
    cfg = run_cfg(corpus, tmp_path, preset, "train.total_steps=2")
    run = trainer.train(cfg)
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows)
    assert (run / "final" / "model.safetensors").is_file()
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002"]
    if cfg.train.rl:
        assert {"reward", "rollout_accuracy", "think_len_mean", "malformed_frac", "p_hard"} <= set(rows[-1])
        assert ("budget" in rows[-1]) == cfg.budget.enabled, "a budget only where the method has one (not rpt)"
        uses_ntp = cfg.ntp.weight > 0
        assert all(("ntp_loss" in r) == uses_ntp for r in rows), "an NTP loss only where the method has the term (not rpt)"
    else:
        assert "reward" not in rows[-1] and "budget" not in rows[-1] and "p_hard" not in rows[-1] and rows[-1]["ntp_loss"] > 0


def test_flops_are_counted_per_step_and_add_up(corpus, tmp_path):
    rows = {p: read_metrics(trainer.train(run_cfg(corpus, tmp_path, p, "train.total_steps=2"))) for p in ("rmt", "ntp")}
    for preset, r in rows.items():
        assert all(x["flops"] > 0 for x in r), preset
        assert r[1]["flops_total"] == pytest.approx(r[0]["flops"] + r[1]["flops"])
    # the same sequences: RMT adds generation and the RL responses to NTP's forward and backward
    assert rows["rmt"][-1]["flops_total"] > rows["ntp"][-1]["flops_total"]


def test_auto_b0_is_measured_once_and_kept_on_resume(corpus, tmp_path, monkeypatch):
    real_measure = collect.measure_think_lengths
    calls = []
    monkeypatch.setattr(collect, "measure_think_lengths", lambda *a, **k: calls.append(1) or [0, 4, 6, 8, 0])
    real_step = crash_on_third_step(monkeypatch)
    cfg = run_cfg(corpus, tmp_path, "rmt", "budget.b0=auto", "budget.auto_quantile=0.5")
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train(cfg)
    run = Path(cfg.output.dir)
    assert json.loads((run / "budget_b0.json").read_text())["b0"] == 6 and calls == [1]  # median of 4, 6, 8
    monkeypatch.setattr(trainer, "train_step", real_step)
    monkeypatch.setattr(collect, "measure_think_lengths", lambda *a, **k: calls.append(1) or [50])
    trainer.train(cfg)  # resumes at step 2 with the B_0 it started with, without measuring again
    rows = read_metrics(run)
    assert calls == [1] and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["budget"] for r in rows] == [schedules.token_budget(t, 4, 6, 1, cfg.budget.gamma) for t in range(4)]
    # the measurement itself, on the tiny model: one sampled response per position, lengths of the well-formed ones
    from rmt.modeling import load_model, load_tokenizer
    from rmt.scoring import load_scored

    model, tok = load_model(cfg.model.path, cfg), load_tokenizer(cfg.model.path)
    lengths = real_measure(cfg, collect.make_engine(cfg, model, tok), tok, load_scored(cfg.data.prepared_dir, "train"))
    assert all(isinstance(n, int) and 0 <= n <= cfg.rollout.max_response_tokens for n in lengths)


@pytest.mark.parametrize(
    "b0, lengths, expected",
    [
        ("auto", [0, 4, 6, 8, 0], (6, 3)),  # the median 6; the floor half of it
        ("8", [0, 4, 6, 8, 0], (8, 3)),  # a fixed B_0 with a measured floor
        ("8", [50], (8, 8)),  # a measured floor above a fixed B_0 is lowered to B_0
    ],
)
def test_auto_b_min_is_measured_with_b0_and_kept_on_resume(corpus, tmp_path, monkeypatch, b0, lengths, expected):
    calls = []
    monkeypatch.setattr(collect, "measure_think_lengths", lambda *a, **k: calls.append(1) or lengths)
    real_step = crash_on_third_step(monkeypatch)
    cfg = run_cfg(corpus, tmp_path, "rmt", f"budget.b0={b0}", "budget.b_min=auto", "budget.auto_quantile=0.5", "budget.gamma=0.1")
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train(cfg)
    run = Path(cfg.output.dir)
    record = json.loads((run / "budget_b0.json").read_text())
    assert (record["b0"], record["b_min"]) == expected and calls == [1]
    monkeypatch.setattr(trainer, "train_step", real_step)
    trainer.train(cfg)  # resumes with the budget it measured, without measuring again
    rows = read_metrics(run)
    assert calls == [1] and [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [r["budget"] for r in rows] == [schedules.token_budget(t, 4, *expected, 0.1) for t in range(4)]
    assert rows[-1]["budget"] == expected[1]  # gamma 0.1: the last budget is the floor


def test_a_corrupt_budget_record_is_named(corpus, tmp_path, monkeypatch):
    monkeypatch.setattr(collect, "measure_think_lengths", lambda *a, **k: [4, 6, 8])
    crash_on_third_step(monkeypatch)
    cfg = run_cfg(corpus, tmp_path, "rmt", "budget.b0=auto", "budget.b_min=auto")
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train(cfg)
    record = Path(cfg.output.dir) / "budget_b0.json"
    record.write_text('{"b0": ')  # cut short
    with pytest.raises(CheckpointError, match="budget_b0.json is not a measured budget"):
        trainer.train(cfg)
    assert record.read_text() == '{"b0": '  # left for the user to look at


@pytest.mark.parametrize("preset", ["ntp", "rpt"])
@pytest.mark.parametrize("auto", [["budget.b0=auto"], ["budget.b_min=auto"], ["budget.b0=auto", "budget.b_min=auto"]])
def test_auto_b0_is_not_measured_where_nothing_reads_it(corpus, tmp_path, monkeypatch, preset, auto):
    """One config layer (auto budget) over every method: NTP has no RL and RPT no budget, so nothing is measured."""
    monkeypatch.setattr(collect, "measure_think_lengths", lambda *a, **k: pytest.fail("measured"))
    cfg = run_cfg(corpus, tmp_path, preset, *auto, "train.total_steps=1")
    trainer.train(cfg)
    assert not (Path(cfg.output.dir) / "budget_b0.json").exists() and len(read_metrics(Path(cfg.output.dir))) == 1


def test_budget_and_curriculum_follow_the_schedule(corpus, tmp_path):
    cfg = run_cfg(corpus, tmp_path, "rmt", "train.total_steps=5", "budget.b0=8", "budget.gamma=0.25")
    rows = read_metrics(trainer.train(cfg))
    for r in rows:
        t = r["step"] - 1
        assert r["budget"] == schedules.token_budget(t, 5, 8, 1, 0.25)
        assert r["response_cap"] == min(2 * r["budget"] + 2, 16)
        p = schedules.curriculum_probs(t, 5, cfg.curriculum.p_early, cfg.curriculum.p_late, 0.3, 0.7)
        assert (r["p_easy"], r["p_medium"], r["p_hard"]) == pytest.approx(p)
    assert rows[0]["budget"] == 8 and rows[-1]["budget"] < 8


@pytest.mark.parametrize(("preset", "schedule", "mu"), [
    ("ntp", "constant", 1), ("ntp", "constant", 2), ("ntp", "linear", 1), ("ntp", "linear", 2),
    ("ntp", "cosine", 1), ("ntp", "cosine", 2), ("rmt", "cosine", 2),
])
def test_learning_rate_depends_on_the_step_only(corpus, tmp_path, preset, schedule, mu):
    """One scheduler step per training step, whatever grpo.num_iterations (mu optimizer steps per training step)."""
    cfg = run_cfg(corpus, tmp_path, preset, *LR_WARMUP2_T6_ARGS, f"train.lr_schedule={schedule}", f"grpo.num_iterations={mu}")
    lrs = [r["lr"] / cfg.train.lr for r in read_metrics(trainer.train(cfg))]
    assert lrs == pytest.approx(LR_WARMUP2_T6[schedule], abs=1e-6)


def test_learning_rate_resumes_exactly(corpus, tmp_path, monkeypatch):
    cfg = run_cfg(corpus, tmp_path, "ntp", *LR_WARMUP2_T6_ARGS, "train.lr_schedule=cosine", "grpo.num_iterations=2")
    real_step = trainer.train_step

    def crash_on_fourth_step(*args, **kwargs):
        if args[1] == 3:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", crash_on_fourth_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train(cfg)
    monkeypatch.setattr(trainer, "train_step", real_step)
    lrs = [r["lr"] / cfg.train.lr for r in read_metrics(trainer.train(cfg))]  # resumed from the step-2 checkpoint
    assert lrs == pytest.approx(LR_WARMUP2_T6["cosine"], abs=1e-6)


def test_ntp_mask_excludes_exactly_the_rl_set(corpus, tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rmt import collect
    from rmt.scoring import load_scored

    cfg = load_config("rmt", [*corpus, "rollout.group_size=2", "budget.b0=2", "curriculum.positions_per_sequence=3"])
    data = load_scored(cfg.data.prepared_dir, "train").select(range(5))
    batch = trainer.Batch(data["input_ids"], data["tier"], data["computed"])
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    engine = collect.make_engine(cfg, model, tok)
    selection = collect.select_positions(cfg, batch.tiers, (1 / 3, 1 / 3, 1 / 3), torch.Generator().manual_seed(0))
    rl = collect.collect(cfg, batch, 2, selection, engine, tok, sample_generator=torch.Generator().manual_seed(1))
    chosen = set(rl.selection.positions)
    assert chosen and all(batch.tiers[b][p] != NTP_ONLY for b, p in chosen)
    for b, ids in enumerate(batch.input_ids):
        for pos in range(rl.ntp_mask.shape[1]):
            expected = 1 <= pos < len(ids) and (b, pos) not in chosen
            assert bool(rl.ntp_mask[b, pos]) == expected
    assert rl.rewards.shape == (len(chosen), 2) and len(rl.groups) == len(chosen)


def test_two_process_selection_partitions_the_global_draw(corpus):
    from rmt import collect
    from rmt.scoring import load_scored

    cfg = load_config("rmt", [*corpus, "curriculum.positions_per_sequence=2"])
    tiers = load_scored(cfg.data.prepared_dir, "train").select(range(6))["tier"]
    full = collect.select_positions(cfg, tiers, (0.2, 0.3, 0.5), torch.Generator().manual_seed(3))
    parts = [collect.select_positions(cfg, tiers, (0.2, 0.3, 0.5), torch.Generator().manual_seed(3), r, 2) for r in (0, 1)]
    back = sorted((b * 2 + r, pos) for r, part in enumerate(parts) for b, pos in part.positions)
    assert back == full.positions
    for r, part in enumerate(parts):
        width = part.ntp_mask.shape[1]
        assert (part.ntp_mask == full.ntp_mask[r::2][:, :width]).all()


def weights(run):
    return load_file(str(run / "final" / "model.safetensors"))


def test_resume_is_exact(corpus, tmp_path, monkeypatch):
    straight = trainer.train(run_cfg(corpus, tmp_path / "a"))
    cfg = run_cfg(corpus, tmp_path / "b")
    real_step = trainer.train_step
    calls = {"n": 0}

    def crash_on_third_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(trainer, "train_step", crash_on_third_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train(cfg)
    monkeypatch.setattr(trainer, "train_step", real_step)
    assert [p.name for p in list_checkpoints(cfg.output.dir and Path(cfg.output.dir))] == ["step-0000002"]
    resumed = trainer.train(cfg)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    ma, mb = read_metrics(straight), read_metrics(resumed)
    assert [r["step"] for r in mb] == [1, 2, 3, 4]
    for ra, rb in zip(ma, mb):
        assert ra["reward"] == rb["reward"] and ra["tier_hard"] == rb["tier_hard"] and ra["loss"] == rb["loss"]
        assert ra["flops_total"] == rb["flops_total"]  # the compute count resumes with the run


def test_finished_run_is_not_rerun_and_other_config_is_refused(corpus, tmp_path, caplog):
    cfg = run_cfg(corpus, tmp_path, "ntp", "train.total_steps=2")
    run = trainer.train(cfg)
    mtime = (run / "final" / "model.safetensors").stat().st_mtime_ns
    with caplog.at_level("INFO"):
        trainer.train(cfg)
    assert "already finished" in caplog.text
    assert (run / "final" / "model.safetensors").stat().st_mtime_ns == mtime
    with pytest.raises(CheckpointError, match="another config"):
        trainer.train(run_cfg(corpus, tmp_path, "ntp", "train.total_steps=2", "train.lr=0.5"))
    # a folder written before a field existed: the field reads as its default, so the run is the same
    import yaml

    written = yaml.safe_load((run / "config.yaml").read_text())
    del written["pretrain"]["seed"]
    (run / "config.yaml").write_text(yaml.safe_dump(written))
    trainer.train(cfg)  # pretrain.seed is at its default in cfg: the same run, still finished
    del written["train"]["lr"]
    (run / "config.yaml").write_text(yaml.safe_dump(written))
    other_lr = run_cfg(corpus, tmp_path, "ntp", "train.total_steps=2", "train.lr=0.5")
    with pytest.raises(CheckpointError, match=r"another config \(differs in train.lr\)"):
        trainer.train(other_lr)  # a missing field reads as its default, which is not 0.5


def test_a_start_that_failed_before_its_first_step_does_not_block_the_corrected_one(corpus, tmp_path):
    """A wrong model.path failed after the run folder took its config: the rerun with the right path was refused as
    "another config" although the folder held nothing of the failed start."""
    from rmt.errors import ModelError

    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    model = next(o for o in corpus if o.startswith("model.path=")).split("=", 1)[1]
    (no_weights / "config.json").write_text((Path(model) / "config.json").read_text())
    with pytest.raises(ModelError):
        trainer.train(run_cfg(corpus, tmp_path, "ntp", "train.total_steps=2", f"model.path={no_weights}"))
    run = trainer.train(run_cfg(corpus, tmp_path, "ntp", "train.total_steps=2"))
    assert (run / "final" / "model.safetensors").is_file()
    with pytest.raises(CheckpointError, match=r"another config \(differs in model.path\)"):  # now it holds results
        trainer.train(run_cfg(corpus, tmp_path, "ntp", "train.total_steps=2", f"model.path={no_weights}"))


def test_corrupt_checkpoint_is_a_clear_error(corpus, tmp_path):
    cfg = run_cfg(corpus, tmp_path, "ntp", "train.total_steps=4", "train.save_every=1", "train.keep_last=3")
    run = trainer.train(cfg)
    newest = list_checkpoints(run)[-1]
    (newest / "optimizer.pt").write_bytes(b"garbage")
    cfg2 = run_cfg(corpus, tmp_path, "ntp", "train.total_steps=4", "train.save_every=1", "train.keep_last=3")
    with pytest.raises(CheckpointError, match="corrupt or partial: optimizer.pt does not load as plain tensors") as caught:
        trainer.train(cfg2)
    assert "weights_only=False" not in str(caught.value)  # torch's advice to load it unsafely is not passed on
    assert len(list_checkpoints(run)) == 3, "earlier checkpoints are left untouched"


def test_kill_during_checkpoint_write_leaves_previous_checkpoint(corpus, tmp_path):
    """kill -9 inside the second checkpoint's write: the first stays loadable and the run resumes from it."""
    cfg = run_cfg(corpus, tmp_path, "ntp", "train.total_steps=4")
    from rmt.config import config_to_yaml

    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(config_to_yaml(cfg))
    script = textwrap.dedent(f"""
        import os, signal
        import torch
        from rmt.config import load_config
        import rmt.trainer as trainer
        calls = {{"n": 0}}
        real = torch.save
        def dying_save(*a, **k):
            calls["n"] += 1
            if calls["n"] == 3:  # first save of the second checkpoint (each writes optimizer + scheduler)
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*a, **k)
        torch.save = dying_save
        trainer.train(load_config({str(cfg_file)!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = Path(cfg.output.dir)
    assert [p.name for p in list_checkpoints(run)] == ["step-0000002"]
    assert any(p.name.startswith(".step-0000004.tmp") for p in (run / "checkpoints").iterdir())
    trainer.train(cfg)
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3, 4]
    assert (run / "final" / "model.safetensors").is_file()


def _teach_format(model_dir, tok, steps=150, seed=0):
    """NTP-train a tiny model on `text<think>xy</think>d` with d in {7, 8}: it learns to think, close and answer."""
    from transformers import AutoModelForCausalLM

    rng = np.random.default_rng(seed)
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    letters = "abcdefgh"
    for _ in range(steps):
        docs = ["".join(rng.choice(list(letters), 3)) + "<think>" + "".join(rng.choice(list(letters), 2)) + "</think>"
                + str(rng.choice([7, 8])) for _ in range(16)]
        enc = tok(docs, return_tensors="pt", padding=True)
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        loss = model(**enc, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


@pytest.mark.slow
def test_rl_raises_the_matching_reward(tmp_path, tiny_model_dir):
    """The RL signal is real: on a corpus whose RL targets are all '7', the match reward climbs from ~0.5."""
    import datasets
    from transformers import AutoTokenizer

    from rmt.tiers import HARD

    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(0)
    model = _teach_format(tiny_model_dir, tok)
    seven = tok.convert_tokens_to_ids("7")
    rng = np.random.default_rng(1)
    rows = {"input_ids": [], "doc_id": [], "computed": [], "entropy": [], "tier": []}
    for i in range(64):
        ids = tok("".join(rng.choice(list("abcdefgh"), 3)) + "7", add_special_tokens=False)["input_ids"]
        rows["input_ids"].append(ids)
        rows["doc_id"].append(i)
        rows["computed"].append([0] * len(ids))
        rows["entropy"].append([float("nan")] + [2.0] * (len(ids) - 1))
        rows["tier"].append([HARD if t == seven else NTP_ONLY for t in ids])
    prep = tmp_path / "prep"
    datasets.Dataset.from_dict(rows).save_to_disk(str(prep / "scored" / "train"))
    cfg = load_config("rmt-no-ntp", [
        f"model.path={tiny_model_dir}", f"data.prepared_dir={prep}", f"output.dir={tmp_path / 'run'}",
        "train.total_steps=24", "train.sequences_per_step=8", "rollout.group_size=8", "rollout.positions_per_batch=8",
        "rollout.temperature=1.0", "budget.b0=4", "budget.answer_allowance=2", "reward.length_weight=0",
        "train.lr=3e-3", "train.save_every=100",
    ])
    rows = read_metrics(trainer.train(cfg, model=model, tokenizer=tok))
    first = np.mean([r["reward_match"] for r in rows[:6]])
    last = np.mean([r["reward_match"] for r in rows[-6:]])
    assert 0.2 < first < 0.8, first  # the format is learnt; the answer is a coin flip between 7 and 8
    assert last > first + 0.15, (first, last)


def test_resume_trims_metrics_and_samples_logged_after_the_checkpoint(tmp_path):
    from rmt.run_dir import MetricsLog

    log = MetricsLog(tmp_path)
    for step in (1, 2, 3):
        log.log(step, {"loss": float(step)})
        log.samples(step, [{"prompt_tail": "a", "response": "b", "reward": 0.5}, {"prompt_tail": "c", "response": "d"}])
    log.truncate_after(2)  # the checkpoint was at step 2; step 3 will be logged again
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [s["step"] for s in samples] == [1, 1, 2, 2]
    assert not list(tmp_path.glob("*.tmp"))


def test_every_rl_step_logs_the_rollout_vs_trainer_logprob_gap(corpus, tmp_path):
    """The HF engine samples from the live model: the trainer's log-probs of its tokens agree to rounding."""
    rows = read_metrics(trainer.train(run_cfg(corpus, tmp_path, "rmt", "train.total_steps=2")))
    assert all(0 <= r["logprob_gap_mean"] <= r["logprob_gap_max"] < 1e-4 for r in rows)
