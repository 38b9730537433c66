import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rmt.sampling import rl_candidates, sample_rl_set
from rmt.tiers import EASY, HARD, MEDIUM, NTP_ONLY

P = (0.6, 0.3, 0.1)


def _check(selection, tiers, valid, per_seq):
    """Invariants of every draw: only RL tiers, pos >= 1, valid, distinct, at most per_seq per sequence, and the NTP
    mask is exactly valid & pos >= 1 & not in C."""
    positions = selection.positions
    assert len(set(positions)) == len(positions) and positions == sorted(positions)
    for (b, pos), tier in zip(positions, selection.tiers):
        assert tiers[b, pos] == tier != NTP_ONLY
        assert pos >= 1 and valid[b, pos]
    counts = np.bincount([b for b, _ in positions], minlength=tiers.shape[0])
    assert (counts <= per_seq).all()
    expected = np.asarray(valid, dtype=bool).copy()
    expected[:, 0] = False
    for b, pos in positions:
        expected[b, pos] = False
    assert np.array_equal(np.asarray(selection.ntp_mask), expected)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 5), st.integers(1, 20), st.integers(1, 4), st.integers(0, 2**32 - 1),
    st.lists(st.floats(0, 1), min_size=3, max_size=3).filter(lambda p: sum(p) > 0),
)
def test_draws_respect_every_rule(n_seq, length, per_seq, seed, probs):
    rng = np.random.default_rng(seed)
    tiers = rng.integers(0, 4, size=(n_seq, length)).astype(np.int8)
    valid = rng.random((n_seq, length)) > 0.2
    selection = sample_rl_set(
        tiers, probs, np.random.default_rng(seed), valid=valid, positions_per_sequence=per_seq
    )
    _check(selection, tiers, valid, per_seq)
    # a sequence stops early only when the tiers it has left all have probability 0
    candidates = rl_candidates(tiers, valid)
    for b in range(n_seq):
        taken = sum(1 for s, _ in selection.positions if s == b)
        if taken < per_seq:
            left = candidates[b].copy()
            left[[p for s, p in selection.positions if s == b]] = False
            assert all(probs[t - 1] == 0 for t in np.unique(tiers[b][left]))


def test_renormalises_over_non_empty_tiers():
    tiers = np.array([[NTP_ONLY, EASY, HARD, HARD, HARD, NTP_ONLY]] * 50, dtype=np.int8)
    hard_only = tiers.copy()
    hard_only[:, 1] = NTP_ONLY
    sel = sample_rl_set(hard_only, (0.98, 0.01, 0.01), np.random.default_rng(0))  # only hard is present
    assert len(sel.positions) == 50 and set(sel.tiers) == {HARD}
    sel = sample_rl_set(tiers, (0.0, 1.0, 0.0), np.random.default_rng(0))  # present tiers all have probability 0
    assert sel.positions == [] and sel.ntp_mask[:, 1:].all()
    sel = sample_rl_set(tiers, (1.0, 0.0, 0.0), np.random.default_rng(0), positions_per_sequence=3)
    assert sel.positions == [(b, 1) for b in range(50)]  # the only easy position; the hard ones have p = 0


def test_the_tiers_alone_decide_and_no_candidates():
    tiers = np.full((3, 8), HARD, dtype=np.int8)
    tiers[:, :5] = NTP_ONLY  # what scoring.min_context=5 makes of the first five positions
    sel = sample_rl_set(tiers, P, np.random.default_rng(1), positions_per_sequence=8)
    assert sorted(p for _, p in sel.positions) == [5, 5, 5, 6, 6, 6, 7, 7, 7]  # without replacement: all of them
    sel = sample_rl_set(np.full((1, 4), EASY, dtype=np.int8), P, np.random.default_rng(1), positions_per_sequence=8)
    assert sel.positions == [(0, 1), (0, 2), (0, 3)]  # never position 0, whatever its tier: a prompt needs a prefix
    sel = sample_rl_set(np.zeros((2, 5), dtype=np.int8), P, np.random.default_rng(1))
    assert sel.positions == [] and sel.ntp_mask.sum() == 2 * 4


def test_same_seed_same_set_for_both_generator_kinds():
    rng = np.random.default_rng(7)
    tiers = torch.from_numpy(rng.integers(0, 4, size=(16, 40)).astype(np.int8))
    kwargs = dict(positions_per_sequence=3)
    a = sample_rl_set(tiers, P, torch.Generator().manual_seed(3), **kwargs)
    b = sample_rl_set(tiers, P, torch.Generator().manual_seed(3), **kwargs)
    c = sample_rl_set(tiers, P, torch.Generator().manual_seed(4), **kwargs)
    assert a.positions == b.positions and a.positions != c.positions
    assert isinstance(a.ntp_mask, torch.Tensor) and a.ntp_mask.dtype == torch.bool
    assert torch.equal(a.ntp_mask, b.ntp_mask)
    n1 = sample_rl_set(tiers.numpy(), P, np.random.default_rng(3), **kwargs)
    n2 = sample_rl_set(tiers.numpy(), P, np.random.default_rng(3), **kwargs)
    assert n1.positions == n2.positions and isinstance(n1.ntp_mask, np.ndarray)


def test_cap_keeps_a_subset():
    tiers = np.random.default_rng(0).integers(1, 4, size=(20, 30)).astype(np.int8)
    full = sample_rl_set(tiers, P, np.random.default_rng(5), positions_per_sequence=2)
    capped = sample_rl_set(tiers, P, np.random.default_rng(5), positions_per_sequence=2, max_positions=7)
    assert len(full.positions) == 40 and len(capped.positions) == 7
    assert set(capped.positions) <= set(full.positions)
    _check(capped, tiers, np.ones_like(tiers, dtype=bool), 2)


def test_ragged_sequences():
    tiers = [[0, 1, 2, 3], [0, 3], [0, 1, 1, 1, 1, 2]]
    sel = sample_rl_set(tiers, (1 / 3,) * 3, np.random.default_rng(0), positions_per_sequence=10)
    assert sorted(sel.positions) == [(0, 1), (0, 2), (0, 3), (1, 1), (2, 1), (2, 2), (2, 3), (2, 4), (2, 5)]
    assert sel.ntp_mask.shape == (3, 6) and not sel.ntp_mask.any()


def test_empirical_tier_frequencies_match_p_t():
    # every sequence has 5 positions of each tier; one draw per sequence
    rng = np.random.default_rng(11)
    tiers = np.stack([rng.permutation(np.repeat([EASY, MEDIUM, HARD], 5)) for _ in range(6000)]).astype(np.int8)
    tiers = np.concatenate([np.zeros((6000, 1), dtype=np.int8), tiers], axis=1)
    sel = sample_rl_set(tiers, P, torch.Generator().manual_seed(0))
    freqs = np.bincount(sel.tiers, minlength=4)[1:] / len(sel.tiers)
    assert np.abs(freqs - np.array(P)).max() < 0.03  # 5 standard errors at n = 6000, and the seed is fixed
    # uniform inside a tier: every easy slot of the first sequence pattern gets picked about equally often
    slots = [int((tiers[b] == EASY)[: pos + 1].sum()) - 1 for (b, pos), t in zip(sel.positions, sel.tiers) if t == EASY]
    slot_freqs = np.bincount(slots, minlength=5) / len(slots)
    assert np.abs(slot_freqs - 0.2).max() < 0.04


def test_bad_probs():
    with pytest.raises(ValueError):
        sample_rl_set(np.ones((1, 4), dtype=np.int8), (0.5, 0.5), np.random.default_rng(0))
    with pytest.raises(ValueError):
        sample_rl_set(np.ones((1, 4), dtype=np.int8), (-0.5, 1.0, 0.5), np.random.default_rng(0))
