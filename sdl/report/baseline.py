"""What random selection would have found: the best of ``n`` draws from a known pool.

Why: "best so far = 0.31 eV after 32 experiments" means little until it sits beside what 32 random
picks from the same pool would give. For a pool of ``N`` known values, drawing ``n`` without
replacement, the best draw is the ``k``-th smallest utility with probability
``C(k-1, n-1) / C(N, n)`` (order statistics), so the expectation and any quantile are exact and
need no simulation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from math import lgamma

import numpy as np

__all__ = ["RandomBaseline", "random_best_of_n"]


@dataclass(frozen=True)
class RandomBaseline:
    """Best value of ``n`` random draws, for ``n = 1 .. len(mean)`` (in the objective's units).

    Attributes:
        mean: Expected best value after ``n`` draws (``[n_max]``).
        low: Lower quantile of the best value (``[n_max]``), ``quantiles[0]`` of the utility.
        high: Upper quantile (``[n_max]``), ``quantiles[1]`` of the utility.
        quantiles: The two utility quantiles of the band (e.g. 0.1 and 0.9).
        pool_size: ``N``.
    """

    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    quantiles: tuple[float, float]
    pool_size: int


def _log_comb(n: np.ndarray, k: np.ndarray) -> np.ndarray:
    """``log C(n, k)``, ``-inf`` where ``k > n`` or ``k < 0``."""
    out = np.full(np.broadcast(n, k).shape, -np.inf)
    n_b, k_b = np.broadcast_arrays(n, k)
    ok = (k_b >= 0) & (k_b <= n_b)
    lg = np.vectorize(lgamma, otypes=[float])
    out[ok] = lg(n_b[ok] + 1.0) - lg(k_b[ok] + 1.0) - lg(n_b[ok] - k_b[ok] + 1.0)
    return out


def random_best_of_n(
    values: Sequence[float] | np.ndarray,
    goal: str,
    n_max: int,
    quantiles: tuple[float, float] = (0.1, 0.9),
) -> RandomBaseline | None:
    """Expected best value, and a quantile band, of ``n`` random picks without replacement.

    Args:
        values: The pool's true values (NaN ignored), e.g. a simulated world's recorded values.
        goal: ``maximize`` or ``minimize``; a target range has no single "best" direction here.
        n_max: Largest ``n`` (clipped to the pool size).
        quantiles: Band edges as utility quantiles (``0.1, 0.9``: 80 % of random campaigns fall inside).

    Returns:
        The baseline for ``n = 1 .. min(n_max, N)``, or None when the goal has no direction or the
        pool is empty.
    """
    if goal not in ("maximize", "minimize"):
        return None
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    size = int(arr.size)
    n_max = min(int(n_max), size)
    if size == 0 or n_max < 1:
        return None
    sign = 1.0 if goal == "maximize" else -1.0
    utility = np.sort(sign * arr)  # ascending: u_1 <= ... <= u_N
    k = np.arange(1, size + 1, dtype=float)[None, :]
    n = np.arange(1, n_max + 1, dtype=float)[:, None]
    # P(best of n is the k-th smallest) = C(k-1, n-1) / C(N, n); rows sum to 1.
    weights = np.exp(_log_comb(k - 1.0, n - 1.0) - _log_comb(np.full_like(n, float(size)), n))
    weights /= weights.sum(axis=1, keepdims=True)
    mean = weights @ utility
    cdf = np.cumsum(weights, axis=1)

    def quantile(q: float) -> np.ndarray:
        index = np.minimum((cdf < q - 1e-12).sum(axis=1), size - 1)
        return np.asarray(utility[index], dtype=float)

    lo, hi = quantile(quantiles[0]), quantile(quantiles[1])
    if sign > 0:
        return RandomBaseline(mean, lo, hi, quantiles, size)
    return RandomBaseline(-mean, -hi, -lo, quantiles, size)  # back to values: low stays the smaller value
