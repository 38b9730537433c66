"""The information-gain reward (preset rlp, rmt.rlp): formulas, the two log-probability passes against plain
forwards, the EMA model's update and its exact resume, and `rmt train -c rlp` end to end."""

import math
from pathlib import Path

import pytest
import torch
from conftest import crash_on_third_step, text_corpus
from safetensors.torch import load_file

import rmt.trainer as trainer
from rmt import rlp
from rmt.checkpoint import list_checkpoints
from rmt.collect import RLData
from rmt.config import ConfigError, load_config
from rmt.data.prepare import prepare_corpus
from rmt.modeling import load_tokenizer
from rmt.rollout import Group, Response
from rmt.run_dir import read_metrics
from rmt.sampling import RLSelection
from rmt.scoring import score_corpus


# --- formulas ---------------------------------------------------------------------------------------------------


def test_information_gain_is_the_log_ratio_by_hand():
    # p(x_t | thought) = 1/2, 1/8; p_ema(x_t) = 1/4: gains log 2 and -log 2.
    think = torch.tensor([[math.log(0.5), math.log(0.125)]])
    base = torch.tensor([[math.log(0.25)]])
    torch.testing.assert_close(rlp.information_gain(think, base), torch.tensor([[math.log(2), -math.log(2)]]))


def test_ema_step_by_hand():
    assert rlp.ema_lerp(torch.tensor(1.0), torch.tensor(3.0), 0.9).item() == pytest.approx(0.9 * 1 + 0.1 * 3)  # 1.2
    assert rlp.ema_lerp(torch.tensor(1.0), torch.tensor(3.0), 0.0).item() == 3.0
    # Two steps towards a fixed value v: ema_2 = v + tau^2 (ema_0 - v) = 3 + 0.25 * (1 - 3) = 2.5.
    e = rlp.ema_lerp(rlp.ema_lerp(torch.tensor(1.0), torch.tensor(3.0), 0.5), torch.tensor(3.0), 0.5)
    assert e.item() == 2.5
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        rlp.ema_lerp(torch.tensor(1.0), torch.tensor(3.0), 1.0)


def test_split_thought():
    close, eos = 9, 2
    assert rlp.split_thought([5, 6, 9, 7], close, [eos]) == (3, [])  # up to and including </think>
    assert rlp.split_thought([5, 6, 7], close, [eos]) == (3, [close])  # cut by the cap: closed by a marker
    assert rlp.split_thought([5, 2, 7], close, [eos]) == (1, [close])  # EOS before closing: dropped, then closed
    assert rlp.split_thought([], close, [eos]) == (0, [close])


def test_ema_model_follows_the_model_by_the_formula(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    ema = rlp.EMAModel(model)
    start = {k: v.clone() for k, v in ema.tensors().items()}
    assert set(start) == {n for n, _ in model.named_parameters()}  # tied weights once
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    ema.update(model, 0.75)
    now = dict(model.named_parameters())
    for name, value in ema.tensors().items():
        torch.testing.assert_close(value, 0.75 * start[name] + 0.25 * now[name].detach(), rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in ema.model.parameters())
    with pytest.raises(ValueError, match="do not fit"):
        ema.load_tensors({"nope": torch.zeros(1)})


# --- the two passes against plain forwards ------------------------------------------------------------------------


def plain_logprob(model, context: list[int], target: int) -> float:
    """log p(target | context) from one ordinary forward (the hand computation)."""
    with torch.no_grad():
        logits = model(torch.tensor([context])).logits[0, -1].float()
    return torch.log_softmax(logits, -1)[target].item()


def test_rewards_equal_two_plain_forwards(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)).eval()
    ema = rlp.EMAModel(model)
    with torch.no_grad():  # the EMA lags the model: the two passes must use different weights
        for p in model.parameters():
            p.mul_(1.1)
    close = tok.encode("</think>", add_special_tokens=False)[0]
    think = tok.encode("<think>", add_special_tokens=False)[0]
    eos = tok.eos_token_id
    seqs = [tok.encode("The cat sat on the mat. 12+7=19"), tok.encode("A quick brown fox jumps over")]
    positions = [(0, 5), (0, 9), (1, 4)]
    responses = [[[7, 8, close, 30], [11, close]], [[12, 13, 14], [15, eos, 16]], [[close], [20, 21, close, 5]]]
    groups = [Group(seqs[b][:pos] + [think], [Response(r, [-1.0] * len(r), "stop") for r in rs])
              for (b, pos), rs in zip(positions, responses)]
    got = rlp.information_gain_rewards(model, ema, seqs, positions, groups, close_id=close, eos_ids=[eos], pad_id=tok.pad_token_id)

    # What the predictor reads after the prompt: the thought up to </think>; an unclosed thought is closed for it.
    read = [[[7, 8, close], [11, close]], [[12, 13, 14, close], [15, close]], [[close], [20, 21, close]]]
    for i, ((b, pos), group) in enumerate(zip(positions, groups)):
        x_t = seqs[b][pos]
        base = plain_logprob(ema.model, seqs[b][:pos], x_t)
        assert got.logp_base[i].item() == pytest.approx(base, abs=1e-5)
        for j, thought in enumerate(read[i]):
            with_thought = plain_logprob(model, group.prompt_ids + thought, x_t)
            assert got.logp_think[i, j].item() == pytest.approx(with_thought, abs=1e-5)
            assert got.rewards[i, j].item() == pytest.approx(with_thought - base, abs=1e-5)
    # The loss trains the sampled thought only (the answer after </think> and a dropped EOS are cut off).
    assert [[r.token_ids for r in g.responses] for g in got.groups] == [[[7, 8, close], [11, close]], [[12, 13, 14], [15]], [[close], [20, 21, close]]]
    assert got.teacher_forced == [[0, 0], [0, 0], [0, 0]]

    # With the written part of the current value (restated after </think>, as the answer rule reads it) before x_t.
    written = [[], seqs[0][7:9], [seqs[1][3]]]
    restated = rlp.information_gain_rewards(model, ema, seqs, positions, groups, written, close_id=close, eos_ids=[eos],
                                            pad_id=tok.pad_token_id)
    for i, ((b, pos), group) in enumerate(zip(positions, groups)):
        for j, thought in enumerate(read[i]):
            with_thought = plain_logprob(model, group.prompt_ids + thought + written[i], seqs[b][pos])
            assert restated.logp_think[i, j].item() == pytest.approx(with_thought, abs=1e-5)
    assert torch.equal(restated.logp_base, got.logp_base)

    answered = rlp.information_gain_rewards(model, ema, seqs, positions, groups, close_id=close, eos_ids=[eos],
                                            pad_id=tok.pad_token_id, train_answer=True)
    x_t = seqs[0][9]  # group 1 is position (0, 9)
    assert answered.groups[1].responses[0].token_ids == [12, 13, 14, close, x_t]  # forced </think>, then x_t
    assert answered.teacher_forced == [[1, 1], [2, 2], [1, 1]]
    with_written = rlp.information_gain_rewards(model, ema, seqs, positions, groups, written, close_id=close, eos_ids=[eos],
                                                pad_id=tok.pad_token_id, train_answer=True)
    assert with_written.groups[1].responses[1].token_ids == [15, close, *seqs[0][7:9], x_t]
    assert with_written.teacher_forced == [[1, 1], [4, 4], [2, 2]]
    lp = answered.groups[1].responses[0].logprobs
    assert lp[-1] == pytest.approx(got.logp_think[1, 0].item(), abs=1e-6) and lp[:3] == [-1.0] * 3


def test_teacher_forced_tokens_get_advantage_one():
    groups = [Group([1, 2], [Response([3, 4, 9, 5], [0.0] * 4, "stop"), Response([6, 9, 5], [0.0] * 3, "stop")])]
    data = RLData(RLSelection([(0, 2)], [1], None), groups, torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, -1.0]]),
                  teacher_forced=[[1, 2]])
    assert [a for *_, a, _ in data.flat()] == [[1.0, 1.0, 1.0, 1.0], [-1.0, 1.0, 1.0]]
    advantages = trainer.advantage_tensor([(r, a) for _, _, r, a, _ in data.flat()], "cpu")
    assert advantages.tolist() == [[1.0, 1.0, 1.0, 1.0], [0.0, -1.0, 1.0, 1.0]]  # right-aligned like the log-probs


def test_config_rules():
    assert load_config("rlp").reward.kind == "information_gain"
    with pytest.raises(ConfigError, match="prompt.style=raw"):
        load_config("rlp", ["prompt.style=chat"])
    with pytest.raises(ConfigError, match="rollout.temperature=1"):
        load_config("rlp", ["reward.train_answer=true", "rollout.temperature=0.8"])
    load_config("rlp", ["reward.train_answer=true", "rollout.temperature=1"])
    with pytest.raises(ConfigError, match="ema_tau"):
        load_config("rlp", ["reward.ema_tau=1.0"])


# --- training --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    base = [*text_corpus(tmp_path_factory.mktemp("corpus"), tiny_model_dir), "scoring.tier_rule=quantile"]
    cfg = load_config(None, base)
    prepare_corpus(cfg)
    score_corpus(cfg)
    return base


def run_args(corpus, out, *extra):
    return [*corpus, f"output.dir={out}", "train.total_steps=4", "train.sequences_per_step=4", "rollout.group_size=3",
            "rollout.positions_per_batch=4", "rollout.max_response_tokens=12", "train.lr=1e-3", "train.save_every=1",
            "train.keep_last=4", "reward.ema_tau=0.5", *extra]


def test_ema_moves_once_per_step_and_is_checkpointed(corpus, tmp_path, tiny_model_dir):
    run = trainer.train(load_config("rlp", run_args(corpus, tmp_path / "run")))
    ckpts = list_checkpoints(run)
    assert [p.name for p in ckpts] == [f"step-{i:07d}" for i in (1, 2, 3, 4)]
    init = load_file(str(Path(tiny_model_dir) / "model.safetensors"))
    previous = {k: v for k, v in init.items() if k in load_file(str(ckpts[0] / "ema.safetensors"))}
    for ckpt in ckpts:  # ema_t = 0.5 * ema_{t-1} + 0.5 * theta_t, from ema_0 = the initial model
        ema, model = load_file(str(ckpt / "ema.safetensors")), load_file(str(ckpt / "model" / "model.safetensors"))
        for k in ema:
            torch.testing.assert_close(ema[k], 0.5 * previous[k] + 0.5 * model[k], rtol=0, atol=1e-6)
        assert any(not torch.equal(ema[k], model[k]) for k in ema)
        previous = ema


def test_resume_with_the_ema_model_is_bit_identical(corpus, tmp_path, monkeypatch):
    straight = trainer.train(load_config("rlp", run_args(corpus, tmp_path / "a", "train.save_every=2")))
    cfg = load_config("rlp", run_args(corpus, tmp_path / "b", "train.save_every=2"))
    real_step = crash_on_third_step(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train(cfg)
    monkeypatch.setattr(trainer, "train_step", real_step)
    resumed = trainer.train(cfg)
    for name in ("model/model.safetensors", "ema.safetensors"):
        a = load_file(str(list_checkpoints(straight)[-1] / name))
        b = load_file(str(list_checkpoints(resumed)[-1] / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    ma, mb = read_metrics(straight), read_metrics(resumed)
    assert [r["reward"] for r in ma] == [r["reward"] for r in mb]  # the rewards of steps 3-4 read the restored EMA
    assert [r["logp_base_mean"] for r in ma] == [r["logp_base_mean"] for r in mb]


def test_a_checkpoint_without_its_ema_is_a_clear_error(corpus, tmp_path, monkeypatch):
    from rmt.errors import CheckpointError

    cfg = load_config("rlp", run_args(corpus, tmp_path / "run", "train.save_every=2"))
    real_step = crash_on_third_step(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train(cfg)
    monkeypatch.setattr(trainer, "train_step", real_step)
    (list_checkpoints(Path(cfg.output.dir))[-1] / "ema.safetensors").unlink()
    with pytest.raises(CheckpointError, match="ema.safetensors"):
        trainer.train(cfg)


def test_train_answer_trains_the_true_token(corpus, tmp_path):
    rows = {}
    for flag in ("false", "true"):
        cfg = load_config("rlp", run_args(corpus, tmp_path / flag, "train.total_steps=1", f"reward.train_answer={flag}",
                                          "rollout.temperature=1"))
        rows[flag] = read_metrics(trainer.train(cfg))[0]
    # The same rollouts; each response gains x_t (and a closing marker when it had none, the restated part of a value).
    n = rows["true"]["rl_positions"] * 3
    assert rows["false"]["rl_positions"] == rows["true"]["rl_positions"] > 0
    assert rows["true"]["rl_tokens"] - rows["false"]["rl_tokens"] >= n
    assert rows["true"]["reward"] == rows["false"]["reward"]  # the reward does not depend on what is trained


def test_rmt_train_c_rlp_from_the_command_line(corpus, tmp_path):
    from typer.testing import CliRunner

    from rmt.cli import app

    result = CliRunner().invoke(app, ["train", "-c", "rlp", *run_args(corpus, tmp_path / "cli", "train.total_steps=2")])
    assert result.exit_code == 0, result.output
    rows = read_metrics(tmp_path / "cli")
    assert [r["step"] for r in rows] == [1, 2]
    assert {"reward", "logp_think_mean", "logp_base_mean", "rollout_accuracy", "generated_tokens"} <= set(rows[0])
    assert "reward_length" not in rows[0] or rows[0]["reward_length"] == 0.0
    assert rows[0]["reward"] == pytest.approx(rows[0]["logp_think_mean"] - rows[0]["logp_base_mean"], abs=1e-4)
    assert (tmp_path / "cli" / "final" / "model.safetensors").is_file()
