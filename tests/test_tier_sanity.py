"""What `rmt score` says about its tiers (rmt/tier_sanity.py): top tokens and decoded examples per tier, and
warnings with suggestions when the tiers cannot mean what RMT needs."""

import numpy as np
import pytest
from conftest import text_corpus

from rmt import tier_sanity as ts
from rmt.config import load_config
from rmt.data.prepare import prepare_corpus
from rmt.scoring import format_summary, score_corpus


def test_histogram_quantiles_by_hand():
    # values binned at 0.5: one in [0, 0.5), one in [0.5, 1), two in [1, 1.5); cumulative 1, 2, 4 of 4
    assert ts.histogram_quantiles(np.array([1, 1, 2]), 0.5, [0.25, 0.5, 0.75, 1.0]) == [0.5, 1.0, 1.5, 1.5]
    assert ts.histogram_quantiles(np.zeros(3), 0.5, [0.5]) == []
    assert ts.median_from_histogram(np.array([0, 0, 5, 0]), 0.25) == 0.75


KW = dict(tier_rule="fixed", thresholds=(0.5, 1.0, 1.5), suggested=[4.5, 4.9, 5.2], median_entropy=4.9,
          max_entropy=np.log(50_000), eval_per_tier=100)


def test_the_issues_corpus_gets_warnings_and_numbers_to_try():
    # the counts of the own-corpus report: 88% hard, 1.5% easy, 0.4% medium of all positions
    counts = {"ntp_only": 10_100, "easy": 1_500, "medium": 400, "hard": 88_000}
    warnings = ts.tier_warnings(counts, {"easy": 100, "medium": 30, "hard": 5000}, {}, **KW)
    text = "\n".join(warnings)
    assert "the hard tier holds 98% of the RL positions" in text
    assert "the medium tier is nearly empty (400 positions, 0.4%" in text and "the easy tier is nearly empty" in text
    assert "scoring.tier_rule=quantile" in text and "scoring.thresholds=[4.5,4.9,5.2]" in text
    assert "fewer positions than eval.positions_per_tier=100 in some tiers (medium 30)" in text


def test_one_token_filling_a_tier_is_named():
    counts = {"easy": 100, "medium": 100, "hard": 100}
    tops = {"easy": [("=", 90), ("-", 5)], "medium": [("a", 20)], "hard": [("x", 10)]}
    warnings = ts.tier_warnings(counts, None, tops, **KW)
    assert warnings == ["one token, '=', is 90% of the easy tier: its accuracy measures that token, not the tier "
                        "(see the examples above)"]
    # too few positions to judge: no warning
    assert ts.tier_warnings({"easy": 10, "medium": 10, "hard": 10}, None, {"easy": [("=", 10)]}, **KW) == []


def test_narrow_quantiles_and_near_uniform_entropy_are_named():
    counts = {"easy": 100, "medium": 100, "hard": 100}
    w = ts.tier_warnings(counts, None, {}, **{**KW, "tier_rule": "quantile", "thresholds": (4.75, 4.9, 5.09)})
    assert len(w) == 1 and "within 0.34 nats (4.75-5.09)" in w[0]
    w = ts.tier_warnings(counts, None, {}, **{**KW, "median_entropy": 9.0, "max_entropy": 10.0})
    assert len(w) == 1 and "uniform guess" in w[0] and "scoring.reference_model" in w[0]
    assert ts.tier_warnings({"ntp_only": 5}, None, {}, **KW)[0].startswith("no position is in an RL tier")


def test_balanced_tiers_get_no_warning():
    assert ts.tier_warnings({"easy": 300, "medium": 300, "hard": 400}, {"easy": 100, "medium": 100, "hard": 100},
                            {"easy": [("a", 30)]}, **KW) == []


def test_examples_show_the_token_in_context():
    decode = lambda ids: "".join("\n" if i == 0 else chr(96 + i) for i in ids)  # noqa: E731
    assert ts.show_example([1, 2, 0, 3, 4, 5], 3, decode, before=2, after=1) == "…b\\n⟦c⟧d…"
    assert ts.top_tokens(np.array([0, 5, 2, 5]), lambda ids: str(ids[0]), k=2) == [["1", 5], ["3", 5]]
    rows = [np.array([0, 1, 1, 3]), np.array([2, 0])]
    drawn = ts.draw_examples(rows, 5, seed=0)
    assert drawn == {"easy": [(0, 1), (0, 2)], "medium": [(1, 0)], "hard": [(0, 3)]}


def test_rmt_score_shows_what_each_tier_holds_and_warns(tmp_path, tiny_model_dir):
    # the random tiny model finds every position about equally hard (~ln V): fixed thresholds put all in `hard`
    cfg = load_config(None, [*text_corpus(tmp_path, tiny_model_dir), "eval.positions_per_tier=50"])
    prepare_corpus(cfg)
    summary = score_corpus(cfg)
    sanity = summary["sanity"]
    assert len(sanity["examples"]["hard"]) == ts.EXAMPLES_PER_TIER and all("⟦" in e for e in sanity["examples"]["hard"])
    assert sanity["examples"]["easy"] == [] and sanity["top_tokens"]["hard"][0][1] > 0
    text = "\n".join(sanity["warnings"])
    assert "the hard tier holds 100% of the RL positions" in text and "try scoring.tier_rule=quantile" in text
    assert "the easy tier is empty: no position to train on or to evaluate there" in text
    assert "uniform guess" in text
    out = format_summary(summary)
    assert "what each tier holds" in out and out.splitlines()[-1].startswith("warning: ")
    # quantile tiers on the same scores: the tiers fill, the narrow boundaries are named
    summary = score_corpus(load_config(None, [*text_corpus(tmp_path, tiny_model_dir), "scoring.tier_rule=quantile"]))
    assert all(summary["sanity"]["examples"][t] for t in ("easy", "medium", "hard"))
    assert any("quantile boundaries lie within" in w for w in summary["sanity"]["warnings"])


@pytest.mark.parametrize("share", [0.81, 0.95])
def test_dominance_threshold(share):
    n = 1000
    counts = {"easy": int(n * (1 - share)) // 2 + 50, "medium": int(n * (1 - share)) // 2 + 50, "hard": int(n * share)}
    assert any("hard tier holds" in w for w in ts.tier_warnings(counts, None, {}, **KW)) == (
        counts["hard"] / sum(counts.values()) > ts.DOMINANT_SHARE)
