"""The RL set C and the NTP mask of a batch of corpus sequences (SPEC section 2, steps 3-4).

Position convention (shared with rmt.scoring): position ``pos`` of a sequence ``ids`` means predicting ``ids[pos]``
from the prefix ``ids[:pos]``; ``tiers[b, pos]`` is the tier of that prediction. Position 0 has no prefix.

- C: for each sequence, up to ``positions_per_sequence`` draws without replacement. One draw: a tier
  d ~ Categorical(p_t) renormalised over the tiers that still have candidates, then a position uniformly inside
  tier d. Candidates are valid (not padding) positions pos >= 1 whose tier is easy, medium or hard (never
  ntp_only; scoring makes every position before ``scoring.min_context`` ntp_only, so the tiers alone decide, as
  they do for the evaluation set). When every tier with candidates has probability 0, the sequence gives no (more)
  positions. An optional cap keeps a uniformly drawn subset of C.
- NTP mask m (B, L), by target position: m[b, pos] = 1 for valid pos >= 1 with (b, pos) not in C.

All randomness comes from the generator passed in (torch.Generator or numpy Generator): the same generator state
and inputs give the same C.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rmt.tiers import RL_TIERS

Generator = torch.Generator | np.random.Generator


@dataclass
class RLSelection:
    positions: list[tuple[int, int]]  # C as (sequence index, position), sorted
    tiers: list[int]  # the tier id of each position of C, same order
    ntp_mask: torch.Tensor | np.ndarray  # (B, L) bool, True where the NTP loss applies
    draw_index: list[int] | None = None  # index of each position in the global draw of C (None = 0, 1, ...)

    def tier_counts(self) -> dict[int, int]:
        return {t: self.tiers.count(t) for t in RL_TIERS}


def uniforms(generator: Generator, n: int) -> np.ndarray:
    """n floats in [0, 1) from either kind of generator (float64)."""
    if isinstance(generator, torch.Generator):
        return torch.rand(n, generator=generator, dtype=torch.float64).numpy()
    return generator.random(n)


def rl_candidates(tiers: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(B, L) bool: positions that may enter C (valid, an RL tier, pos >= 1: a prompt needs a prefix)."""
    candidates = np.isin(tiers, RL_TIERS) & valid
    candidates[:, :1] = False
    return candidates


def ntp_mask_for(valid: np.ndarray, positions: Sequence[tuple[int, int]]) -> np.ndarray:
    """(B, L) bool: valid target positions pos >= 1, minus the RL positions."""
    mask = valid.copy()
    mask[:, :1] = False
    for b, pos in positions:
        mask[b, pos] = False
    return mask


def sample_rl_set(
    tiers,
    probs: Sequence[float],
    generator: Generator,
    *,
    valid=None,
    positions_per_sequence: int = 1,
    max_positions: int | None = None,
) -> RLSelection:
    """Draw C and build the NTP mask (see the module docstring).

    ``tiers``: (B, L) tier ids (torch tensor or numpy array), or a list of per-sequence lists of different lengths
    (padded here; positions past a sequence's end are invalid). ``probs``: p_t over (easy, medium, hard).
    ``valid``: (B, L) bool, False at padding (None = all valid). ``max_positions``: cap on |C| for the batch
    (None = no cap). The NTP mask is a torch tensor when ``tiers`` is one, else a numpy array.
    """
    as_torch = isinstance(tiers, torch.Tensor)
    tier_ids, lengths_valid = _as_array(tiers)
    valid_mask = lengths_valid if valid is None else lengths_valid & _as_array(valid)[0].astype(bool)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.shape != (len(RL_TIERS),) or (probs < 0).any():
        raise ValueError(f"probs must be 3 non-negative numbers (easy, medium, hard), got {probs.tolist()}")

    candidates = rl_candidates(tier_ids, valid_mask)
    n_seq = tier_ids.shape[0]
    draws = uniforms(generator, n_seq * positions_per_sequence * 2).reshape(n_seq, positions_per_sequence, 2)
    chosen: list[tuple[int, int]] = []
    for b in range(n_seq):
        pools = [list(np.flatnonzero(candidates[b] & (tier_ids[b] == t))) for t in RL_TIERS]
        for u_tier, u_pos in draws[b]:
            weights = probs * np.array([len(pool) > 0 for pool in pools])
            if weights.sum() <= 0:
                break
            pool = pools[_categorical(weights, u_tier)]
            chosen.append((b, int(pool.pop(int(u_pos * len(pool))))))

    if max_positions is not None and len(chosen) > max_positions:
        keep = np.argsort(uniforms(generator, len(chosen)), kind="stable")[:max_positions]
        chosen = [chosen[i] for i in keep]
    chosen.sort()
    ntp_mask = ntp_mask_for(valid_mask, chosen)
    return RLSelection(
        positions=chosen,
        tiers=[int(tier_ids[b, pos]) for b, pos in chosen],
        ntp_mask=torch.from_numpy(ntp_mask) if as_torch else ntp_mask,
    )


def _categorical(weights: np.ndarray, u: float) -> int:
    """Index i with probability weights[i] / sum(weights), by inverting the CDF at u in [0, 1)."""
    cdf = np.cumsum(weights) / weights.sum()
    index = int(np.searchsorted(cdf, u, side="right"))
    return min(index, int(np.flatnonzero(weights > 0)[-1]))  # rounding in the last cdf entry


def _as_array(rows) -> tuple[np.ndarray, np.ndarray]:
    """(B, L) array and its validity (False past the end of a shorter row of a ragged list)."""
    if isinstance(rows, torch.Tensor):
        array = rows.detach().cpu().numpy()
        return array, np.ones(array.shape, dtype=bool)
    if isinstance(rows, np.ndarray):
        return rows, np.ones(rows.shape, dtype=bool)
    rows = [np.asarray(r) for r in rows]
    width = max((len(r) for r in rows), default=0)
    array = np.zeros((len(rows), width), dtype=rows[0].dtype if rows else np.int8)
    filled = np.zeros((len(rows), width), dtype=bool)
    for i, r in enumerate(rows):
        array[i, : len(r)] = r
        filled[i, : len(r)] = True
    return array, filled
