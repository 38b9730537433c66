"""rollout.filter_groups (dynamic sampling): only groups with mixed rewards are kept, the cap on extra generation
holds, dropped positions return to NTP, and a run with it resumes exactly."""

import math
from pathlib import Path

import pytest
import torch
from conftest import crash_on_third_step, text_corpus
from safetensors.torch import load_file

import rmt.trainer as trainer
from rmt import collect
from rmt.checkpoint import list_checkpoints
from rmt.config import load_config
from rmt.data.prepare import prepare_corpus
from rmt.run_dir import read_metrics
from rmt.scoring import load_scored, score_corpus
from rmt.tiers import NTP_ONLY


def test_extra_draw_size_by_hand():
    assert collect.extra_draw_size(missing=2, kept=6, drawn=8, left=10) == 3  # 2 / 0.75 = 2.67 -> 3
    assert collect.extra_draw_size(missing=4, kept=2, drawn=8, left=10) == 10  # 4 / 0.25 = 16, capped by what is left
    assert collect.extra_draw_size(missing=4, kept=0, drawn=8, left=100) == 16  # nothing kept yet: the floor 1/4
    assert collect.extra_draw_size(missing=3, kept=0, drawn=0, left=100) == 3
    assert collect.extra_draw_size(missing=3, kept=1, drawn=2, left=0) == 0


def test_informative_groups_are_those_with_unequal_rewards():
    rows = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.5], [0.2, 0.2, 0.3]])
    assert collect.informative(rows) == [1, 3]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tiny_model_dir):
    base = [*text_corpus(tmp_path_factory.mktemp("corpus"), tiny_model_dir), "scoring.tier_rule=quantile"]
    cfg = load_config(None, base)
    prepare_corpus(cfg)
    score_corpus(cfg)
    return base


def mixed_at_even_positions(monkeypatch) -> list:
    """Rewards by position, whatever the responses: (0, 1, 0, ...) at even positions, all 0 at odd ones. Returns the
    list of every position rewarded (in order)."""
    real, seen = collect.score_groups, []

    def score(cfg, sequences, positions, tiers, out, budget, scorer=None):
        scored = real(cfg, sequences, positions, tiers, out, budget, scorer)
        for i, (b, pos) in enumerate(scored.positions):
            scored.rewards[i] = torch.arange(scored.rewards.shape[1]).remainder(2).float() if pos % 2 == 0 else 0.0
        seen.extend(positions)
        return scored

    monkeypatch.setattr(collect, "score_groups", score)
    return seen


def collect_once(corpus, tiny_model_dir, *overrides):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config("rmt", [*corpus, "rollout.group_size=2", "budget.b0=2", "rollout.filter_groups=true", *overrides])
    data = load_scored(cfg.data.prepared_dir, "train").select(range(8))
    batch = trainer.Batch(data["input_ids"], data["tier"], data["computed"])
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    engine = collect.make_engine(cfg, AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), tok)
    probs = (1 / 3, 1 / 3, 1 / 3)
    selection = collect.select_positions(cfg, batch.tiers, probs, torch.Generator().manual_seed(0))
    rl = collect.collect(cfg, batch, 2, selection, engine, tok, sample_generator=torch.Generator().manual_seed(1),
                         probs=probs, extra_generator=torch.Generator().manual_seed(2))
    return cfg, batch, selection, rl


@pytest.mark.parametrize("max_extra", [0.0, 0.5, 3.0])
def test_filter_keeps_only_mixed_groups_within_the_cap(corpus, tiny_model_dir, monkeypatch, max_extra):
    seen = mixed_at_even_positions(monkeypatch)
    cfg, batch, selection, rl = collect_once(corpus, tiny_model_dir, f"rollout.filter_max_extra={max_extra}")
    target, m = len(selection.positions), rl.metrics
    kept = rl.selection.positions
    assert kept and all(pos % 2 == 0 for _, pos in kept)  # only groups with mixed rewards
    assert all(bool((row != row[0]).any()) for row in rl.rewards)
    assert len(kept) <= target and m["filter_kept"] == len(kept) == len(rl.groups) == m["rl_positions"]
    # The cap: extra positions rolled out at most max_extra x |C|; every one drawn once, from a candidate tier.
    assert m["filter_drawn"] == len(seen) == len(set(seen))
    assert m["filter_drawn"] - target <= math.ceil(max_extra * target)
    assert all(batch.tiers[b][pos] != NTP_ONLY for b, pos in seen)
    assert m["filter_dropped"] == sum(pos % 2 for _, pos in seen)  # zero-variance groups
    assert m["filter_drawn"] - m["filter_dropped"] >= m["filter_kept"]  # informative ones beyond |C| are left out
    assert len(rl.generated) == len(seen) * cfg.rollout.group_size  # generation of dropped groups is counted
    assert m["drawn_easy"] + m["drawn_medium"] + m["drawn_hard"] == m["filter_drawn"]
    assert m["tier_easy"] + m["tier_medium"] + m["tier_hard"] == len(kept)  # the kept mix, logged beside p_t
    if max_extra == 0.0:
        assert m["filter_rounds"] == 0 and kept == [p for p in selection.positions if p[1] % 2 == 0]
    if max_extra == 3.0:
        assert len(kept) == target and m["filter_rounds"] >= 1  # enough even positions in 8 sequences to fill C again
    # NTP: every valid position but the kept ones (dropped positions are trained by NTP again).
    for b, ids in enumerate(batch.input_ids):
        for pos in range(1, len(ids)):
            assert bool(rl.ntp_mask[b, pos]) == ((b, pos) not in set(kept))


def test_filter_off_keeps_every_group(corpus, tiny_model_dir, monkeypatch):
    mixed_at_even_positions(monkeypatch)
    _, _, selection, rl = collect_once(corpus, tiny_model_dir, "rollout.filter_groups=false")
    assert rl.selection.positions == selection.positions and "filter_drawn" not in rl.metrics
    assert rl.metrics["informative_groups"] == sum(pos % 2 == 0 for _, pos in selection.positions)


def test_a_run_with_filtering_resumes_exactly(corpus, tmp_path, monkeypatch):
    mixed_at_even_positions(monkeypatch)

    def cfg(out):
        return load_config("rmt", [
            *corpus, f"output.dir={out}", "train.total_steps=4", "train.sequences_per_step=4", "rollout.group_size=3",
            "rollout.positions_per_batch=4", "budget.b0=6", "budget.answer_allowance=2", "rollout.max_response_tokens=16",
            "train.lr=1e-3", "train.save_every=2", "rollout.filter_groups=true", "rollout.filter_max_extra=2",
        ])

    straight = trainer.train(cfg(tmp_path / "a"))
    real_step = crash_on_third_step(monkeypatch)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainer.train(cfg(tmp_path / "b"))
    monkeypatch.setattr(trainer, "train_step", real_step)
    resumed = trainer.train(cfg(tmp_path / "b"))
    a, b = (load_file(str(Path(run) / "final" / "model.safetensors")) for run in (straight, resumed))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ma, mb = read_metrics(straight), read_metrics(resumed)
    keys = ("filter_drawn", "filter_dropped", "filter_kept", "tier_easy", "tier_hard", "loss", "generated_tokens")
    assert [[r[k] for k in keys] for r in ma] == [[r[k] for k in keys] for r in mb]
    assert any(r["filter_rounds"] > 0 for r in ma)  # extra positions were drawn, so the resume covers them
    assert [p.name for p in list_checkpoints(resumed)] == ["step-0000002", "step-0000004"]


def test_a_positions_rollouts_do_not_depend_on_the_positions_batched_with_it(corpus, tiny_model_dir):
    """The answer rule gives a position inside a value room to restate its written part: the batch generates under
    its longest, and each position keeps what its own cap and stop rule allow. So a position outside any value gets
    the same responses alone and beside a position inside a long word (the same with 1 or 2 processes)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = load_config("rmt", [*corpus, "budget.b0=2"])
    assert collect.reads_first_token(cfg) and cfg.prompt.skip_restatement
    seqs = load_scored(cfg.data.prepared_dir, "train").select(range(4))["input_ids"]
    tok = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    engine = collect.make_engine(cfg, AutoModelForCausalLM.from_pretrained(str(tiny_model_dir)), tok)
    decode = lambda ids: tok.decode(ids, clean_up_tokenization_spaces=False)  # noqa: E731
    written = {(b, pos): len(collect.written_part(cfg, list(seqs[b][:pos]), decode))
               for b in range(len(seqs)) for pos in range(8, len(seqs[b]))}
    outside = next(p for p, n in written.items() if n == 0)
    inside = next(p for p, n in written.items() if n >= 2)

    def responses(positions):
        out = collect.roll_out(cfg, engine, tok, seqs, positions, 2, 6, group_size=1, temperature=0.0, batch_size=8)
        return [[(r.token_ids, r.finish_reason) for r in g.responses] for g in out.groups]

    alone = responses([outside])[0]
    assert responses([outside, inside])[0] == alone
    assert responses([inside, outside])[1] == alone
    assert all(len(ids) <= 6 for ids, _ in alone)  # its own cap, not the batch's 6 + written part
