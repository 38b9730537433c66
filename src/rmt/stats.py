"""Statistics of the evaluation, as pure functions: intervals, pass@k, relative change, paired bootstrap.

- Wilson score interval for a proportion k/n at z = 1.96: ``(p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)``.
  Unlike the normal approximation it stays inside [0, 1] and does not collapse to a point at p = 0 or 1.
- pass@k: the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)``.
- Relative change against a baseline: ``(value - baseline) / baseline``.
- Paired bootstrap of the difference between two rows scored on the same positions, over seeds and positions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def wilson_interval(k: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (k may be fractional, see the module docstring)."""
    if n <= 0:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= k <= n:
        raise ValueError(f"k must be within [0, n={n}], got {k}")
    p = k / n
    z2 = z * z
    denom = 1 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    # At p = 0 and p = 1 the bounds are exactly 0 and 1; rounding would put them a hair inside.
    lo = 0.0 if k == 0 else max(0.0, min(p, centre - half))
    hi = 1.0 if k == n else min(1.0, max(p, centre + half))
    return lo, hi


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for n samples with c correct: 1 - C(n-c, k) / C(n, k) (Chen et al., 2021)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"need 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    # C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), stable for large n.
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def relative_change(value: float | None, baseline: float | None) -> float | None:
    """(value - baseline) / baseline; None when either is missing or the baseline is 0."""
    if value is None or baseline is None or baseline == 0:
        return None
    return (value - baseline) / baseline


def pass_ks(samples: int) -> list[int]:
    """k = 1, 2, 4, ... up to ``samples``, and ``samples`` itself."""
    ks = [1 << i for i in range(samples.bit_length()) if 1 << i <= samples]
    return ks + ([samples] if ks[-1] != samples else [])


def accuracy_stats(scores: Sequence[Sequence[float]], z: float = 1.96) -> dict:
    """Accuracy of a group of positions, each with the 0/1 scores of its samples: n, correct, accuracy, ci95.

    ``correct`` is the sum over positions of their mean score (an integer count when there is one sample).
    """
    n = len(scores)
    if n == 0:
        return {"n": 0, "correct": 0, "accuracy": None, "ci95": None}
    means = [float(np.mean(s)) for s in scores]
    k = float(sum(means))
    k = int(k) if all(len(s) == 1 for s in scores) else round(k, 6)
    lo, hi = wilson_interval(min(k, n), n, z)
    return {"n": n, "correct": k, "accuracy": k / n, "ci95": [lo, hi]}


def paired_bootstrap(a, b, n_boot: int = 10_000, seed: int = 0, level: float = 0.95) -> dict:
    """Mean paired difference a - b and its percentile bootstrap interval.

    ``a``, ``b``: scores of two rows on the same positions, shape (seeds, positions) (or (positions,) for one
    seed). Each bootstrap sample draws seeds with replacement, then positions with replacement (the same positions
    for both rows: the pairing), and takes the mean difference. Returns ``diff``, ``ci`` ([lo, hi]) and ``n``
    (seeds x positions).
    """
    a, b = np.atleast_2d(np.asarray(a, dtype=np.float64)), np.atleast_2d(np.asarray(b, dtype=np.float64))
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired scores need the same non-empty shape, got {a.shape} and {b.shape}")
    d = a - b
    n_seeds, n_pos = d.shape
    rng = np.random.default_rng(seed)
    seeds = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    pos = rng.integers(0, n_pos, size=(n_boot, n_seeds, n_pos))
    means = d[seeds[:, :, None], pos].mean(axis=(1, 2))
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return {"diff": float(d.mean()), "ci": [float(lo), float(hi)], "n": int(d.size)}


def mean_of(values: Sequence[float | None]) -> float | None:
    """Mean of the values present (None when none is)."""
    present = [v for v in values if v is not None]
    return float(np.mean(present)) if present else None
