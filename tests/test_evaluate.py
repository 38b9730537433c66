"""`rmt eval`: statistics against reference computations, the fixed evaluation set, known-answer accuracy in both
modes (scripted model and engine), and an end-to-end comparison of two tiny models through a prepared, scored corpus."""

from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from conftest import PREFLIGHT_WARN

from rmt import evaluate as ev
from rmt import stats
from rmt.config import load_config
from rmt.evaluate import EvalItem, Outcome
from rmt.rollout import Group, Response, RolloutEngine
from rmt.tiers import EASY, HARD, MEDIUM, NTP_ONLY

# --- statistics ------------------------------------------------------------------------------------------------


def _wilson_reference(k, n, z=1.96):
    """The textbook formula, written out independently of the implementation."""
    p = k / n
    lo = (2 * n * p + z**2 - z * math.sqrt(z**2 + 4 * n * p * (1 - p))) / (2 * (n + z**2))
    hi = (2 * n * p + z**2 + z * math.sqrt(z**2 + 4 * n * p * (1 - p))) / (2 * (n + z**2))
    return lo, hi


def test_wilson_interval_matches_reference():
    lo, hi = stats.wilson_interval(8, 10)
    assert (lo, hi) == pytest.approx(_wilson_reference(8, 10), abs=1e-12)
    assert (lo, hi) == pytest.approx((0.4902, 0.9433), abs=1e-4)  # the published value for 8/10
    for k, n in [(0, 10), (10, 10), (1, 3), (57, 200), (199, 200)]:
        assert stats.wilson_interval(k, n) == pytest.approx(_wilson_reference(k, n), abs=1e-12)
    assert stats.wilson_interval(0, 10)[0] == 0.0 and stats.wilson_interval(10, 10)[1] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        stats.wilson_interval(3, 0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 500).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n))))
def test_wilson_contains_the_estimate(kn):
    k, n = kn
    lo, hi = stats.wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_pass_at_k_matches_combinatorial_formula():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                ref = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert stats.pass_at_k(n, c, k) == pytest.approx(ref, abs=1e-12)
    assert stats.pass_at_k(8, 2, 1) == pytest.approx(0.25)
    assert stats.pass_at_k(200, 0, 10) == 0.0 and stats.pass_at_k(200, 195, 10) == 1.0
    assert stats.pass_ks(8) == [1, 2, 4, 8] and stats.pass_ks(6) == [1, 2, 4, 6] and stats.pass_ks(1) == [1]


def test_relative_change_and_baseline_resolution():
    assert stats.relative_change(0.6, 0.5) == pytest.approx(0.2)
    assert stats.relative_change(0.4, 0.5) == pytest.approx(-0.2)
    assert stats.relative_change(0.4, 0.0) is None and stats.relative_change(None, 0.5) is None
    results = {"base/ntp": {"model": "base"}, "ntr": {"model": "base"}, "rmt/ntp": {"model": "rmt"}}
    assert ev.resolve_baseline(results, None) == "base/ntp"
    assert ev.resolve_baseline(results, "ntr") == "ntr"
    assert ev.resolve_baseline(results, "rmt") == "rmt/ntp"
    with pytest.raises(ValueError, match="neither"):
        ev.resolve_baseline(results, "nope")
    assert ev.row_label("base", "reasoning", ["reasoning"]) == "ntr"
    assert ev.row_label("base", "ntp", ["ntp", "reasoning"]) == "base/ntp"
    assert ev.row_label("rmt", "reasoning", ["reasoning"]) == "rmt"


def test_parse_model_specs():
    assert ev.parse_model_specs(["base=/m/a", "rmt = runs/rmt/final"]) == {"base": "/m/a", "rmt": "runs/rmt/final"}
    for bad in (["nopath"], ["=x"], ["a=x", "a=y"], ["a|b=x"]):
        with pytest.raises(ValueError):
            ev.parse_model_specs(bad)


# --- the evaluation set --------------------------------------------------------------------------------------


def test_draw_positions_is_seeded_and_respects_tiers():
    rng = np.random.default_rng(0)
    tiers = [rng.integers(0, 4, size=rng.integers(5, 40)).astype(np.int8) for _ in range(30)]
    a = ev.draw_positions(tiers, per_tier=10, seed=3)
    assert a == ev.draw_positions(tiers, per_tier=10, seed=3)
    assert a != ev.draw_positions(tiers, per_tier=10, seed=4)
    ids = {"easy": EASY, "medium": MEDIUM, "hard": HARD}
    for name, pairs in a.items():
        assert len(pairs) == 10 and len(set(pairs)) == 10 and pairs == sorted(pairs)
        assert all(tiers[r][p] == ids[name] for r, p in pairs)
    # A tier with fewer candidates gives all of them; ntp_only (e.g. before scoring.min_context) is never drawn.
    few = [np.array([NTP_ONLY] * 5 + [EASY, EASY, HARD], dtype=np.int8)]
    got = ev.draw_positions(few, per_tier=10, seed=0)
    assert got == {"easy": [(0, 5), (0, 6)], "medium": [], "hard": [(0, 7)]}


# --- known answers: summaries, NTP and reasoning -------------------------------------------------------------


def _item(tier, computed=0, row=0, pos=1, target=0):
    return EvalItem(row=row, pos=pos, tier=tier, computed=computed, target=target)


def test_summarize_known_counts():
    items = [_item("easy", 1), _item("easy", 0), _item("easy", 0), _item("easy", 1),
             _item("medium", 1), _item("medium", 0), _item("hard", 0)]
    exact = [1, 0, 1, 1, 0, 1, 0]
    res = ev.summarize(items, [Outcome(exact=[float(x)]) for x in exact], has_computed=True)
    easy, medium, hard = (res["tiers"][t] for t in ("easy", "medium", "hard"))
    assert (easy["n"], easy["correct"], easy["accuracy"]) == (4, 3, 0.75)
    assert easy["ci95"] == pytest.approx(list(_wilson_reference(3, 4)))
    assert medium["accuracy"] == 0.5 and hard["accuracy"] == 0.0
    assert res["average"] == pytest.approx((0.75 + 0.5 + 0.0) / 3)  # mean of tiers, not pooled (4/7)
    assert easy["computed"]["accuracy"] == 1.0 and easy["computed"]["n"] == 2
    assert easy["random"]["accuracy"] == 0.5 and hard["computed"]["n"] == 0 and hard["computed"]["accuracy"] is None
    assert res["overall"]["accuracy"] == pytest.approx(4 / 7)
    assert "think_len_mean" not in res and "prefix_accuracy" not in easy


def test_summarize_samples_gives_mean_accuracy_and_pass_at_k():
    items = [_item("easy"), _item("easy"), _item("hard")]
    samples = [[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]
    outs = [Outcome(exact=[float(x) for x in s], prefix=[float(x) for x in s], think=[2, 4, 6, 8],
                    malformed=[False] * 4, truncated=[False] * 4) for s in samples]
    res = ev.summarize(items, outs, has_computed=False)
    easy = res["tiers"]["easy"]
    assert easy["accuracy"] == pytest.approx((0.25 + 0.75) / 2)
    assert easy["ci95"] == pytest.approx(list(_wilson_reference(1.0, 2)))  # one count per position
    for k in (1, 2, 4):
        ref = np.mean([1 - math.comb(4 - c, k) / math.comb(4, k) for c in (1, 3)])
        assert easy["pass_at_k"][str(k)] == pytest.approx(ref)
    assert res["average_pass_at_k"]["1"] == pytest.approx(np.mean([0.5, 0.0]))  # the empty medium tier is skipped
    assert res["tiers"]["medium"]["accuracy"] is None and res["average"] == pytest.approx(0.25)
    assert res["think_len_mean"] == 5.0 and res["think_len_p90"] == pytest.approx(np.percentile([2, 4, 6, 8] * 3, 90))
    assert "computed" not in easy


class ShiftLM(torch.nn.Module):
    """A stand-in whose next-token prediction is (previous token + 1) mod V: known answers for NTP mode."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.forwards = 0

    def get_decoder(self):
        def decoder(input_ids, attention_mask):
            self.forwards += 1
            return SimpleNamespace(last_hidden_state=torch.nn.functional.one_hot((input_ids + 1) % self.vocab, self.vocab).float())

        return decoder

    def get_output_embeddings(self):
        return torch.nn.Identity()


def test_ntp_predictions_known_answers():
    sequences = {0: [5, 6, 7, 9, 10], 3: [1, 2, 4], 7: [8, 9, 10, 11, 12, 0, 1]}
    items = [EvalItem(0, 1, "easy", 0, 6), EvalItem(0, 3, "hard", 0, 9), EvalItem(3, 2, "medium", 1, 4),
             EvalItem(7, 5, "hard", 1, 0), EvalItem(7, 4, "easy", 0, 12), EvalItem(0, 4, "medium", 0, 10)]
    model = ShiftLM(13)
    preds = ev.ntp_predictions(model, sequences, items, batch_size=2)
    assert preds == [6, 8, 3, 0, 12, 10]
    assert model.forwards == 2  # 3 rows in batches of 2: one forward per row batch, not per position
    res = ev.summarize(items, ev.ntp_outcomes(preds, items), has_computed=True)
    assert [res["tiers"][t]["accuracy"] for t in ("easy", "medium", "hard")] == [1.0, 0.5, 0.5]
    assert ev.ntp_predictions(model, sequences, items[:1], batch_size=4, exclude_ids=[6]) != [6]


class ScriptEngine(RolloutEngine):
    """Returns scripted responses for each prompt (keyed by the prompt's ids) and records the calls."""

    def __init__(self, script: dict[tuple, list[Response]]):
        self.script, self.calls = script, []

    def generate_groups(self, prompts, group_size, max_new_tokens, *, stop, temperature=1.0, top_p=1.0, generator=None):
        self.calls.append((len(prompts), group_size, max_new_tokens, temperature))
        return [Group(list(p), self.script[tuple(p)][:group_size]) for p in prompts]


def test_reasoning_known_answers_exact_and_prefix(tiny_model_dir):
    from transformers import AutoTokenizer

    from rmt.prompts import build_prompt_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    close = tok.convert_tokens_to_ids("</think>")
    cfg = load_config(None, ["prompt.raw_answer=line", "eval.batch_size=2", "eval.budget=3", "eval.max_response_tokens=10"])
    # Five rows "<letter> 12+7=19;"; each item is the '1' of "19" (position 7), target token "1".
    sequences = {r: enc(f"{c} 12+7=19;") for r, c in enumerate("abcde")}
    pos = 7
    assert tok.decode([sequences[0][pos]]) == "1"
    tiers = ["easy", "easy", "medium", "hard", "hard"]
    items = [EvalItem(r, pos, tiers[r], int(r % 2 == 0), sequences[r][pos]) for r in range(5)]
    responses = [
        Response(enc("ab") + [close] + enc("19\n"), [0.0] * 6, "eos"),  # "19": prefix match (1, 9), not exact
        Response([close] + enc("1\n"), [0.0] * 3, "eos"),  # exact and prefix
        Response(enc("x") + [close] + enc("2\n"), [0.0] * 4, "eos"),  # wrong
        Response(enc("abab"), [0.0] * 4, "length"),  # never closes: malformed, truncated
        Response([close] + enc("19;\n"), [0.0] * 4, "eos"),  # three whole tokens: prefix match
    ]
    script = {tuple(build_prompt_ids(sequences[r][:pos], tok, cfg.prompt, 3)): [responses[r]] for r in range(5)}
    engine = ScriptEngine(script)
    outcomes, examples, cut = ev.reasoning_outcomes(cfg, engine, tok, sequences, items, budget=3)
    assert [o.exact for o in outcomes] == [[0.0], [1.0], [0.0], [0.0], [0.0]]
    assert [o.prefix for o in outcomes] == [[1.0], [1.0], [0.0], [0.0], [1.0]]
    assert [o.think for o in outcomes] == [[2], [0], [1], [4], [0]]
    assert [o.malformed for o in outcomes] == [[False], [False], [False], [True], [False]]
    assert cut == 0 and len(examples) == 3
    # Batches of two prompts, greedy, at the evaluation's one cap (eval.max_response_tokens), whatever the budget.
    assert engine.calls == [(2, 1, 10, 0.0), (2, 1, 10, 0.0), (1, 1, 10, 0.0)]

    res = ev.summarize(items, outcomes, has_computed=True)
    assert [res["tiers"][t]["accuracy"] for t in ("easy", "medium", "hard")] == [0.5, 0.0, 0.0]
    assert [res["tiers"][t]["prefix_accuracy"] for t in ("easy", "medium", "hard")] == [1.0, 0.0, 0.5]
    assert res["average"] == pytest.approx(0.5 / 3) and res["average_prefix"] == pytest.approx(0.5)
    assert res["malformed_frac"] == pytest.approx(0.2) and res["truncated_frac"] == pytest.approx(0.2)
    assert res["think_len_mean"] == pytest.approx(7 / 5)
    assert res["tiers"]["easy"]["computed"]["accuracy"] == 0.0 and res["tiers"]["easy"]["random"]["accuracy"] == 1.0


def test_reasoning_with_samples_passes_temperature_and_seed(tiny_model_dir):
    from transformers import AutoTokenizer

    from rmt.prompts import build_prompt_ids

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    close = tok.convert_tokens_to_ids("</think>")
    cfg = load_config(None, ["eval.samples=3", "eval.temperature=0.7", "budget.enabled=false", "rollout.max_response_tokens=9"])
    assert ev.eval_budget(cfg) is None
    seq = tok.encode("x 12+7=19;", add_special_tokens=False)
    item = EvalItem(0, 7, "hard", 1, seq[7])
    one, nine = tok.encode("19", add_special_tokens=False)
    script = {tuple(build_prompt_ids(seq[:7], tok, cfg.prompt, None)): [
        Response([close, one], [0.0, 0.0], "stop"), Response([close, nine], [0.0, 0.0], "stop"),
        Response([close, one], [0.0, 0.0], "stop")]}
    seen = {}

    class Recording(ScriptEngine):
        def generate_groups(self, prompts, group_size, max_new_tokens, **kw):
            seen.update(kw)
            return super().generate_groups(prompts, group_size, max_new_tokens, **kw)

    engine = Recording(script)
    outcomes, _, _ = ev.reasoning_outcomes(cfg, engine, tok, {0: seq}, [item], budget=None)
    assert outcomes[0].exact == [1.0, 0.0, 1.0]
    assert engine.calls == [(1, 3, 9, 0.7)] and isinstance(seen["generator"], torch.Generator)
    res = ev.summarize([item], outcomes, has_computed=True)
    assert res["tiers"]["hard"]["accuracy"] == pytest.approx(2 / 3)
    assert res["tiers"]["hard"]["pass_at_k"] == {"1": pytest.approx(2 / 3), "2": 1.0, "3": 1.0}
    # The run's final budget: B_T = floor(B_0 * gamma) = 160 with the paper's numbers; fixed B_0 without decay.
    assert ev.eval_budget(load_config(None, [])) == 160
    assert ev.eval_budget(load_config(None, ["budget.dynamic=false"])) == 800
    assert ev.eval_budget(load_config(None, ["eval.budget=7", "budget.enabled=false"])) == 7
    # a measured budget (auto) is known per run only: none is stated unless eval.budget says one
    assert ev.eval_budget(load_config(None, ["budget.b_min=auto"])) is None
    assert ev.eval_budget(load_config(None, ["budget.b_min=auto", "eval.budget=9"])) == 9


def test_table_has_one_row_per_model_and_relative_change():
    def row(model, mode, accs, think=None):
        items = [_item(t) for t in ("easy", "medium", "hard") for _ in range(4)]
        outs = [Outcome(exact=[float(i < round(4 * a))]) for a in accs for i in range(4)]
        res = ev.summarize(items, outs, has_computed=False)
        if think is not None:
            res.update(think_len_mean=think, think_len_p90=think + 2, malformed_frac=0.0)
        return {"model": model, "mode": mode, **res}

    results = {"base": row("base", "ntp", [0.5, 0.25, 0.25]), "ntr": row("base", "reasoning", [0.5, 0.5, 0.5], 12.0),
               "rmt": row("rmt", "reasoning", [0.75, 0.5, 0.5], 9.0)}
    ev.add_relative_changes(results, "base")
    assert results["rmt"]["relative_change"]["average"] == pytest.approx((1.75 / 3) / (1.0 / 3) - 1)
    assert results["rmt"]["relative_change"]["easy"] == pytest.approx(0.5)
    table = ev.format_table(results, "base")
    lines = table.splitlines()
    assert lines[0].startswith("| Method | Mode | Easy | Medium | Hard | Average")
    assert [ln.split("|")[1].strip() for ln in lines[2:5]] == ["base", "ntr", "rmt"]
    assert "(+75.0% vs base)" in lines[4] and "9.0 / 11" in lines[4]
    assert "| 50.0 [" in lines[2]


# --- end to end on the tiny model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_model_dir):
    """A prepared and scored tiny corpus with computed spans (the results of sums), tiered by quantiles."""
    from rmt.data.prepare import prepare_corpus
    from rmt.scoring import score_corpus

    tmp = tmp_path_factory.mktemp("eval_corpus")
    rng = random.Random(0)
    lines = []
    for _ in range(40):
        text, spans = "", []
        for _ in range(3):
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            text += f"{a}+{b}="
            spans.append([len(text), len(text) + len(str(a + b))])
            text += f"{a + b}; "
        lines.append(json.dumps({"text": text, "computed_spans": spans}))
    src = tmp / "c.jsonl"
    src.write_text("\n".join(lines) + "\n")
    overrides = [f"model.path={tiny_model_dir}", f"data.path={src}", f"data.prepared_dir={tmp / 'prep'}",
                 "data.seq_len=32", "data.eval_fraction=0.5", "scoring.tier_rule=quantile",
                 "scoring.quantiles=[0.2,0.5,0.8]", "eval.positions_per_tier=6", "eval.batch_size=4",
                 "eval.budget=3", "budget.answer_allowance=2", f"output.dir={tmp / 'run'}", PREFLIGHT_WARN,
                 # The random tiny model rarely closes its thinking: a small cap keeps reasoning mode to seconds.
                 "eval.max_response_tokens=24"]
    cfg = load_config(None, overrides)
    prepare_corpus(cfg)
    score_corpus(cfg)
    return cfg, overrides, tmp


def test_eval_set_is_fixed_and_rebuilt_only_when_its_identity_changes(scored):
    from rmt.scoring import load_scored

    cfg, overrides, tmp = scored
    path = tmp / "prep" / "eval_set.json"
    path.unlink(missing_ok=True)
    first = ev.load_eval_set(cfg)
    text = path.read_text()
    assert first["has_computed"] and first["counts"] == {"easy": 6, "medium": 6, "hard": 6}
    ds = load_scored(cfg.data.prepared_dir, "eval")
    for it in ev.eval_items(first):
        assert it.pos >= cfg.scoring.min_context
        assert ds[it.row]["input_ids"][it.pos] == it.target and ds[it.row]["computed"][it.pos] == it.computed
        assert ev.TIERS[ds[it.row]["tier"][it.pos] - 1] == it.tier
    mtime = path.stat().st_mtime_ns
    assert ev.load_eval_set(cfg) == first and path.stat().st_mtime_ns == mtime  # read back, not redrawn
    path.unlink()
    assert ev.load_eval_set(cfg) == first and path.read_text() == text  # drawn again: the same positions
    other = ev.load_eval_set(load_config(None, overrides + ["eval.seed=99"]))
    assert other["items"] != first["items"] and other["identity"]["seed"] == 99
    assert ev.load_eval_set(cfg) == first


@pytest.mark.slow
def test_end_to_end_two_models_both_modes_one_table(scored, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from conftest import build_tiny_model
    from rmt.report import write_report
    from rmt.scoring import load_scored

    cfg, overrides, tmp = scored
    other_dir = tmp_path / "other"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    build_tiny_model(other_dir, tok, seed=5)
    tok.save_pretrained(str(other_dir))
    out = tmp_path / "results.json"
    result = ev.evaluate(cfg, {"base": str(tiny_model_dir), "other": str(other_dir)}, out)

    assert list(result["results"]) == ["base/ntp", "ntr", "other/ntp", "other/reasoning"]
    assert result["baseline"] == "base/ntp" and result["settings"]["budget"] == 3
    saved = json.loads(out.read_text())
    assert saved["table_markdown"] == result["table_markdown"] and out.with_suffix(".md").is_file()
    rows = [ln for ln in result["table_markdown"].splitlines() if ln.startswith("| ") and not ln.startswith("| Method")]
    assert [r.split("|")[1].strip() for r in rows[:4]] == ["base/ntp", "ntr", "other/ntp", "other/reasoning"]
    for label, res in result["results"].items():
        assert [res["tiers"][t]["n"] for t in ev.TIERS] == [6, 6, 6]  # every row judged on the same positions
        assert set(res["relative_change"]) == {"easy", "medium", "hard", "average"}
        assert "computed" in res["tiers"]["hard"] and "random" in res["overall"]
    ntr = result["results"]["ntr"]
    assert ntr["think_len_mean"] is not None and 0.0 <= ntr["malformed_frac"] <= 1.0 and ntr["examples"]
    assert ntr["responses"] == 18

    # NTP accuracy equals a direct reference: a full forward per position, argmax without the thinking markers.
    ds = load_scored(cfg.data.prepared_dir, "eval")
    items = ev.eval_items(ev.load_eval_set(cfg))
    markers = tok.convert_tokens_to_ids(["<think>", "</think>"])
    for name, path in (("base", tiny_model_dir), ("other", other_dir)):
        model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        correct = {t: 0 for t in ev.TIERS}
        with torch.no_grad():
            for it in items:
                logits = model(torch.tensor([ds[it.row]["input_ids"][: it.pos]])).logits[0, -1]
                logits[markers] = -float("inf")
                correct[it.tier] += int(logits.argmax().item() == it.target)
        got = result["results"][f"{name}/ntp"]["tiers"]
        assert {t: got[t]["correct"] for t in ev.TIERS} == correct

    report = write_report([], tmp_path / "report", out)
    assert "Next-token accuracy by tier" in report.read_text() and (tmp_path / "report" / "accuracy_by_tier.png").is_file()


def test_cli_eval_writes_the_table(scored, tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from rmt.cli import app

    _cfg, overrides, _tmp = scored
    out = tmp_path / "cli.json"
    res = CliRunner().invoke(app, ["eval", "--model", f"base={tiny_model_dir}", "--mode", "ntp", "--out", str(out), *overrides])
    assert res.exit_code == 0, res.output
    data = json.loads(out.read_text())
    assert list(data["results"]) == ["base"] and data["settings"]["modes"] == ["ntp"]
    assert "| base | ntp |" in res.output
    bad = CliRunner().invoke(app, ["eval", "--model", "nopath", *overrides])
    assert bad.exit_code == 2 and "NAME=PATH" in bad.output


def test_paired_bootstrap_by_hand_and_its_laws():
    # identical rows: the difference and its interval are exactly 0
    same = np.array([[1, 0, 1, 1], [0, 0, 1, 0]])
    assert stats.paired_bootstrap(same, same) == {"diff": 0.0, "ci": [0.0, 0.0], "n": 8}
    # a constant difference of +1 at every position: every resample has it
    got = stats.paired_bootstrap(np.ones((2, 5)), np.zeros((2, 5)), n_boot=200)
    assert got["diff"] == 1.0 and got["ci"] == [1.0, 1.0]
    # one seed: half the positions +1, half 0 -> mean 0.5, interval around it, inside [0, 1]
    got = stats.paired_bootstrap(np.array([1, 1, 0, 0] * 25), np.zeros(100), n_boot=2000, seed=1)
    assert got["diff"] == 0.5 and 0.35 < got["ci"][0] < 0.5 < got["ci"][1] < 0.65
    # antisymmetric: swapping the rows flips the sign
    a, b = np.random.default_rng(0).integers(0, 2, (3, 40)), np.random.default_rng(1).integers(0, 2, (3, 40))
    ab, ba = stats.paired_bootstrap(a, b, seed=3), stats.paired_bootstrap(b, a, seed=3)
    assert ab["diff"] == -ba["diff"] and ab["ci"] == pytest.approx([-ba["ci"][1], -ba["ci"][0]])
    with pytest.raises(ValueError):
        stats.paired_bootstrap(np.ones(3), np.ones(4))
